"""The glue the aggregator calls: records in, encoded requests handed to an ``ExportSink``.

Intervals become samples (``semconv``), cumulative streams (``cumulative``) and metrics requests
(``encode``); spans and log events are encoded as they come. kscope's own counters (exporter
outcomes, cardinality overflow) leave the same way, so every drop is counted *and* exported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from cluster_processor.otlp import encode, semconv
from cluster_processor.otlp.cumulative import CumulativeStore, Series, StoreStats
from cluster_processor.otlp.encode import EncodedRequest
from cluster_processor.otlp.exporter import Signal, SignalStats
from cluster_processor.otlp.model import Attrs, Interval, LogEvent, SpanRecord, attrs
from cluster_processor.otlp.semconv import ERROR_TYPE, Instrument, Kind, Sample

COMPONENT_TYPE: Final = "otel.component.type"
# Semantic-convention names of the SDK's own exporter metrics, and their component types.
_EXPORTED: Final = {
    Signal.METRICS: (
        Instrument(
            "otel.sdk.exporter.metric_data_point.exported",
            "{data_point}",
            "Exported data points.",
            Kind.OBSERVED_COUNTER,
        ),
        "otlp_grpc_metric_exporter",
    ),
    Signal.TRACES: (
        Instrument("otel.sdk.exporter.span.exported", "{span}", "Exported spans.", Kind.OBSERVED_COUNTER),
        "otlp_grpc_span_exporter",
    ),
    Signal.LOGS: (
        Instrument("otel.sdk.exporter.log.exported", "{log_record}", "Exported log records.", Kind.OBSERVED_COUNTER),
        "otlp_grpc_log_exporter",
    ),
}
RETRIES: Final = Instrument("kscope.otlp.retries", "{request}", "Export requests re-sent.", Kind.OBSERVED_COUNTER)
OVERFLOWED: Final = Instrument(
    "kscope.otlp.cardinality.overflowed",
    "{sample}",
    "Samples folded into a metric's otel.metric.overflow stream.",
    Kind.OBSERVED_COUNTER,
)
SERIES: Final = Instrument("kscope.otlp.series", "{series}", "Live cumulative metric streams.", Kind.GAUGE)
# The agents' own counters as each last reported them (a gauge: a few are current sizes, and an agent's
# restart starts its totals over), one stream per counter name on the agent's node.
AGENT_STAT: Final = Instrument(
    "kscope.agent.stat", "{count}", "A node agent's self-metric, as the agent last reported it.", Kind.GAUGE
)
AGENT_STAT_NAME: Final = "kscope.agent.stat.name"
MAX_AGENT_STATS: Final = 512  # names per agent report (the agent has ~100); more are cut and counted


class AgentStatsLike(Protocol):
    """What the pipeline reads of a kscope.v1.AgentStats."""

    @property
    def counters(self) -> Mapping[str, int]: ...


class ExportSink(Protocol):
    """What the pipeline needs of ``OtlpExporter``."""

    def submit(self, signal: Signal, request: EncodedRequest) -> bool: ...


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    max_points_per_request: int = encode.MAX_POINTS_PER_REQUEST
    max_spans_per_request: int = encode.MAX_SPANS_PER_REQUEST
    max_logs_per_request: int = encode.MAX_LOGS_PER_REQUEST


def self_samples(exporter: Mapping[Signal, SignalStats], store: StoreStats) -> list[Sample]:
    """kscope's own counters as samples (running totals), named as the SDK self-metrics are."""
    out: list[Sample] = []
    for signal, st in exporter.items():
        inst, component = _EXPORTED[signal]
        outcomes: list[tuple[str, int]] = [
            ("", st.exported),
            ("rejected", st.rejected),
            ("queue_full", st.dropped_queue_full),
            ("non_retryable", st.dropped_non_retryable),
            ("retry_exhausted", st.dropped_retry_exhausted),
            ("shutdown", st.dropped_shutdown),
        ]
        for error_type, n in outcomes:
            pairs: list[tuple[str, str]] = [(COMPONENT_TYPE, component)]
            if error_type:
                pairs.append((ERROR_TYPE, error_type))
            out.append(Sample(inst, attrs(pairs), n))
        out.append(Sample(RETRIES, ((COMPONENT_TYPE, component),), st.retries))
    out += [Sample(OVERFLOWED, (("kscope.metric.name", name),), n) for name, n in sorted(store.overflowed.items())]
    out.append(Sample(SERIES, (), store.series))
    return out


