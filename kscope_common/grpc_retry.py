"""When to retry a gRPC export and how long to wait: the OTLP exporter rules, pure.

Used by the agent's shipper (node -> processor), the processor's OTLP exporter (processor ->
collector) and its Kubernetes watcher (backoff only), so that all three back off the same way.

Retryable codes are the OTLP/gRPC set (opentelemetry-specification, otlp.md "Failures"): CANCELLED,
DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS; RESOURCE_EXHAUSTED only when the server
says recovery is possible by sending a retry delay. Everything else (INVALID_ARGUMENT, UNAUTHENTICATED,
UNIMPLEMENTED, ...) fails the same way on every attempt, so the request is dropped at once.

A server asks for a delay with a google.rpc.RetryInfo (googleapis-common-protos) inside the serialized
google.rpc.Status of the ``grpc-status-details-bin`` trailer, or with ``grpc-retry-pushback-ms`` (gRFC A6).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import Final

import grpc
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
RETRY_INFO_TYPE_URL: Final = "type.googleapis.com/google.rpc.RetryInfo"
PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"
# gRFC A6: a negative or unparseable pushback means "do not retry at all".
DO_NOT_RETRY: Final = math.inf


def status_details(code: int, message: str, retry_delay_s: float | None = None) -> bytes:
    """Serialized google.rpc.Status{code, message}, with a RetryInfo detail when a delay is given (what a
    server sends to throttle its clients). ``code`` must equal the gRPC status the call ends with."""
    status = Status(code=code, message=message)
    if retry_delay_s is not None:
        info = RetryInfo()
        whole = int(retry_delay_s)
        info.retry_delay.seconds = whole
        info.retry_delay.nanos = round((retry_delay_s - whole) * 1e9)
        status.details.add(type_url=RETRY_INFO_TYPE_URL, value=info.SerializeToString())
    return bytes(status.SerializeToString())


def retry_delay_from_details(data: bytes) -> float | None:
    """The RetryInfo delay in seconds in a serialized google.rpc.Status, or None if there is none (or the
    bytes are not a Status: a bad trailer must not turn a retryable error into a crash)."""
    try:
        status = Status.FromString(data)
        for detail in status.details:
            if detail.type_url.rsplit("/", 1)[-1] == "google.rpc.RetryInfo":
                info = RetryInfo.FromString(detail.value)
                if info.HasField("retry_delay"):
                    seconds: float = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                    return max(0.0, seconds)
    except DecodeError:
        return None
    return None


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


def should_retry(code: grpc.StatusCode | None, server_delay_s: float | None) -> bool:
    if server_delay_s == DO_NOT_RETRY:
        return False
    if code in RETRYABLE:
        return True
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and server_delay_s is not None


def backoff_delay(attempt: int, initial_s: float, maximum_s: float, jitter: float, rng: Callable[[], float]) -> float:
    """Capped exponential backoff with jitter: attempt n (0-based) waits a random time in
    [(1 - jitter) * d, d] with d = min(maximum, initial * 2**n), so clients that failed together do not
    come back in lockstep."""
    ceiling = min(maximum_s, initial_s * 2.0 ** min(attempt, 62))
    return ceiling * (1.0 - jitter * rng())


class Backoff:
    """``backoff_delay`` with its attempt counter. A server-sent delay is a floor (the server knows its
    own load), bounded by ``server_delay_cap_s`` where a misbehaving server must not park us for hours."""

    def __init__(
        self,
        initial_s: float,
        maximum_s: float,
        *,
        jitter: float = 0.5,
        server_delay_cap_s: float = math.inf,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.jitter = jitter
        self.server_delay_cap_s = server_delay_cap_s
        self._rng = rng
        self._attempt = 0

    def next(self, server_delay_s: float | None = None) -> float:
        delay = backoff_delay(self._attempt, self.initial_s, self.maximum_s, self.jitter, self._rng)
        self._attempt += 1
        if server_delay_s is not None:
            delay = max(delay, min(server_delay_s, self.server_delay_cap_s))
        return delay

    def reset(self) -> None:
        self._attempt = 0
