"""Reading google.rpc.RetryInfo out of the ``grpc-status-details-bin`` trailer.

googleapis-common-protos (which ships google.rpc.Status and RetryInfo) is not a dependency, so the two
messages are declared from their published field numbers in a private descriptor pool: nothing clashes
with the real package if something else imports it later.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import DecodeError

STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRY_INFO_TYPE_URL = "type.googleapis.com/google.rpc.RetryInfo"

_F = descriptor_pb2.FieldDescriptorProto


def _message_classes() -> tuple[Any, Any]:
    pool = descriptor_pool.DescriptorPool()
    for wkt in (any_pb2, duration_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        wkt.DESCRIPTOR.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
    rpc = descriptor_pb2.FileDescriptorProto(
        name="google/rpc/kscope_status_subset.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto"],
    )
    status = rpc.message_type.add(name="Status")  # google/rpc/status.proto
    status.field.add(name="code", number=1, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    status.field.add(name="details", number=3, type=_F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
                     type_name=".google.protobuf.Any")
    retry = rpc.message_type.add(name="RetryInfo")  # google/rpc/error_details.proto
    retry.field.add(name="retry_delay", number=1, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL,
                    type_name=".google.protobuf.Duration")
    pool.AddSerializedFile(rpc.SerializeToString())
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.RetryInfo")),
    )


Status, RetryInfo = _message_classes()


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
