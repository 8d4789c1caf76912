"""Pure functions from kscope's records to OTLP protobuf export requests.

Metrics: an observed workload's series (RED, L4, DNS, accept queues) under that workload's
resource (``semconv.workload_resource``); the service graph, the overflow streams and the agents'
counters under kscope's (``service.name=kscope``). Every metrics resource carries the reporting
node (``k8s.node.name``) and ``service.instance.id`` = replica/node, so every stream is
single-writer even with several processor replicas, and even while a node's agent moves from one
replica to another (the moved streams become new series with new start times instead of two
writers fighting over one).
Spans and logs: one ResourceSpans/ResourceLogs per observed workload (see
``semconv.span_resource``). Every request is bounded in items so it stays under the 4 MiB a
gRPC receiver accepts by default.

Metrics and spans are assembled at the byte level (``wire``) from parts encoded once and cached
(a series' data point without its time, an edge's span attributes, a resource); logs, rare, are
built field by field and serialized. Every request leaves as an ``EncodedRequest``: the bytes the
exporter sends as they are, and its item count. The bytes are what the generated classes would
serialize for the same request, field for field and in the same order (the tests parse them back
and serialize them again to check), so a receiver cannot tell them apart.
"""

from __future__ import annotations

import struct
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, islice
from operator import itemgetter
from typing import Final, TypeVar

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from cluster_processor.otlp import semconv, wire
from cluster_processor.otlp.cumulative import Series, Stream
from cluster_processor.otlp.model import Exemplar, Histogram, LogEvent, Protocol, SpanRecord
from cluster_processor.otlp.semconv import Instrument, Kind
from cluster_processor.resolved import K8S_NODE, SERVICE_NAME, Attrs, AttrValue, Edge, Side, attrs

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
class EncodedRequest:
    """One serialized export request (an ``Export{Metrics,Trace,Logs}ServiceRequest``) and the
    items it holds: data points, spans or log records, which the exporter counts by outcome."""

    data: bytes
    items: int


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

    def workload_resource(self, resource: Attrs, node_name: str) -> Attrs:
        """The resource of a workload's streams from ``node_name``'s reports: the workload
        (``semconv.workload_resource``) and this writer's instance id. Not kscope's service.version:
        the resource describes the workload (kscope's version is the scope's)."""
        return _with_instance(resource, f"{self.replica}/{node_name}")

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


@lru_cache(maxsize=65_536)  # one per workload and node, as semconv.workload_resource
def _with_instance(resource: Attrs, instance_id: str) -> Attrs:
    return attrs([*resource, (SERVICE_INSTANCE_ID, instance_id)])


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
# Built at the byte level (``wire``), every message's fields in field-number order as the generated
# classes write them. Field numbers from metrics/v1:
# Metric name = 1, description = 2, unit = 3, gauge = 5, sum = 7, histogram = 9; Sum and
# Histogram data_points = 1, aggregation_temporality = 2, Sum is_monotonic = 3;
# NumberDataPoint start = 2, time = 3, as_double = 4, as_int = 6, attributes = 7;
# HistogramDataPoint start = 2, time = 3, count = 4, sum = 5, bucket_counts = 6,
# explicit_bounds = 7, attributes = 9, min = 11, max = 12.
#
# So a data point is: its tag and length and start time (the *lead*), the time, then the *rest*:
# the value, what never changes for a stream (a histogram's bounds, the attributes), and a
# histogram's min and max. A series keeps its lead and rest as bytes (and the unchanging middle, to
# rebuild the rest when only the value moved); every point of one request shares one encoded time.

_DATA_FIELD: Final = {Kind.GAUGE: 5, Kind.COUNTER: 7, Kind.OBSERVED_COUNTER: 7, Kind.HISTOGRAM: 9}
_DATA_TAGS: Final = {kind: wire.tag(field) for kind, field in _DATA_FIELD.items()}
_TEMPORALITY: Final = b"\x10" + wire.varint(_CUMULATIVE)
_DATA_TRAILER: Final = {
    Kind.GAUGE: b"",
    Kind.COUNTER: _TEMPORALITY + b"\x18\x01",  # cumulative, monotonic
    Kind.OBSERVED_COUNTER: _TEMPORALITY + b"\x18\x01",
    Kind.HISTOGRAM: _TEMPORALITY,
}
_GAUGE: Final = Kind.GAUGE  # a global: an Enum class's attribute read takes ~10x as long
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


