"""Pure functions from kscope's records to OTLP protobuf export requests.

Metrics: one ResourceMetrics per (reporting node, replica): ``service.name=kscope``,
``k8s.node.name`` and ``service.instance.id`` make every stream single-writer even with several
processor replicas, and even while a node's agent moves from one replica to another (the moved
streams become new series with new start times instead of two writers fighting over one).
Spans and logs: one ResourceSpans/ResourceLogs per observed workload (see
``semconv.span_resource``). Every request is bounded in items so it stays under the 4 MiB a
gRPC receiver accepts by default.

Metrics and spans are assembled at the byte level (``wire``) from parts encoded once and cached
(a series' data point without its time, an edge's span attributes, a resource), then parsed by
the C runtime into the request objects the exporter takes; logs, rare, are built field by field.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, islice
from typing import Final, TypeVar

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from cluster_processor.otlp import semconv, wire
from cluster_processor.otlp.cumulative import Series, Stream
from cluster_processor.otlp.model import (
    K8S_NODE,
    SERVICE_NAME,
    Attrs,
    AttrValue,
    Edge,
    Histogram,
    LogEvent,
    Protocol,
    Side,
    SpanRecord,
    attrs,
)
from cluster_processor.otlp.semconv import Instrument, Kind

SERVICE: Final = "kscope"
SCOPE_NAME: Final = "kscope"
SERVICE_INSTANCE_ID: Final = "service.instance.id"
SERVICE_VERSION: Final = "service.version"
MAX_POINTS_PER_REQUEST: Final = 5000  # a histogram point with 15 buckets and 10 attributes is ~500 B
MAX_SPANS_PER_REQUEST: Final = 2000
MAX_LOGS_PER_REQUEST: Final = 2000

_CUMULATIVE: Final = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
# OTLP Span.flags bits 8 and 9: "we know whether the parent is remote" and "it is".
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_SPAN_KIND: Final = {Side.SERVER: trace_pb2.Span.SPAN_KIND_SERVER, Side.CLIENT: trace_pb2.Span.SPAN_KIND_CLIENT}

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Reporter:
    """Who writes: this processor replica. Its streams are told apart from other replicas' by
    ``service.instance.id``."""

    replica: str  # the processor pod's name (or any id unique among replicas)
    node_name: str  # the node the replica runs on: its own metrics' node
    version: str = "0.1.0"

    def metrics_resource(self, node_name: str) -> Attrs:
        """The resource of the streams built from ``node_name``'s reports."""
        return self._resource(node_name, f"{self.replica}/{node_name}")

    def self_resource(self) -> Attrs:
        """The resource of kscope's own metrics (exporter outcomes, overflow counts)."""
        return self._resource(self.node_name, self.replica)

    def _resource(self, node_name: str, instance_id: str) -> Attrs:
        return (
            (K8S_NODE, node_name),
            (SERVICE_NAME, SERVICE),
            (SERVICE_INSTANCE_ID, instance_id),
            (SERVICE_VERSION, self.version),
        )


# ---- common -------------------------------------------------------------------------------------


def any_value(v: AttrValue) -> AnyValue:
    if isinstance(v, bool):  # before int: bool is an int in Python
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=v)


def key_values(attributes: Attrs) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attributes]


def resource(attributes: Attrs) -> Resource:
    return Resource(attributes=key_values(attributes))


def scope(version: str) -> InstrumentationScope:
    return InstrumentationScope(name=SCOPE_NAME, version=version)


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


# ---- metrics ------------------------------------------------------------------------------------
#
# Built at the byte level (``wire``): a series' data point is cached as bytes without its time,
# and every point of one request shares one encoded time. Field numbers from metrics/v1:
# Metric name = 1, description = 2, unit = 3, gauge = 5, sum = 7, histogram = 9; Sum and
# Histogram data_points = 1, aggregation_temporality = 2, Sum is_monotonic = 3;
# NumberDataPoint start = 2, time = 3, as_double = 4, as_int = 6, attributes = 7;
# HistogramDataPoint start = 2, time = 3, count = 4, sum = 5, bucket_counts = 6,
# explicit_bounds = 7, attributes = 9, min = 11, max = 12.

