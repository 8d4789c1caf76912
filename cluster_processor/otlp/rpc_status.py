"""``google.rpc.Status`` and ``google.rpc.RetryInfo``: how an OTLP server tells a client when to retry.

The server puts a serialized Status in the ``grpc-status-details-bin`` trailer; its details hold
a RetryInfo with the delay to wait. The messages come from googleapis-common-protos, which kscope
would need for nothing else, so they are declared here from a descriptor in a private pool: the
wire format is the same, and nothing clashes with that package if something else installs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
RETRY_INFO_TYPE_URL: Final = "type.googleapis.com/google.rpc.RetryInfo"

_F = descriptor_pb2.FieldDescriptorProto


def _build() -> tuple[Any, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(name="kscope/otlp/google_rpc.proto", package="google.rpc", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:  # only message fields name a type; an empty name still counts as set
                f.type_name = type_name

    opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    # Same field numbers and types as google/protobuf/any.proto and duration.proto.
    message("Any", ("type_url", 1, _F.TYPE_STRING, opt, ""), ("value", 2, _F.TYPE_BYTES, opt, ""))
    message("Duration", ("seconds", 1, _F.TYPE_INT64, opt, ""), ("nanos", 2, _F.TYPE_INT32, opt, ""))
    message(
        "Status",
        ("code", 1, _F.TYPE_INT32, opt, ""),
        ("message", 2, _F.TYPE_STRING, opt, ""),
        ("details", 3, _F.TYPE_MESSAGE, rep, ".google.rpc.Any"),
    )
    message("RetryInfo", ("retry_delay", 1, _F.TYPE_MESSAGE, opt, ".google.rpc.Duration"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.RetryInfo")),
    )


Status, RetryInfo = _build()


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
