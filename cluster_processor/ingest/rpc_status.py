"""google.rpc.Status with a google.rpc.RetryInfo detail, the throttling signal OTLP clients understand
("wait this long, then retry"), sent in the ``grpc-status-details-bin`` trailer.

googleapis-common-protos (which ships these messages) is not a dependency, so the two messages are
declared here from their published field numbers, in a private descriptor pool: nothing clashes with
the real package if something else imports it later.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory

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
