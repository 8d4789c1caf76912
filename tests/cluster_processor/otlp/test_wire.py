"""Byte-level OTLP encoding against the generated classes: random attributes, values and series
encoded by ``wire``/``encode`` (with their caches) and field by field, parsed back and compared.
Whole requests are compared byte for byte with what the generated classes serialize: the exporter
sends ``encode``'s bytes as they are."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from cluster_processor.otlp import encode, semconv, wire
from cluster_processor.otlp.cumulative import CumulativeStore, Stream
from cluster_processor.otlp.model import (
    Attrs,
    AttrValue,
    Edge,
    Histogram,
    Protocol,
    Side,
    SpanRecord,
    attrs,
    span_context,
)
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


@pytest.mark.parametrize(
    "n", [0, 1, 127, 128, 300, 16_383, 16_384, 36_653, 2**21 - 1, 2**21, 2**32, 2**63 - 1, -1, -(2**63)]
)
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
    want = ref_metrics_request(resource, streams, T0 + S, "9.9")
    assert [(r.data, r.items) for r in got] == [(want.SerializeToString(), len(streams))]


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
        assert [ExportMetricsServiceRequest.FromString(r.data) for r in got] == want, k
        assert [r.data for r in got] == [w.SerializeToString() for w in want], k
        assert [r.items for r in got] == [encode.count_points(w) for w in want], k
    assert store.stats().resets > 0 and store.stats().expired > 0 and store.stats().overflowed


def test_attributes_cache_is_keyed_by_identity_not_equality() -> None:
    cache = wire.AttributesCache(limit=2)
    as_bool: Attrs = (("k", True),)
    as_int: Attrs = (("k", 1),)
    assert as_bool == as_int  # equal tuples...
    assert cache(7, as_bool) != cache(7, as_int)  # ...two encodings
    assert cache(7, as_bool) == wire.attributes(7, as_bool)
    neg: Attrs = (("k", -0.0),)
    assert cache(7, (("k", 0.0),)) != cache(7, neg) == wire.attributes(7, neg)
    for i in range(10):  # past the bound: cleared, still right
        pairs: Attrs = (("k", f"v{i}"),)
        assert cache(9, pairs) == wire.attributes(9, pairs)
    assert len(cache._entries) <= 2


# ---- spans ----------------------------------------------------------------------------------------


def ref_span(s: SpanRecord) -> trace_pb2.Span:
    """The field-by-field Span the encoder replaced."""
    ctx = s.context
    flags = ctx.trace_flags & 0xFF
    if ctx.parent_span_id:
        flags |= 0x100 | (0x200 if ctx.remote_parent else 0)
    return trace_pb2.Span(
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        parent_span_id=ctx.parent_span_id,
        trace_state=ctx.trace_state,
        flags=flags,
        name=semconv.span_name(s),
        kind=trace_pb2.Span.SPAN_KIND_SERVER if s.side is Side.SERVER else trace_pb2.Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=s.start_unix_nano,
        end_time_unix_nano=max(s.end_unix_nano, s.start_unix_nano),
        attributes=ref_key_values(semconv.span_attributes(s)),
        status=trace_pb2.Status(
            code=trace_pb2.Status.STATUS_CODE_ERROR if semconv.span_failed(s) else trace_pb2.Status.STATUS_CODE_UNSET
        ),
    )


def random_edge_attrs(r: random.Random) -> Attrs:
    # What resolution gives an edge: strings and ports. (Edges are compared by equality wherever
    # they key a table, so an edge of True and one of 1 were always one edge.)
    return tuple((k, v) for k, v in random_attrs(r) if type(v) in (str, int))


def random_span(r: random.Random) -> SpanRecord:
    client, server = random_edge_attrs(r), random_edge_attrs(r)
    if r.random() < 0.5:
        client = attrs([*client, ("client.port", r.randint(1, 65535)), ("client.address", "10.0.0.1")])
    edge = Edge(client, attrs([*server, ("server.port", 8080)]))
    protocol = r.choice([Protocol.HTTP, Protocol.DNS])
    tp = r.choice([None, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "00-" + "ab" * 16 + "-" + "cd" * 8
                   + "-00", "garbage"])  # fmt: skip
    ctx = span_context(tp, r.choice(["", "vendor=1"]), rng=r)
    extra: list[tuple[str, AttrValue]] = r.choice([[], [("url.path", "/a/1")], [("url.path", "/b"), ("x", 1.5)],
                                                   [("service.peer.name", "override")]])  # fmt: skip
    start = r.choice([0, T0, T0 + 5])
    side = r.choice([Side.CLIENT, Side.SERVER])
    method, route = r.choice(["", "GET", "PROPFIND", "A"]), r.choice(["", "/a/{id}"])
    status, error_type = r.choice([None, 200, 404, 503]), r.choice(["", "timeout", "NXDOMAIN"])
    end = start + r.choice([-1, 0, 9])
    return SpanRecord(edge, side, protocol, ctx, start, end, method, route, status, error_type, attrs(extra))


@pytest.mark.parametrize("seed", range(5))
def test_span_bytes_equal_the_field_by_field_span(seed: int) -> None:
    r = random.Random(seed)
    records = [random_span(r) for _ in range(300)]
    for s in records:
        assert trace_pb2.Span.FromString(encode.span_bytes(s)) == ref_span(s)
    (encoded,) = encode.traces_requests("node-a", records, max_spans=1000)
    req = ExportTraceServiceRequest.FromString(encoded.data)
    assert encoded.items == len(records)
    # Byte for byte what the generated classes write: the exporter sends these bytes as they are.
    assert encoded.data == req.SerializeToString()
    got = [sp for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]
    by_resource: dict[Attrs, list[trace_pb2.Span]] = {}
    for s in records:
        by_resource.setdefault(semconv.span_resource(s.edge.of(s.side), "node-a"), []).append(ref_span(s))
    assert [tuple(f.key for f in rs.resource.attributes) for rs in req.resource_spans] == [
        tuple(k for k, _ in res) for res in by_resource
    ]
    assert got == [sp for spans in by_resource.values() for sp in spans]


@pytest.mark.parametrize("seed", range(5))
def test_span_template_splices_own_attributes_as_the_general_rule_orders_them(seed: int) -> None:
    """The cached per-(edge, side, outcome) template splices a request's own attributes in place:
    byte for byte what sorting every pair afresh gives, and the general rule whenever a key of the
    request's own overlaps the edge's or the outcome's (either way round)."""
    r = random.Random(seed)
    own_choices: list[list[tuple[str, AttrValue]]] = [
        [], [("url.path", "/a/1")], [("aaa.first", "x")], [("zzz.last", 2)], [("url.path", "/b"), ("x", 1.5)],
        [("zzz.last", "z"), ("aaa.first", "a"), ("http.request.header.x-request-id", "r1")],
        [("url.path", "/1"), ("url.path", "/2")],  # the record's own: last wins
        [("server.port", 1)], [("client.address", "10.9.9.9")], [("http.route", "/own")],
        [("http.response.status_code", 999)], [("error.type", "mine")], [("http.request.method", "MINE")],
        [("error.type", "mine"), ("url.path", "/p")], [("aaa.first", "x"), ("server.port", 1)],
        [("client.address", "10.9.9.9"), ("zzz.last", 1)],
        [("http.request.header.x-request-id", "r"), ("url.path", "/")],
    ]  # fmt: skip
    for _ in range(400):
        base = random_span(r)
        own = r.choice(own_choices)
        s = base._replace(attributes=tuple(own))
        t = encode._span_template(s.edge, s.side, s.protocol, s.method, s.route, s.status_code, s.error_type)
        assert encode._template_attributes(t, s) == encode._span_attributes(s), own
        assert trace_pb2.Span.FromString(encode.span_bytes(s)) == ref_span(s), own
        (encoded,) = encode.traces_requests("node-a", [s])
        assert encoded.data == ref_traces_request("node-a", [s]).SerializeToString(), own


