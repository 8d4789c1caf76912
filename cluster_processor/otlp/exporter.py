"""The I/O edge: an async OTLP/gRPC exporter for metrics, traces and logs.

Per signal, a bounded queue of encoded export requests and one worker that sends them in order:
one request in flight per signal keeps a cumulative stream's points in time order (Prometheus
rejects an older sample after a newer one), and a processor's few requests per interval do not
need more.
Retries follow the OTLP specification: only the transient status codes are retried
(RESOURCE_EXHAUSTED only when the server says when, with RetryInfo), with jittered exponential
backoff or the server's delay, within an overall deadline per request; a partial success is
final (the receiver has already decided about every item) and its rejected items are counted.
Nothing is lost silently: each item ends up exported, rejected or dropped, and each drop has a
reason and a counter.

When the queue is full the oldest request is dropped: fresh data is worth more than old, and
for cumulative metrics the next request carries the dropped one's totals anyway.

Requests arrive already serialized (``EncodedRequest``: the bytes ``encode`` assembles and how
many items they hold) and go on the wire as they are: parsing them into message objects only for
gRPC to serialize them again would cost more than encoding them did.

The gRPC client sits behind the small ``Transport`` protocol so the retry logic can be driven
by a test double as well as by the real test receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import grpc
import structlog
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from cluster_processor.otlp.encode import EncodedRequest
from cluster_processor.otlp.errors import OtlpError
from kscope_common.grpc_retry import backoff_delay, server_retry_delay, should_retry

log = structlog.get_logger(__name__)

ExportResponse = ExportMetricsServiceResponse | ExportTraceServiceResponse | ExportLogsServiceResponse


class Signal(enum.Enum):
    METRICS = "metrics"
    TRACES = "traces"
    LOGS = "logs"


# Each signal's Export method (opentelemetry-proto's collector services) and how its answer is read.
_METHODS: Final[dict[Signal, tuple[str, Callable[[bytes], ExportResponse]]]] = {
    Signal.METRICS: (
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        ExportMetricsServiceResponse.FromString,
    ),
    Signal.TRACES: (
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        ExportTraceServiceResponse.FromString,
    ),
    Signal.LOGS: (
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        ExportLogsServiceResponse.FromString,
    ),
}


def rejected_items(response: ExportResponse) -> tuple[int, str]:
    """(items the receiver rejected, its message) from a partial-success response."""
    if isinstance(response, ExportMetricsServiceResponse):
        m = response.partial_success
        return m.rejected_data_points, m.error_message
    if isinstance(response, ExportTraceServiceResponse):
        t = response.partial_success
        return t.rejected_spans, t.error_message
    lg = response.partial_success
    return lg.rejected_log_records, lg.error_message


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    jitter: float = 0.5  # a delay is drawn from [(1 - jitter) * d, d]: replicas do not retry in lockstep

    def delay_s(
        self, code: grpc.StatusCode, server_delay_s: float | None, attempt: int, rng: Callable[[], float]
    ) -> float | None:
        """Seconds to wait before retrying after failed attempt number ``attempt`` (0-based), or
        None when the failure is final."""
        # RESOURCE_EXHAUSTED is retryable only when the server says it will recover (RetryInfo);
        # otherwise the limit is a quota, and retrying would only add load.
        if not should_retry(code, server_delay_s):
            return None
        if server_delay_s is not None:
            return server_delay_s  # the server knows its own load better than our backoff
        return backoff_delay(attempt, self.initial_backoff_s, self.max_backoff_s, self.jitter, rng)


@dataclass(frozen=True, slots=True)
class ExporterSettings:
    endpoint: str  # host:port of an OTLP/gRPC receiver (an OpenTelemetry Collector)
    headers: tuple[tuple[str, str], ...] = ()  # e.g. (("authorization", "Bearer ..."),)
    timeout_s: float = 10.0  # deadline of one attempt
    max_elapsed_s: float = 60.0  # deadline of one request, all retries included, from its first attempt
    retry: RetryPolicy = RetryPolicy()
    queue_size: int = 64  # requests waiting per signal
    gzip: bool = True
    # gRPC's own reconnect backoff grows to 120 s; after an outage we want to be back within seconds.
    reconnect_backoff_max_s: float = 5.0


@dataclass(slots=True)
class SignalStats:
    """Counters of one signal, in items (data points, spans, log records) unless named otherwise.
    Every submitted item is eventually exported, rejected or dropped (or still queued)."""

    submitted: int = 0
    exported: int = 0  # accepted by the receiver
    rejected: int = 0  # refused in a partial success; final, never retried
    dropped_queue_full: int = 0
    dropped_non_retryable: int = 0  # a status that must not be retried (or a local failure)
    dropped_retry_exhausted: int = 0  # still failing when the request's deadline came
    dropped_shutdown: int = 0  # queued or in flight when the exporter stopped
    retries: int = 0  # requests re-sent after a retryable failure
    attempts: int = 0  # requests sent, retries included
    queued: int = 0  # requests waiting now

    @property
    def dropped(self) -> int:
        return (
            self.dropped_queue_full + self.dropped_non_retryable + self.dropped_retry_exhausted + self.dropped_shutdown
        )


class RpcFailure(OtlpError):
    """One failed attempt, as the transport reports it."""

    def __init__(self, code: grpc.StatusCode, message: str = "", retry_delay_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message
        self.retry_delay_s = retry_delay_s  # from the server's RetryInfo


class Transport(Protocol):
    async def export(self, signal: Signal, request: bytes, timeout_s: float) -> ExportResponse:
        """Send one serialized request; raise ``RpcFailure`` when the call fails."""
        ...

    async def close(self) -> None: ...


class GrpcTransport:
    """OTLP/gRPC over one grpc.aio channel; must be created inside the running event loop."""

    def __init__(
        self,
        settings: ExporterSettings,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        backoff_ms = int(settings.reconnect_backoff_max_s * 1000)
        opts = [
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            *options,
        ]
        compression = grpc.Compression.Gzip if settings.gzip else grpc.Compression.NoCompression
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(settings.endpoint, options=opts, compression=compression)
        else:
            self._channel = grpc.aio.secure_channel(
                settings.endpoint, credentials, options=opts, compression=compression
            )
        self._metadata = tuple(settings.headers) or None
        # The generated stubs' Export methods, but with no request serializer: gRPC sends the bytes
        # it is given (the request is encoded already), and parses the answer as the stubs do.
        self._calls: dict[Signal, Any] = {
            signal: self._channel.unary_unary(
                path, request_serializer=None, response_deserializer=deserialize, _registered_method=True
            )
            for signal, (path, deserialize) in _METHODS.items()
        }

    async def export(self, signal: Signal, request: bytes, timeout_s: float) -> ExportResponse:
        try:
            response: ExportResponse = await self._calls[signal](request, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            delay = server_retry_delay(err.trailing_metadata())
            raise RpcFailure(err.code(), err.details() or "", delay) from err
        return response

    async def close(self) -> None:
        await self._channel.close()


@dataclass(slots=True)
class _Lane:
    """One signal's queue, worker and counters."""

    queue: asyncio.Queue[EncodedRequest]
    stats: SignalStats = field(default_factory=SignalStats)
    task: asyncio.Task[None] | None = None


