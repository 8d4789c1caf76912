"""The pure batch checks, driven directly: no server."""

from __future__ import annotations

import grpc
import pytest

from cluster_processor.ingest.validate import Limits, Rejection, Verdict, decode, record_problem, validate
from kscope.v1 import flow_pb2 as pb
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


@pytest.mark.parametrize(("version", "says"), [(0, "missing (0)"), (2, "unsupported schema_version 2")])
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
