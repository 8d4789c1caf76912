"""Requests paired in user space past the node's record budget, summed per socket and key
(node_exporter/l7/agentsum.py): every database operation, gRPC call and HTTP-over-TLS request is accounted
for exactly (counts, latency sum/min/max/buckets, bytes), what the kernel sums or pairs passes untouched,
errors stay records, the budget refills with time, the summaries' bound passes requests on as records
(counted), and a summed interval aggregates in the processor to the same metrics and service graph as its
requests one by one."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import replace
from typing import Any

from cluster_processor.aggregate import Aggregator
from cluster_processor.kube.index import KubeIndex
from kscope_common.latency import LATENCY_BOUNDS_NS
from node_exporter.l7.agentsum import AgentSummer
from node_exporter.l7.pipeline import ConnInfo, L7Event
from node_exporter.output.convert import MonotonicClock, l7_request
from node_exporter.protocols import DbRecord, DnsRecord, Role
from node_exporter.protocols.http1 import HttpLinkedRecord, HttpRecord
from node_exporter.protocols.http2_session import Http2Record
from tests.cluster_processor import test_aggregate as base

index = base.index


def conn(cookie: int = 7, side: Role = Role.CLIENT) -> ConnInfo:
    return ConnInfo(sock_cookie=cookie, netns_ino=4026531840, side=side, protocol="redis", tls=False,
                    local_ip=base.A_IP, local_port=40000, remote_ip=base.VIP, remote_port=80, family=2, tgid=42,
                    comm="app")  # fmt: skip


def op(i: int, operation: str = "GET", error: str = "", cookie: int = 7, side: Role = Role.CLIENT) -> L7Event:
    # latencies from 1 ms to ~30 ms: several of the summary's buckets
    rec = DbRecord(system="redis", operation=operation, request_bytes=20 + i, response_bytes=5 + i,
                   start_ns=1_000_000_000 + i * 1000, latency_ns=1_000_000 + i * 997_000, status_code=error,
                   error_type=error, cache_hits=1 if operation == "GET" else 0, parent=(1, 2, 3))  # fmt: skip
    return L7Event(conn(cookie, side), rec)


def workload() -> list[L7Event]:
    events = [op(i, "GET") for i in range(12)] + [op(12 + i, "GET", "WRONGTYPE") for i in range(4)]
    events += [op(16 + i, "SET") for i in range(4)]
    lookup = DnsRecord(id=1, name="b.default.svc.cluster.local", qtype="A", rcode="NOERROR", answers=1, start_ns=5,
                       latency_ns=7, request_bytes=40, response_bytes=56, timed_out=False)  # fmt: skip
    dns = L7Event(conn(), lookup)
    return [*events[:3], dns, *events[3:]]


def key(r: DbRecord) -> tuple[str, str]:
    return r.operation, r.error_type


def test_past_the_budget_operations_are_summed_exactly() -> None:
    summer = AgentSummer(budget_per_s=4)
    events = workload()
    out = summer.fold(events, now=0.0)
    assert [e for e in out if not isinstance(e.record, DbRecord)] == [events[3]]  # the DNS record, as it was
    singles = [e.record for e in out if isinstance(e.record, DbRecord) and e.record.summary is None]
    summaries = [e.record for e in out if isinstance(e.record, DbRecord) and e.record.summary is not None]
    assert singles == [e.record for e in events if isinstance(e.record, DbRecord)][:4]  # the budget, in order
    assert out[: len(singles) + 1] == events[:5]
    ops = [e.record for e in events if isinstance(e.record, DbRecord)]
    want = Counter(key(r) for r in ops)
    got = Counter(key(r) for r in singles)
    for s in summaries:
        assert s.summary is not None
        got[key(s)] += s.summary.count
    assert got == want
    assert len(summaries) == 3
    assert summer.counters() == {"agent_summed": 16, "agent_summaries": 3, "agent_summaries_full": 0}
    for s in summaries:
        assert s.summary is not None
        folded = [r for r in ops[4:] if key(r) == key(s)]
        lat = [r.latency_ns for r in folded]
        buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        for v in lat:
            buckets[bisect_left(LATENCY_BOUNDS_NS, v)] += 1
        assert (s.summary.count, s.summary.latency_sum_ns, s.summary.latency_min_ns, s.summary.latency_max_ns) == (
            len(lat), sum(lat), min(lat), max(lat))  # fmt: skip
        assert list(s.summary.buckets) == buckets and sum(buckets) == len(lat)
        assert max(buckets) < len(lat) or key(s) != ("GET", "")  # that one spans several buckets
        assert (s.start_ns, s.summary.end_ns) == (folded[0].start_ns, folded[-1].start_ns)
        assert (s.request_bytes, s.response_bytes) == (sum(r.request_bytes for r in folded),
                                                       sum(r.response_bytes for r in folded))  # fmt: skip
        assert s.cache_hits == sum(r.cache_hits for r in folded)
        assert s.latency_ns == 0 and s.parent is None  # no span: nothing to be a child


def test_the_budget_refills_with_time_and_keeps_at_most_a_seconds_worth() -> None:
    summer = AgentSummer(budget_per_s=10)

    def singles(now: float) -> int:
        out = summer.fold([op(i) for i in range(30)], now)
        return sum(isinstance(e.record, DbRecord) and e.record.summary is None for e in out)

    assert singles(0.0) == 10
    assert singles(0.5) == 5
    assert singles(0.5) == 0
    assert singles(100.0) == 10  # not 1,000: what was not used is not saved up past a second


def test_a_zero_budget_sums_nothing() -> None:
    events = workload()
    summer = AgentSummer(budget_per_s=0)
    assert summer.offer(events, now=0.0) is events and summer.fold(events, now=0.0) == events
    assert summer.counters()["agent_summed"] == 0


def test_sockets_and_sides_never_share_a_summary() -> None:
    events = [op(0, cookie=1), op(1, cookie=2), op(2, cookie=1, side=Role.SERVER), op(3, cookie=1)]
    out = AgentSummer(budget_per_s=0.5).fold(events, now=0.0)  # less than one token: everything summed
    got = sorted((e.conn.sock_cookie, e.conn.side.value, e.record.summary.count) for e in out)  # type: ignore[union-attr]
    assert got == sorted([(1, Role.CLIENT.value, 2), (2, Role.CLIENT.value, 1), (1, Role.SERVER.value, 1)])


def test_past_the_summaries_bound_operations_leave_as_records_counted() -> None:
    summer = AgentSummer(budget_per_s=0.5, max_summaries=2)
    events = [op(i, name) for i, name in enumerate(["GET", "SET", "DEL", "DEL", "GET", "INCR"])]
    out = summer.fold(events, now=0.0)
    summaries = {e.record.operation: e.record.summary.count for e in out if e.record.summary}  # type: ignore[union-attr]
    singles = [e.record.operation for e in out if not e.record.summary]  # type: ignore[union-attr]
    assert summaries == {"GET": 2, "SET": 1} and singles == ["DEL", "DEL", "INCR"]
    assert summer.counters() == {"agent_summed": 3, "agent_summaries": 2, "agent_summaries_full": 3}
    # the next interval starts empty: its first operations are summed again
    again = summer.fold([op(0, "DEL")], now=0.0)
    assert [e.record.summary.count for e in again] == [1]  # type: ignore[union-attr]


def test_a_summed_interval_aggregates_like_its_operations(index: KubeIndex) -> None:
    """The processor's metrics and service graph from the summed output equal those from every operation
    as a record; spans only for the records."""
    ops = [replace(e, conn=conn()) for e in workload() if isinstance(e.record, DbRecord)]
    clock = MonotonicClock()

    def report(events: list[L7Event]) -> tuple[dict[tuple[str, str], tuple[int, float]], tuple[int, int], int]:
        agg = Aggregator(index)
        agg.add(base.batch("node-1", (), [l7_request(e, None, clock) for e in events]))
        (rep,) = agg.flush(base.T0 + 1)
        red = {(p.method, p.error_type): (p.duration.count, round(p.duration.sum, 9)) for p in rep.interval.red}
        (g,) = rep.interval.service_graph
        return red, (g.requests, g.failed), len(rep.spans)

    red, graph, spans = report(ops)
    summed = AgentSummer(budget_per_s=4).fold(ops, now=0.0)
    assert len(summed) == 4 + 3
    assert report(summed) == (red, graph, 4)
    assert red[("GET", "WRONGTYPE")][0] == 4 and graph == (20, 4) and spans == 20


def http(i: int, record: type[HttpRecord] = HttpRecord, status: int = 200, tls: bool = True, **kw: Any) -> L7Event:
    h2 = issubclass(record, Http2Record)
    rec = record("POST" if h2 else "GET", f"/users/{i}", "/users/{id}", status, 100 + i, 50 + i,
                 2_000_000_000 + i, 3_000_000 + i * 10_000, TRACEPARENT, f"rid-{i}", **kw)  # fmt: skip
    return L7Event(replace(conn(), protocol="http2" if h2 else "http1", tls=tls), rec)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
GRPC: dict[str, Any] = {"rpc_system": "grpc", "rpc_service": "shop.Cart", "rpc_method": "Add"}


def test_grpc_and_tls_requests_are_summed_with_their_rpc_and_what_the_kernel_pairs_is_not() -> None:
    tls = [http(i) for i in range(6)]
    grpc_ok = [http(10 + i, Http2Record, **GRPC, grpc_status=0) for i in range(6)]
    grpc_err = [http(20 + i, Http2Record, **GRPC, grpc_status=5) for i in range(3)]
    errors = [http(30, status=503), http(31, status=0), http(32, Http2Record, status=500, **GRPC, grpc_status=13)]
    kernel = [http(40 + i, tls=False) for i in range(5)]  # plain-text HTTP/1: the kernel's budget, not ours
    kernel.append(http(50, HttpLinkedRecord, tls=False, tcp_seqs=(1, 2)))
    events = [*kernel[:2], *tls, *grpc_ok, *errors, *grpc_err, *kernel[2:]]
    summer = AgentSummer(budget_per_s=2)
    out: list[Any] = summer.fold(events, now=0.0)  # Any: every record here is HTTP
    assert [e for e in out if e.record.summary is None and not e.conn.tls and e.conn.protocol == "http1"] == kernel
    assert [e for e in out if e.record.status in (0, 500, 503)] == errors  # never summed, no token taken
    assert [e for e in out if e.record.summary is None and e.conn.tls and e.record.status == 200] == tls[:2]
    summaries = {(type(e.record).__name__, getattr(e.record, "grpc_status", None)): e.record for e in out
                 if e.record.summary is not None}  # fmt: skip
    assert {k: r.summary.count for k, r in summaries.items()} == {
        ("HttpSummaryRecord", None): 4,
        ("Http2SummaryRecord", 0): 6,
        ("Http2SummaryRecord", 5): 3,
    }
    g = summaries[("Http2SummaryRecord", 0)]
    assert isinstance(g, Http2Record) and (g.rpc_system, g.rpc_service, g.rpc_method) == ("grpc", "shop.Cart", "Add")
    assert (g.traceparent, g.request_id, g.latency_ns, g.parent, g.path) == ("", "", 0, None, "/users/10")
    assert g.request_bytes == sum(e.record.request_bytes for e in grpc_ok)
    assert summer.counters() == {"agent_summed": 13, "agent_summaries": 3, "agent_summaries_full": 0}
    msg = l7_request(next(e for e in out if e.record is g), None, MonotonicClock())
    assert msg.rpc.method == "Add" and msg.summary.count == 6 and msg.http.route == "/users/{id}"
    assert not msg.http.traceparent and msg.latency_ns == 0


def test_a_summed_grpc_interval_aggregates_like_its_calls(index: KubeIndex) -> None:
    calls = [http(i, Http2Record, **GRPC, grpc_status=0 if i % 4 else 14) for i in range(24)]
    clock = MonotonicClock()

    def report(events: list[L7Event]) -> tuple[object, ...]:
        agg = Aggregator(index)
        agg.add(base.batch("node-1", (), [l7_request(e, None, clock) for e in events]))
        (rep,) = agg.flush(base.T0 + 1)
        red = sorted((p.method, p.status_code, p.error_type, p.duration.count, round(p.duration.sum, 9))
                     for p in rep.interval.red)  # fmt: skip
        (g,) = rep.interval.service_graph
        return red, g.requests, g.failed, len(rep.spans)

    whole = report(calls)
    summed = AgentSummer(budget_per_s=3).fold(calls, now=0.0)
    assert len(summed) == 3 + 2
    assert report(summed) == (*whole[:3], 3) and whole[1:] == (24, 6, 24)


def test_offers_during_an_interval_meet_in_one_summary_at_its_flush() -> None:
    """The agent offers each drain's events as they are parsed and flushes at the interval's step."""
    summer = AgentSummer(budget_per_s=1)
    first = summer.offer([op(i) for i in range(5)], now=0.0)
    second = summer.offer([op(5 + i) for i in range(5)], now=0.1)  # 0.1 token: nothing more passes
    assert len(first) == 1 and second == [] and summer.counters()["agent_summaries"] == 0
    (summary,) = summer.flush()
    assert summary.record.summary is not None and summary.record.summary.count == 9  # type: ignore[union-attr]
    assert summer.flush() == [] and summer.counters() == {"agent_summed": 9, "agent_summaries": 1,
                                                          "agent_summaries_full": 0}  # fmt: skip


def test_on_the_syscall_fallback_plain_http1_is_summed_too() -> None:
    """Without kernel pairing (the syscall fallback) every HTTP/1 request is paired in user space."""
    plain = [http(i, tls=False) for i in range(8)]
    assert [e.record.summary for e in AgentSummer(budget_per_s=2).fold(plain, now=0.0)] == [None] * 8  # type: ignore[union-attr]
    out: list[Any] = AgentSummer(budget_per_s=2, plain_http1=True).fold(plain, now=0.0)
    assert out[:2] == plain[:2] and len(out) == 3 and out[2].record.summary.count == 6
    assert (out[2].record.route, out[2].record.request_bytes) == ("/users/{id}", sum(100 + i for i in range(2, 8)))
