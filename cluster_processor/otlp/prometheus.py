"""The cumulative streams kscope exports as OTLP, served for Prometheus to scrape.

A prometheus-client ``Collector`` reads a ``CumulativeStore`` at scrape time (no second copy of
the state, the same cardinality caps and overflow streams) and names what it finds by the
OpenTelemetry "Prometheus and OpenMetrics Compatibility" rules, as the Collector's
``prometheusexporter`` does for many resources on one endpoint:

- metric names: characters outside ``[a-zA-Z0-9_:]`` become ``_``, runs of ``_`` collapse; the
  UCUM unit is appended when the name does not already end in it (``s`` -> ``_seconds``, ``By`` ->
  ``_bytes``; annotations such as ``{request}`` are dropped); monotonic sums end in ``_total``.
  So ``http.server.request.duration`` is ``http_server_request_duration_seconds_bucket``/``_sum``/
  ``_count``, and Tempo's ``traces_service_graph_request_total`` stays as the servicegraph
  connector names it.
- labels: data-point attributes, sanitised the same way (``http.request.method`` ->
  ``http_request_method``; keys that collide join their values with ``;`` in key order), plus
  ``job`` (``service.namespace/service.name``) and ``instance`` (``service.instance.id``) of the
  series' resource, and ``otel_scope_name``/``otel_scope_version``.
- resources: the rest of each resource's attributes in one ``target_info`` series per resource
  (info-typed, joined on ``job``/``instance``). Scrape with ``honor_labels: true`` so the ``job``
  and ``instance`` of the series win over the scrape target's (each workload has its own).

Usage: ``registry.register(StoreCollector(reporter, pipeline.store))`` (the processor), or an
``IntervalCollector`` fed ``model.Interval``s (one host, no OTLP pipeline); then ``serve``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Final

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cluster_processor.otlp import semconv
from cluster_processor.otlp.cumulative import CumulativeStore, Series
from cluster_processor.otlp.encode import SCOPE_NAME, SERVICE_INSTANCE_ID, Reporter
from cluster_processor.otlp.model import SERVICE_NAME, SERVICE_NAMESPACE, Attrs, AttrValue, Histogram, Interval
from cluster_processor.otlp.semconv import Instrument, Kind

# UCUM units -> the Prometheus unit words the compatibility spec appends (the Collector's table,
# the units kscope uses and their near relatives).
UNIT_WORDS: Final = {
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "min": "minutes",
    "h": "hours",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "bit": "bits",
    "Hz": "hertz",
    "%": "percent",
}
TARGET_INFO: Final = "target"  # an info-typed family: its one sample is target_info
SCOPE_NAME_LABEL: Final = "otel_scope_name"
SCOPE_VERSION_LABEL: Final = "otel_scope_version"
_INVALID: Final = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL: Final = re.compile(r"[^a-zA-Z0-9_]")
_RUNS: Final = re.compile(r"__+")
_TYPES: Final = {
    Kind.COUNTER: "counter",
    Kind.OBSERVED_COUNTER: "counter",
    Kind.GAUGE: "gauge",
    Kind.HISTOGRAM: "histogram",
}
_HISTOGRAM: Final = Kind.HISTOGRAM
# How long a gauge's last value is served after its node last reported it (an RTT, an accept queue):
# Prometheus' own lookback, so a gauge the agent reports now and then neither flickers in and out of
# scrapes (each absence would mark the series stale) nor lingers longer than an OTLP-fed Prometheus
# would show it.
GAUGE_MAX_AGE_NS: Final = 5 * 60 * 1_000_000_000


def unit_word(unit: str, kind: Kind) -> str:
    """The suffix a UCUM unit adds to a metric name ("" for none): ``s`` -> ``seconds``,
    ``By/s`` -> ``bytes_per_second``, ``{request}`` -> "" (an annotation), ``1`` -> ``ratio``
    (gauges only)."""
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    if not unit:
        return ""
    if unit == "1":
        return "ratio" if kind is Kind.GAUGE else ""
    per, _, denominator = unit.partition("/")
    words = [UNIT_WORDS.get(per, per)] if per else []
    if denominator:
        words.append("per_" + UNIT_WORDS.get(denominator, denominator).removesuffix("s"))
    return _RUNS.sub("_", _INVALID.sub("_", "_".join(words))).strip("_")


@lru_cache(maxsize=1024)
def metric_name(inst: Instrument) -> str:
    """The Prometheus family name of an instrument, without a type suffix (prometheus-client adds
    ``_total``, ``_bucket``...): sanitised, with its unit word."""
    name = _RUNS.sub("_", _INVALID.sub("_", inst.name)).strip("_")
    if name[:1].isdigit():
        name = "_" + name
    counter = inst.kind in (Kind.COUNTER, Kind.OBSERVED_COUNTER)
    if counter:
        name = name.removesuffix("_total")  # put back, last, by the exposition
    word = unit_word(inst.unit, inst.kind)
    if word and not name.endswith("_" + word):
        name += "_" + word
    return name


@lru_cache(maxsize=4096)
def label_name(key: str) -> str:
    """An attribute key as a label name: invalid characters to ``_``, runs of ``_`` collapsed, a
    leading digit prefixed with ``key_`` (``__`` names are Prometheus' own)."""
    name = _RUNS.sub("_", _INVALID_LABEL.sub("_", key))
    if name[:1].isdigit():
        return "key_" + name
    if name.startswith("_"):
        return "key" + name
    return name


def label_value(v: AttrValue) -> str:
    if isinstance(v, bool):  # before int: bool is an int in Python
        return "true" if v else "false"
    return str(v)


@lru_cache(maxsize=65_536)  # one per attribute set (the store hands out the same tuples)
def labels(attributes: Attrs) -> tuple[tuple[str, str], ...]:
    """Attributes as labels; two keys that sanitise to one label join their values with ``;``
    in key order (attributes are sorted by key)."""
    out: dict[str, str] = {}
    for k, v in attributes:
        name = label_name(k)
        value = label_value(v)
        out[name] = f"{out[name]};{value}" if name in out else value
    return tuple(out.items())


@lru_cache(maxsize=65_536)  # one per resource
def job_instance(resource: Attrs) -> tuple[str, str]:
    """``job`` and ``instance`` of a resource, as the spec derives them."""
    values = dict(resource)
    name = label_value(values.get(SERVICE_NAME, "unknown_service"))
    namespace = values.get(SERVICE_NAMESPACE)
    job = f"{label_value(namespace)}/{name}" if namespace not in (None, "") else name
    return job, label_value(values.get(SERVICE_INSTANCE_ID, ""))


@lru_cache(maxsize=65_536)
def target_labels(resource: Attrs) -> tuple[tuple[str, str], ...]:
    """The labels of a resource's ``target_info`` series: job, instance and every other attribute."""
    job, instance = job_instance(resource)
    rest = tuple((k, v) for k, v in resource if k not in (SERVICE_NAME, SERVICE_NAMESPACE, SERVICE_INSTANCE_ID))
    return (("job", job), ("instance", instance), *labels(rest))


def _histogram_samples(m: Metric, name: str, base: dict[str, str], h: Histogram) -> None:
    """OTLP buckets (each its own count) as Prometheus' cumulative ``le`` buckets."""
    running = 0
    for bound, n in zip(h.bounds, h.bucket_counts, strict=False):
        running += n
        m.add_sample(name + "_bucket", {**base, "le": floatToGoString(bound)}, running)  # type: ignore[no-untyped-call]
    count = h.count
    m.add_sample(name + "_bucket", {**base, "le": "+Inf"}, count)
    m.add_sample(name + "_count", base, count)
    m.add_sample(name + "_sum", base, h.sum)


class StoreCollector(Collector):
    """Serves the streams of one or more ``CumulativeStore``s (the OTLP pipeline's, the agents'):
    every metric once, its series from every node under their resources, and ``target_info``.
    ``reporter`` gives each series its resource exactly as the OTLP encoder does."""

    def __init__(self, reporter: Reporter, *stores: CumulativeStore, gauge_max_age_ns: int = GAUGE_MAX_AGE_NS) -> None:
        self._reporter = reporter
        self._stores = stores
        self._gauge_max_age_ns = gauge_max_age_ns
        self.duplicates = 0  # series left out of scrapes so far (the counter below)

    def collect(self) -> Iterator[Metric]:
        reporter = self._reporter
        scope = ((SCOPE_NAME_LABEL, SCOPE_NAME), (SCOPE_VERSION_LABEL, reporter.version))
        families: dict[str, tuple[Metric, set[tuple[tuple[str, str], ...]]]] = {}
        resources: dict[Attrs, None] = {}
        duplicates = 0
        for store in self._stores:
            for node, inst, series in store.snapshot(self._gauge_max_age_ns):
                name = metric_name(inst)
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = (Metric(name, inst.description, _TYPES[inst.kind]), set())
                duplicates += self._add(fam[0], fam[1], inst, node, series, scope, resources)
        yield from (m for m, _ in families.values())
        info = Metric(TARGET_INFO, "Target metadata: the resource attributes of each job and instance.", "info")
        for res in resources:
            info.add_sample("target_info", dict(target_labels(res)), 1)
        if info.samples:
            yield info
        self.duplicates += duplicates
        yield CounterMetricFamily(
            "kscope_prometheus_series_dropped",
            "Series left out of scrapes: another series of the metric had the same labels (two resources "
            "with one job and instance).",
            value=self.duplicates,
        )

    def _add(
        self,
        m: Metric,
        seen: set[tuple[tuple[str, str], ...]],
        inst: Instrument,
        node: str,
        series: Iterable[Series],
        scope: tuple[tuple[str, str], ...],
        resources: dict[Attrs, None],
    ) -> int:
        """Adds the series' samples to ``m``; returns how many were left out as duplicates."""
        duplicates = 0
        reporter = self._reporter
        name = m.name
        sample_name = name + "_total" if m.type == "counter" else name
        kscope_resource = reporter.metrics_resource(node)
        for s in series:
            value = s.value  # read once: the store's thread may replace it meanwhile
            res = reporter.workload_resource(s.resource, node) if s.resource else kscope_resource
            job, instance = job_instance(res)
            key = (*labels(s.attributes), ("job", job), ("instance", instance))
            if key in seen:
                # Two resources that Prometheus cannot tell apart (a Deployment and a StatefulSet of
                # one name and namespace): a second sample of one series would fail the scrape's
                # ingestion, so it is left out and counted.
                duplicates += 1
                continue
            seen.add(key)
            resources[res] = None
            base = {**dict(key), **dict(scope)}
            if inst.kind is _HISTOGRAM:
                assert isinstance(value, Histogram)
                _histogram_samples(m, name, base, value)
            else:
                assert not isinstance(value, Histogram)
                m.add_sample(sample_name, base, value)
        return duplicates


class IntervalCollector(StoreCollector):
    """A ``StoreCollector`` over its own store, fed ``model.Interval``s (what an aggregator hands
    the OTLP pipeline): for a process that serves Prometheus without exporting OTLP. ``add`` may
    run on another thread than the scrapes."""

    def __init__(
        self, reporter: Reporter, store: CumulativeStore | None = None, *, gauge_max_age_ns: int = GAUGE_MAX_AGE_NS
    ) -> None:
        self.store = store or CumulativeStore()
        super().__init__(reporter, self.store, gauge_max_age_ns=gauge_max_age_ns)
        self._lock = threading.Lock()  # one writer at a time; scrapes read without it (snapshot)

    def add(self, interval: Interval) -> None:
        with self._lock:
            self.store.update_series(
                interval.node_name,
                interval.start_unix_nano,
                interval.end_unix_nano,
                semconv.interval_samples(interval),
            )

    def expire(self, now_unix_nano: int) -> None:
        """Forget streams not updated for the store's ``stale_after_ns`` (call once per interval)."""
        with self._lock:
            self.store.expire(now_unix_nano)


def serve(collector: Collector, port: int, addr: str = "0.0.0.0") -> tuple[object, threading.Thread]:
    """Serve ``collector`` alone on ``addr:port`` (``/metrics``, gzip when asked, OpenMetrics when
    accepted) from a daemon thread; returns prometheus-client's (server, thread): ``server.shutdown()``
    and ``server.server_close()`` stop it, ``server.server_port`` is the bound port. Raises
    ``OSError`` when the address cannot be bound."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return server, thread