class OtlpPipeline:
    def __init__(
        self,
        reporter: encode.Reporter,
        sink: ExportSink,
        *,
        store: CumulativeStore | None = None,
        settings: PipelineSettings = PipelineSettings(),
        start_unix_nano: int | None = None,
    ) -> None:
        self._reporter = reporter
        self._sink = sink
        self._store = store or CumulativeStore()
        self._self_store = CumulativeStore(max_series=64)  # separate: self-metrics never compete for slots
        self._agent_store = CumulativeStore(max_series=MAX_AGENT_STATS + 1)  # per node, for the same reason
        self.agent_stats_cut = 0  # agent counter names beyond MAX_AGENT_STATS in one report
        self._settings = settings
        # Self-metric totals count from about now (the exporter is built alongside): their start time.
        self._self_start_ns = start_unix_nano if start_unix_nano is not None else time.time_ns()

    @property
    def reporter(self) -> encode.Reporter:
        return self._reporter

    @property
    def store(self) -> CumulativeStore:
        return self._store

    @property
    def agent_store(self) -> CumulativeStore:
        """The agents' re-exported self-metrics (one node each)."""
        return self._agent_store

    def export_interval(self, interval: Interval) -> int:
        """Encode one node's interval as cumulative metrics and submit; returns requests submitted."""
        node = interval.node_name
        samples = semconv.interval_samples(interval)
        groups = self._store.update_series(node, interval.start_unix_nano, interval.end_unix_nano, samples)
        reporter = self._reporter
        return self._submit_metrics(
            reporter.metrics_resource(node),
            groups,
            interval.end_unix_nano,
            lambda resource: reporter.workload_resource(resource, node),
        )

    def export_spans(self, node_name: str, spans: Sequence[SpanRecord]) -> int:
        reqs = encode.traces_requests(
            node_name, spans, version=self._reporter.version, max_spans=self._settings.max_spans_per_request
        )
        return sum(self._sink.submit(Signal.TRACES, r) for r in reqs)

    def export_logs(self, node_name: str, events: Sequence[LogEvent]) -> int:
        reqs = encode.logs_requests(
            node_name, events, version=self._reporter.version, max_records=self._settings.max_logs_per_request
        )
        return sum(self._sink.submit(Signal.LOGS, r) for r in reqs)

    def export_self(self, exporter_stats: Mapping[Signal, SignalStats], now_unix_nano: int) -> int:
        """Submit kscope's own counters; call once per interval. Also forgets stale streams of
        nodes that stopped reporting (their agents' self-metrics too), which only a periodic sweep
        can notice."""
        self._store.expire(now_unix_nano)
        self._agent_store.expire(now_unix_nano)
        samples = self_samples(exporter_stats, self._store.stats())
        groups = self._self_store.update_series("", self._self_start_ns, now_unix_nano, samples)
        return self._submit_metrics(self._reporter.self_resource(), groups, now_unix_nano)

    def export_agent_stats(self, node_name: str, stats: AgentStatsLike, now_unix_nano: int) -> int:
        """A node agent's self-metrics (the ``stats`` of its latest batch), under that node's resource."""
        names = sorted(stats.counters)
        if len(names) > MAX_AGENT_STATS:
            self.agent_stats_cut += len(names) - MAX_AGENT_STATS
            names = names[:MAX_AGENT_STATS]
        samples = [Sample(AGENT_STAT, ((AGENT_STAT_NAME, name),), stats.counters[name]) for name in names]
        groups = self._agent_store.update_series(node_name, now_unix_nano, now_unix_nano, samples)
        return self._submit_metrics(self._reporter.metrics_resource(node_name), groups, now_unix_nano)

    def _submit_metrics(
        self,
        resource: Attrs,
        groups: Sequence[tuple[Instrument, Sequence[Series]]],
        time_unix_nano: int,
        resource_of: Callable[[Attrs], Attrs] | None = None,
    ) -> int:
        reqs = encode.series_requests(
            resource,
            groups,
            time_unix_nano,
            version=self._reporter.version,
            max_points=self._settings.max_points_per_request,
            resource_of=resource_of,
        )
        return sum(self._sink.submit(Signal.METRICS, r) for r in reqs)