def ref_traces_request(node: str, records: Sequence[SpanRecord]) -> ExportTraceServiceRequest:
    by_resource: dict[Attrs, list[trace_pb2.Span]] = {}
    for s in records:
        by_resource.setdefault(semconv.span_resource(s.edge.of(s.side), node), []).append(ref_span(s))
    return ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=Resource(attributes=ref_key_values(res)),
                scope_spans=[
                    trace_pb2.ScopeSpans(scope=InstrumentationScope(name="kscope", version="0.1.0"), spans=spans)
                ],
            )
            for res, spans in by_resource.items()
        ]
    )


def test_spans_of_edges_and_outcomes_without_attributes_encode_too() -> None:
    bare = Edge((), ())
    records = [
        SpanRecord(bare, side, Protocol.DNS, span_context(), T0, T0 + 1, attributes=own)
        for side in (Side.CLIENT, Side.SERVER)
        for own in ((), (("url.path", "/x"),), (("a", 1), ("b", "2")))
    ]
    (encoded,) = encode.traces_requests("node-a", records)
    assert encoded.data == ref_traces_request("node-a", records).SerializeToString()


@pytest.mark.parametrize("field", [7, 9, 40])
@pytest.mark.parametrize(
    "value", ["", "/a/1", "é" * 70, "x" * 200, "y" * 20_000, 0, 7, 300, 2**63 - 1, -1, -(2**63), True, False, 1.5, -0.0]
)
def test_attribute_uncached_is_the_message_of_key_value_uncached(field: int, value: AttrValue) -> None:
    for key in ("url.path", "k" * 130):
        assert wire.attribute_uncached(field, key, value) == wire.message(field, wire.key_value_uncached(key, value))


def test_traces_requests_resource_follows_the_reporting_node_through_the_template_cache() -> None:
    """The span's resource is remembered per template and node: another node (and more nodes than
    a template keeps) must still get its own, the one ``semconv.span_resource`` names."""
    r = random.Random(7)
    records = [random_span(r) for _ in range(60)]
    for node in [f"node-{i}" for i in range(12)] * 2:
        (encoded,) = encode.traces_requests(node, records, max_spans=1000)
        req = ExportTraceServiceRequest.FromString(encoded.data)
        assert encoded.data == req.SerializeToString()
        want: dict[Attrs, list[trace_pb2.Span]] = {}
        for s in records:
            want.setdefault(semconv.span_resource(s.edge.of(s.side), node), []).append(ref_span(s))
        got_res = [list(rs.resource.attributes) for rs in req.resource_spans]
        assert got_res == [list(ref_key_values(res)) for res in want]
        got = [sp for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]
        assert got == [sp for spans in want.values() for sp in spans]