_DATA_FIELD: Final = {Kind.GAUGE: 5, Kind.COUNTER: 7, Kind.OBSERVED_COUNTER: 7, Kind.HISTOGRAM: 9}
_TEMPORALITY: Final = b"\x10" + wire.varint(_CUMULATIVE)
_DATA_TRAILER: Final = {
    Kind.GAUGE: b"",
    Kind.COUNTER: _TEMPORALITY + b"\x18\x01",  # cumulative, monotonic
    Kind.OBSERVED_COUNTER: _TEMPORALITY + b"\x18\x01",
    Kind.HISTOGRAM: _TEMPORALITY,
}
_POINT_TAG: Final = b"\x0a"  # data_points = 1 in Gauge, Sum and Histogram
_TIME_LEN: Final = 9  # tag + fixed64
_ATTRIBUTES: Final = wire.AttributesCache()


def _time_field(time_unix_nano: int) -> bytes:
    return b"\x19" + wire.pack_fixed64(time_unix_nano)


def _number_value(v: int | float | Histogram) -> bytes:
    if isinstance(v, int) and not isinstance(v, bool):
        return b"\x31" + wire.pack_sfixed64(v)
    if isinstance(v, int | float):
        return b"\x21" + wire.pack_double(float(v))
    return b""


def _histogram_value(h: Histogram) -> bytes:
    n = len(h.bucket_counts)
    out = [b"\x21" + wire.pack_fixed64(h.count) if h.count else b"", b"\x29" + wire.pack_double(h.sum)]
    if n:
        out.append(b"\x32" + wire.varint(8 * n) + struct.pack(f"<{n}Q", *h.bucket_counts))
    if h.min is not None:
        out.append(b"\x59" + wire.pack_double(h.min))
    if h.max is not None:
        out.append(b"\x61" + wire.pack_double(h.max))
    return b"".join(out)


def _point_prefix(attributes: Attrs, start_unix_nano: int, value: int | float | Histogram) -> bytes:
    """The parts of a data point that stay while its value moves: attributes, start time, and a
    histogram's bounds."""
    start = b"\x11" + wire.pack_fixed64(start_unix_nano) if start_unix_nano else b""
    if isinstance(value, Histogram):
        bounds = value.bounds
        packed = b"\x3a" + wire.varint(8 * len(bounds)) + struct.pack(f"<{len(bounds)}d", *bounds) if bounds else b""
        return _ATTRIBUTES(9, attributes) + start + packed
    return _ATTRIBUTES(7, attributes) + start


def _value_bytes(value: int | float | Histogram) -> bytes:
    return _histogram_value(value) if isinstance(value, Histogram) else _number_value(value)


def _point_bytes(attributes: Attrs, start_unix_nano: int, value: int | float | Histogram) -> tuple[bytes, int]:
    """A whole ``data_points`` entry without its time field (appended per request), and the
    offset where its value starts."""
    body = _point_prefix(attributes, start_unix_nano, value)
    val = _value_bytes(value)
    head = _POINT_TAG + wire.varint(len(body) + len(val) + _TIME_LEN)
    return head + body + val, len(head) + len(body)


def series_point(s: Series, gauge: bool) -> bytes:
    """``s``'s data point bytes (without the time), re-encoding only what changed since the last
    call: usually just the fixed-width value, spliced after the cached attributes."""
    old = s.wire
    if old is not None and not s.changed:
        return old
    value = s.value
    if old is not None:
        val = _value_bytes(value)
        at = s.wire_at
        if len(old) - at == len(val):  # same length: same header, same prefix
            s.wire = old[:at] + val
            s.changed = False
            return s.wire
    s.wire, s.wire_at = _point_bytes(s.attributes, 0 if gauge else s.start_unix_nano, value)
    s.changed = False
    return s.wire


