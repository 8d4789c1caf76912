"""L7 summaries in the processor: validation on the wire, and the property that matters — one summary
of N requests gives the same RED histograms and service-graph metrics as the N requests one by one
(except spans: a summary makes none)."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_processor.aggregate import Aggregator, NodeReport
from cluster_processor.ingest.validate import Limits, Verdict, summary_problem, validate
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp.model import HTTP_DURATION_BOUNDS_S, SERVICE_GRAPH_BOUNDS_S, Histogram
from kscope.v1 import flow_pb2 as pb
from kscope_common.latency import LATENCY_BOUNDS_NS, LATENCY_BUCKETS, rebucket_map
from tests.cluster_processor.ingest.harness import batch as ingest_batch
from tests.cluster_processor.ingest.harness import l7 as ingest_l7
from tests.cluster_processor.test_aggregate import T0, batch, index, l4, l7, server_l4

__all__ = ["index"]  # the fixture, used by name

MS = 1_000_000


def buckets_of(latencies: list[int]) -> list[int]:
    out = [0] * LATENCY_BUCKETS
    for v in latencies:
        out[bisect_left(LATENCY_BOUNDS_NS, v)] += 1  # bound[i-1] < v <= bound[i], as the kernel counts
    return out


def summary(latencies: list[int], **kw: Any) -> pb.L7Summary:
    fields: dict[str, Any] = {
        "count": len(latencies),
        "latency_sum_ns": sum(latencies),
        "latency_min_ns": min(latencies),
        "latency_max_ns": max(latencies),
        "latency_bucket_counts": buckets_of(latencies),
        "end_time_unix_nano": T0 + 5,
    }
    fields.update(kw)
    return pb.L7Summary(**fields)


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"count": 0}, "summary.count 0"),
        ({"latency_bucket_counts": [2] + [0] * 20}, "21 latency_bucket_counts; kscope.v1 has 22"),
        ({"latency_bucket_counts": [1] + [0] * 22}, "23 latency_bucket_counts"),
        ({"count": 3}, "latency_bucket_counts sum to 2, count is 3"),
        ({"latency_min_ns": 9 * MS, "latency_max_ns": 8 * MS}, "latency_min_ns 9000000 > latency_max_ns 8000000"),
    ],
)
def test_malformed_summary_is_named(kw: dict[str, Any], says: str) -> None:
    problem = summary_problem(summary([1 * MS, 2 * MS], **kw))
    assert problem is not None and says in problem


def test_good_summary_passes() -> None:
    assert summary_problem(summary([1 * MS, 2 * MS, 30_000 * MS])) is None
    assert summary_problem(summary([7 * MS])) is None


def test_bad_summaries_are_skipped_and_counted_the_rest_kept() -> None:
    b = ingest_batch(0, 0)
    b.l7.extend(
        [
            ingest_l7(0, latency_ns=0, summary=summary([MS, MS])),
            ingest_l7(1, latency_ns=0, summary=summary([MS, MS], count=0)),
            ingest_l7(2),
            ingest_l7(3, latency_ns=0, summary=summary([MS], latency_bucket_counts=[1])),
            ingest_l7(4, latency_ns=5, summary=summary([MS])),  # a summary's latency_ns is 0
        ]
    )
    v = validate(b, Limits(max_problems_reported=5))
    assert isinstance(v, Verdict)
    assert (v.accepted, v.rejected) == (2, 3)
    assert [r.socket_cookie for r in v.batch.l7] == [1000, 1002]
    assert v.problems[0] == "l7[1]: summary.count 0 (a summary sums at least one request)"
    assert v.problems[1].startswith("l7[3]: summary has 1 latency_bucket_counts")
    assert v.problems[2].startswith("l7[4]: summary with latency_ns 5")
    assert v.error_message.startswith("3 invalid record(s) skipped: l7[1]: summary.count 0")


# ---- re-bucketing -------------------------------------------------------------------------------


@pytest.mark.parametrize("bounds", [HTTP_DURATION_BOUNDS_S, SERVICE_GRAPH_BOUNDS_S])
def test_rebucket_map_puts_every_summary_bucket_where_its_values_go(bounds: tuple[float, ...]) -> None:
    into = rebucket_map(bounds)
    assert len(into) == LATENCY_BUCKETS
    edges = (0, *LATENCY_BOUNDS_NS)
    for i in range(LATENCY_BUCKETS):
        lowest = edges[i] + 1 if i else 0  # the smallest latency (ns) in summary bucket i
        highest = LATENCY_BOUNDS_NS[i] if i < len(LATENCY_BOUNDS_NS) else 10**12
        for v in (lowest, (lowest + highest) // 2, highest):
            assert bisect_left(bounds, v / 1e9) == into[i], (i, v)


def test_rebucket_map_refuses_bounds_a_summary_cannot_split() -> None:
    with pytest.raises(ValueError, match="not a summary bucket bound"):
        rebucket_map((0.005, 0.3))


# ---- one summary == its requests one by one -------------------------------------------------------

# Latencies (ns) that stress the buckets: exactly on every bound, one ns either side, zero, far above.
_EDGE_NS = sorted({v + d for v in LATENCY_BOUNDS_NS for d in (-1, 0, 1)} | {0, 1, 100 * 10**9})
_LATENCY = st.one_of(st.sampled_from(_EDGE_NS), st.integers(0, 20 * 10**9))


def _requests_one_by_one(latencies: list[int], side: int, status: int) -> list[pb.L7Request]:
    return [
        l7(side, latency_ns=v, http=pb.HttpInfo(method="GET", route="/items/{id}", status_code=status))
        for v in latencies
    ]


def _one_summary(latencies: list[int], side: int, status: int) -> list[pb.L7Request]:
    http = pb.HttpInfo(method="GET", path="/items/42", route="/items/{id}", status_code=status)
    return [l7(side, latency_ns=0, http=http, summary=summary(latencies))]


def _reports(index: KubeIndex, client: list[pb.L7Request], server: list[pb.L7Request]) -> dict[str, NodeReport]:
    agg = Aggregator(index)
    agg.add(batch("node-1", [l4()], client))
    agg.add(batch("node-2", [server_l4()], server))
    for b in (batch("node-1", [], client), batch("node-2", [], server)):  # every record passes validation
        verdict = validate(b, Limits())
        assert isinstance(verdict, Verdict) and verdict.rejected == 0
    return {r.interval.node_name: r for r in agg.flush(T0 + 10_000 * MS)}


def _same_histogram(a: Histogram | None, b: Histogram | None) -> None:
    assert a is not None and b is not None
    assert (a.bounds, a.bucket_counts, a.min, a.max) == (b.bounds, b.bucket_counts, b.min, b.max)
    # the one value that may differ: N float additions of ns/1e9 against one division of the ns sum
    assert a.sum == pytest.approx(b.sum, rel=1e-12, abs=1e-15)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    client_ns=st.lists(_LATENCY, min_size=1, max_size=40),
    server_ns=st.lists(_LATENCY, min_size=1, max_size=40),
    status=st.sampled_from([200, 404, 500, 503]),
)
def test_a_summary_exports_what_its_requests_would(
    index: KubeIndex, client_ns: list[int], server_ns: list[int], status: int
) -> None:
    each = _reports(index, _requests_one_by_one(client_ns, pb.ROLE_CLIENT, status),
                    _requests_one_by_one(server_ns, pb.ROLE_SERVER, status))  # fmt: skip
    summed = _reports(index, _one_summary(client_ns, pb.ROLE_CLIENT, status),
                      _one_summary(server_ns, pb.ROLE_SERVER, status))  # fmt: skip
    for node in ("node-1", "node-2"):
        e, s = each[node].interval, summed[node].interval
        # RED: the same points (edge, side, method, route, status, error), the same histograms
        assert len(e.red) == len(s.red) == 1
        (re_,), (rs,) = e.red, s.red
        assert (re_.edge, re_.side, re_.protocol, re_.method, re_.route, re_.status_code, re_.error_type) == (
            rs.edge, rs.side, rs.protocol, rs.method, rs.route, rs.status_code, rs.error_type)  # fmt: skip
        _same_histogram(re_.duration, rs.duration)
        assert rs.duration.count == len(client_ns if node == "node-1" else server_ns)
        # service graph: requests and failures counted per request, the duration histograms
        (ge,), (gs,) = e.service_graph, s.service_graph
        assert (ge.client, ge.server, ge.requests, ge.failed, ge.connection_type) == (
            gs.client, gs.server, gs.requests, gs.failed, gs.connection_type)  # fmt: skip
        for a, b in ((ge.server_duration, gs.server_duration), (ge.client_duration, gs.client_duration)):
            assert (a is None) == (b is None)
            if a is not None:
                _same_histogram(a, b)
        # spans: one per request, none for a summary
        assert len(each[node].spans) == len(client_ns if node == "node-1" else server_ns)
        assert summed[node].spans == ()

        # logs: the same aggregated records (a 5xx record counts every request, summed or not)
        def logs(r: NodeReport) -> list[tuple[Any, ...]]:
            return [(e.edge, e.side, e.name, e.body, e.attributes, e.count) for e in r.logs]

        assert logs(summed[node]) == logs(each[node])
        assert sum(e.count for e in summed[node].logs) == (rs.duration.count if status >= 500 else 0)
    # the server counts the requests in the graph (and failures when the status is a server error)
    (g,) = summed["node-2"].interval.service_graph
    assert (g.requests, g.failed) == (len(server_ns), len(server_ns) if status >= 500 else 0)


def test_summary_merges_with_single_requests_in_one_histogram(index: KubeIndex) -> None:
    """Requests of one RED key arrive both ways (sampled ones as records, the rest summed): the
    histogram is that of all of them."""
    sampled, summed = [5 * MS, 250 * MS], [1 * MS, 5 * MS, 5 * MS + 1, 12_800 * MS, 13_000 * MS]
    mixed = _reports(index, [], _requests_one_by_one(sampled, pb.ROLE_SERVER, 200)
                     + _one_summary(summed, pb.ROLE_SERVER, 200))  # fmt: skip
    each = _reports(index, [], _requests_one_by_one(sampled + summed, pb.ROLE_SERVER, 200))
    (rm,), (re_,) = mixed["node-2"].interval.red, each["node-2"].interval.red
    _same_histogram(rm.duration, re_.duration)
    assert rm.duration.min == 0.001 and rm.duration.max == 13.0
    (gm,), (ge,) = mixed["node-2"].interval.service_graph, each["node-2"].interval.service_graph
    assert (gm.requests, ge.requests) == (7, 7)
    _same_histogram(gm.server_duration, ge.server_duration)
    assert len(mixed["node-2"].spans) == 2  # the sampled ones


def test_summaries_are_counted(index: KubeIndex) -> None:
    agg = Aggregator(index)
    agg.add(batch("node-2", [server_l4()], _requests_one_by_one([MS], pb.ROLE_SERVER, 200)
                  + _one_summary([MS, 2 * MS, 3 * MS], pb.ROLE_SERVER, 200)))  # fmt: skip
    counters = agg.counters()
    assert (counters["l7_records"], counters["l7_summaries"], counters["l7_summarized_requests"]) == (2, 1, 3)
