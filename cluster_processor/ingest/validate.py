"""Pure checks of one incoming batch: bytes -> FlowBatch -> verdict. No I/O, no logging, no raising on
bad input: the server adapter turns a verdict into a gRPC status and counters.

Two kinds of problem, two answers. A batch-level problem (undecodable bytes, an unknown schema version,
no node name, too many records, L4 columns of the wrong length or with a string index past the string
table) rejects the whole batch with a status the client will not retry. A bad
record (a port above 65535, an address that does not parse, an L7 summary whose counts disagree) is
skipped and counted, and the rest of the
batch is accepted: one agent bug must not cost a node all its data (OTLP "partial success").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import grpc
from google.protobuf.message import DecodeError

from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import COLUMNS, STRING_COLUMNS, take
from kscope_common.latency import LATENCY_BUCKETS

SCHEMA_VERSIONS = (1, 2)  # 1: L4 records as rows only; 2: also as columns
MAX_PORT = 65535
# A Kubernetes node name is a DNS subdomain: at most 253 characters.
MAX_NODE_NAME = 253


@dataclass(frozen=True, slots=True)
class Limits:
    max_records: int = 50_000  # l4 + l7 records in one batch (columnar L4 records included)
    max_problems_reported: int = 5  # record problems quoted in the response's error_message


@dataclass(frozen=True, slots=True)
class Rejection:
    """The whole batch is refused. ``reason`` is a stable counter suffix; ``message`` is for the client."""

    code: grpc.StatusCode
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The batch is accepted, minus ``rejected`` bad records. ``batch`` holds only the good records
    (the request object itself when nothing was removed, so the common case copies nothing)."""

    batch: pb.FlowBatch
    accepted: int
    rejected: int
    problems: tuple[str, ...]  # the first few record problems, e.g. "l4[3]: local_port 70000 > 65535"

    @property
    def error_message(self) -> str:
        if not self.rejected:
            return ""
        more = self.rejected - len(self.problems)
        tail = f"; and {more} more" if more > 0 else ""
        return f"{self.rejected} invalid record(s) skipped: " + "; ".join(self.problems) + tail


def decode(raw: bytes) -> pb.FlowBatch | Rejection:
    try:
        return pb.FlowBatch.FromString(raw)
    except DecodeError as exc:
        return Rejection(
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed",
            f"request body is not a kscope.v1.FlowBatch protobuf ({len(raw)} bytes): {exc}",
        )


def record_count(batch: pb.FlowBatch) -> int:
    return len(batch.l4) + len(batch.l7) + int(batch.l4_columns.count)


def validate(batch: pb.FlowBatch, limits: Limits) -> Verdict | Rejection:
    rejection = _check_envelope(batch, limits)
    if rejection is not None:
        return rejection
    problems: list[str] = []
    bad_l4 = _bad_indices("l4", batch.l4, problems)
    bad_columns = _bad_column_indices(batch.l4_columns, problems) if batch.HasField("l4_columns") else []
    bad_l7 = _bad_indices("l7", batch.l7, problems)
    rejected = len(bad_l4) + len(bad_columns) + len(bad_l7)
    accepted = record_count(batch) - rejected
    shown = tuple(problems[: limits.max_problems_reported])
    if not rejected:
        return Verdict(batch, accepted, 0, ())
    clean = pb.FlowBatch(
        schema_version=batch.schema_version, node_name=batch.node_name, time_unix_nano=batch.time_unix_nano
    )
    if batch.HasField("stats"):
        clean.stats.CopyFrom(batch.stats)
    clean.l4.extend(r for i, r in enumerate(batch.l4) if i not in bad_l4)
    if batch.HasField("l4_columns"):
        skip = set(bad_columns)
        clean.l4_columns.CopyFrom(take(batch.l4_columns, [i for i in range(batch.l4_columns.count) if i not in skip]))
    clean.l7.extend(r for i, r in enumerate(batch.l7) if i not in bad_l7)
    return Verdict(clean, accepted, rejected, shown)


def _check_envelope(batch: pb.FlowBatch, limits: Limits) -> Rejection | None:
    if batch.schema_version not in SCHEMA_VERSIONS:
        got = "missing (0)" if batch.schema_version == 0 else str(batch.schema_version)
        return Rejection(
            grpc.StatusCode.INVALID_ARGUMENT,
            "schema_version",
            f"unsupported schema_version {got}: this processor accepts kscope.v1 schema_version "
            + " and ".join(map(str, SCHEMA_VERSIONS)),
        )
    if not batch.node_name:
        return Rejection(grpc.StatusCode.INVALID_ARGUMENT, "node_name", "node_name is required (the reporting node)")
    if len(batch.node_name) > MAX_NODE_NAME:
        return Rejection(
            grpc.StatusCode.INVALID_ARGUMENT,
            "node_name",
            f"node_name is {len(batch.node_name)} characters; a node name has at most {MAX_NODE_NAME}",
        )
    n = record_count(batch)
    if n > limits.max_records:
        # The same code gRPC gives an over-size message: a limit, and (without RetryInfo) not retryable,
        # because resending the same batch can only fail the same way.
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_many_records",
            f"batch holds {n} records; the limit is {limits.max_records} per batch: send smaller batches",
        )
    if batch.HasField("l4_columns"):
        return _check_columns(batch, limits)
    return None


def _columns_invalid(message: str) -> Rejection:
    return Rejection(grpc.StatusCode.INVALID_ARGUMENT, "columns", message)


