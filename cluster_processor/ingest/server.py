"""The gRPC ingest endpoint: ``kscope.v1.FlowIngest/ExportFlows`` on ``grpc.aio``, a thin adapter around
the pure checks in ``validate``.

An accepted batch goes into a bounded queue and the RPC is answered at once; sink workers take batches
off the queue and hand them to the ``BatchSink``. When the queue is full the RPC fails with UNAVAILABLE
and a RetryInfo delay, which OTLP-style clients retry: back-pressure reaches the agents, and nothing is
dropped here without a counter saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NoReturn, Protocol, TypeAlias

import grpc
import grpc.aio
import structlog

from cluster_processor.ingest.dedupe import SeenBatches
from cluster_processor.ingest.errors import IngestConfigError, IngestListenError
from cluster_processor.ingest.validate import Limits, Rejection, decode, record_count, validate
from kscope.v1 import flow_pb2 as pb
from kscope_common.grpc_retry import STATUS_DETAILS_KEY, status_details

log = structlog.get_logger("kscope.ingest")

SERVICE = pb.DESCRIPTOR.services_by_name["FlowIngest"]
METHOD = SERVICE.methods_by_name["ExportFlows"]
# Requests arrive as raw bytes: the handler decodes them itself (see start()).
Context: TypeAlias = "grpc.aio.ServicerContext[bytes, pb.ExportFlowsResponse]"

COUNTERS = (
    "received_batches",  # every ExportFlows call that reached the handler, retries included
    "received_records",  # l4 (rows or columns) + l7 records in decodable batches
    "accepted_batches",  # answered OK (queued for the sink, or nothing in it worth queueing)
    "accepted_records",
    "invalid_records",  # bad records skipped from accepted batches
    "rejected_batches",  # refused whole; one of the rejected_<reason> counters says why
    "rejected_malformed",
    "rejected_schema_version",
    "rejected_node_name",
    "rejected_too_many_records",
    "rejected_columns",  # l4_columns of the wrong shape (length, string index) or with schema_version 1
    "rejected_too_many_strings",  # l4_columns' string table longer than its records can use
    "duplicate_batches",  # a batch this processor had already taken (an agent's retry): answered OK, dropped
    "duplicate_records",
    "unverifiable_batches",  # numbered too far back (or from a forgotten agent run) to check: taken
    "queue_full",  # answered UNAVAILABLE + RetryInfo: the client keeps the batch and retries
    "consumed_batches",  # handed to the sink without error
    "sink_errors",  # the sink raised: the batch is lost, and this counts it
    "dropped_on_shutdown",  # still queued (or in the sink) when stop() ran out of drain time
)


class BatchSink(Protocol):
    """Where accepted batches go (resolve + aggregate in the processor, a list in tests). Called by one
    or more worker tasks; a slow sink fills the queue and pushes back on the agents."""

    async def consume(self, batch: pb.FlowBatch) -> None: ...


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert_file: Path  # PEM certificate chain the server presents
    key_file: Path  # its PEM private key
    client_ca_file: Path | None = None  # set: require a client certificate signed by this CA (mTLS)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    listen: str = "0.0.0.0:9440"  # host:port; port 0 picks a free one (start() returns it)
    max_message_bytes: int = 16 * 1024 * 1024  # after gzip decompression; larger -> RESOURCE_EXHAUSTED
    limits: Limits = field(default_factory=Limits)
    queue_batches: int = 64  # accepted batches waiting for the sink
    sink_workers: int = 1
    retry_after_s: float = 1.0  # the RetryInfo delay sent with UNAVAILABLE when the queue is full
    # The agents' Service balances connections, not requests: without an age limit every agent stays on
    # the replica it first reached, and a scaled-up Deployment gets no traffic.
    max_connection_age_s: float | None = 300.0
    max_connection_age_grace_s: float = 30.0
    drain_timeout_s: float = 5.0  # stop(): how long the sink may take to finish the queue
    dedupe_window: int = 4096  # batch numbers remembered per agent run
    dedupe_max_agents: int = 16384  # agent runs remembered (least recently heard from forgotten first)
    tls: ServerTls | None = None

    def __post_init__(self) -> None:
        if min(self.queue_batches, self.sink_workers, self.max_message_bytes) < 1:
            raise IngestConfigError("queue_batches, sink_workers and max_message_bytes must be at least 1")
        if min(self.dedupe_window, self.dedupe_max_agents) < 1:
            raise IngestConfigError("dedupe_window and dedupe_max_agents must be at least 1")
        if self.retry_after_s < 0 or self.drain_timeout_s < 0:
            raise IngestConfigError("retry_after_s and drain_timeout_s must not be negative")


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    key = _read(tls.key_file, "TLS key")
    cert = _read(tls.cert_file, "TLS certificate")
    ca = _read(tls.client_ca_file, "TLS client CA") if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IngestConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


class IngestServer:
    def __init__(self, sink: BatchSink, config: IngestConfig | None = None) -> None:
        self.config = config or IngestConfig()
        self._sink = sink
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._seen = SeenBatches(self.config.dedupe_window, self.config.dedupe_max_agents)
        self._queue: asyncio.Queue[pb.FlowBatch] = asyncio.Queue(self.config.queue_batches)
        self._server: grpc.aio.Server | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.port = 0

    def counters(self) -> dict[str, int]:
        """Monotonic self-metrics since construction (a copy)."""
        return dict(self._counters)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def start(self) -> int:
        """Bind, start serving, start the sink workers; returns the bound port."""
        cfg = self.config
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            # A second processor on the same port must fail to start, not silently share the traffic.
            ("grpc.so_reuseport", 0),
        ]
        if cfg.max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(cfg.max_connection_age_grace_s * 1000)),
            ]
        server = grpc.aio.server(options=options)
        handler = grpc.unary_unary_rpc_method_handler(
            self._export,
            # No request deserializer: the handler parses the bytes itself, so garbage gets a clear
            # INVALID_ARGUMENT instead of gRPC's generic UNKNOWN, and is counted.
            request_deserializer=None,
            response_serializer=pb.ExportFlowsResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, {METHOD.name: handler}),)
        )
        try:
            if cfg.tls is not None:
                self.port = server.add_secure_port(cfg.listen, server_credentials(cfg.tls))
            else:
                self.port = server.add_insecure_port(cfg.listen)
        except RuntimeError as exc:
            raise IngestListenError(f"cannot listen on {cfg.listen}: {exc}") from exc
        await server.start()
        self._server = server
        self._workers = [asyncio.create_task(self._work(), name=f"ingest-sink-{i}") for i in range(cfg.sink_workers)]
        log.info(
            "ingest_started",
            listen=cfg.listen,
            port=self.port,
            tls=cfg.tls is not None,
            mtls=cfg.tls is not None and cfg.tls.client_ca_file is not None,
        )
        return self.port

    async def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop taking calls (in-flight ones get ``grace_s``), then let the sink drain the queue for up to
        ``drain_timeout_s``; whatever is left is counted in ``dropped_on_shutdown``."""
        if self._server is None:
            return
        server, self._server = self._server, None
        await server.stop(grace_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), self.config.drain_timeout_s)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        left = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            left += 1
        self._counters["dropped_on_shutdown"] += left
        log.info("ingest_stopped", dropped_on_shutdown=self._counters["dropped_on_shutdown"])

    async def __aenter__(self) -> IngestServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _export(self, raw: bytes, context: Context) -> pb.ExportFlowsResponse:
        c = self._counters
        c["received_batches"] += 1
        batch = decode(raw)
        if isinstance(batch, Rejection):
            await self._reject(batch, context, node="")
        c["received_records"] += record_count(batch)
        verdict = validate(batch, self.config.limits)
        if isinstance(verdict, Rejection):
            await self._reject(verdict, context, node=batch.node_name)
        if self._seen.seen(batch):
            # Taken before: the agent's earlier call reached us but its answer did not reach the agent.
            c["duplicate_batches"] += 1
            c["duplicate_records"] += verdict.accepted
            return pb.ExportFlowsResponse(
                accepted=verdict.accepted, rejected=verdict.rejected, error_message=verdict.error_message
            )
        # A batch of only bad records, no stats, carries nothing for the sink.
        if verdict.accepted or verdict.batch.HasField("stats"):
            try:
                self._queue.put_nowait(verdict.batch)
            except asyncio.QueueFull:
                await self._push_back(context)
        before = self._seen.unverifiable
        self._seen.taken(batch)
        c["unverifiable_batches"] += self._seen.unverifiable - before
        c["accepted_batches"] += 1
        c["accepted_records"] += verdict.accepted
        c["invalid_records"] += verdict.rejected
        return pb.ExportFlowsResponse(
            accepted=verdict.accepted, rejected=verdict.rejected, error_message=verdict.error_message
        )

    async def _push_back(self, context: Context) -> NoReturn:
        self._counters["queue_full"] += 1
        delay = self.config.retry_after_s
        message = f"processor queue full ({self.config.queue_batches} batches); retry in {delay:g} s"
        # UNAVAILABLE is retryable for every OTLP-style client; the RetryInfo tells it when.
        details = status_details(grpc.StatusCode.UNAVAILABLE.value[0], message, delay)
        await context.abort(grpc.StatusCode.UNAVAILABLE, message, ((STATUS_DETAILS_KEY, details),))
        raise AssertionError("unreachable: ServicerContext.abort raises")

    async def _reject(self, rejection: Rejection, context: Context, node: str) -> NoReturn:
        self._counters["rejected_batches"] += 1
        self._counters[f"rejected_{rejection.reason}"] += 1
        # Expected bad input: the counters carry it; the log line is for debugging one client.
        log.debug("ingest_batch_rejected", reason=rejection.reason, node=node, peer=context.peer())
        await context.abort(rejection.code, rejection.message)
        raise AssertionError("unreachable: ServicerContext.abort raises")

    async def _work(self) -> None:
        while True:
            batch = await self._queue.get()
            try:
                await self._sink.consume(batch)
                self._counters["consumed_batches"] += 1
            except asyncio.CancelledError:
                # stop() ran out of drain time while this batch was in the sink.
                self._counters["dropped_on_shutdown"] += 1
                raise
            except Exception:
                n = self._counters["sink_errors"] = self._counters["sink_errors"] + 1
                # A broken sink fails every batch: log at 1, 2, 4, 8, ... failures, so the log shows it
                # is still happening without a line per batch.
                if n & (n - 1) == 0:
                    log.exception("ingest_sink_failed", node=batch.node_name, sink_errors=n)
            finally:
                self._queue.task_done()
