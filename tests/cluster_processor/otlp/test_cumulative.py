"""Cumulative streams: deltas add up per stream, cardinality is capped with an overflow stream,
stale streams are forgotten and restart with a new start time."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from cluster_processor.otlp import encode
from cluster_processor.otlp.cumulative import OVERFLOW_ATTRS, CumulativeStore, Stream
from cluster_processor.otlp.model import Histogram
from cluster_processor.otlp.semconv import HTTP_SERVER_DURATION, TCP_BYTES, TCP_RTT, Sample
from tests.cluster_processor.otlp import factories as f

S = 1_000_000_000


def counter(pod: str, n: int) -> Sample:
    return Sample(TCP_BYTES, (("k8s.pod.name", pod),), n)


def values(streams: list[Stream]) -> dict[object, object]:
    return {s.attributes: s.value for s in streams}


def test_deltas_accumulate_per_stream_and_node() -> None:
    store = CumulativeStore()
    store.update("a", 0, 10 * S, [counter("p1", 5), counter("p2", 1)])
    store.update("b", 0, 10 * S, [counter("p1", 100)])  # another node: another writer, another stream
    out = store.update("a", 10 * S, 20 * S, [counter("p1", 2)])
    assert values(out) == {(("k8s.pod.name", "p1"),): 7, (("k8s.pod.name", "p2"),): 1}
    assert {s.start_unix_nano for s in out} == {0}  # unchanged streams are still reported
    assert store.stats().series == 3


def test_overflow_stream_takes_what_exceeds_the_limit() -> None:
    store = CumulativeStore(max_series=3)  # two regular streams + the overflow stream
    out = store.update("a", 0, S, [counter(f"p{i}", i + 1) for i in range(5)])
    assert values(out) == {(("k8s.pod.name", "p0"),): 1, (("k8s.pod.name", "p1"),): 2, OVERFLOW_ATTRS: 3 + 4 + 5}
    out = store.update("a", S, 2 * S, [counter("p0", 1), counter("p9", 10)])
    assert values(out)[OVERFLOW_ATTRS] == 22 and values(out)[(("k8s.pod.name", "p0"),)] == 2
    assert store.stats().overflowed == {"kscope.tcp.bytes": 4}
    # The overflow stream encodes as the SDK's: a single boolean attribute.
    req = ExportMetricsServiceRequest.FromString(encode.metrics_requests((), out, 2 * S)[0].data)
    dps = req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points
    assert {"otel.metric.overflow": True} in [f.kv(dp.attributes) for dp in dps]


def test_limit_is_per_metric() -> None:
    store = CumulativeStore(max_series=2)
    h = Histogram.of((1.0,), [0.5])
    out = store.update("a", 0, S, [counter("p1", 1), Sample(HTTP_SERVER_DURATION, (("k8s.pod.name", "p1"),), h)])
    assert OVERFLOW_ATTRS not in values(out)


def test_total_bound_sends_new_streams_of_any_node_to_their_overflow() -> None:
    store = CumulativeStore(max_total_series=3)  # whatever the per-(node, metric) room
    store.update("a", 0, S, [counter("p0", 1), counter("p1", 2)])
    out = store.update("b", 0, S, [counter("p0", 10), counter("p1", 20), counter("p2", 30)])
    assert values(out) == {(("k8s.pod.name", "p0"),): 10, OVERFLOW_ATTRS: 50}  # b's own overflow stream
    out = store.update("a", S, 2 * S, [counter("p0", 1), counter("p5", 7)])
    assert values(out) == {(("k8s.pod.name", "p0"),): 2, (("k8s.pod.name", "p1"),): 2, OVERFLOW_ATTRS: 7}
    stats = store.stats()
    assert stats.overflowed == {"kscope.tcp.bytes": 3} and stats.overflowed_store_full == 3
    assert stats.series == 5  # 3 streams + one overflow stream per node that needed one


def test_total_bound_frees_slots_as_streams_expire() -> None:
    store = CumulativeStore(max_total_series=1, stale_after_ns=30 * S)
    store.update("a", 0, 10 * S, [counter("p1", 5)])
    store.update("b", 0, 10 * S, [counter("p2", 1)])  # overflow: the store is full
    store.update("a", 40 * S, 50 * S, [])
    store.expire(50 * S)  # both gone: idle since 10 s
    out = store.update("b", 50 * S, 60 * S, [counter("p2", 3)])
    assert values(out) == {(("k8s.pod.name", "p2"),): 3}
    assert store.stats().overflowed_store_full == 1


def test_stale_streams_expire_and_come_back_with_a_new_start() -> None:
    store = CumulativeStore(max_series=2, stale_after_ns=30 * S)
    store.update("a", 0, 10 * S, [counter("p1", 5)])
    store.update("a", 10 * S, 20 * S, [counter("p2", 1)])  # overflow: no room left
    out = store.update("a", 40 * S, 50 * S, [])
    assert values(out) == {OVERFLOW_ATTRS: 1}  # p1 idle since 10 s: gone
    out = store.update("a", 50 * S, 60 * S, [counter("p1", 3)])
    # p1 has a slot again and starts over; the overflow stream (idle since 20 s) has gone too.
    assert [(s.attributes, s.value, s.start_unix_nano) for s in out] == [((("k8s.pod.name", "p1"),), 3, 50 * S)]
    assert store.stats().expired == 2


def test_expire_sweeps_silent_nodes() -> None:
    store = CumulativeStore(stale_after_ns=30 * S)
    store.update("gone", 0, 10 * S, [counter("p1", 5)])
    store.expire(100 * S)
    assert store.stats().series == 0


def test_gauge_is_reported_only_when_fresh() -> None:
    store = CumulativeStore()
    out = store.update("a", 0, S, [Sample(TCP_RTT, (), 0.001)])
    assert [(s.value, s.start_unix_nano) for s in out] == [(0.001, 0)]
    assert store.update("a", S, 2 * S, []) == []
    assert [s.value for s in store.update("a", 2 * S, 3 * S, [Sample(TCP_RTT, (), 0.002)])] == [0.002]


def test_histogram_with_new_bounds_restarts_its_stream() -> None:
    store = CumulativeStore()
    store.update("a", 0, S, [Sample(HTTP_SERVER_DURATION, (), Histogram.of((1.0,), [0.5]))])
    (s,) = store.update("a", S, 2 * S, [Sample(HTTP_SERVER_DURATION, (), Histogram.of((2.0,), [0.5]))])
    assert isinstance(s.value, Histogram) and s.value.bounds == (2.0,) and s.start_unix_nano == S
    assert store.stats().resets == 1


def test_limit_must_leave_room() -> None:
    with pytest.raises(ValueError):
        CumulativeStore(max_series=1)
    with pytest.raises(ValueError):
        CumulativeStore(max_total_series=0)


def test_expiry_follows_update_times_even_when_the_clock_goes_back() -> None:
    store = CumulativeStore(stale_after_ns=30 * S)
    store.update("a", 0, 100 * S, [counter("p1", 1)])
    store.update("a", 0, 50 * S, [counter("p2", 1)])  # a wall clock set back
    store.expire(90 * S)  # p2 (last update 50 s) is stale, p1 (100 s) is not
    out = store.update("a", 90 * S, 95 * S, [])
    assert values(out) == {(("k8s.pod.name", "p1"),): 1}
    assert store.stats().expired == 1 and store.stats().series == 1


def test_a_stream_updated_again_is_not_expired_by_its_older_update() -> None:
    store = CumulativeStore(stale_after_ns=30 * S)
    store.update("a", 0, 10 * S, [counter("p1", 1), counter("p2", 1)])
    store.update("a", 10 * S, 20 * S, [counter("p1", 0)])  # a zero delta still keeps p1 alive
    out = store.update("a", 40 * S, 45 * S, [])  # horizon 15 s: p2 (10 s) goes, p1 (20 s) stays
    assert values(out) == {(("k8s.pod.name", "p1"),): 1}
