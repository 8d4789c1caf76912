"""Reading google.rpc.RetryInfo (googleapis-common-protos) out of the ``grpc-status-details-bin``
trailer."""

from __future__ import annotations

from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRY_INFO_TYPE_URL = "type.googleapis.com/google.rpc.RetryInfo"


def retry_delay_from_details(data: bytes) -> float | None:
    """The RetryInfo delay in seconds in a serialized google.rpc.Status, or None if there is none (or
    the bytes are not a Status: a bad trailer must not break the sender)."""
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