_COUNT_SUM: Final = struct.Struct("<BQBd").pack  # count = 4 (fixed64), sum = 5 (double)
_SUM: Final = struct.Struct("<Bd").pack
_MIN_MAX: Final = struct.Struct("<BdBd").pack  # min = 11, max = 12 (double)


@lru_cache(maxsize=64)
def _bucket_packer(n: int) -> Callable[..., bytes]:
    """Packs bucket_counts = 6 with ``n`` counts: tag, length and the fixed64 counts in one call."""
    return struct.Struct(f"<{len(wire.varint(8 * n)) + 1}s{n}Q").pack


def _histogram_value(h: Histogram) -> tuple[bytes, bytes]:
    """(count, sum and bucket counts; min and max): what comes before and after the bounds and
    attributes."""
    counts = h.bucket_counts
    n = len(counts)
    count = sum(counts)
    head = _COUNT_SUM(0x21, count, 0x29, h.sum) if count else _SUM(0x29, h.sum)
    if n:
        head += _bucket_packer(n)(b"\x32" + wire.varint(8 * n), *counts)
    lo, hi = h.min, h.max
    if lo is None:
        return head, b"" if hi is None else _SUM(0x61, hi)
    if hi is None:
        return head, _SUM(0x59, lo)
    return head, _MIN_MAX(0x59, lo, 0x61, hi)


def _fixed_part(attributes: Attrs, value: int | float | Histogram) -> bytes:
    """What stays while a stream's value moves, between its value and a histogram's min and max:
    a histogram's bounds and the attributes."""
    if isinstance(value, Histogram):
        bounds = value.bounds
        packed = b"\x3a" + wire.varint(8 * len(bounds)) + struct.pack(f"<{len(bounds)}d", *bounds) if bounds else b""
        return packed + _ATTRIBUTES(9, attributes)
    return _ATTRIBUTES(7, attributes)


def _rest(fixed: bytes, value: int | float | Histogram) -> bytes:
    if isinstance(value, Histogram):
        head, tail = _histogram_value(value)
        return head + fixed + tail
    return _number_value(value) + fixed


def _lead(start_unix_nano: int, rest: bytes) -> bytes:
    start = b"\x11" + wire.pack_fixed64(start_unix_nano) if start_unix_nano else b""
    return _POINT_TAG + wire.varint(len(start) + _TIME_LEN + len(rest)) + start


def _point_parts(attributes: Attrs, start_unix_nano: int, value: int | float | Histogram) -> tuple[bytes, bytes]:
    """A whole ``data_points`` entry as (lead, rest): the entry is lead + time field + rest."""
    rest = _rest(_fixed_part(attributes, value), value)
    return _lead(start_unix_nano, rest), rest


def refresh_series(s: Series, gauge: bool) -> None:
    """Bring ``s``'s cached point (``wire_lead``, ``wire``) up to date, re-encoding only what
    changed: usually the value alone, joined to the cached bounds and attributes."""
    fixed = s.wire_fixed
    if s.wire is None or fixed is None:
        fixed = s.wire_fixed = _fixed_part(s.attributes, s.value)
        s.wire = None
    rest = _rest(fixed, s.value)
    if s.wire is None or len(rest) != len(s.wire):  # the length is in the lead
        s.wire_lead = _lead(0 if gauge else s.start_unix_nano, rest)
    s.wire = rest
    s.changed = False


def exemplar_field(e: Exemplar) -> bytes:
    """A histogram point's ``exemplars`` entry (HistogramDataPoint exemplars = 8; Exemplar
    time_unix_nano = 2, as_double = 3, span_id = 4, trace_id = 5), appended after the point's other
    fields (any order parses; the cached bytes before it stay as they are)."""
    body = b"".join((b"\x11", wire.pack_fixed64(e.time_unix_nano), b"\x19", wire.pack_double(e.value),
                     b"\x22", wire.varint(len(e.span_id)), e.span_id,
                     b"\x2a", wire.varint(len(e.trace_id)), e.trace_id))  # fmt: skip
    return b"\x42" + wire.varint(len(body)) + body


