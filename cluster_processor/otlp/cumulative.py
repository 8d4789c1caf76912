"""Per-interval samples in, cumulative metric streams out, with bounded cardinality.

Why cumulative: the backends kscope feeds most often are Prometheus-compatible (Prometheus'
OTLP receiver, Mimir, Thanos, Grafana Cloud); they store cumulative counters and drop or
mishandle delta sums, and a deltatocumulative processor in the collector would be one more
stateful hop to run. kscope can do it itself because every stream has exactly one writer (the
resource names the reporting node and the replica). Each stream keeps the start time of the
interval that created it, so a backend sees a restart (a new start time) as a reset and never
as a drop in a counter.

Cardinality is bounded per (node, metric), as the OpenTelemetry SDK does: once a metric holds
``max_series - 1`` streams (of all the node's workload resources together), samples for new
(resource, attribute) sets go to one overflow stream with the single attribute
``otel.metric.overflow=true`` under kscope's resource of the node, and are counted. The store as a whole
holds at most ``max_total_series`` streams (~1.6 kB a stream with its encoded point: 50 nodes x ~20
metrics x ``max_series`` would be GBs): past it, a new stream of any node goes to that node's overflow
stream for its metric, counted the same way. Streams not updated for
``stale_after_ns`` are forgotten, which frees their slots; if they come back they start anew,
with a new start time, as cumulative semantics require.

Pure state: time is passed in, nothing here does I/O.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from cluster_processor.otlp.model import Exemplar, Histogram
from cluster_processor.otlp.semconv import OVERFLOW, Instrument, Kind, Sample
from cluster_processor.resolved import Attrs

OVERFLOW_ATTRS: Final[Attrs] = ((OVERFLOW, True),)
# A stream is (resource, attributes) within its node and metric; the overflow stream is kscope's.
_Key = tuple[Attrs, Attrs]
OVERFLOW_KEY: Final[_Key] = ((), OVERFLOW_ATTRS)
DEFAULT_MAX_SERIES: Final = 2000  # the OpenTelemetry SDK's default cardinality limit
DEFAULT_MAX_TOTAL_SERIES: Final = 100_000  # every node's streams together: ~160 MB (bench/memory.py)
DEFAULT_STALE_AFTER_NS: Final = 10 * 60 * 1_000_000_000
# Members read through module globals in hot code: an Enum class's attribute read takes ~10x a global's.
_COUNTER, _HISTOGRAM, _GAUGE = Kind.COUNTER, Kind.HISTOGRAM, Kind.GAUGE


@dataclass(frozen=True, slots=True)
class Stream:
    """One cumulative stream at the end of an interval, ready to encode."""

    instrument: Instrument
    attributes: Attrs
    start_unix_nano: int  # 0 for gauges, whose points stand alone
    value: int | float | Histogram
    resource: Attrs = ()  # the sample's (semconv.Sample.resource): () is kscope's


class Series:
    """One live cumulative stream. The ``wire*`` slots belong to the encoder (``encode``): the bytes
    of the stream's last data point before and after its time field, and the part of them that
    stays while the value moves, so an unchanged stream is not encoded again. The store sets
    ``changed`` when the value moves and drops ``wire`` when anything else in those bytes would (a
    restart's new start time and bounds)."""

    __slots__ = ("attributes", "changed", "exemplar", "key", "last_update_unix_nano", "name", "resource", "serial",
                 "start_unix_nano", "value", "wire", "wire_fixed", "wire_lead")  # fmt: skip

    def __init__(
        self, name: str, key: tuple[Attrs, Attrs], start: int, end: int, value: int | float | Histogram
    ) -> None:
        self.name = name
        self.key = key  # in the store: the sample's (resource, attributes), or OVERFLOW_KEY
        self.resource, self.attributes = key
        self.start_unix_nano = start
        self.last_update_unix_nano = end
        self.value = value
        self.serial = 0  # the update() call that last touched it: a gauge is exported only then
        self.changed = True
        self.wire: bytes | None = None
        self.wire_lead = b""
        self.wire_fixed: bytes | None = None
        # a histogram's exemplar for its next exported point only (the encoder takes it)
        self.exemplar: Exemplar | None = None


@dataclass(slots=True)
class StoreStats:
    series: int = 0  # live streams, all nodes
    overflowed: dict[str, int] = field(default_factory=dict)  # metric -> samples folded into overflow
    overflowed_store_full: int = 0  # of those, folded because the store held max_total_series streams
    expired: int = 0  # streams forgotten after going stale
    resets: int = 0  # streams restarted because their histogram bounds changed


class _Node:
    """One reporting node's streams: metric name -> attributes -> series (dicts keep insertion
    order, so export order is stable), and which series each update touched, oldest first, so
    expiry visits only what may have gone stale instead of every stream every interval."""

    __slots__ = ("end", "metrics", "touched")

    def __init__(self) -> None:
        self.metrics: dict[str, dict[_Key, Series]] = {}
        self.touched: deque[tuple[int, list[Series]]] = deque()  # (end of update, series it touched)
        self.end = 0  # the latest end of an interval applied: what a gauge's age is measured from


class CumulativeStore:
    def __init__(
        self,
        *,
        max_series: int = DEFAULT_MAX_SERIES,
        stale_after_ns: int = DEFAULT_STALE_AFTER_NS,
        max_total_series: int = DEFAULT_MAX_TOTAL_SERIES,
    ) -> None:
        if max_series < 2:
            raise ValueError("max_series must leave room for one stream and the overflow stream")
        if max_total_series < 1:
            raise ValueError("max_total_series must be at least 1")
        self.max_series = max_series
        self.max_total_series = max_total_series
        self.stale_after_ns = stale_after_ns
        self._nodes: dict[str, _Node] = {}
        self._instruments: dict[str, Instrument] = {}
        self._stats = StoreStats()
        self._live = 0
        self._serial = 0

    def update(self, node: str, start_unix_nano: int, end_unix_nano: int, samples: Iterable[Sample]) -> list[Stream]:
        """Apply one interval of ``node``'s samples; return every live stream of that node."""
        out: list[Stream] = []
        for inst, series in self.update_series(node, start_unix_nano, end_unix_nano, samples):
            gauge = inst.kind is _GAUGE
            out += [Stream(inst, s.attributes, 0 if gauge else s.start_unix_nano, s.value, s.resource) for s in series]
        return out

    def update_series(
        self, node: str, start_unix_nano: int, end_unix_nano: int, samples: Iterable[Sample]
    ) -> list[tuple[Instrument, list[Series]]]:
        """``update`` for the encoder: per metric in first-seen order, its live series (a gauge's
        only when this interval refreshed them) as the store's own objects, not copies."""
        st = self._nodes.get(node)
        if st is None:
            st = self._nodes[node] = _Node()
        self._serial += 1
        st.end = max(st.end, end_unix_nano)
        touched: list[Series] = []
        metrics = st.metrics
        known = len(metrics)
        serial = self._serial
        instruments = self._instruments
        start, end = start_unix_nano, end_unix_nano
        for sample in samples:
            # The common case inline (an existing stream of a known instrument); the rest in _apply.
            inst, attributes, value, resource, exemplar = sample
            by_attrs = metrics.get(inst.name)
            if by_attrs is None or instruments.get(inst.name) is not inst:
                self._apply(metrics, sample, start, end, touched)
                continue
            series = by_attrs.get((resource, attributes))
            if series is None:
                if inst.kind is _COUNTER and value == 0:
                    continue  # no stream yet, and a zero delta is no reason to start one
                self._apply(metrics, sample, start, end, touched)
                continue
            series.last_update_unix_nano = end
            if series.serial != serial:
                series.serial = serial
                touched.append(series)
            kind = inst.kind
            if kind is _COUNTER:
                if value:
                    series.value += value  # type: ignore[operator]
                    series.changed = True
            elif kind is _HISTOGRAM:
                self._merge(series, value, start)  # type: ignore[arg-type]
                if exemplar is not None:
                    series.exemplar = exemplar
            else:
                series.value = value  # gauge and observed counter: the latest value is the value
                series.changed = True
        if len(metrics) > known:
            for name in [n for n, by_attrs in metrics.items() if not by_attrs]:
                del metrics[name]
        self._touch(st, end_unix_nano, touched)
        self._expire_node(st, end_unix_nano)
        if not st.metrics:
            del self._nodes[node]
        out: list[tuple[Instrument, list[Series]]] = []
        for name, by_attrs in st.metrics.items():
            inst = self._instruments[name]
            if inst.kind is _GAUGE:
                fresh = [s for s in by_attrs.values() if s.serial == serial]
                if fresh:
                    out.append((inst, fresh))
            else:
                out.append((inst, list(by_attrs.values())))
        return out

    def expire(self, now_unix_nano: int) -> None:
        """Forget stale streams of every node, including nodes that stopped reporting."""
        for node in list(self._nodes):
            st = self._nodes[node]
            self._expire_node(st, now_unix_nano)
            if not st.metrics:
                del self._nodes[node]

    def snapshot(self, gauge_max_age_ns: int) -> list[tuple[str, Instrument, list[Series]]]:
        """Every node's live streams, per metric: (node, instrument, series), a gauge's only when the
        node reported it at most ``gauge_max_age_ns`` before its latest interval. For a
        reader on another thread (a Prometheus scrape) while ``update`` runs: each level is copied
        by one ``list()`` of a dict, which CPython does without running Python code between items,
        so an update never changes a dict while it is read. The series are the store's own objects;
        a reader takes each one's ``value`` once (an int, float or immutable ``Histogram``)."""
        out: list[tuple[str, Instrument, list[Series]]] = []
        instruments = self._instruments
        for node, st in list(self._nodes.items()):
            horizon = st.end - gauge_max_age_ns
            for name, by_attrs in list(st.metrics.items()):
                inst = instruments.get(name)
                if inst is None:
                    continue
                series = list(by_attrs.values())
                if inst.kind is _GAUGE:
                    series = [s for s in series if s.last_update_unix_nano >= horizon]
                if series:
                    out.append((node, inst, series))
        return out

    def stats(self) -> StoreStats:
        return StoreStats(
            self._live,
            dict(self._stats.overflowed),
            self._stats.overflowed_store_full,
            self._stats.expired,
            self._stats.resets,
        )

    # ---- internals ------------------------------------------------------------------------------

    def _apply(
        self, metrics: dict[str, dict[_Key, Series]], sample: Sample, start: int, end: int, touched: list[Series]
    ) -> None:
        inst = sample.instrument
        known = self._instruments.setdefault(inst.name, inst)
        if known is not inst and known != inst:
            raise ValueError(f"instrument {inst.name} redefined: {known} != {inst}")
        by_attrs = metrics.get(inst.name)
        if by_attrs is None:
            # Created even for a zero delta, which keeps the metric's place in the export order;
            # dropped again at the end of the update if it is still empty.
            by_attrs = metrics[inst.name] = {}
        value = sample.value
        key: _Key = (sample.resource, sample.attributes)
        series = by_attrs.get(key)
        if series is None:
            if inst.kind is _COUNTER and value == 0:
                return  # a zero delta is no reason to spend a slot on a new stream
            full = self._live >= self.max_total_series and key != OVERFLOW_KEY
            if full or len(by_attrs) >= self.max_series - (0 if OVERFLOW_KEY in by_attrs else 1):
                key = OVERFLOW_KEY
                self._stats.overflowed[inst.name] = self._stats.overflowed.get(inst.name, 0) + 1
                self._stats.overflowed_store_full += full
            series = by_attrs.get(key)
            if series is None:
                series = by_attrs[key] = Series(inst.name, key, start, end, value)
                series.serial = self._serial
                series.exemplar = sample.exemplar
                self._live += 1
                touched.append(series)
                return
        series.last_update_unix_nano = end
        if series.serial != self._serial:
            series.serial = self._serial
            touched.append(series)
        kind = inst.kind
        old = series.value
        if kind is _COUNTER:
            if value:
                series.value = old + value  # type: ignore[operator]
                series.changed = True
        elif kind is _HISTOGRAM:
            assert isinstance(value, Histogram)
            self._merge(series, value, start)
            if sample.exemplar is not None:
                series.exemplar = sample.exemplar
        else:
            series.value = value  # gauge and observed counter: the latest value is the value
            series.changed = True

    def _merge(self, series: Series, value: Histogram, start: int) -> None:
        old = series.value
        assert isinstance(old, Histogram)
        if old.bounds == value.bounds:
            series.value = old.merge(value)
        else:
            # Buckets changed (reconfigured aggregator): the old totals cannot continue; restart.
            self._stats.resets += 1
            series.start_unix_nano = start
            series.value = value
            series.wire = None
        series.changed = True

    def _touch(self, st: _Node, end: int, touched: list[Series]) -> None:
        if not touched:
            return
        if st.touched and st.touched[-1][0] > end:
            # Time went backwards (a wall clock set back): keep the queue ordered by end time.
            ordered = list(st.touched)
            insort(ordered, (end, touched), key=lambda entry: entry[0])
            st.touched = deque(ordered)
        else:
            st.touched.append((end, touched))

    def _expire_node(self, st: _Node, now: int) -> None:
        horizon = now - self.stale_after_ns
        queue = st.touched
        metrics = st.metrics
        while queue and queue[0][0] < horizon:
            for s in queue.popleft()[1]:
                if s.last_update_unix_nano >= horizon:
                    continue  # touched again since: a later entry has it
                by_attrs = metrics.get(s.name)
                if by_attrs is None or by_attrs.get(s.key) is not s:
                    continue  # already forgotten through an earlier entry
                del by_attrs[s.key]
                self._live -= 1
                self._stats.expired += 1
                if not by_attrs:
                    del metrics[s.name]