@lru_cache(maxsize=1024)
def _metric_head(inst: Instrument) -> bytes:
    return wire.string(1, inst.name) + wire.string(2, inst.description) + wire.string(3, inst.unit)


def _metric(inst: Instrument, points: list[bytes], time_field: bytes) -> bytes:
    """One Metric: header, then its data field holding every point, each followed by the time."""
    data = time_field.join(points) + time_field + _DATA_TRAILER[inst.kind]
    return _metric_head(inst) + wire.message(_DATA_FIELD[inst.kind], data)


@lru_cache(maxsize=4096)  # per (node, replica) resource: a few hundred at most
def _resource_field(resource_attrs: Attrs) -> bytes:
    return wire.message(1, wire.attributes(1, resource_attrs))  # ResourceMetrics.resource = 1


@lru_cache(maxsize=64)
def _scope_field(version: str) -> bytes:
    # ScopeMetrics.scope = 1; InstrumentationScope name = 1, version = 2
    return wire.message(1, wire.string(1, SCOPE_NAME) + wire.string(2, version))


def _metrics_request(resource_attrs: Attrs, version: str, metric_fields: list[bytes]) -> ExportMetricsServiceRequest:
    scope_metrics = _scope_field(version) + b"".join(wire.message(2, m) for m in metric_fields)
    rm = _resource_field(resource_attrs) + wire.message(2, scope_metrics)  # ResourceMetrics.scope_metrics = 2
    # Parsed by the C runtime: the exporter takes request objects, and a malformed byte fails here.
    request: ExportMetricsServiceRequest = ExportMetricsServiceRequest.FromString(wire.message(1, rm))
    return request


def series_requests(
    resource_attrs: Attrs,
    groups: Iterable[tuple[Instrument, Sequence[Series]]],
    time_unix_nano: int,
    *,
    version: str = "0.1.0",
    max_points: int = MAX_POINTS_PER_REQUEST,
) -> list[ExportMetricsServiceRequest]:
    """The store's live series of one resource (``CumulativeStore.update_series``) at one instant,
    in requests of at most ``max_points`` points; a metric split across two requests appears in both."""
    time_field = _time_field(time_unix_nano)
    out: list[ExportMetricsServiceRequest] = []
    current: list[bytes] = []
    room = max_points
    for inst, series in groups:
        gauge = inst.kind is Kind.GAUGE
        # An unchanged series' cached bytes taken without a call: most series, most intervals.
        points = [s.wire if s.wire is not None and not s.changed else series_point(s, gauge) for s in series]
        i = 0
        while i < len(points):
            take = points[i : i + room]
            current.append(_metric(inst, take, time_field))
            i += len(take)
            room -= len(take)
            if room == 0:
                out.append(_metrics_request(resource_attrs, version, current))
                current, room = [], max_points
    if current:
        out.append(_metrics_request(resource_attrs, version, current))
    return out


def metrics_requests(
    resource_attrs: Attrs,
    streams: Sequence[Stream],
    time_unix_nano: int,
    *,
    version: str = "0.1.0",
    max_points: int = MAX_POINTS_PER_REQUEST,
) -> list[ExportMetricsServiceRequest]:
    """The streams of one resource at one instant, in requests of at most ``max_points`` points;
    within a request, one Metric per instrument, its streams in first-seen order."""
    time_field = _time_field(time_unix_nano)
    out = []
    for batch in chunks(streams, max_points):
        by_name: dict[str, tuple[Instrument, list[bytes]]] = {}
        for s in batch:
            entry = by_name.get(s.instrument.name)
            if entry is None:
                entry = by_name[s.instrument.name] = (s.instrument, [])
            entry[1].append(_point_bytes(s.attributes, s.start_unix_nano, s.value)[0])
        out.append(_metrics_request(resource_attrs, version, [_metric(i, p, time_field) for i, p in by_name.values()]))
    return out