def _with_exemplar(s: Series, gauge: bool) -> tuple[bytes, bytes]:
    """(lead, rest) of ``s``'s point with its exemplar, which it carries for this export only."""
    e = s.exemplar
    assert e is not None
    s.exemplar = None
    assert s.wire is not None
    rest = s.wire + exemplar_field(e)
    return _lead(0 if gauge else s.start_unix_nano, rest), rest


@lru_cache(maxsize=1024)
def _metric_head(inst: Instrument) -> bytes:
    return wire.string(1, inst.name) + wire.string(2, inst.description) + wire.string(3, inst.unit)


# A message in pieces: its bytes are the pieces joined, and their total length is known without
# joining them. A request is joined once from the pieces of all its parts: joining each nested
# message on its own would copy every point once per level of nesting.
_Pieces = tuple[list[bytes], int]


def _metric(inst: Instrument, leads: Sequence[bytes], rests: Sequence[bytes], time_field: bytes) -> _Pieces:
    """One Metric: header, then its data field holding every point, each its lead, the time, its rest."""
    n = len(leads)
    trailer = _DATA_TRAILER[inst.kind]
    data_len = sum(map(len, leads)) + sum(map(len, rests)) + _TIME_LEN * n + len(trailer)
    head = _metric_head(inst) + _DATA_TAGS[inst.kind] + wire.varint(data_len)
    parts = [time_field] * (3 * n + 2)
    parts[0] = head
    parts[1:-1:3] = leads
    parts[3:-1:3] = rests
    parts[-1] = trailer
    return parts, len(head) + data_len


@lru_cache(maxsize=4096)  # per (node, replica) resource: a few hundred at most
def _resource_field(resource_attrs: Attrs) -> bytes:
    return wire.message(1, wire.attributes(1, resource_attrs))  # ResourceMetrics.resource = 1


@lru_cache(maxsize=64)
def _scope_field(version: str) -> bytes:
    # ScopeMetrics.scope = 1; InstrumentationScope name = 1, version = 2
    return wire.message(1, wire.string(1, SCOPE_NAME) + wire.string(2, version))


def _resource_metrics(resource_attrs: Attrs, version: str, metrics: list[_Pieces]) -> list[bytes]:
    """One ResourceMetrics entry of a request, in pieces."""
    # ExportMetricsServiceRequest.resource_metrics = 1 { resource = 1, scope_metrics = 2 { scope = 1,
    # metrics = 2 ... } }, the heads written once the lengths below them are known.
    pieces = [b"", b""]
    scope = _scope_field(version)
    scope_len = len(scope)
    pieces.append(scope)
    for parts, n in metrics:
        head = b"\x12" + wire.varint(n)
        pieces.append(head)
        pieces += parts
        scope_len += len(head) + n
    res = _resource_field(resource_attrs)
    scope_head = b"\x12" + wire.varint(scope_len)
    pieces[0] = b"\x0a" + wire.varint(len(res) + len(scope_head) + scope_len)
    pieces[1] = res + scope_head
    return pieces


def _metrics_request(resource_attrs: Attrs, version: str, metrics: list[_Pieces], points: int) -> EncodedRequest:
    return EncodedRequest(b"".join(_resource_metrics(resource_attrs, version, metrics)), points)


def _by_resource(
    resource_attrs: Attrs,
    groups: Iterable[tuple[Instrument, Sequence[Series]]],
    resource_of: Callable[[Attrs], Attrs] | None,
) -> dict[Attrs, list[tuple[Instrument, Sequence[Series]]]]:
    """``groups`` split by each series' resource (kscope's, ``resource_attrs``, first), each
    resource's metrics in first-seen order."""
    out: dict[Attrs, list[tuple[Instrument, Sequence[Series]]]] = {resource_attrs: []}
    for inst, series in groups:
        if resource_of is None or all(not s.resource for s in series):
            out[resource_attrs].append((inst, series))
            continue
        split: dict[Attrs, list[Series]] = {}
        for s in series:
            split.setdefault(s.resource, []).append(s)
        for res, part in split.items():
            out.setdefault(resource_of(res) if res else resource_attrs, []).append((inst, part))
    return out


