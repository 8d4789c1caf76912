"""The pure batch checks, driven directly: no server."""

from __future__ import annotations

import grpc
import pytest

from cluster_processor.ingest.validate import Limits, Rejection, Verdict, decode, record_problem, validate
from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import rows, to_columns
from tests.cluster_processor.ingest.harness import batch, l4, l7

LIMITS = Limits(max_records=100, max_problems_reported=2)


def rejected(b: pb.FlowBatch) -> Rejection:
    verdict = validate(b, LIMITS)
    assert isinstance(verdict, Rejection)
    return verdict


def accepted(b: pb.FlowBatch) -> Verdict:
    verdict = validate(b, LIMITS)
    assert isinstance(verdict, Verdict)
    return verdict


def test_a_good_batch_passes_through_uncopied() -> None:
    b = batch(3, 2, stats=pb.AgentStats(counters={"x": 1}))
    v = accepted(b)
    assert v.batch is b
    assert (v.accepted, v.rejected, v.error_message) == (5, 0, "")


@pytest.mark.parametrize(("version", "says"), [(0, "missing (0)"), (3, "unsupported schema_version 3")])
def test_schema_version_other_than_1_is_invalid_argument(version: int, says: str) -> None:
    r = rejected(batch(1, version=version))
    assert r.code is grpc.StatusCode.INVALID_ARGUMENT
    assert r.reason == "schema_version"
    assert says in r.message and "schema_version 1" in r.message


def test_node_name_is_required_and_bounded() -> None:
    r = rejected(batch(1, node=""))
    assert (r.code, r.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "node_name")
    assert "node_name is required" in r.message
    assert rejected(batch(1, node="n" * 254)).reason == "node_name"


def test_too_many_records_is_resource_exhausted() -> None:
    r = rejected(batch(60, 41))
    assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_records")
    assert "101 records" in r.message and "100" in r.message
    assert accepted(batch(60, 40)).accepted == 100


def test_bad_records_are_skipped_and_the_rest_kept() -> None:
    b = batch(0, 0, stats=pb.AgentStats(counters={"ring_lost": 3}))
    b.l4.extend([l4(0), l4(1, local_port=70000), l4(2), l4(3, remote_ip="not-an-ip")])
    b.l7.extend([l7(0, ip_family=5), l7(1)])
    v = accepted(b)
    assert (v.accepted, v.rejected) == (3, 3)
    assert [r.socket_cookie for r in v.batch.l4] == [1000, 1002]
    assert [r.socket_cookie for r in v.batch.l7] == [1001]
    assert v.batch.stats.counters["ring_lost"] == 3
    assert (v.batch.node_name, v.batch.schema_version) == (b.node_name, 1)
    # Only the first two problems are quoted; the message says how many more there were.
    assert v.problems == ("l4[1]: local_port 70000 > 65535", "l4[3]: remote_ip 'not-an-ip' is not an IP address")
    assert v.error_message.startswith("3 invalid record(s) skipped: l4[1]")
    assert v.error_message.endswith("; and 1 more")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("10.0.0.1", 1, "10.0.0.2", 65535, 4), None),
        (("::", 0, "::ffff:10.0.0.2", 1, 6), None),
        (("fd00::1", 1, "10.0.0.2", 1, 6), None),  # an IPv4 peer of an IPv6 socket
        (("10.0.0.1", 65536, "10.0.0.2", 1, 4), "local_port 65536 > 65535"),
        (("10.0.0.1", 1, "10.0.0.2", 99999, 4), "remote_port 99999 > 65535"),
        (("", 1, "10.0.0.2", 1, 4), "local_ip '' is not an IP address"),
        (("10.0.0.256", 1, "10.0.0.2", 1, 4), "local_ip '10.0.0.256' is not an IP address"),
        (("10.0.0.1", 1, "fd00::2", 1, 4), "ip_family 4 with an IPv6 address"),
        (("10.0.0.1", 1, "10.0.0.2", 1, 0), "ip_family 0 is neither 4 nor 6"),
    ],
)
def test_record_problem(args: tuple[str, int, str, int, int], problem: str | None) -> None:
    assert record_problem(*args) == problem


def test_a_long_bad_address_is_truncated_in_the_message() -> None:
    problem = record_problem("x" * 10_000, 1, "10.0.0.2", 1, 4)
    assert problem is not None and len(problem) < 120


def test_a_batch_of_only_bad_records_is_accepted_empty() -> None:
    b = batch()
    b.l4.append(l4(0, local_port=1 << 20))
    v = accepted(b)
    assert (v.accepted, v.rejected, len(v.batch.l4)) == (0, 1, 0)


