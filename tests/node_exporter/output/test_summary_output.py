"""A summary event on its way out: protobuf (round trip), JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb
from kscope_common.latency import LATENCY_BUCKETS
from node_exporter.l7.exchanges import ExchangeBatch
from node_exporter.l7.pipeline import ConnInfo, L7Event, L7Pipeline
from node_exporter.output.convert import MonotonicClock, l7_request
from node_exporter.output.jsonl import JsonlWriter
from node_exporter.protocols import HttpRecord
from node_exporter.protocols import Role as PRole
from node_exporter.protocols.http1 import HttpSummary, HttpSummaryRecord
from tests.node_exporter.l7.test_exchanges import TRACED
from tests.node_exporter.l7.test_summaries import buckets_of, summary_bytes

MS = 1_000_000
INFO = ConnInfo(sock_cookie=1, netns_ino=1, side=PRole.SERVER, protocol="http1", tls=False, local_ip="198.18.0.2",
                local_port=80, remote_ip="198.18.0.1", remote_port=40000, family=2, tgid=9, comm="nginx")  # fmt: skip


def summary_event(latencies: list[int], status: int = 200, route: str = "/users/{id}") -> L7Event:
    s = HttpSummary(len(latencies), sum(latencies), min(latencies), max(latencies), tuple(buckets_of(latencies)), 900)
    rec = HttpSummaryRecord("GET", "/users/1", route, status, 80 * len(latencies), 150 * len(latencies), 100, 0, "",
                            "", s)  # fmt: skip
    return L7Event(INFO, rec)


def test_summary_converts_with_latency_zero_and_the_sum_in_the_summary() -> None:
    # decoded from a kernel-format record, so the whole agent path is covered
    (ev,) = L7Pipeline().feed([ExchangeBatch.of([summary_bytes(TRACED, [2 * MS, 3 * MS, 40 * MS], start=100,
                                                               end=900, req_bytes=600, resp_bytes=60)])])  # fmt: skip
    clock = MonotonicClock()
    msg = l7_request(ev, None, clock)
    assert msg.HasField("summary") and msg.HasField("http")
    assert msg.latency_ns == 0
    assert (msg.request_bytes, msg.response_bytes) == (600, 60)
    assert (msg.http.method, msg.http.route, msg.http.status_code) == ("POST", "/api/v1/items", 200)
    assert msg.http.traceparent == "" and msg.http.request_id == ""
    s = msg.summary
    assert (s.count, s.latency_sum_ns, s.latency_min_ns, s.latency_max_ns) == (3, 45 * MS, 2 * MS, 40 * MS)
    assert list(s.latency_bucket_counts) == buckets_of([2 * MS, 3 * MS, 40 * MS])
    assert len(s.latency_bucket_counts) == LATENCY_BUCKETS
    assert msg.start_time_unix_nano == clock.unix_ns(100) and s.end_time_unix_nano == clock.unix_ns(900)
    # the wire round trip keeps every field
    again = pb.L7Request.FromString(msg.SerializeToString())
    assert again == msg
    assert again.summary.count == 3


def test_one_request_has_no_summary_on_the_wire() -> None:
    rec = HttpRecord("GET", "/a", "/a", 200, 1, 2, 3, 4 * MS, "", "")
    msg = l7_request(L7Event(INFO, rec), None, MonotonicClock())
    assert not msg.HasField("summary") and msg.latency_ns == 4 * MS


def test_jsonl_line_of_a_summary_round_trips_and_counts_its_requests(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(str(path))
    one = l7_request(L7Event(INFO, HttpRecord("GET", "/a", "/a", 200, 1, 2, 3, 4 * MS, "", "")), None, MonotonicClock())
    summed = l7_request(summary_event([MS] * 12), None, MonotonicClock())
    writer.write_requests([one, summed])
    writer.close()
    assert (writer.lines, writer.requests) == (2, 13)
    lines = path.read_text().splitlines()
    back = json_format.ParseDict(json.loads(lines[1]), pb.NodeRecord())
    assert back.l7 == summed and back.l7.summary.count == 12