def series_requests(
    resource_attrs: Attrs,
    groups: Iterable[tuple[Instrument, Sequence[Series]]],
    time_unix_nano: int,
    *,
    version: str = "0.1.0",
    max_points: int = MAX_POINTS_PER_REQUEST,
    resource_of: Callable[[Attrs], Attrs] | None = None,
) -> list[EncodedRequest]:
    """The store's live series (``CumulativeStore.update_series``) at one instant, in requests of
    at most ``max_points`` points; a metric split across two requests appears in both. A series of
    a workload (``Series.resource``) goes under ``resource_of`` its resource, the rest under
    ``resource_attrs``: one ResourceMetrics per resource in a request."""
    time_field = _time_field(time_unix_nano)
    out: list[EncodedRequest] = []
    done: list[bytes] = []  # the current request's finished ResourceMetrics entries
    room = max_points
    for res, res_groups in _by_resource(resource_attrs, groups, resource_of).items():
        current: list[_Pieces] = []
        for inst, series in res_groups:
            gauge = inst.kind is _GAUGE
            exemplars = False
            for s in series:
                if s.changed or s.wire is None:  # an unchanged series' cached bytes are taken as they are
                    refresh_series(s, gauge)
                exemplars = exemplars or s.exemplar is not None
            leads = [s.wire_lead for s in series]
            rests = [s.wire for s in series]
            if exemplars:
                for j, s in enumerate(series):
                    if s.exemplar is not None:
                        leads[j], rests[j] = _with_exemplar(s, gauge)
            i, n = 0, len(series)
            while i < n:
                take = min(room, n - i)
                current.append(_metric(inst, leads[i : i + take], rests[i : i + take], time_field))  # type: ignore[arg-type]
                i += take
                room -= take
                if room == 0:
                    done += _resource_metrics(res, version, current)
                    out.append(EncodedRequest(b"".join(done), max_points))
                    done, current, room = [], [], max_points
        if current:
            done += _resource_metrics(res, version, current)
    if done:
        out.append(EncodedRequest(b"".join(done), max_points - room))
    return out


def metrics_requests(
    resource_attrs: Attrs,
    streams: Sequence[Stream],
    time_unix_nano: int,
    *,
    version: str = "0.1.0",
    max_points: int = MAX_POINTS_PER_REQUEST,
) -> list[EncodedRequest]:
    """The streams of one resource at one instant, in requests of at most ``max_points`` points;
    within a request, one Metric per instrument, its streams in first-seen order."""
    time_field = _time_field(time_unix_nano)
    out = []
    for batch in chunks(streams, max_points):
        by_name: dict[str, tuple[Instrument, list[bytes], list[bytes]]] = {}
        for s in batch:
            entry = by_name.get(s.instrument.name)
            if entry is None:
                entry = by_name[s.instrument.name] = (s.instrument, [], [])
            lead, rest = _point_parts(s.attributes, s.start_unix_nano, s.value)
            entry[1].append(lead)
            entry[2].append(rest)
        metric_fields = [_metric(i, leads, rests, time_field) for i, leads, rests in by_name.values()]
        out.append(_metrics_request(resource_attrs, version, metric_fields, len(batch)))
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
_KEY: Final = itemgetter(0)


@lru_cache(maxsize=16_384)
def _span_base(e: Edge, side: Side) -> tuple[frozenset[str], list[tuple[str, bytes]]]:
    """What every span of one edge seen from ``side`` carries (one per socket: a client's edge
    holds its own port), canonical and encoded once: its keys, and (key, KeyValue field bytes).
    Keyed by the edge's equality, as every table of edges is (resolution gives edges strings and
    ports only)."""
    pairs = attrs(semconv.record_attributes(e, side))
    # Not through the value caches: an edge is one socket's (its client port, its peer's pod), and
    # its values would mostly evict others that recur.
    return frozenset(k for k, _ in pairs), [(k, wire.attribute_uncached(9, k, v)) for k, v in pairs]