@pytest.mark.parametrize("raw", [b"not a protobuf", b"\xff" * 16, b"\x0a\x05ab"])
def test_undecodable_bytes_are_a_clear_invalid_argument(raw: bytes) -> None:
    r = decode(raw)
    assert isinstance(r, Rejection)
    assert (r.code, r.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed")
    assert "not a kscope.v1.FlowBatch" in r.message


def test_decode_round_trips_a_batch() -> None:
    b = batch(2, 1)
    assert decode(b.SerializeToString()) == b


# --- L4 records as columns (schema_version 2) -------------------------------------------------------------


def columnar(flows: list[pb.L4Flow], n_l7: int = 0) -> pb.FlowBatch:
    b = batch(0, n_l7, version=2)
    b.l4_columns.CopyFrom(to_columns(flows))
    return b


def test_a_good_columnar_batch_passes_through_uncopied() -> None:
    b = columnar([l4(i) for i in range(4)], n_l7=1)
    v = accepted(b)
    assert v.batch is b and (v.accepted, v.rejected) == (5, 0)


def test_bad_columnar_records_are_skipped_with_the_row_forms_messages() -> None:
    flows = [l4(0), l4(1, local_port=70000), l4(2, remote_ip="fd00::9"), l4(3), l4(4, remote_ip="nope"), l4(5)]
    b = columnar(flows)
    v = accepted(b)
    assert (v.accepted, v.rejected) == (3, 3)
    assert v.problems == ("l4[1]: local_port 70000 > 65535", "l4[2]: ip_family 4 with an IPv6 address")
    assert v.error_message.endswith("; and 1 more")
    assert v.batch.schema_version == 2 and not v.batch.l4
    assert [r.socket_cookie for r in rows(v.batch.l4_columns)] == [1000, 1003, 1005]
    assert "nope" not in v.batch.l4_columns.strings  # the string table holds only what the kept records use
    # The same records as rows get the same verdict.
    row_form = batch(0)
    row_form.l4.extend(flows)
    assert accepted(row_form).problems == v.problems


def test_a_missing_family_column_makes_every_columnar_record_bad() -> None:
    b = columnar([l4(0), l4(1)])
    b.l4_columns.ClearField("ip_family")  # empty column: every record has family 0
    v = accepted(b)
    assert (v.accepted, v.rejected) == (0, 2) and v.problems[0] == "l4[0]: ip_family 0 is neither 4 nor 6"


@pytest.mark.parametrize(
    ("damage", "reason", "says"),
    [
        (lambda c: c.local_port.append(80), "columns", "l4_columns.local_port holds 4 values for 3 records"),
        (lambda c: c.socket_cookie.pop(), "columns", "l4_columns.socket_cookie holds 2 values for 3 records"),
        (lambda c: setattr(c, "count", 5), "columns", "holds 3 values for 5 records"),
        (lambda c: c.remote_ip.__setitem__(2, 99), "columns", "l4_columns.remote_ip[2] is string index 99"),
        (lambda c: c.tcp_state.__setitem__(0, 4), "columns", "outside the string table (4 strings)"),
        (lambda c: c.strings.__setitem__(0, "x"), "columns", "l4_columns.strings[0] must be the empty string"),
        (lambda c: c.strings.extend(["s"] * 25), "too_many_strings", "holds 29 strings; 3 records can use at most 28"),
    ],
)
def test_misshapen_columns_reject_the_whole_batch(damage: object, reason: str, says: str) -> None:
    b = columnar([l4(0), l4(1), l4(2)])
    damage(b.l4_columns)  # type: ignore[operator]
    r = validate(b, LIMITS)
    assert isinstance(r, Rejection)
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if reason == "too_many_strings" else grpc.StatusCode.INVALID_ARGUMENT
    assert (r.code, r.reason) == (code, reason)
    assert says in r.message, r.message


def test_a_string_index_into_an_empty_table_is_rejected_and_index_0_is_not() -> None:
    b = columnar([pb.L4Flow(socket_cookie=1, ip_family=4)])
    assert not b.l4_columns.strings
    b.l4_columns.local_ip.append(0)  # "" by definition: a bad address, skipped like in a row
    assert accepted(b).rejected == 1
    b.l4_columns.remote_ip.append(1)
    assert "outside the string table (0 strings)" in rejected(b).message


def test_columns_need_schema_version_2_and_never_come_with_rows() -> None:
    b = columnar([l4(0)])
    b.schema_version = 1
    r = rejected(b)
    assert (r.reason, r.message) == ("columns", "l4_columns needs schema_version 2 (this batch says 1)")
    b = columnar([l4(0)])
    b.l4.append(l4(1))
    assert "as l4 rows or as l4_columns, not both" in rejected(b).message


def test_columnar_records_count_towards_the_record_limit() -> None:
    b = columnar([pb.L4Flow()] * 1, n_l7=0)
    b.l4_columns.count = 101  # every column empty: legal in shape, over the limit in size
    r = rejected(b)
    assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_records")
    assert "101 records" in r.message


def test_an_empty_columnar_batch_is_accepted() -> None:
    b = batch(0, 1, version=2)
    b.l4_columns.SetInParent()
    assert (accepted(b).accepted, accepted(b).rejected) == (1, 0)