# ---- traces -------------------------------------------------------------------------------------


def span(s: SpanRecord) -> trace_pb2.Span:
    """One span as a message (the requests are assembled from ``span_bytes`` directly)."""
    message: trace_pb2.Span = trace_pb2.Span.FromString(span_bytes(s))
    return message


# Span (trace/v1) field numbers: trace_id = 1, span_id = 2, trace_state = 3, parent_span_id = 4,
# name = 5, kind = 6, start = 7 (fixed64), end = 8 (fixed64), attributes = 9, status = 15
# (Status.code = 3), flags = 16 (fixed32). Written in field order, as the generated classes do.
_SPAN_KIND_FIELD: Final = {side: b"\x30" + wire.varint(kind) for side, kind in _SPAN_KIND.items()}
_STATUS_UNSET: Final = wire.message(15, b"")  # set, so present even when empty (code UNSET)
_STATUS_ERROR: Final = wire.message(15, b"\x18" + wire.varint(trace_pb2.Status.STATUS_CODE_ERROR))
_pack_fixed32: Final = struct.Struct("<I").pack


@lru_cache(maxsize=16_384)
def _span_base(e: Edge, side: Side) -> tuple[frozenset[str], list[tuple[str, bytes]]]:
    """What every span of one edge seen from ``side`` carries (one per socket: a client's edge
    holds its own port), canonical and encoded once: its keys, and (key, KeyValue field bytes).
    Keyed by the edge's equality, as every table of edges is (resolution gives edges strings and
    ports only)."""
    pairs = attrs(semconv.record_attributes(e, side))
    return frozenset(k for k, _ in pairs), [(k, wire.attribute(9, k, v)) for k, v in pairs]


@lru_cache(maxsize=16_384)
def _span_outcome(
    side: Side, protocol: Protocol, method: str, route: str, status: int | None, error_type: str
) -> tuple[frozenset[str], list[tuple[str, bytes]]]:
    """The protocol's attributes of a span (method, route, status, error): few combinations."""
    pairs = dict(semconv.span_protocol_attributes(side, protocol, method, route, status, error_type))
    return frozenset(pairs), [(k, wire.attribute(9, k, v)) for k, v in pairs.items()]


def _span_attributes(s: SpanRecord) -> bytes:
    """The attributes field of one span: the general rule, field by field (``_SpanTemplate`` is
    the fast path ``span_bytes`` takes, and must agree with this)."""
    base_keys, base = _span_base(s.edge, s.side)
    out_keys, outcome = _span_outcome(s.side, s.protocol, s.method, s.route, s.status_code, s.error_type)
    own = dict(s.attributes)  # per request (url.path)
    if not (base_keys.isdisjoint(out_keys) and base_keys.isdisjoint(own) and out_keys.isdisjoint(own)):
        # One part overrides another's key: the general rule (last wins) decides.
        return wire.attributes(9, semconv.span_attributes(s))
    items = base + outcome
    if own:
        # Not through the caches: these values are per request and would only evict the rest.
        items += [(k, wire.message(9, wire.key_value_uncached(k, v))) for k, v in own.items()]
    # Keys are unique, so comparing the pairs only ever compares keys: the canonical order.
    items.sort()
    return b"".join([b for _, b in items])


# What every span of one (edge, side, outcome) shares, encoded once: name and kind (head), status,
# and the edge's and outcome's attributes joined in canonical order (attrs), with their keys and the
# offset before each, so a request's own attributes (url.path, ...) are spliced in place without a
# sort. keys is None when the edge's and the outcome's keys overlap: such spans take
# ``_span_attributes``. A plain tuple of bytes, strs and ints, so the cycle collector can untrack
# it: thousands live in the cache, and tracked objects would make every collection longer.
# (head, status, keys, offsets, attrs)
_SpanTemplate = tuple[bytes, bytes, "tuple[str, ...] | None", tuple[int, ...], bytes]


