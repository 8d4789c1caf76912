"""Pure functions from kscope's records to OTLP protobuf export requests.

Metrics: one ResourceMetrics per (reporting node, replica): ``service.name=kscope``,
``k8s.node.name`` and ``service.instance.id`` make every stream single-writer even with several
processor replicas, and even while a node's agent moves from one replica to another (the moved
streams become new series with new start times instead of two writers fighting over one).
Spans and logs: one ResourceSpans/ResourceLogs per observed workload (see
``semconv.span_resource``). Every request is bounded in items so it stays under the 4 MiB a
gRPC receiver accepts by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Final, TypeVar

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from cluster_processor.otlp import semconv
from cluster_processor.otlp.cumulative import Stream
from cluster_processor.otlp.model import (
    K8S_NODE,
    SERVICE_NAME,
    Attrs,
    AttrValue,
    Histogram,
    LogEvent,
    Side,
    SpanRecord,
    attrs,
)
from cluster_processor.otlp.semconv import Kind

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


def _number_point(s: Stream, time_unix_nano: int) -> metrics_pb2.NumberDataPoint:
    p = metrics_pb2.NumberDataPoint(
        attributes=key_values(s.attributes), start_time_unix_nano=s.start_unix_nano, time_unix_nano=time_unix_nano
    )
    v = s.value
    if isinstance(v, int) and not isinstance(v, bool):
        p.as_int = v
    elif isinstance(v, int | float):
        p.as_double = float(v)
    return p


def _histogram_point(s: Stream, h: Histogram, time_unix_nano: int) -> metrics_pb2.HistogramDataPoint:
    p = metrics_pb2.HistogramDataPoint(
        attributes=key_values(s.attributes),
        start_time_unix_nano=s.start_unix_nano,
        time_unix_nano=time_unix_nano,
        count=h.count,
        sum=h.sum,
        bucket_counts=h.bucket_counts,
        explicit_bounds=h.bounds,
    )
    if h.min is not None:
        p.min = h.min
    if h.max is not None:
        p.max = h.max
    return p


def metrics(streams: Iterable[Stream], time_unix_nano: int) -> list[metrics_pb2.Metric]:
    """One Metric per instrument, its streams as data points, in first-seen order."""
    by_name: dict[str, metrics_pb2.Metric] = {}
    for s in streams:
        inst = s.instrument
        m = by_name.get(inst.name)
        if m is None:
            m = by_name[inst.name] = metrics_pb2.Metric(name=inst.name, unit=inst.unit, description=inst.description)
            if inst.kind is Kind.HISTOGRAM:
                m.histogram.aggregation_temporality = _CUMULATIVE
            elif inst.kind is Kind.GAUGE:
                m.gauge.SetInParent()
            else:
                m.sum.aggregation_temporality = _CUMULATIVE
                m.sum.is_monotonic = True
        if isinstance(s.value, Histogram):
            m.histogram.data_points.append(_histogram_point(s, s.value, time_unix_nano))
        elif inst.kind is Kind.GAUGE:
            m.gauge.data_points.append(_number_point(s, time_unix_nano))
        else:
            m.sum.data_points.append(_number_point(s, time_unix_nano))
    return list(by_name.values())


def metrics_requests(
    resource_attrs: Attrs,
    streams: Sequence[Stream],
    time_unix_nano: int,
    *,
    version: str = "0.1.0",
    max_points: int = MAX_POINTS_PER_REQUEST,
) -> list[ExportMetricsServiceRequest]:
    """The streams of one resource at one instant, in requests of at most ``max_points`` points."""
    out = []
    for batch in chunks(streams, max_points):
        rm = metrics_pb2.ResourceMetrics(resource=resource(resource_attrs))
        rm.scope_metrics.add(scope=scope(version), metrics=metrics(batch, time_unix_nano))
        out.append(ExportMetricsServiceRequest(resource_metrics=[rm]))
    return out


# ---- traces -------------------------------------------------------------------------------------


def span(s: SpanRecord) -> trace_pb2.Span:
    ctx = s.context
    flags = ctx.trace_flags & 0xFF
    if ctx.parent_span_id:
        flags |= _HAS_IS_REMOTE | (_IS_REMOTE if ctx.remote_parent else 0)
    return trace_pb2.Span(
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        parent_span_id=ctx.parent_span_id,
        trace_state=ctx.trace_state,
        flags=flags,
        name=semconv.span_name(s),
        kind=_SPAN_KIND[s.side],
        start_time_unix_nano=s.start_unix_nano,
        end_time_unix_nano=max(s.end_unix_nano, s.start_unix_nano),
        attributes=key_values(semconv.span_attributes(s)),
        status=trace_pb2.Status(
            code=trace_pb2.Status.STATUS_CODE_ERROR if semconv.span_failed(s) else trace_pb2.Status.STATUS_CODE_UNSET
        ),
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
    for batch in chunks(spans, max_spans):
        req = ExportTraceServiceRequest()
        for res, idx in _group_by_resource(node_name, batch).items():
            rs = req.resource_spans.add(resource=resource(res))
            rs.scope_spans.add(scope=scope(version), spans=[span(batch[i]) for i in idx])
        out.append(req)
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