class OtlpExporter:
    def __init__(
        self,
        settings: ExporterSettings,
        *,
        transport: Transport | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if settings.queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._settings = settings
        self._transport = transport
        self._credentials = credentials
        self._rng = rng
        self._lanes = {s: _Lane(asyncio.Queue(maxsize=settings.queue_size)) for s in Signal}
        self._closed = False
        self._log = log.bind(endpoint=settings.endpoint)

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start one worker per signal; call from inside the running event loop."""
        if self._transport is None:
            self._transport = GrpcTransport(self._settings, credentials=self._credentials)
        for signal, lane in self._lanes.items():
            if lane.task is None:
                lane.task = asyncio.create_task(self._worker(signal, lane), name=f"otlp-export-{signal.value}")

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued request has been delivered or dropped; False on timeout."""
        try:
            await asyncio.wait_for(asyncio.gather(*(lane.queue.join() for lane in self._lanes.values())), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, give queued requests ``timeout_s`` to go out, then drop (and count) the rest."""
        self._closed = True
        if any(lane.task is not None for lane in self._lanes.values()):
            await self.flush(timeout_s)
        for lane in self._lanes.values():
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
                lane.task = None
            while not lane.queue.empty():
                entry = lane.queue.get_nowait()
                lane.queue.task_done()
                lane.stats.dropped_shutdown += entry.items
            lane.stats.queued = 0
        if self._transport is not None:
            await self._transport.close()

    async def __aenter__(self) -> OtlpExporter:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- submitting -----------------------------------------------------------------------------

    def submit(self, signal: Signal, request: EncodedRequest) -> bool:
        """Queue one request without waiting; False when it was dropped because the exporter is
        stopped. Call from the event loop's thread."""
        lane = self._lanes[signal]
        lane.stats.submitted += request.items
        if self._closed:
            lane.stats.dropped_shutdown += request.items
            return False
        if lane.queue.full():
            oldest = lane.queue.get_nowait()
            lane.queue.task_done()
            lane.stats.dropped_queue_full += oldest.items
            self._log.warning("otlp_queue_full", signal=signal.value, dropped_items=oldest.items)
        lane.queue.put_nowait(request)
        lane.stats.queued = lane.queue.qsize()
        return True

    def stats(self) -> dict[Signal, SignalStats]:
        return {s: replace(lane.stats) for s, lane in self._lanes.items()}

    # ---- delivering -----------------------------------------------------------------------------

    async def _worker(self, signal: Signal, lane: _Lane) -> None:
        while True:
            entry = await lane.queue.get()
            lane.stats.queued = lane.queue.qsize()
            try:
                await self._deliver(signal, lane.stats, entry)
            except asyncio.CancelledError:
                lane.stats.dropped_shutdown += entry.items
                raise
            except Exception:  # a bug must cost one request, not the signal's worker
                lane.stats.dropped_non_retryable += entry.items
                self._log.exception("otlp_export_crashed", signal=signal.value, items=entry.items)
            finally:
                lane.queue.task_done()

    async def _deliver(self, signal: Signal, stats: SignalStats, entry: EncodedRequest) -> None:
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.max_elapsed_s
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            stats.attempts += 1
            try:
                response = await self._transport.export(
                    signal, entry.data, max(0.001, min(self._settings.timeout_s, remaining))
                )
            except RpcFailure as failure:
                delay = self._settings.retry.delay_s(failure.code, failure.retry_delay_s, attempt, self._rng)
                if delay is None:
                    stats.dropped_non_retryable += entry.items
                    self._log.warning("otlp_export_failed", signal=signal.value, items=entry.items, error=str(failure))
                    return
                if loop.time() + delay >= deadline:
                    stats.dropped_retry_exhausted += entry.items
                    self._log.warning(
                        "otlp_export_deadline",
                        signal=signal.value,
                        items=entry.items,
                        attempts=attempt + 1,
                        error=str(failure),
                    )
                    return
                stats.retries += 1
                self._log.debug("otlp_export_retry", signal=signal.value, delay_s=round(delay, 3), error=str(failure))
                await asyncio.sleep(delay)
                attempt += 1
                continue
            self._account(signal, stats, entry, response)
            return

    def _account(self, signal: Signal, stats: SignalStats, entry: EncodedRequest, response: ExportResponse) -> None:
        rejected, message = rejected_items(response)
        rejected = min(max(rejected, 0), entry.items)
        stats.rejected += rejected
        stats.exported += entry.items - rejected
        if rejected or message:
            # A partial success is final: the receiver has dealt with every item. Retrying would duplicate.
            self._log.warning("otlp_partial_success", signal=signal.value, rejected=rejected, message=message)