@lru_cache(maxsize=16_384)
def _span_outcome(
    side: Side, protocol: Protocol, method: str, route: str, status: int | None, error_type: str
) -> tuple[frozenset[str], list[tuple[str, bytes]], bytes, bytes]:
    """What a span's protocol outcome (method, route, status, error: few combinations) decides:
    its attributes' keys and (key, KeyValue field bytes), its name and kind fields, its status field."""
    pairs = dict(semconv.span_protocol_attributes(side, protocol, method, route, status, error_type))
    failed = semconv.PROTOCOLS[protocol].failed(side, status, error_type)
    return (
        frozenset(pairs),
        [(k, wire.attribute(9, k, v)) for k, v in pairs.items()],
        _span_head(side, protocol, method, route),
        _STATUS_ERROR if failed else _STATUS_UNSET,
    )


def _span_attributes(s: SpanRecord) -> bytes:
    """The attributes field of one span: the general rule, field by field (``_SpanTemplate`` is
    the fast path ``span_bytes`` takes, and must agree with this)."""
    base_keys, base = _span_base(s.edge, s.side)
    out_keys, outcome, _, _ = _span_outcome(s.side, s.protocol, s.method, s.route, s.status_code, s.error_type)
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
    base_keys, base = _span_base(e, side)
    out_keys, outcome, head, status_field = _span_outcome(side, protocol, method, route, status, error_type)
    if not base_keys.isdisjoint(out_keys):
        return head, status_field, None, (), b""
    items = sorted(base + outcome, key=_KEY)  # keys unique: sorted by key
    if not items:
        return head, status_field, (), (0,), b""
    keys, parts = zip(*items, strict=True)
    return head, status_field, keys, (0, *accumulate(map(len, parts))), b"".join(parts)


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


@lru_cache(maxsize=4096)  # a span is a few hundred bytes: few lengths recur
def _span_field_head(n: int) -> bytes:
    return b"\x12" + wire.varint(n)  # ScopeSpans.spans = 2


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
    return b"".join(_span_parts(s, t))


_TIMES: Final = struct.Struct("<BQBQ").pack  # start = 7 and end = 8, fixed64 both
_FLAGS: Final = struct.Struct("<BBI").pack  # flags = 16, fixed32: a two-byte tag