@lru_cache(maxsize=16_384)
def _span_template(
    e: Edge, side: Side, protocol: Protocol, method: str, route: str, status: int | None, error_type: str
) -> _SpanTemplate:
    head = _span_head(side, protocol, method, route)
    failed = semconv.PROTOCOLS[protocol].failed(side, status, error_type)
    status_field = _STATUS_ERROR if failed else _STATUS_UNSET
    base_keys, base = _span_base(e, side)
    out_keys, outcome = _span_outcome(side, protocol, method, route, status, error_type)
    if not base_keys.isdisjoint(out_keys):
        return head, status_field, None, (), b""
    items = sorted(base + outcome)  # keys unique: sorted by key
    parts = [b for _, b in items]
    return head, status_field, tuple([k for k, _ in items]), (0, *accumulate(map(len, parts))), b"".join(parts)


def _template_attributes(t: _SpanTemplate, s: SpanRecord) -> bytes:
    """``_span_attributes`` of a span of template ``t``."""
    own: Iterable[tuple[str, AttrValue]] = s.attributes
    if not own:
        return t[4]
    keys = t[2]
    if keys is None:
        return _span_attributes(s)
    if len(own) > 1:  # type: ignore[arg-type]
        own = sorted(dict(own).items())  # last wins among the record's own, as dict() decides
    offsets, joined = t[3], t[4]
    n = len(keys)
    parts = []
    prev = 0
    for k, v in own:
        i = bisect_left(keys, k)
        if i < n and keys[i] == k:  # overrides, or is overridden by, the edge or the outcome
            return _span_attributes(s)
        at = offsets[i]
        parts.append(joined[prev:at])
        # Not through the caches: these values are per request and would only evict the rest.
        parts.append(wire.attribute_uncached(9, k, v))
        prev = at
    parts.append(joined[prev:])
    return b"".join(parts)


def _id_field(field: int, value: bytes) -> bytes:
    # trace and span ids are 16 and 8 bytes: one prebuilt tag and length
    n = len(value)
    if n == 16 or n == 8:
        return _ID_HEADS[field, n] + value
    return wire.message(field, value) if value else b""


_ID_HEADS: Final = {(f, n): wire.tag(f) + wire.varint(n) for f in (1, 2, 4) for n in (8, 16)}
_ID_1_16: Final = _ID_HEADS[1, 16]
_ID_2_8: Final = _ID_HEADS[2, 8]


@lru_cache(maxsize=4096)
def _span_head(side: Side, protocol: Protocol, method: str, route: str) -> bytes:
    """name = 5 and kind = 6 of a span: few combinations (a server's route, a method)."""
    name = semconv.PROTOCOLS[protocol].span_name(side, method, route)
    return wire.string(5, name) + _SPAN_KIND_FIELD[side]


def span_bytes(s: SpanRecord) -> bytes:
    """The bytes of one Span message (without its own tag)."""
    return _span_bytes(s, _span_template(s.edge, s.side, s.protocol, s.method, s.route, s.status_code, s.error_type))


def _span_bytes(s: SpanRecord, t: _SpanTemplate) -> bytes:
    ctx = s.context
    flags = ctx.trace_flags & 0xFF
    parent = ctx.parent_span_id
    if parent:
        flags |= _HAS_IS_REMOTE | (_IS_REMOTE if ctx.remote_parent else 0)
    start = s.start_unix_nano
    end = s.end_unix_nano
    if end < start:
        end = start
    trace_id, span_id = ctx.trace_id, ctx.span_id
    return b"".join(
        (
            _ID_1_16 + trace_id if len(trace_id) == 16 else _id_field(1, trace_id),
            _ID_2_8 + span_id if len(span_id) == 8 else _id_field(2, span_id),
            wire.string(3, ctx.trace_state) if ctx.trace_state else b"",
            _id_field(4, parent) if parent else b"",
            t[0],
            b"\x39" + wire.pack_fixed64(start) if start else b"",
            b"\x41" + wire.pack_fixed64(end) if end else b"",
            _template_attributes(t, s),
            t[1],
            b"\x85\x01" + _pack_fixed32(flags) if flags else b"",
        )
    )


