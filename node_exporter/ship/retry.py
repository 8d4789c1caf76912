"""When to retry an ExportFlows call and how long to wait: the OTLP exporter rules, pure.

Retryable codes are the OTLP/gRPC set (opentelemetry-specification, otlp.md "Failures"): CANCELLED,
DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS; RESOURCE_EXHAUSTED only when the server
says recovery is possible by sending a retry delay. Everything else (INVALID_ARGUMENT, UNAUTHENTICATED,
UNIMPLEMENTED, ...) fails the same way on every attempt, so the batch is dropped at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

import grpc

from node_exporter.ship.rpc_status import STATUS_DETAILS_KEY, retry_delay_from_details

RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
PUSHBACK_KEY = "grpc-retry-pushback-ms"
# gRFC A6: a negative or unparseable pushback means "do not retry at all".
DO_NOT_RETRY = math.inf


def server_retry_delay(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The delay the server asked for, in seconds: from ``grpc-retry-pushback-ms`` or a google.rpc.RetryInfo
    in ``grpc-status-details-bin`` (the longer if both). None if it sent neither; ``DO_NOT_RETRY`` if its
    pushback refuses retries."""
    delay: float | None = None
    for key, value in trailing_metadata or ():
        found: float | None = None
        if key == PUSHBACK_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            try:
                ms = int(text)
            except ValueError:
                return DO_NOT_RETRY
            if ms < 0:
                return DO_NOT_RETRY
            found = ms / 1000.0
        elif key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            found = retry_delay_from_details(value)
        if found is not None:
            delay = found if delay is None else max(delay, found)
    return delay


def should_retry(code: grpc.StatusCode | None, server_delay: float | None) -> bool:
    if server_delay == DO_NOT_RETRY:
        return False
    if code in RETRYABLE:
        return True
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and server_delay is not None


class Backoff:
    """Capped exponential backoff with jitter: attempt n waits a random time in [(1 - jitter) * d, d] with
    d = min(maximum, initial * 2**n), so agents that lost the processor together do not return in
    lockstep. A server-sent delay is a floor: the server knows its own load."""

    def __init__(
        self,
        initial_s: float,
        maximum_s: float,
        *,
        jitter: float = 0.5,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.jitter = jitter
        self._rng = rng
        self._attempt = 0

    def next(self, server_delay_s: float | None = None) -> float:
        ceiling = min(self.maximum_s, self.initial_s * 2.0 ** min(self._attempt, 62))
        self._attempt += 1
        delay = ceiling * (1.0 - self.jitter * self._rng())
        if server_delay_s is not None:
            delay = max(delay, server_delay_s)
        return delay
