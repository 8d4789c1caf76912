"""The agent and the processor's aggregation in one process: ``kscope run``'s batch sink.

The agent hands each interval's ``FlowBatch`` to ``submit`` (as it would ship it to a processor);
``LocalNamer`` learns who serves which address, the cluster processor's own ``Aggregator`` folds it
(the same per-edge RED, L4, DNS and service-graph rules), and ``flush`` closes the interval for the
live map, with ``--otlp`` for the processor's own ``OtlpPipeline`` and ``OtlpExporter``, with
``--prometheus`` for the processor's Prometheus view (``otlp/prometheus.IntervalCollector``). The
exporter is asyncio code: it runs on an event loop in a thread of its own, and intervals reach it
through ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, Final

import grpc
import structlog

from cluster_processor.aggregate import Aggregator, AggregatorSettings, NodeReport
from cluster_processor.main import OtlpTarget
from cluster_processor.otlp import encode
from cluster_processor.otlp.exporter import ExporterSettings, OtlpExporter
from cluster_processor.otlp.model import SpanRecord
from cluster_processor.otlp.pipeline import OtlpPipeline
from cluster_processor.otlp.prometheus import IntervalCollector, serve
from cluster_processor.tracejoin import JoinSettings, TraceJoin
from kscope.v1 import flow_pb2 as pb
from node_exporter.errors import HostError
from node_exporter.local.namer import LocalNamer

log = structlog.get_logger("kscope.local")


# Answers the resolution cache keeps (per table): LocalNamer is process-keyed, so they are keyed by
# process, address and port; a table that fills is dropped whole and counted (resolutions_cleared).
MAX_RESOLUTIONS: Final = 16_384
# How long a span waits for the trace of the request it follows (cluster_processor/tracejoin): on one
# host every hop of a chain is in the same interval's records, so only a span whose caller is not
# traced here (a client on another host) waits this long before it leaves with its pairwise ids.
TRACE_WAIT_S: Final = 5.0


def local_settings(interval_s: float, max_resolutions: int = MAX_RESOLUTIONS) -> AggregatorSettings:
    # The first interval is one agent interval long (rates over a processor's 10 s default would read low).
    return AggregatorSettings(max_resolutions=max_resolutions, default_interval_ns=int(interval_s * 1e9))


class _Exporting:
    """The processor's OTLP pipeline and exporter on an event loop in their own thread."""

    def __init__(self, target: OtlpTarget, node_name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kscope-otlp", daemon=True)
        self.thread.start()
        credentials = None if target.insecure else grpc.ssl_channel_credentials()
        settings = ExporterSettings(endpoint=target.endpoint, headers=target.headers)

        async def build() -> OtlpExporter:  # grpc.aio objects belong to the loop they are made in
            exporter = OtlpExporter(settings, credentials=credentials)
            exporter.start()
            return exporter

        self.exporter = self._call(build())
        self.pipeline = OtlpPipeline(encode.Reporter(f"kscope-run/{node_name}", node_name), self.exporter)
        self.errors = 0

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def export(self, reports: list[NodeReport], spans: dict[str, list[SpanRecord]], now_unix_nano: int) -> None:
        """The intervals' metrics and logs, and the spans the trace join released (by node)."""

        async def submit() -> None:  # the exporter's queues are the loop's: submit on it
            p = self.pipeline
            for r in reports:
                p.export_interval(r.interval)
                if r.logs:
                    p.export_logs(r.interval.node_name, r.logs)
            for node, node_spans in spans.items():
                p.export_spans(node, node_spans)
            p.export_self(self.exporter.stats(), now_unix_nano)

        self._call(submit())

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for signal, st in self.exporter.stats().items():
            out[f"otlp_{signal.value}_exported"] = st.exported
            out[f"otlp_{signal.value}_dropped"] = st.dropped
        return out

    def close(self, timeout_s: float) -> None:
        try:
            self._call(self.exporter.stop(timeout_s), timeout=timeout_s + 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout_s)


class LocalPipeline:
    """``submit`` / ``counters`` / ``close`` as the agent's ``FlowShipper``; ``flush`` per interval."""

    def __init__(
        self,
        node_name: str,
        namer: LocalNamer,
        *,
        settings: AggregatorSettings | None = None,
        otlp: OtlpTarget | None = None,
        prometheus: tuple[str, int] | None = None,
    ) -> None:
        """``prometheus``: (address, port) to serve the same metrics for Prometheus (the processor's
        ``--prometheus-port`` naming); HostError when it cannot be bound."""
        self.node_name = node_name
        self.namer = namer
        self.aggregator = Aggregator(namer, settings or local_settings(1.0))
        self.export_errors = 0
        self._prometheus: IntervalCollector | None = None
        self._prometheus_server: Any = None
        if prometheus is not None:
            self._prometheus = IntervalCollector(encode.Reporter(f"kscope-run/{node_name}", node_name))
            try:
                self._prometheus_server, _ = serve(self._prometheus, prometheus[1], prometheus[0])
            except OSError as exc:
                raise HostError(f"cannot serve Prometheus metrics on {prometheus[0]}:{prometheus[1]}: {exc}") from exc
        self._otlp = _Exporting(otlp, node_name) if otlp is not None else None
        # one trace per incoming request along a chain of local services, as the processor joins them
        # (no peers: one process); only where spans leave (--otlp)
        self.join = TraceJoin(JoinSettings(wait_s=TRACE_WAIT_S)) if otlp is not None else None

    @property
    def prometheus_port(self) -> int:
        return int(self._prometheus_server.server_port) if self._prometheus_server is not None else 0

    def submit(self, batch: pb.FlowBatch) -> None:
        self.namer.learn(batch)  # first: a server seen in this batch names its clients' records too
        self.aggregator.add(batch, time.time_ns())

    def flush(self, now_unix_nano: int | None = None, *, final: bool = False) -> list[NodeReport]:
        """Close the interval; ``final``: the last one, every span the join still holds leaves too."""
        now = now_unix_nano if now_unix_nano is not None else time.time_ns()
        reports = self.aggregator.flush(now)
        if self._prometheus is not None:
            for r in reports:
                self._prometheus.add(r.interval)
            self._prometheus.expire(now)
        if self._otlp is not None and self.join is not None:
            for r in reports:
                self.join.add(r.interval.node_name, r.spans, r.held, r.resolved, now)
            self.join.expire(now)
            if final:
                self.join.release_all(now)
            ready = self.join.take_ready()
            self.aggregator.exemplars(ready)
            try:
                self._otlp.export(reports, ready, now)
            except Exception:  # one interval's export must not stop the agent: counted and logged
                log.exception("otlp_export_failed")
                self.export_errors += 1
        return reports

    def counters(self) -> dict[str, int]:
        out = {f"aggregator_{k}": v for k, v in self.aggregator.counters().items()}
        out.update({f"namer_{k}": v for k, v in self.namer.counters().items()})
        out["resolutions_cleared"] = self.aggregator.resolutions.cleared
        if self._otlp is not None:
            out.update(self._otlp.counters())
            out["otlp_export_errors"] = self.export_errors
        if self.join is not None:
            out.update(self.join.counters)
        return out

    def close(self, timeout_s: float = 5.0) -> None:
        if self._otlp is not None:
            self.flush(final=True)  # the last interval leaves too, and every span still waiting
            self._otlp.close(timeout_s)
            self._otlp = None
        if self._prometheus_server is not None:
            self._prometheus_server.shutdown()
            self._prometheus_server.server_close()
            self._prometheus_server = None