def _span_parts(s: SpanRecord, t: _SpanTemplate) -> list[bytes]:
    """The bytes of one Span message (without its own tag), in pieces for one join."""
    _, _, _, ctx, start, end, _, _, _, _, own = s
    trace_id, span_id, parent, flags, trace_state, remote = ctx
    flags &= 0xFF
    # Ids are 16 and 8 bytes (one prebuilt tag and length each) but for a context made by hand.
    parts = [_ID_1_16, trace_id] if len(trace_id) == 16 else [_id_field(1, trace_id)]
    if len(span_id) == 8:
        parts += (_ID_2_8, span_id)
    else:
        parts.append(_id_field(2, span_id))
    if trace_state:
        parts.append(wire.string(3, trace_state))
    if parent:
        flags |= _HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE
        parts.append(_id_field(4, parent))
    parts.append(t[0])
    if end < start:
        end = start
    if start:  # and so end: the common case in one piece
        parts.append(_TIMES(0x39, start, 0x41, end))
    elif end:
        parts.append(b"\x41" + wire.pack_fixed64(end))
    keys = t[2]
    if not own:
        parts.append(t[4])
    elif len(own) == 1 and keys is not None:
        # One own attribute (url.path): spliced at its place among the template's, if its key is new.
        ((k, v),) = own
        i = bisect_left(keys, k)
        if i < len(keys) and keys[i] == k:
            parts.append(_span_attributes(s))
        else:
            joined = t[4]
            at = t[3][i]
            # Not through the caches: these values are per request and would only evict the rest.
            parts += (joined[:at], wire.attribute_uncached(9, k, v), joined[at:])
    elif keys is not None and len(own) == 2 and own[0][0] < own[1][0]:
        # Two, in key order (a request id and a path, as the aggregator writes them): both spliced.
        (k1, v1), (k2, v2) = own
        n = len(keys)
        i = bisect_left(keys, k1)
        j = bisect_left(keys, k2, i)
        if (i < n and keys[i] == k1) or (j < n and keys[j] == k2):
            parts.append(_span_attributes(s))
        else:
            joined, offsets = t[4], t[3]
            a, b = offsets[i], offsets[j]
            parts += (joined[:a], wire.attribute_uncached(9, k1, v1), joined[a:b],
                      wire.attribute_uncached(9, k2, v2), joined[b:])  # fmt: skip
    else:
        parts.append(_template_attributes(t, s))
    parts.append(t[1])
    if flags:
        parts.append(_FLAGS(0x85, 0x01, flags))
    return parts


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
) -> list[EncodedRequest]:
    out = []
    scope = _scope_field(version)  # ScopeSpans.scope = 1, as ScopeMetrics'
    template = _span_template
    span_head = _span_field_head
    join = b"".join
    for batch in chunks(spans, max_spans):
        # Grouped by resource in first-seen order, each span's ScopeSpans.spans (= 2) field built
        # as it is met, as its tag and length and its bytes, joined once per group.
        groups: dict[Attrs, list[bytes]] = {}
        # The group of each template met in this batch: found by the template's identity (held
        # alongside, so its id stays its own while this call runs), not by hashing the resource.
        by_template: dict[int, tuple[_SpanTemplate, list[bytes]]] = {}
        for sp in batch:
            edge, side, protocol, _, _, _, method, route, status, error_type, _ = sp
            t = template(edge, side, protocol, method, route, status, error_type)
            known = by_template.get(id(t))
            if known is None:
                fields = groups.setdefault(semconv.span_resource(edge.of(side), node_name), [])
                by_template[id(t)] = (t, fields)
            else:
                fields = known[1]
            b = join(_span_parts(sp, t))
            fields += (span_head(len(b)), b)
        # ExportTraceServiceRequest.resource_spans = 1 { resource = 1, scope_spans = 2 { scope = 1,
        # spans = 2 ... } }: joined once, the heads written from the lengths below them.
        pieces: list[bytes] = []
        for res, fields in groups.items():
            scope_len = len(scope) + sum(map(len, fields))
            head = _resource_field(res) + b"\x12" + wire.varint(scope_len)
            pieces += (b"\x0a" + wire.varint(len(head) + scope_len), head, scope)
            pieces += fields
        out.append(EncodedRequest(join(pieces), len(batch)))
    return out


# ---- logs ---------------------------------------------------------------------------------------


# An aggregated record's count and span, named as the collector's logdedup processor names them (the
# one de-duplication scheme backends and users already meet): log_count, first/last_observed_timestamp.
LOG_COUNT: Final = "log_count"
LOG_FIRST: Final = "first_observed_timestamp"
LOG_LAST: Final = "last_observed_timestamp"


def _rfc3339(unix_nano: int) -> str:
    seconds, nanos = divmod(unix_nano, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def log_record(e: LogEvent) -> logs_pb2.LogRecord:
    """One aggregated event: its time is the first occurrence's, its observed time when kscope
    reported it (the end of its interval); the count and the first and last occurrences as
    attributes."""
    pairs = semconv.record_attributes(e.edge, e.side)
    last = e.last_unix_nano or e.time_unix_nano
    # event.name as an attribute too: log backends that predate the LogRecord field read only this.
    pairs += [*e.attributes, ("event.name", e.name), (LOG_COUNT, e.count), (LOG_FIRST, _rfc3339(e.time_unix_nano)),
              (LOG_LAST, _rfc3339(last))]  # fmt: skip
    return logs_pb2.LogRecord(
        time_unix_nano=e.time_unix_nano,
        observed_time_unix_nano=e.observed_unix_nano or e.time_unix_nano,
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
) -> list[EncodedRequest]:
    out = []
    for batch in chunks(events, max_records):
        req = ExportLogsServiceRequest()
        for res, idx in _group_by_resource(node_name, batch).items():
            rl = req.resource_logs.add(resource=resource(res))
            rl.scope_logs.add(scope=scope(version), log_records=[log_record(batch[i]) for i in idx])
        out.append(EncodedRequest(req.SerializeToString(), len(batch)))
    return out