def _check_columns(batch: pb.FlowBatch, limits: Limits) -> Rejection | None:
    """The shape of ``l4_columns``: one form of L4 records per batch, every column empty or one value
    per record, every string index inside the string table. A batch that fails cannot be split into
    good and bad records (which value belongs to which record is unknown): it is refused whole."""
    if batch.schema_version < 2:
        return _columns_invalid("l4_columns needs schema_version 2 (this batch says 1)")
    if batch.l4:
        return _columns_invalid("a batch carries its L4 records as l4 rows or as l4_columns, not both")
    cols = batch.l4_columns
    n = cols.count
    strings = cols.strings
    # Each record can bring at most one new string per string column: more is padding, not data.
    most = 1 + len(STRING_COLUMNS) * n
    if len(strings) > most:
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_many_strings",
            f"l4_columns.strings holds {len(strings)} strings; {n} records can use at most {most}",
        )
    if strings and strings[0] != "":
        return _columns_invalid(f"l4_columns.strings[0] must be the empty string, not {_quote(strings[0])}")
    n_strings = max(len(strings), 1)  # index 0 is "" even when the table is empty
    for name in COLUMNS:
        column = getattr(cols, name)
        if not column:
            continue
        if len(column) != n:
            return _columns_invalid(
                f"l4_columns.{name} holds {len(column)} values for {n} records: a column is empty or holds"
                " one value per record"
            )
        if name in STRING_COLUMNS and max(column) >= n_strings:
            i = next(i for i, v in enumerate(column) if v >= n_strings)
            table = f"the string table ({len(strings)} strings)"
            return _columns_invalid(f"l4_columns.{name}[{i}] is string index {column[i]}, outside {table}")
    return None


def _bad_indices(kind: str, records: Iterable[pb.L4Flow | pb.L7Request], problems: list[str]) -> set[int]:
    bad: set[int] = set()
    l7 = kind == "l7"
    for i, rec in enumerate(records):
        problem = record_problem(rec.local_ip, rec.local_port, rec.remote_ip, rec.remote_port, rec.ip_family)
        if problem is None and l7 and rec.HasField("summary"):
            problem = summary_problem(rec.summary, rec.latency_ns)
        if problem is not None:
            bad.add(i)
            problems.append(f"{kind}[{i}]: {problem}")
    return bad


def _bad_column_indices(cols: pb.L4Columns, problems: list[str]) -> list[int]:
    """``_bad_indices`` of columnar records (shape already checked): whole-column checks first, each
    distinct address parsed once; the record-by-record pass only when one of them fails."""
    strings = cols.strings
    local_port, remote_port, family = cols.local_port, cols.remote_port, cols.ip_family
    families = set(family) if family else {0}
    addresses = (set(cols.local_ip) or {0}) | (set(cols.remote_ip) or {0})
    versions = {_ip_version(strings[i] if i else "") for i in addresses}
    if (
        (not local_port or max(local_port) <= MAX_PORT)
        and (not remote_port or max(remote_port) <= MAX_PORT)
        and families <= {4, 6}
        and 0 not in versions
        and not (4 in families and 6 in versions)
    ):
        return []
    n = cols.count

    def column(values: Sequence[int]) -> Sequence[int]:
        return values or [0] * n

    def text(i: int) -> str:
        return strings[i] if i else ""

    bad: list[int] = []
    ends = zip(column(cols.local_ip), column(local_port), column(cols.remote_ip), column(remote_port), strict=True)
    for i, ((lip, lport, rip, rport), fam) in enumerate(zip(ends, column(family), strict=True)):
        problem = record_problem(text(lip), lport, text(rip), rport, fam)
        if problem is not None:
            bad.append(i)
            problems.append(f"l4[{i}]: {problem}")
    return bad


def record_problem(local_ip: str, local_port: int, remote_ip: str, remote_port: int, family: int) -> str | None:
    """What is wrong with one record's endpoints, or None. Shared by L4 flows and L7 requests, which carry
    the same five-tuple fields."""
    for name, port in (("local_port", local_port), ("remote_port", remote_port)):
        if port > MAX_PORT:
            return f"{name} {port} > {MAX_PORT}"
    if family not in (4, 6):
        return f"ip_family {family} is neither 4 nor 6"
    versions: list[int] = []
    for name, text in (("local_ip", local_ip), ("remote_ip", remote_ip)):
        version = _ip_version(text)
        if version == 0:
            return f"{name} {_quote(text)} is not an IP address"
        versions.append(version)
    # Family 6 may carry IPv4 text (an IPv4-mapped peer of an IPv6 socket); family 4 never carries IPv6.
    if family == 4 and 6 in versions:
        return "ip_family 4 with an IPv6 address"
    return None


def summary_problem(s: pb.L7Summary, latency_ns: int = 0) -> str | None:
    """What is wrong with an L7 summary (``latency_ns``: its record's), or None. A bad one would put
    requests in the wrong buckets or counts that disagree into the RED histograms and the service
    graph, so the record is skipped."""
    if latency_ns:
        # kscope.v1: 0 on a summary (the sum is latency_sum_ns); the aggregator looks for a summary only then
        return f"summary with latency_ns {latency_ns}: a summary's is 0, its sum is summary.latency_sum_ns"
    n = s.count
    if n == 0:
        return "summary.count 0 (a summary sums at least one request)"
    buckets = s.latency_bucket_counts
    if len(buckets) != LATENCY_BUCKETS:
        return f"summary has {len(buckets)} latency_bucket_counts; kscope.v1 has {LATENCY_BUCKETS}"
    total = sum(buckets)
    if total != n:
        return f"summary latency_bucket_counts sum to {total}, count is {n}"
    if s.latency_min_ns > s.latency_max_ns:
        return f"summary latency_min_ns {s.latency_min_ns} > latency_max_ns {s.latency_max_ns}"
    return None


@lru_cache(maxsize=65_536)
def _ip_version(text: str) -> int:
    # Cached because the same few addresses repeat across every record of a node; bounded so a client
    # sending random strings cannot grow it.
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


def _quote(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
