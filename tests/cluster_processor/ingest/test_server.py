"""The ingest server over real gRPC on 127.0.0.1, called with raw synchronous channels (bytes in, so a
test can send anything)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from cluster_processor.ingest import IngestConfigError, IngestServer, Limits, ServerTls
from cluster_processor.ingest.server import COUNTERS, METHOD
from kscope.v1 import flow_pb2 as pb
from kscope_common.grpc_retry import server_retry_delay, should_retry
from kscope_common.l4_columns import rows, to_columns
from tests.cluster_processor.ingest.harness import (
    Certs,
    FailingSink,
    LoopThread,
    RecordingSink,
    batch,
    config,
    free_port,
    l4,
)
from tests.helpers import eventually

PATH = f"/{METHOD.containing_service.full_name}/{METHOD.name}"


class RawClient:
    def __init__(self, port: int, creds: grpc.ChannelCredentials | None = None, server_name: str = "") -> None:
        target = f"127.0.0.1:{port}"
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.channel = grpc.secure_channel(target, creds, options=options) if creds else grpc.insecure_channel(target)
        # Identity request serializer: the payload goes out exactly as given.
        self.call = self.channel.unary_unary(
            PATH, request_serializer=None, response_deserializer=pb.ExportFlowsResponse.FromString
        )

    def send(self, payload: bytes | pb.FlowBatch, gzip: bool = True) -> pb.ExportFlowsResponse:
        raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
        compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
        response: pb.ExportFlowsResponse = self.call(raw, timeout=5, compression=compression)
        return response

    def fail(self, payload: bytes | pb.FlowBatch, gzip: bool = True) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.send(payload, gzip)
        return info.value


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def client_and_server(loop_thread: LoopThread, sink: RecordingSink) -> Iterator[tuple[RawClient, IngestServer]]:
    with loop_thread.serving(sink, config(limits=Limits(max_records=1000), max_message_bytes=256 * 1024)) as server:
        client = RawClient(server.port)
        yield client, server
        client.channel.close()


def test_good_gzip_batch_is_acked_and_handed_to_the_sink(loop_thread: LoopThread, sink: RecordingSink) -> None:
    with loop_thread.serving(sink, config()) as server:
        client = RawClient(server.port)
        sent = batch(3, 2, stats=pb.AgentStats(counters={"ring_lost": 7}))
        response = client.send(sent)
        assert (response.accepted, response.rejected, response.error_message) == (5, 0, "")
        eventually(lambda: len(sink.batches) == 1, "the sink got the batch")
        assert sink.batches[0] == sent
        c = server.counters()
        assert set(c) == set(COUNTERS)
        assert (c["received_batches"], c["received_records"], c["accepted_records"], c["consumed_batches"]) == (
            1,
            5,
            5,
            1,
        )


def test_a_copy_of_a_taken_batch_is_acked_and_not_handed_on(
    client_and_server: tuple[RawClient, IngestServer], sink: RecordingSink
) -> None:
    client, server = client_and_server
    sent = batch(3)
    sent.node_name, sent.agent_start_time_unix_nano, sent.batch_seq = "node-a", 42, 7
    assert client.send(sent).accepted == 3
    assert client.send(sent).accepted == 3  # the agent retried: it is told the batch is in
    sent.batch_seq = 8
    assert client.send(sent).accepted == 3
    eventually(lambda: len(sink.batches) == 2, "the two different batches reached the sink")
    c = server.counters()
    assert (c["duplicate_batches"], c["duplicate_records"], c["accepted_batches"]) == (1, 3, 2)
    unnumbered = batch(1)
    client.send(unnumbered)
    client.send(unnumbered)  # without numbers, nothing can be told apart: both are taken
    eventually(lambda: len(sink.batches) == 4, "unnumbered batches are never dropped")


def test_invalid_records_are_skipped_and_reported(
    client_and_server: tuple[RawClient, IngestServer], sink: RecordingSink
) -> None:
    client, server = client_and_server
    b = batch(2)
    b.l4.append(l4(9, remote_port=123456))
    response = client.send(b)
    assert (response.accepted, response.rejected) == (2, 1)
    assert "l4[2]: remote_port 123456 > 65535" in response.error_message
    eventually(lambda: sink.records == 2, "the two good records reached the sink")
    assert server.counters()["invalid_records"] == 1


@pytest.mark.parametrize("version", [0, 3])
def test_wrong_schema_version_is_invalid_argument(
    client_and_server: tuple[RawClient, IngestServer], sink: RecordingSink, version: int
) -> None:
    client, server = client_and_server
    err = client.fail(batch(1, version=version))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "schema_version" in (err.details() or "")
    assert not should_retry(err.code(), server_retry_delay(err.trailing_metadata()))
    c = server.counters()
    assert (c["rejected_batches"], c["rejected_schema_version"], c["accepted_batches"]) == (1, 1, 0)
    assert sink.batches == []


def test_missing_node_name_is_invalid_argument(client_and_server: tuple[RawClient, IngestServer]) -> None:
    client, server = client_and_server
    err = client.fail(batch(1, node=""))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "node_name is required" in (err.details() or "")
    assert server.counters()["rejected_node_name"] == 1


def test_too_many_records_is_resource_exhausted_without_retry_info(
    client_and_server: tuple[RawClient, IngestServer],
) -> None:
    client, server = client_and_server
    err = client.fail(batch(600, 401))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1001 records" in (err.details() or "")
    assert server_retry_delay(err.trailing_metadata()) is None  # so OTLP clients do not retry it
    assert server.counters()["rejected_too_many_records"] == 1


@pytest.mark.parametrize("gzip", [False, True])
def test_message_over_the_size_limit_is_refused_by_grpc(
    client_and_server: tuple[RawClient, IngestServer], gzip: bool
) -> None:
    client, server = client_and_server
    # Under the record limit but ~ 300 KiB serialized; gzip makes it far smaller on the wire, but the limit
    # applies after decompression (no gzip bombs).
    big = batch()
    big.l4.extend(l4(i, last_drop_reason="X" * 300) for i in range(900))
    assert big.ByteSize() > 256 * 1024
    err = client.fail(big, gzip=gzip)
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.counters()["received_batches"] == 0  # refused before the handler
    assert client.send(batch(1)).accepted == 1  # and the server keeps serving


@pytest.mark.parametrize("garbage", [b"not a protobuf", b"\xff\xfe\xfd" * 50])
def test_garbage_bytes_get_a_clear_error_and_the_server_keeps_serving(
    client_and_server: tuple[RawClient, IngestServer], sink: RecordingSink, garbage: bytes
) -> None:
    client, server = client_and_server
    err = client.fail(garbage)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a kscope.v1.FlowBatch" in (err.details() or "")
    assert server.counters()["rejected_malformed"] == 1
    assert client.send(batch(4)).accepted == 4
    eventually(lambda: sink.records == 4, "the good batch after the garbage reached the sink")


def test_full_queue_answers_unavailable_with_retry_info(loop_thread: LoopThread) -> None:
    gate = threading.Event()
    sink = RecordingSink(gate)
    with loop_thread.serving(sink, config(queue_batches=2, retry_after_s=0.25)) as server:
        client = RawClient(server.port)
        # The sink holds the first batch; two more fill the queue; the fourth is pushed back.
        client.send(batch(1))
        eventually(lambda: server.queue_depth == 0, "the sink took the first batch")
        client.send(batch(1))
        client.send(batch(1))
        err = client.fail(batch(1))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert "queue full" in (err.details() or "")
        assert server_retry_delay(err.trailing_metadata()) == pytest.approx(0.25)
        assert server.counters()["queue_full"] == 1
        gate.set()
        eventually(lambda: len(sink.batches) == 3, "the held batches drained")
        assert client.send(batch(1)).accepted == 1  # room again


def test_sink_errors_are_counted_and_serving_goes_on(loop_thread: LoopThread) -> None:
    sink = FailingSink()
    with loop_thread.serving(sink, config()) as server:
        client = RawClient(server.port)
        for _ in range(3):
            assert client.send(batch(1)).accepted == 1
        eventually(lambda: server.counters()["sink_errors"] == 3, "three sink failures counted")
        assert server.counters()["consumed_batches"] == 0


def test_stop_drains_the_queue_then_counts_what_is_left(loop_thread: LoopThread) -> None:
    gate = threading.Event()
    sink = RecordingSink(gate)
    server = loop_thread.start_server(sink, config(queue_batches=4, drain_timeout_s=0.2))
    client = RawClient(server.port)
    for _ in range(3):
        client.send(batch(1))
    loop_thread.stop_server(server)  # the sink never opens: one batch in it, two queued
    c = server.counters()
    assert (c["accepted_batches"], c["consumed_batches"], c["dropped_on_shutdown"]) == (3, 0, 3)


def test_stop_lets_a_working_sink_finish(loop_thread: LoopThread) -> None:
    sink = RecordingSink()
    server = loop_thread.start_server(sink, config(queue_batches=16))
    client = RawClient(server.port)
    for _ in range(10):
        client.send(batch(2))
    loop_thread.stop_server(server)
    assert sink.records == 20
    assert server.counters()["dropped_on_shutdown"] == 0


def test_tls(loop_thread: LoopThread, certs: Certs, sink: RecordingSink) -> None:
    tls = ServerTls(cert_file=certs.server_cert, key_file=certs.server_key)
    with loop_thread.serving(sink, config(tls=tls)) as server:
        trusted = RawClient(
            server.port, grpc.ssl_channel_credentials(certs.ca.read_bytes()), server_name="processor.kscope.test"
        )
        assert trusted.send(batch(2)).accepted == 2
        stranger = RawClient(
            server.port, grpc.ssl_channel_credentials(certs.other_ca.read_bytes()), server_name="processor.kscope.test"
        )
        assert stranger.fail(batch(2)).code() is grpc.StatusCode.UNAVAILABLE
        plaintext = RawClient(server.port)
        assert plaintext.fail(batch(2)).code() is grpc.StatusCode.UNAVAILABLE
        assert server.counters()["received_batches"] == 1


def test_mtls_requires_a_client_certificate_from_the_ca(
    loop_thread: LoopThread, certs: Certs, sink: RecordingSink
) -> None:
    tls = ServerTls(cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca)
    ca = certs.ca.read_bytes()
    with loop_thread.serving(sink, config(tls=tls)) as server:
        agent = grpc.ssl_channel_credentials(ca, certs.client_key.read_bytes(), certs.client_cert.read_bytes())
        assert RawClient(server.port, agent).send(batch(1)).accepted == 1
        no_cert = RawClient(server.port, grpc.ssl_channel_credentials(ca))
        assert no_cert.fail(batch(1)).code() is grpc.StatusCode.UNAVAILABLE
        other = grpc.ssl_channel_credentials(
            ca, certs.other_client_key.read_bytes(), certs.other_client_cert.read_bytes()
        )
        assert RawClient(server.port, other).fail(batch(1)).code() is grpc.StatusCode.UNAVAILABLE
        assert server.counters()["received_batches"] == 1


def test_unreadable_tls_file_fails_at_start(loop_thread: LoopThread, certs: Certs) -> None:
    tls = ServerTls(cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca.with_name("nope"))
    with pytest.raises(IngestConfigError, match="cannot read TLS client CA"):
        loop_thread.start_server(RecordingSink(), config(tls=tls))


def test_a_taken_port_fails_at_start(loop_thread: LoopThread) -> None:
    port = free_port()
    with loop_thread.serving(RecordingSink(), config(port)), pytest.raises(IngestConfigError, match="cannot listen"):
        loop_thread.start_server(RecordingSink(), config(port))


def test_columnar_batches_are_taken_deduplicated_and_misshapen_ones_refused(
    client_and_server: tuple[RawClient, IngestServer], sink: RecordingSink
) -> None:
    client, server = client_and_server
    good = batch(0, 1, version=2)
    good.l4_columns.CopyFrom(to_columns([l4(i) for i in range(3)] + [l4(3, local_port=99999)]))
    good.agent_start_time_unix_nano, good.batch_seq = 42, 1
    response = client.send(good)
    assert (response.accepted, response.rejected) == (4, 1)
    assert "l4[3]: local_port 99999 > 65535" in response.error_message
    assert client.send(good).accepted == 4  # a retried copy: answered the same, not handed on
    eventually(lambda: sink.records == 4, "the good records reached the sink")
    assert [f.socket_cookie for f in rows(sink.batches[0].l4_columns)] == [1000, 1001, 1002]
    bad = batch(0, version=2)
    bad.l4_columns.CopyFrom(to_columns([l4(0), l4(1)]))
    bad.l4_columns.remote_port.append(80)  # one value too many: which record's is it?
    err = client.fail(bad)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "l4_columns.remote_port holds 3 values for 2 records" in (err.details() or "")
    assert not should_retry(err.code(), server_retry_delay(err.trailing_metadata()))
    c = server.counters()
    assert (c["rejected_columns"], c["duplicate_batches"], c["accepted_batches"], c["invalid_records"]) == (1, 1, 1, 1)
    assert len(sink.batches) == 1
