"""Byte-level OTLP encoding against the generated classes: random attributes, values and series
encoded by ``wire``/``encode`` (with their caches) and field by field, parsed back and compared."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from cluster_processor.otlp import encode, wire
from cluster_processor.otlp.cumulative import CumulativeStore, Stream
from cluster_processor.otlp.model import Attrs, AttrValue, Histogram, attrs
from cluster_processor.otlp.semconv import (
    HTTP_SERVER_DURATION,
    TCP_BYTES,
    TCP_CONNECTIONS,
    TCP_RTT,
    Instrument,
    Kind,
    Sample,
)

CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
T0 = 1_700_000_000_000_000_000
S = 1_000_000_000


# ---- the reference: messages built field by field with the generated classes ----------------------


def ref_any_value(v: AttrValue) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=v)


def ref_key_values(a: Attrs) -> list[KeyValue]:
    return [KeyValue(key=k, value=ref_any_value(v)) for k, v in a]


def ref_metrics_request(
    resource: Attrs, streams: Sequence[Stream], t: int, version: str
) -> ExportMetricsServiceRequest:
    by_name: dict[str, metrics_pb2.Metric] = {}
    for s in streams:
        inst = s.instrument
        m = by_name.get(inst.name)
        if m is None:
            m = by_name[inst.name] = metrics_pb2.Metric(name=inst.name, unit=inst.unit, description=inst.description)
            if inst.kind is Kind.HISTOGRAM:
                m.histogram.aggregation_temporality = CUMULATIVE
            elif inst.kind is Kind.GAUGE:
                m.gauge.SetInParent()
            else:
                m.sum.aggregation_temporality = CUMULATIVE
                m.sum.is_monotonic = True
        kv = ref_key_values(s.attributes)
        v = s.value
        if isinstance(v, Histogram):
            hp = m.histogram.data_points.add(attributes=kv, start_time_unix_nano=s.start_unix_nano, time_unix_nano=t,
                                             count=v.count, sum=v.sum, bucket_counts=v.bucket_counts,
                                             explicit_bounds=v.bounds)  # fmt: skip
            if v.min is not None:
                hp.min = v.min
            if v.max is not None:
                hp.max = v.max
            continue
        points = m.gauge.data_points if inst.kind is Kind.GAUGE else m.sum.data_points
        p = points.add(attributes=kv, start_time_unix_nano=s.start_unix_nano, time_unix_nano=t)
        if isinstance(v, int) and not isinstance(v, bool):
            p.as_int = v
        else:
            p.as_double = float(v)
    rm = metrics_pb2.ResourceMetrics(resource=Resource(attributes=ref_key_values(resource)))
    rm.scope_metrics.add(scope=InstrumentationScope(name="kscope", version=version), metrics=list(by_name.values()))
    return ExportMetricsServiceRequest(resource_metrics=[rm])


# ---- random inputs --------------------------------------------------------------------------------

KEYS = ("k8s.pod.name", "service.name", "server.port", "peer.k8s.namespace.name", "otel.metric.overflow", "x.ratio",
        "ünïcode.key", "")  # fmt: skip


def random_value(r: random.Random) -> AttrValue:
    kind = r.randrange(5)
    if kind == 0:
        return r.choice([True, False])
    if kind == 1:
        return r.choice([0, 1, 127, 128, 16_384, 2**31, 2**63 - 1, -1, -(2**63)])
    if kind == 2:
        return r.choice([0.0, -0.0, 1.5, 1e-300, -2.25])
    return r.choice(["", "a", "é" * 70, "x" * 200, "app-7d4b9c8f6b-x2x9z"])


def random_attrs(r: random.Random) -> Attrs:
    return attrs((r.choice(KEYS), random_value(r)) for _ in range(r.randrange(0, 7)))


def random_histogram(r: random.Random, bounds: tuple[float, ...]) -> Histogram:
    return Histogram.of(bounds, [r.uniform(0, 2) for _ in range(r.randrange(0, 20))])


def test_any_value_and_key_value_match_the_generated_classes() -> None:
    r = random.Random(1)
    values: list[AttrValue] = [True, False, 0, 1, -1, 2**63 - 1, -(2**63), 0.0, -0.0, 1.0, "", "é", "x" * 300]
    values += [random_value(r) for _ in range(200)]
    for v in values:
        assert AnyValue.FromString(wire.any_value(v)) == ref_any_value(v), v
        # Typed: 1, True and 1.0 share a cache key in an untyped cache, never an encoding.
        assert wire.any_value(v) == ref_any_value(v).SerializeToString()
        kv = KeyValue.FromString(wire.key_value("k", v))
        assert kv == KeyValue(key="k", value=ref_any_value(v))


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**32, 2**63 - 1, -1, -(2**63)])
def test_varint(n: int) -> None:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue as A

    assert b"\x18" + wire.varint(n) == A(int_value=n).SerializeToString()


@pytest.mark.parametrize("seed", range(8))
def test_streams_encode_as_the_field_by_field_request(seed: int) -> None:
    r = random.Random(seed)
    insts = [TCP_BYTES, TCP_RTT, HTTP_SERVER_DURATION, TCP_CONNECTIONS]
    streams: list[Stream] = []
    for _ in range(r.randrange(1, 60)):
        inst = r.choice(insts)
        a = random_attrs(r)
        start = r.choice([0, T0])
        if inst.kind is Kind.HISTOGRAM:
            value: int | float | Histogram = random_histogram(r, r.choice([(1.0,), (0.1, 0.5, 1.0), ()]))
        elif inst.kind is Kind.GAUGE:
            value = r.choice([0.0, 0.25, 3, -1.5])
        else:
            value = r.choice([0, 1, 2**40, -5])
        streams.append(Stream(inst, a, start, value))
    resource = random_attrs(r)
    got = encode.metrics_requests(resource, streams, T0 + S, version="9.9", max_points=10**6)
    assert got == [ref_metrics_request(resource, streams, T0 + S, "9.9")]


def test_cached_series_encoding_follows_every_change() -> None:
    """Many intervals through the store with the cached encoder, each compared with the reference
    built from the same store's streams: values moving, unchanged series reused, histograms whose
    min/max appear, a histogram restarting with new bounds, new and expiring series, overflow."""
    r = random.Random(42)
    store = CumulativeStore(max_series=12, stale_after_ns=3 * S)
    pool = [random_attrs(r) for _ in range(20)]
    insts: list[Instrument] = [TCP_BYTES, TCP_RTT, HTTP_SERVER_DURATION, TCP_CONNECTIONS]
    resource = (("k8s.node.name", "n"),)
    for k in range(30):
        samples = []
        for _ in range(r.randrange(0, 25)):
            inst = r.choice(insts)
            a = r.choice(pool)
            if inst.kind is Kind.HISTOGRAM:
                bounds = (0.5, 1.0) if k < 20 or r.random() < 0.5 else (0.25, 1.0, 4.0)
                samples.append(Sample(inst, a, random_histogram(r, bounds)))
            elif inst.kind is Kind.GAUGE:
                samples.append(Sample(inst, a, r.choice([0.001, 0.002, 5])))
            else:
                samples.append(Sample(inst, a, r.choice([0, 0, 1, 7])))
        start, end = T0 + k * S, T0 + (k + 1) * S
        groups = store.update_series("n", start, end, samples)
        streams = [Stream(inst, s.attributes, 0 if inst.kind is Kind.GAUGE else s.start_unix_nano, s.value)
                   for inst, series in groups for s in series]  # fmt: skip
        got = encode.series_requests(resource, groups, end, max_points=7)
        want = [ref_metrics_request(resource, streams[i : i + 7], end, "0.1.0") for i in range(0, len(streams), 7)]
        assert got == want, k
    assert store.stats().resets > 0 and store.stats().expired > 0 and store.stats().overflowed