def _group_by_resource(node_name: str, items: Iterable[SpanRecord | LogEvent]) -> dict[Attrs, list[int]]:
    groups: dict[Attrs, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(semconv.span_resource(item.edge.of(item.side), node_name), []).append(i)
    return groups


def traces_requests(
    node_name: str,
    spans: Sequence[SpanRecord],
    *,
    version: str = "0.1.0",
    max_spans: int = MAX_SPANS_PER_REQUEST,
) -> list[ExportTraceServiceRequest]:
    out = []
    scope = _scope_field(version)  # ScopeSpans.scope = 1, as ScopeMetrics'
    resources: dict[int, tuple[_SpanTemplate, Attrs]] = {}  # each template's span resource, for this node
    for batch in chunks(spans, max_spans):
        # Grouped by resource in first-seen order, each span's ScopeSpans.spans (= 2) field built
        # as it is met: the resource found by the span's template, not by hashing its attributes.
        groups: dict[Attrs, list[bytes]] = {}
        for sp in batch:
            t = _span_template(sp.edge, sp.side, sp.protocol, sp.method, sp.route, sp.status_code, sp.error_type)
            # Keyed by the template's identity, the template held alongside so its id stays its own
            # for as long as this call runs.
            known = resources.get(id(t))
            if known is None:
                res = semconv.span_resource(sp.edge.of(sp.side), node_name)
                resources[id(t)] = (t, res)
            else:
                res = known[1]
            b = _span_bytes(sp, t)
            n = len(b)
            field = b"\x12" + (wire.varint(n) if n > 0x7F else bytes((n,))) + b
            fields = groups.get(res)
            if fields is None:
                groups[res] = [field]
            else:
                fields.append(field)
        resource_spans = []
        for res, fields in groups.items():
            # ResourceSpans: resource = 1, scope_spans = 2
            resource_spans.append(wire.message(1, _resource_field(res) + wire.message(2, scope + b"".join(fields))))
        out.append(ExportTraceServiceRequest.FromString(b"".join(resource_spans)))
    return out


# ---- logs ---------------------------------------------------------------------------------------


def log_record(e: LogEvent) -> logs_pb2.LogRecord:
    pairs = semconv.record_attributes(e.edge, e.side)
    # event.name as an attribute too: log backends that predate the LogRecord field read only this.
    pairs += [*e.attributes, ("event.name", e.name)]
    return logs_pb2.LogRecord(
        time_unix_nano=e.time_unix_nano,
        observed_time_unix_nano=e.time_unix_nano,
        severity_number=int(e.severity),  # type: ignore[arg-type]
        severity_text=e.severity.name,
        body=AnyValue(string_value=e.body),
        attributes=key_values(attrs(pairs)),
        trace_id=e.trace_id,
        span_id=e.span_id,
        event_name=e.name,
    )


def logs_requests(
    node_name: str,
    events: Sequence[LogEvent],
    *,
    version: str = "0.1.0",
    max_records: int = MAX_LOGS_PER_REQUEST,
) -> list[ExportLogsServiceRequest]:
    out = []
    for batch in chunks(events, max_records):
        req = ExportLogsServiceRequest()
        for res, idx in _group_by_resource(node_name, batch).items():
            rl = req.resource_logs.add(resource=resource(res))
            rl.scope_logs.add(scope=scope(version), log_records=[log_record(batch[i]) for i in idx])
        out.append(req)
    return out


# ---- counting -----------------------------------------------------------------------------------


def count_points(req: ExportMetricsServiceRequest) -> int:
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                n += len(getattr(m, kind).data_points) if kind else 0
    return n


def count_spans(req: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def count_logs(req: ExportLogsServiceRequest) -> int:
    return sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
