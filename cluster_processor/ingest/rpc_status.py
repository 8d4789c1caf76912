"""google.rpc.Status with a google.rpc.RetryInfo detail (googleapis-common-protos), the throttling
signal OTLP clients understand ("wait this long, then retry"), sent in the ``grpc-status-details-bin``
trailer."""

from __future__ import annotations

from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRY_INFO_TYPE_URL = "type.googleapis.com/google.rpc.RetryInfo"


def retry_status_details(code: int, message: str, retry_delay_s: float) -> bytes:
    """Serialized google.rpc.Status{code, message, details=[RetryInfo{retry_delay}]}.
    ``code`` must equal the gRPC status code the call ends with (clients check that they match)."""
    seconds = int(retry_delay_s)
    info = RetryInfo()
    info.retry_delay.seconds = seconds
    info.retry_delay.nanos = round((retry_delay_s - seconds) * 1e9)
    status = Status(code=code, message=message)
    detail = status.details.add()
    detail.type_url = RETRY_INFO_TYPE_URL
    detail.value = info.SerializeToString()
    data: bytes = status.SerializeToString()
    return data
