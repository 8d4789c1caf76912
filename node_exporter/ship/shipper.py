"""Ships FlowBatches from the agent to the cluster processor: unary ``ExportFlows`` calls, gzip, a deadline
per call, OTLP-style retries, and a counter for every batch that does not arrive.

The agent's loop is synchronous and must never wait on the network, so ``submit`` only queues (dropping
the oldest batch when the queue is full) and one background thread with its own channel does the
sending, one batch at a time, in order.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
import structlog

from kscope.v1 import flow_pb2 as pb
from kscope_common.grpc_retry import Backoff, server_retry_delay, should_retry
from node_exporter.ship.buffer import DropOldestQueue, record_count, split_batch
from node_exporter.ship.errors import ShipConfigError

log = structlog.get_logger("kscope.ship")

_METHOD = pb.DESCRIPTOR.services_by_name["FlowIngest"].methods_by_name["ExportFlows"]
METHOD_PATH = f"/{_METHOD.containing_service.full_name}/{_METHOD.name}"

COUNTERS = (
    "enqueued",  # batches (or parts of a split batch) accepted by submit()
    "sent_batches",  # answered OK by the processor
    "sent_records",
    "server_rejected_records",  # records of sent batches the processor skipped as invalid
    "retries",
    "dropped_queue_full",  # evicted, oldest first, by newer batches while the processor was slow or away
    "dropped_retry_exhausted",  # still failing when the per-batch deadline (or the server's delay) ran out
    "dropped_non_retryable",  # the processor refused it for good (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...)
    "dropped_on_close",  # still queued or retrying when close() ran out of time, or submitted after close()
    "dropped_records",  # records in all dropped batches, whatever the reason
)


@dataclass(frozen=True, slots=True)
class ClientTls:
    ca_file: Path | None = None  # CA for the processor's certificate; None: the system roots
    cert_file: Path | None = None  # client certificate chain for mTLS; needs key_file
    key_file: Path | None = None
    server_name: str | None = None  # name expected in the processor's certificate, if not the target host

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ShipConfigError("TLS client certificate and key go together: set both cert_file and key_file")


@dataclass(frozen=True, slots=True)
class ShipConfig:
    target: str  # host:port of the processor's ingest Service
    queue_batches: int = 64  # waiting batches; at one batch per interval, about a minute of outage
    max_records_per_batch: int = 50_000  # the processor's per-batch limit: larger batches are split
    call_timeout_s: float = 10.0  # deadline of one ExportFlows attempt
    batch_deadline_s: float = 60.0  # from the first attempt: past it the batch is dropped and counted
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    backoff_jitter: float = 0.5
    gzip: bool = True
    tls: ClientTls | None = None
    extra_channel_options: tuple[tuple[str, int | str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.queue_batches < 1 or self.max_records_per_batch < 1:
            raise ShipConfigError("queue_batches and max_records_per_batch must be at least 1")
        for name in ("call_timeout_s", "batch_deadline_s", "backoff_initial_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ShipConfigError(f"{name} must be positive")
        if not 0.0 <= self.backoff_jitter <= 1.0:
            raise ShipConfigError("backoff_jitter must be within [0, 1]")


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    ca = _read(tls.ca_file, "TLS CA") if tls.ca_file is not None else None
    key = _read(tls.key_file, "TLS client key") if tls.key_file is not None else None
    cert = _read(tls.cert_file, "TLS client certificate") if tls.cert_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ShipConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def make_channel(config: ShipConfig) -> grpc.Channel:
    options: list[tuple[str, int | str]] = [
        # gRPC's own reconnect backoff grows to 120 s by default: longer than a batch deadline, so a
        # restarted processor could sit unnoticed while every batch fails fast. Keep it on our schedule.
        ("grpc.initial_reconnect_backoff_ms", max(1, int(config.backoff_initial_s * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, int(config.backoff_max_s * 1000))),
    ]
    if config.tls is not None and config.tls.server_name:
        options.append(("grpc.ssl_target_name_override", config.tls.server_name))
    options.extend(config.extra_channel_options)
    if config.tls is None:
        return grpc.insecure_channel(config.target, options=options)
    return grpc.secure_channel(config.target, channel_credentials(config.tls), options=options)


class FlowShipper:
    """``submit`` from the agent loop; ``close`` on shutdown; ``counters`` for self-metrics."""

    def __init__(
        self,
        config: ShipConfig,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self._rng = rng  # the backoff jitter's source
        self._queue: DropOldestQueue[pb.FlowBatch] = DropOldestQueue(config.queue_batches)
        self._lock = threading.Lock()  # guards the counters and the close state
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._closing = threading.Event()  # set by close(): a sleeping retry re-checks its deadline
        self._flush_deadline = math.inf
        self._failing = False  # log the start and the end of an outage, not every failed call
        self._log = log.bind(target=config.target)
        self._channel = make_channel(config)  # reads the TLS files now: a bad path fails at startup
        self._export = self._channel.unary_unary(
            METHOD_PATH,
            # Batches are serialized once, before the first attempt, not again on every retry.
            request_serializer=None,
            response_deserializer=pb.ExportFlowsResponse.FromString,
        )
        self._compression = grpc.Compression.Gzip if config.gzip else grpc.Compression.NoCompression
        self._thread = threading.Thread(target=self._run, name="kscope-ship", daemon=True)
        # Every part gets (start, seq), kept across its retries: the processor drops a copy it already has.
        self._start_ns = time.time_ns()
        self._seq = 0

    # --- the agent's side -------------------------------------------------------------------------------

    def start(self) -> FlowShipper:
        self._thread.start()
        self._log.info("ship_started", tls=self.config.tls is not None, gzip=self.config.gzip)
        return self

    def submit(self, batch: pb.FlowBatch) -> None:
        """Queue ``batch`` for sending. Never blocks, never raises for a full queue: the oldest waiting
        batch makes room and is counted in ``dropped_queue_full``. Sets the batch's (or its parts')
        ``agent_start_time_unix_nano`` and ``batch_seq``."""
        parts = split_batch(batch, self.config.max_records_per_batch)
        evictions = 0
        # Under the lock that close() sets the closing flag with: a batch is either queued before close()
        # drains the queue, or counted as too late, never stranded in between.
        with self._lock:
            if self._closing.is_set():
                self._drop_locked("dropped_on_close", batch)
                return
            for part in parts:
                self._seq += 1
                part.agent_start_time_unix_nano = self._start_ns
                part.batch_seq = self._seq
                self._counters["enqueued"] += 1
                evicted = self._queue.put(part)
                if evicted is not None:
                    evictions = self._drop_locked("dropped_queue_full", evicted)
        if evictions and _log_worthy(evictions):
            self._log.warning("ship_queue_full", dropped_queue_full=evictions, queue_batches=self.config.queue_batches)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop taking batches, keep sending what is queued for up to ``timeout_s``, then stop. Whatever
        is left is counted in ``dropped_on_close``. True if nothing was left."""
        with self._lock:
            if self._closing.is_set():
                return self._counters["dropped_on_close"] == 0
            self._flush_deadline = time.monotonic() + timeout_s
            before = self._counters["dropped_on_close"]
            self._closing.set()
        self._queue.close()
        if self._thread.is_alive():
            # Waits and later calls end by the flush deadline, but an attempt begun before close() has its
            # own call deadline. Closing the channel cancels it; the thread then counts its batch.
            self._thread.join(max(0.0, timeout_s))
            self._channel.close()
            self._thread.join(1.0)
            if self._thread.is_alive():
                self._log.warning("ship_close_timeout", timeout_s=timeout_s)
        self._channel.close()
        for batch in self._queue.drain():  # left if the thread never started
            self._dropped("dropped_on_close", batch)
        with self._lock:
            left = self._counters["dropped_on_close"] - before
        self._log.info("ship_closed", left_on_close=left, **self.counters())
        return left == 0

    def counters(self) -> dict[str, int]:
        """Monotonic self-metrics since construction (a copy)."""
        with self._lock:
            return dict(self._counters)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def __enter__(self) -> FlowShipper:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the sender thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if time.monotonic() >= self._flush_deadline:
                self._dropped("dropped_on_close", batch)
                continue
            try:
                self._deliver(batch)
            except Exception:
                # A bug here must not kill the thread and silently strand every later batch.
                self._log.exception("ship_sender_bug")
                self._dropped("dropped_non_retryable", batch)

    def _deliver(self, batch: pb.FlowBatch) -> None:
        payload = batch.SerializeToString()
        records = record_count(batch)
        started = time.monotonic()
        backoff = Backoff(
            self.config.backoff_initial_s, self.config.backoff_max_s, jitter=self.config.backoff_jitter, rng=self._rng
        )
        code: grpc.StatusCode | None = None
        details = ""
        while True:
            deadline, reason = self._deadline(started)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._give_up(reason, batch, code, details)
                return
            try:
                response, _call = self._export.with_call(
                    payload, timeout=min(self.config.call_timeout_s, remaining), compression=self._compression
                )
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
                hint = server_retry_delay(err.trailing_metadata())
                if not should_retry(code, hint):
                    self._give_up("dropped_non_retryable", batch, code, details)
                    return
                delay = backoff.next(hint)
                if not self._failing:
                    self._failing = True
                    self._log.warning(
                        "ship_export_failing", code=_name(code), details=details, retry_in_s=round(delay, 3)
                    )
                late = self._sleep_until(time.monotonic() + delay, started)
                if late is not None:
                    self._give_up(late, batch, code, details)
                    return
                with self._lock:
                    self._counters["retries"] += 1
                continue
            self._sent(records, response)
            return

    def _sent(self, records: int, response: pb.ExportFlowsResponse) -> None:
        with self._lock:
            self._counters["sent_batches"] += 1
            self._counters["sent_records"] += records
            self._counters["server_rejected_records"] += response.rejected
        if self._failing:
            self._failing = False
            self._log.info("ship_export_recovered")
        if response.rejected:
            # The processor skipped bad records (an agent bug); counted, the details only in debug.
            self._log.debug("ship_records_rejected", rejected=response.rejected, error=response.error_message)

    def _deadline(self, started: float) -> tuple[float, str]:
        """When this batch must be dropped, and the counter that will say why."""
        own = started + self.config.batch_deadline_s
        with self._lock:
            flush = self._flush_deadline
        return (flush, "dropped_on_close") if flush < own else (own, "dropped_retry_exhausted")

    def _sleep_until(self, wake_at: float, started: float) -> str | None:
        """Wait for the next attempt. Returns the drop reason instead if the batch's deadline comes first:
        waiting longer than we may keep the batch only delays the drop (and the next batch)."""
        deadline, reason = self._deadline(started)
        if wake_at > deadline:
            return reason
        if self._closing.wait(max(0.0, wake_at - time.monotonic())):
            # close() may have pulled the deadline in; the flush deadline is fixed from now on.
            deadline, reason = self._deadline(started)
            if wake_at > deadline:
                return reason
            time.sleep(max(0.0, wake_at - time.monotonic()))
        return None

    def _give_up(self, counter: str, batch: pb.FlowBatch, code: grpc.StatusCode | None, details: str) -> None:
        n = self._dropped(counter, batch)
        # A refusing processor refuses every interval: log a reason's 1st, 2nd, 4th, 8th ... drop; the
        # counters carry the rest.
        if _log_worthy(n):
            self._log.warning(
                "ship_batch_dropped",
                reason=counter,
                code=_name(code),
                details=details,
                records=record_count(batch),
                **{counter: n},
            )

    def _dropped(self, counter: str, batch: pb.FlowBatch) -> int:
        with self._lock:
            return self._drop_locked(counter, batch)

    def _drop_locked(self, counter: str, batch: pb.FlowBatch) -> int:
        self._counters[counter] += 1
        self._counters["dropped_records"] += record_count(batch)
        return self._counters[counter]


def _name(code: grpc.StatusCode | None) -> str:
    return code.name if code is not None else ""


def _log_worthy(n: int) -> bool:
    """True at 1, 2, 4, 8, ...: a recurring problem stays visible in the log at a shrinking rate."""
    return n > 0 and n & (n - 1) == 0
