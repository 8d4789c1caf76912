"""``google.rpc.Status`` and ``google.rpc.RetryInfo`` (googleapis-common-protos): how an OTLP server
tells a client when to retry. The server puts a serialized Status in the ``grpc-status-details-bin``
trailer; its details hold a RetryInfo with the delay to wait."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
RETRY_INFO_TYPE_URL: Final = "type.googleapis.com/google.rpc.RetryInfo"


def status_details(code: int, message: str, retry_delay_s: float | None = None) -> bytes:
    """A serialized Status, with a RetryInfo when a delay is given (what test servers send)."""
    status = Status(code=code, message=message)
    if retry_delay_s is not None:
        info = RetryInfo()
        whole = int(retry_delay_s)
        info.retry_delay.seconds = whole
        info.retry_delay.nanos = round((retry_delay_s - whole) * 1e9)
        status.details.add(type_url=RETRY_INFO_TYPE_URL, value=info.SerializeToString())
    return bytes(status.SerializeToString())


def retry_delay_s(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The server's requested retry delay, or None when it sent none (or sent garbage, which
    must not turn a retryable error into a crash)."""
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = Status.FromString(value)
            for detail in status.details:
                if detail.type_url.rsplit("/", 1)[-1] == "google.rpc.RetryInfo":
                    delay = RetryInfo.FromString(detail.value).retry_delay
                    seconds: float = delay.seconds + delay.nanos / 1e9
                    return max(0.0, seconds)
        except DecodeError:
            return None
    return None
