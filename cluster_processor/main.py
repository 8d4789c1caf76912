"""``kscope-processor``: ingest -> resolve -> aggregate -> OTLP, the entry point the Helm chart runs.

The ``Processor`` wires the tested pieces together: the ``KubeWatcher`` keeps a ``KubeIndex`` in step
with the APIServer, the ``IngestServer`` hands every accepted batch to the ``Aggregator`` (the
processor is its ``BatchSink``), and once per interval the aggregate goes to the ``OtlpPipeline`` and
out through the ``OtlpExporter``. Self-metrics are read from those pieces' counters at scrape time.

The OTLP endpoint is configured like any OpenTelemetry SDK exporter (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``_INSECURE``, ``_HEADERS``, ``_PROTOCOL``), which is what the chart sets. Errors a user can act on
print one line and exit 2 (a bad flag or setting, an unreadable certificate or kubeconfig) or 3 (the
environment: not in a pod and no kubeconfig, the pod's service account unusable, a port in use).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypedDict

import grpc
import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster_processor.aggregate import Aggregator, AggregatorSettings
from cluster_processor.ingest import IngestConfig, IngestConfigError, IngestListenError, IngestServer, ServerTls
from cluster_processor.kube.errors import KubeConfigError, KubeInClusterError
from cluster_processor.kube.index import KubeIndex
from cluster_processor.kube.watcher import KubeWatcher, WatchSettings
from cluster_processor.otlp import encode, prometheus
from cluster_processor.otlp.exporter import ExporterSettings, OtlpExporter
from cluster_processor.otlp.pipeline import OtlpPipeline
from cluster_processor.otlp.prometheus import StoreCollector
from cluster_processor.tracejoin.join import JoinSettings, TraceJoin
from cluster_processor.tracejoin.peers import GrpcTransport, PeerListenError, PeerServer
from kscope.v1 import flow_pb2 as pb
from kscope_common import logging_setup
from kscope_common.cli import EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE
from kscope_common.cli import parser as cli_parser
from kscope_common.runtime import tune_gc

log = structlog.get_logger("kscope.processor")
MAX_AGENT_NODES: Final = 16_384  # agents whose self-metrics one interval re-exports

PROG: Final = "kscope-processor"
ENVIRONMENT: Final = (
    "where it runs cannot serve (not in a pod and no kubeconfig, the\n"
    "     pod's service account not usable, the --listen, --metrics-port or --prometheus-port\n"
    "     address in use)"
)
DEFAULT_OTLP_ENDPOINT: Final = "http://localhost:4317"  # the SDK's default for OTLP/gRPC
_OTLP_GRPC_PORT: Final = 4317


class ProcessorConfigError(Exception):
    """A setting the user must fix; ``main`` prints it on one line and exits 2."""


class ProcessorEnvironmentError(Exception):
    """Where the processor runs must change, not its settings; ``main`` prints it and exits 3."""


# ---- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OtlpTarget:
    endpoint: str  # host:port, as gRPC dials it
    insecure: bool
    headers: tuple[tuple[str, str], ...] = ()


def _truthy(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", ""):
        return False
    raise ProcessorConfigError(f"{name} must be true or false, not {value!r}")


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """``OTEL_EXPORTER_OTLP_HEADERS``: comma-separated ``key=value``, values percent-encoded. gRPC
    metadata keys must be lowercase."""
    out: list[tuple[str, str]] = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = urllib.parse.unquote(key).strip().lower()
        if not sep or not key:
            raise ProcessorConfigError(f"OTEL_EXPORTER_OTLP_HEADERS: {item.strip()!r} is not key=value")
        out.append((key, urllib.parse.unquote(value).strip()))
    return tuple(out)


def otlp_from_env(env: Mapping[str, str]) -> OtlpTarget:
    """The OTLP/gRPC target as the SDK reads it: a scheme decides TLS (http: plaintext, https: TLS);
    without one, ``OTEL_EXPORTER_OTLP_INSECURE`` does (default false)."""
    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip() or "grpc"
    if protocol != "grpc":
        raise ProcessorConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: only grpc is supported")
    raw = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or DEFAULT_OTLP_ENDPOINT
    insecure_env = env.get("OTEL_EXPORTER_OTLP_INSECURE", "")
    if "://" in raw:
        parsed = urllib.parse.urlsplit(raw)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ProcessorConfigError(f"OTEL_EXPORTER_OTLP_ENDPOINT={raw}: expected http(s)://host:port")
        insecure = parsed.scheme == "http"
        host, port = parsed.hostname, parsed.port
    else:
        insecure = _truthy(insecure_env, "OTEL_EXPORTER_OTLP_INSECURE")
        parsed = urllib.parse.urlsplit("//" + raw)
        if not parsed.hostname or parsed.path not in ("", "/"):
            raise ProcessorConfigError(f"OTEL_EXPORTER_OTLP_ENDPOINT={raw}: expected host:port")
        try:
            host, port = parsed.hostname, parsed.port
        except ValueError as exc:
            raise ProcessorConfigError(f"OTEL_EXPORTER_OTLP_ENDPOINT={raw}: {exc}") from exc
    host = f"[{host}]" if ":" in host else host
    headers = parse_headers(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    return OtlpTarget(f"{host}:{port or _OTLP_GRPC_PORT}", insecure, headers)


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    ingest: IngestConfig
    otlp: ExporterSettings
    otlp_insecure: bool = True
    kubeconfig: str | None = None  # None: in-cluster service account
    interval_s: float = 10.0
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"  # self-metrics and the Prometheus endpoint
    prometheus_port: int | None = None  # the RED/L4/DNS/service-graph metrics for Prometheus
    replica: str = field(default_factory=socket.gethostname)  # the pod's name: service.instance.id
    node_name: str = ""  # the node the replica runs on, for its own metrics
    watch: WatchSettings = field(default_factory=WatchSettings)
    aggregator: AggregatorSettings = field(default_factory=AggregatorSettings)
    shutdown_timeout_s: float = 5.0
    trace: JoinSettings = field(default_factory=JoinSettings)
    # The trace join between replicas (docs/traces.md): where this replica answers its peers (None:
    # nowhere, it is alone), its own entry in the peer list, and the list: static, or the ready
    # addresses of a Service's EndpointSlices ("namespace/name"), each with trace_listen's port.
    trace_listen: str | None = None
    trace_self: str = ""
    trace_peers: tuple[str, ...] = ()
    trace_peer_service: str = ""


def _parser() -> argparse.ArgumentParser:
    p = cli_parser(
        PROG,
        "kscope cluster processor: FlowBatches in, Kubernetes-named OTLP metrics, traces and logs out.\n"
        "The OTLP endpoint comes from OTEL_EXPORTER_OTLP_ENDPOINT (+ _INSECURE, _HEADERS).",
        ENVIRONMENT,
    )
    p.add_argument("--listen", default="0.0.0.0:9440", metavar="HOST:PORT", help="gRPC ingest address (0.0.0.0:9440)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT", help="serve self-metrics for Prometheus")
    p.add_argument(
        "--prometheus-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the exported metrics (RED, L4, DNS, service graph) for Prometheus, named by the "
        "OpenTelemetry compatibility rules; scrape with honor_labels: true (each workload is its own job)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); turns TLS on, with --tls-key")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG; in a pod: the service account via KUBERNETES_SERVICE_HOST)",
    )
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="export interval (10)")
    t = p.add_argument_group("trace join (one trace per incoming request across services; docs/traces.md)")
    t.add_argument("--trace-wait", type=float, default=30.0, metavar="SECONDS",
                   help="how long a span waits for the trace of the request it follows before it leaves with "
                   "its pairwise ids (30; 0: no join, every span leaves at once)")  # fmt: skip
    t.add_argument("--trace-exchange", type=float, default=1.0, metavar="SECONDS",
                   help="how often replicas exchange hop traces and timeouts are checked (1)")  # fmt: skip
    t.add_argument("--trace-listen", default=None, metavar="HOST:PORT",
                   help="serve the other replicas here (default 0.0.0.0:9442 when peers are given)")  # fmt: skip
    t.add_argument("--trace-peers", default="", metavar="HOST:PORT,...",
                   help="every replica's --trace-listen address, this one's too (the same list on all)")  # fmt: skip
    t.add_argument("--trace-self", default="", metavar="HOST:PORT",
                   help="this replica's entry in the peer list (default: $POD_IP, --trace-listen's port)")  # fmt: skip
    t.add_argument("--trace-peer-service", default="", metavar="NAMESPACE/NAME",
                   help="find the peers as the ready endpoints of this Service (the replicas' own)")  # fmt: skip
    return p


DEFAULT_TRACE_PORT: Final = 9442


class _TraceConfig(TypedDict):
    trace: JoinSettings
    trace_listen: str | None
    trace_self: str
    trace_peers: tuple[str, ...]
    trace_peer_service: str


def _trace_config(args: argparse.Namespace, env: Mapping[str, str]) -> _TraceConfig:
    if args.trace_wait < 0 or args.trace_exchange <= 0:
        raise ProcessorConfigError("--trace-wait must be >= 0 and --trace-exchange > 0")
    peers = tuple(p.strip() for p in args.trace_peers.split(",") if p.strip())
    service = args.trace_peer_service.strip()
    if service and (service.count("/") != 1 or not all(service.split("/"))):
        raise ProcessorConfigError(f"--trace-peer-service {service!r}: expected NAMESPACE/NAME")
    if peers and service:
        raise ProcessorConfigError("--trace-peers and --trace-peer-service exclude each other")
    listen = args.trace_listen or (f"0.0.0.0:{DEFAULT_TRACE_PORT}" if peers or service else None)
    me = args.trace_self.strip()
    if listen is not None and not me:
        pod_ip = env.get("POD_IP", "").strip()
        port = listen.rpartition(":")[2]
        if pod_ip:
            me = f"[{pod_ip}]:{port}" if ":" in pod_ip else f"{pod_ip}:{port}"
    if peers and me not in peers:
        raise ProcessorConfigError(f"--trace-self {me or '(unset)'} is not one of --trace-peers")
    if service and not me:
        raise ProcessorConfigError("--trace-peer-service needs --trace-self or $POD_IP")
    join = JoinSettings(wait_s=args.trace_wait, exchange_interval_s=args.trace_exchange)
    return {"trace": join, "trace_listen": listen, "trace_self": me, "trace_peers": peers,
            "trace_peer_service": service}  # fmt: skip


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> ProcessorConfig:
    if args.interval <= 0:
        raise ProcessorConfigError("--interval must be > 0")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ProcessorConfigError("--metrics-port must be 0..65535")
    if args.prometheus_port is not None:
        if not 0 <= args.prometheus_port <= 65535:
            raise ProcessorConfigError("--prometheus-port must be 0..65535")
        if args.prometheus_port == args.metrics_port and args.prometheus_port != 0:
            raise ProcessorConfigError("--prometheus-port and --metrics-port must differ")
    tls: ServerTls | None = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key):
            raise ProcessorConfigError("--tls-cert and --tls-key go together (and --tls-ca needs both)")
        tls = ServerTls(args.tls_cert, args.tls_key, args.tls_ca)
    kubeconfig = args.kubeconfig or env.get("KUBECONFIG") or None
    if kubeconfig is None and not env.get("KUBERNETES_SERVICE_HOST"):
        raise ProcessorEnvironmentError(
            "no Kubernetes configuration: pass --kubeconfig (or set KUBECONFIG), or run in a pod "
            "(KUBERNETES_SERVICE_HOST is not set)"
        )
    target = otlp_from_env(env)
    return ProcessorConfig(
        ingest=IngestConfig(listen=args.listen, tls=tls),
        otlp=ExporterSettings(endpoint=target.endpoint, headers=target.headers),
        otlp_insecure=target.insecure,
        kubeconfig=kubeconfig,
        interval_s=args.interval,
        metrics_port=args.metrics_port,
        prometheus_port=args.prometheus_port,
        replica=env.get("POD_NAME") or socket.gethostname(),
        node_name=env.get("NODE_NAME", ""),
        aggregator=AggregatorSettings(default_interval_ns=int(args.interval * 1e9)),
        **_trace_config(args, env),
    )


def configure_logging(level: str) -> None:
    """structlog to stderr: JSON lines (what a log pipeline wants), readable on a terminal."""
    logging_setup.configure(level)


# ---- the processor ------------------------------------------------------------------------------


class Processor:
    """The running pieces. ``start`` / ``stop``, or ``async with``; ``tick`` exports one interval."""

    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config
        self.index = KubeIndex()
        self.aggregator = Aggregator(self.index, config.aggregator)
        self.ingest = IngestServer(self, config.ingest)
        credentials = None if config.otlp_insecure else grpc.ssl_channel_credentials()
        self.exporter = OtlpExporter(config.otlp, credentials=credentials)
        self.pipeline = OtlpPipeline(encode.Reporter(config.replica, config.node_name), self.exporter)
        self.watcher: KubeWatcher | None = None
        self.ticks = 0
        self.tick_errors = 0
        self._agent_stats: dict[str, pb.AgentStats] = {}
        self.agent_stats_dropped = 0  # reports of nodes past MAX_AGENT_NODES in one interval
        self._ticker: asyncio.Task[None] | None = None
        self._stopped = False
        self._metrics_server: object | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_SelfMetrics(self))
        # The Prometheus view reads the OTLP pipeline's own streams (and the agents' counters): the
        # same series, caps and overflow, no second copy.
        self.prometheus = StoreCollector(self.pipeline.reporter, self.pipeline.store, self.pipeline.agent_store)
        self._prometheus_server: object | None = None
        self.transport = GrpcTransport(config.trace_self) if config.trace_listen is not None else None
        self.join = TraceJoin(config.trace, me=config.trace_self, peers=config.trace_peers, transport=self.transport)
        self.peer_server = PeerServer(self.join, config.trace_listen) if config.trace_listen is not None else None
        self._joiner: asyncio.Task[None] | None = None
        self.join_errors = 0

    async def consume(self, batch: pb.FlowBatch) -> None:
        """``BatchSink``: the ingest workers hand over every accepted batch."""
        self.aggregator.add(batch, time.time_ns())
        if batch.HasField("stats"):
            # the latest per node, exported at the next tick; bounded like every table fed from the wire
            if batch.node_name in self._agent_stats or len(self._agent_stats) < MAX_AGENT_NODES:
                self._agent_stats[batch.node_name] = batch.stats
            else:
                self.agent_stats_dropped += 1

    async def start(self) -> int:
        """Start everything; returns the bound ingest port. Raises the components' config errors."""
        cfg = self.config
        # The watcher retries an unreachable APIServer forever, with backoff: flows that arrive
        # meanwhile resolve as external, and resolve properly once the index fills.
        self.watcher = await KubeWatcher.from_config(self.index, cfg.kubeconfig, settings=cfg.watch)
        try:
            if cfg.metrics_port is not None:
                try:
                    self._metrics_server, _ = start_http_server(
                        cfg.metrics_port, addr=cfg.metrics_addr, registry=self.registry
                    )
                except OSError as exc:
                    raise ProcessorEnvironmentError(f"cannot serve metrics on port {cfg.metrics_port}: {exc}") from exc
            if cfg.prometheus_port is not None:
                try:
                    self._prometheus_server, _ = prometheus.serve(
                        self.prometheus, cfg.prometheus_port, cfg.metrics_addr
                    )
                except OSError as exc:
                    raise ProcessorEnvironmentError(
                        f"cannot serve Prometheus metrics on port {cfg.prometheus_port}: {exc}"
                    ) from exc
            self.watcher.start()
            self.exporter.start()
            if self.peer_server is not None:
                try:
                    await self.peer_server.start()
                except PeerListenError as exc:
                    raise ProcessorEnvironmentError(str(exc)) from exc
            port = await self.ingest.start()
        except BaseException:
            await self.stop()
            raise
        self._ticker = asyncio.create_task(self._tick_loop(), name="processor-tick")
        if self.join.enabled:
            self._joiner = asyncio.create_task(self._join_loop(), name="processor-trace-join")
        log.info("processor_started", port=port, otlp=cfg.otlp.endpoint, interval_s=cfg.interval_s)
        return port

    @property
    def metrics_port(self) -> int:
        server = self._metrics_server
        return int(server.server_port) if server is not None else 0  # type: ignore[attr-defined]

    @property
    def prometheus_port(self) -> int:
        server = self._prometheus_server
        return int(server.server_port) if server is not None else 0  # type: ignore[attr-defined]

    def tick(self, now_unix_nano: int | None = None, *, final: bool = False) -> int:
        """Flush one interval of every node to the pipeline; returns the requests submitted. Spans
        go through the trace join: those whose trace is known leave now, the rest when it is (or
        their wait ends); ``final`` sends every one still waiting, with its pairwise ids."""
        now = now_unix_nano if now_unix_nano is not None else time.time_ns()
        submitted = 0
        join = self.join
        for report in self.aggregator.flush(now):
            submitted += self.pipeline.export_interval(report.interval)
            join.add(report.interval.node_name, report.spans, report.held, report.resolved, now)
            if report.logs:
                submitted += self.pipeline.export_logs(report.interval.node_name, report.logs)
        if final:
            join.release_all(now)
        ready = join.take_ready()
        self.aggregator.exemplars(ready)  # their trace ids are final now: their series' next exemplars
        for node, spans in ready.items():
            submitted += self.pipeline.export_spans(node, spans)
        agents, self._agent_stats = self._agent_stats, {}
        for node, stats in agents.items():
            submitted += self.pipeline.export_agent_stats(node, stats, now)
        submitted += self.pipeline.export_self(self.exporter.stats(), now)
        self.ticks += 1
        return submitted

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.tick()
            except Exception:
                # A bug in one interval's data must not stop every later interval.
                self.tick_errors += 1
                log.exception("processor_tick_failed", tick_errors=self.tick_errors)

    def refresh_peers(self) -> None:
        """``--trace-peer-service``: the replicas are that Service's ready endpoints, as the index
        has them now (a replica starting or leaving moves only the hops it owns)."""
        cfg = self.config
        if not cfg.trace_peer_service or cfg.trace_listen is None:
            return
        ns, name = cfg.trace_peer_service.split("/")
        port = cfg.trace_listen.rpartition(":")[2]
        peers = [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in self.index.endpoint_addresses(ns, name)]
        self.join.set_peers(peers)

    async def _join_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.trace.exchange_interval_s)
            try:
                self.refresh_peers()
                if self.transport is not None:  # channels to replicas no longer listed
                    for channel in self.transport.forget(self.join.peers):
                        await channel.close()
                await self.join.exchange(time.time_ns())
            except Exception:
                # a bug in one exchange must not stop the next ones (held spans still time out)
                self.join_errors += 1
                log.exception("processor_trace_join_failed", join_errors=self.join_errors)

    async def stop(self) -> None:
        """Stop taking batches, let the queue drain into the aggregator, export the last interval,
        give the exporter its shutdown time, then stop watching."""
        cfg = self.config
        if self._stopped:
            return
        self._stopped = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
            await self.ingest.stop()
            if self._joiner is not None:
                self._joiner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._joiner
            try:
                self.tick()
                # one last exchange, so the last interval's spans may still join; then nothing waits
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.join.exchange(time.time_ns()), cfg.shutdown_timeout_s / 2)
                self.tick(final=True)
            except Exception:
                log.exception("processor_final_tick_failed")
        else:
            await self.ingest.stop()
        if self.peer_server is not None:
            await self.peer_server.stop()
        if self.transport is not None:
            await self.transport.close()
        await self.exporter.stop(cfg.shutdown_timeout_s)
        if self.watcher is not None:
            await self.watcher.stop()
        for server in (self._metrics_server, self._prometheus_server):
            if server is not None:
                server.shutdown()  # type: ignore[attr-defined]
                server.server_close()  # type: ignore[attr-defined]
        self._metrics_server = self._prometheus_server = None
        log.info("processor_stopped", ingest=self.ingest.counters(), aggregator=self.aggregator.counters())

    async def __aenter__(self) -> Processor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _SelfMetrics(Collector):
    """Read at scrape time (on the HTTP server's thread). Each source hands out a copy, and a
    CPython dict copy is atomic, so a scrape never sees a torn counter."""

    def __init__(self, p: Processor) -> None:
        self._p = p

    def collect(self) -> Iterator[Metric]:
        p = self._p
        ingest = CounterMetricFamily("kscope_processor_ingest", "Ingest counters since start.", labels=["counter"])
        for name, value in p.ingest.counters().items():
            ingest.add_metric([name], value)
        yield ingest
        yield GaugeMetricFamily("kscope_processor_ingest_queue_depth", "Batches waiting.", value=p.ingest.queue_depth)
        sizes = GaugeMetricFamily("kscope_processor_kube_index_size", "KubeIndex table sizes.", labels=["table"])
        for name, value in p.index.sizes().items():
            sizes.add_metric([name], value)
        yield sizes
        watch = CounterMetricFamily(
            "kscope_processor_kube_watch", "List/watch counters per resource.", labels=["resource", "counter"]
        )
        synced = GaugeMetricFamily("kscope_processor_kube_synced", "1 once listed.", labels=["resource"])
        for kind, st in (p.watcher.stats() if p.watcher is not None else {}).items():
            for name in ("lists", "relists", "restarts", "errors", "gone", "events", "bookmarks"):
                watch.add_metric([kind, name], getattr(st, name))
            synced.add_metric([kind], 1 if st.synced else 0)
        yield watch
        yield synced
        agg = CounterMetricFamily(
            "kscope_processor_aggregator", "Aggregator counters (*_overflowed are drops).", labels=["counter"]
        )
        for name, value in p.aggregator.counters().items():
            agg.add_metric([name], value)
        yield agg
        yield GaugeMetricFamily(
            "kscope_processor_sockets_tracked", "Sockets remembered for NAT joins.", value=p.aggregator.sockets_tracked
        )
        items = CounterMetricFamily(
            "kscope_processor_otlp_items", "OTLP items by outcome.", labels=["signal", "outcome"]
        )
        queued = GaugeMetricFamily("kscope_processor_otlp_queued", "Export requests waiting.", labels=["signal"])
        for sig, stats in p.exporter.stats().items():
            for outcome in (
                "submitted",
                "exported",
                "rejected",
                "dropped_queue_full",
                "dropped_non_retryable",
                "dropped_retry_exhausted",
                "dropped_shutdown",
                "retries",
            ):
                items.add_metric([sig.value, outcome], getattr(stats, outcome))
            queued.add_metric([sig.value], stats.queued)
        yield items
        yield queued
        yield CounterMetricFamily(
            "kscope_processor_tick_errors", "Intervals that failed to export.", value=p.tick_errors
        )
        agent_stats = CounterMetricFamily(
            "kscope_processor_agent_stats_dropped",
            "Agent self-metric reports not re-exported: too many nodes in one interval, or names cut.",
            labels=["reason"],
        )
        agent_stats.add_metric(["too_many_nodes"], p.agent_stats_dropped)
        agent_stats.add_metric(["too_many_names"], p.pipeline.agent_stats_cut)
        yield agent_stats
        join = CounterMetricFamily(
            "kscope_processor_trace_join", "Trace join counters since start (docs/traces.md).", labels=["counter"]
        )
        for name, value in p.join.counters.copy().items():
            join.add_metric([name], value)
        join.add_metric(["join_errors"], p.join_errors)
        yield join
        sizes = GaugeMetricFamily("kscope_processor_trace_join_size", "Trace join tables.", labels=["table"])
        for name, value in p.join.sizes().items():
            sizes.add_metric([name], value)
        yield sizes


# ---- entry point --------------------------------------------------------------------------------


async def serve(config: ProcessorConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then shut down cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        async with Processor(config):
            await stop.wait()
            log.info("processor_stopping")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(args, os.environ if env is None else env)
        tune_gc()  # the process is a long-running server from here on (not done in-process by tests)
        asyncio.run(serve(config))
    except (ProcessorEnvironmentError, IngestListenError, KubeInClusterError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except (ProcessorConfigError, IngestConfigError, KubeConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
