"""Per-interval samples in, cumulative metric streams out, with bounded cardinality.

Why cumulative: the backends kscope feeds most often are Prometheus-compatible (Prometheus'
OTLP receiver, Mimir, Thanos, Grafana Cloud); they store cumulative counters and drop or
mishandle delta sums, and a deltatocumulative processor in the collector would be one more
stateful hop to run. kscope can do it itself because every stream has exactly one writer (the
resource names the reporting node and the replica). Each stream keeps the start time of the
interval that created it, so a backend sees a restart (a new start time) as a reset and never
as a drop in a counter.

Cardinality is bounded per (node, metric), as the OpenTelemetry SDK does: once a metric holds
``max_series - 1`` streams, samples for new attribute sets go to one overflow stream with the
single attribute ``otel.metric.overflow=true``, and are counted. Streams not updated for
``stale_after_ns`` are forgotten, which frees their slots; if they come back they start anew,
with a new start time, as cumulative semantics require.

Pure state: time is passed in, nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from cluster_processor.otlp.model import Attrs, Histogram
from cluster_processor.otlp.semconv import OVERFLOW, Instrument, Kind, Sample

OVERFLOW_ATTRS: Final[Attrs] = ((OVERFLOW, True),)
DEFAULT_MAX_SERIES: Final = 2000  # the OpenTelemetry SDK's default cardinality limit
DEFAULT_STALE_AFTER_NS: Final = 10 * 60 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class Stream:
    """One cumulative stream at the end of an interval, ready to encode."""

    instrument: Instrument
    attributes: Attrs
    start_unix_nano: int  # 0 for gauges, whose points stand alone
    value: int | float | Histogram


@dataclass(slots=True)
class _Series:
    start_unix_nano: int
    last_update_unix_nano: int
    value: int | float | Histogram
    fresh: bool  # updated by the last interval: a gauge is exported only then


@dataclass(slots=True)
class StoreStats:
    series: int = 0  # live streams, all nodes
    overflowed: dict[str, int] = field(default_factory=dict)  # metric -> samples folded into overflow
    expired: int = 0  # streams forgotten after going stale
    resets: int = 0  # streams restarted because their histogram bounds changed


class CumulativeStore:
    def __init__(self, *, max_series: int = DEFAULT_MAX_SERIES, stale_after_ns: int = DEFAULT_STALE_AFTER_NS) -> None:
        if max_series < 2:
            raise ValueError("max_series must leave room for one stream and the overflow stream")
        self.max_series = max_series
        self.stale_after_ns = stale_after_ns
        # node -> metric name -> attributes -> series; dicts keep insertion order, so export order is stable
        self._nodes: dict[str, dict[str, dict[Attrs, _Series]]] = {}
        self._instruments: dict[str, Instrument] = {}
        self._stats = StoreStats()

    def update(self, node: str, start_unix_nano: int, end_unix_nano: int, samples: Iterable[Sample]) -> list[Stream]:
        """Apply one interval of ``node``'s samples; return every live stream of that node."""
        metrics = self._nodes.setdefault(node, {})
        for by_attrs in metrics.values():
            for series in by_attrs.values():
                series.fresh = False
        for sample in samples:
            self._apply(metrics, sample, start_unix_nano, end_unix_nano)
        self._expire_node(metrics, end_unix_nano)
        if not metrics:
            del self._nodes[node]
        return self._streams(metrics)

    def expire(self, now_unix_nano: int) -> None:
        """Forget stale streams of every node, including nodes that stopped reporting."""
        for node in list(self._nodes):
            self._expire_node(self._nodes[node], now_unix_nano)
            if not self._nodes[node]:
                del self._nodes[node]

    def stats(self) -> StoreStats:
        live = sum(len(s) for metrics in self._nodes.values() for s in metrics.values())
        return StoreStats(live, dict(self._stats.overflowed), self._stats.expired, self._stats.resets)

    # ---- internals ------------------------------------------------------------------------------

    def _apply(self, metrics: dict[str, dict[Attrs, _Series]], sample: Sample, start: int, end: int) -> None:
        inst = sample.instrument
        known = self._instruments.setdefault(inst.name, inst)
        if known != inst:
            raise ValueError(f"instrument {inst.name} redefined: {known} != {inst}")
        by_attrs = metrics.setdefault(inst.name, {})
        series = by_attrs.get(sample.attributes)
        if series is None:
            if inst.kind is Kind.COUNTER and sample.value == 0:
                return  # a zero delta is no reason to spend a slot on a new stream
            key = sample.attributes
            if len(by_attrs) >= self.max_series - (0 if OVERFLOW_ATTRS in by_attrs else 1):
                key = OVERFLOW_ATTRS
                self._stats.overflowed[inst.name] = self._stats.overflowed.get(inst.name, 0) + 1
            series = by_attrs.get(key)
            if series is None:
                by_attrs[key] = _Series(start, end, sample.value, True)
                return
        series.last_update_unix_nano = end
        series.fresh = True
        series.value = self._combine(inst.kind, series, sample.value, start)

    def _combine(
        self, kind: Kind, series: _Series, value: int | float | Histogram, start: int
    ) -> int | float | Histogram:
        old = series.value
        if kind is Kind.HISTOGRAM:
            assert isinstance(old, Histogram) and isinstance(value, Histogram)
            if old.bounds == value.bounds:
                return old.merge(value)
            # Buckets changed (reconfigured aggregator): the old totals cannot continue; restart.
            self._stats.resets += 1
            series.start_unix_nano = start
            return value
        if kind is Kind.COUNTER:
            assert not isinstance(old, Histogram) and not isinstance(value, Histogram)
            return old + value
        return value  # gauge and observed counter: the latest value is the value

    def _expire_node(self, metrics: dict[str, dict[Attrs, _Series]], now: int) -> None:
        horizon = now - self.stale_after_ns
        for name in list(metrics):
            by_attrs = metrics[name]
            stale = [a for a, s in by_attrs.items() if s.last_update_unix_nano < horizon]
            for a in stale:
                del by_attrs[a]
            self._stats.expired += len(stale)
            if not by_attrs:
                del metrics[name]

    def _streams(self, metrics: dict[str, dict[Attrs, _Series]]) -> list[Stream]:
        out: list[Stream] = []
        for name, by_attrs in metrics.items():
            inst = self._instruments[name]
            for a, s in by_attrs.items():
                if inst.kind is Kind.GAUGE:
                    if s.fresh:
                        out.append(Stream(inst, a, 0, s.value))
                else:
                    out.append(Stream(inst, a, s.start_unix_nano, s.value))
        return out
