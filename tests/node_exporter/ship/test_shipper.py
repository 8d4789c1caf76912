"""The agent's shipper against the real ingest server over gRPC on 127.0.0.1: delivery, gzip, the retry
rules, outages and restarts, back-pressure, queue bounds, TLS and mTLS. Backoffs are shortened through
the config, not patched."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cluster_processor.ingest import Limits, ServerTls
from kscope.v1 import flow_pb2 as pb
from node_exporter.ship import ClientTls, FlowShipper, ShipConfig, ShipConfigError
from node_exporter.ship.shipper import COUNTERS
from tests.cluster_processor.ingest.harness import (
    Certs,
    CountingProxy,
    LoopThread,
    RecordingSink,
    batch,
    config,
    eventually,
    free_port,
    l4,
)


def ship_config(port: int, **kw: Any) -> ShipConfig:
    fields: dict[str, Any] = {
        "call_timeout_s": 2.0,
        "batch_deadline_s": 5.0,
        "backoff_initial_s": 0.02,
        "backoff_max_s": 0.1,
    }
    fields.update(kw)
    return ShipConfig(target=f"127.0.0.1:{port}", **fields)


@pytest.fixture
def shippers() -> Iterator[list[FlowShipper]]:
    """Shippers a test made; closed at the end even if the test failed."""
    made: list[FlowShipper] = []
    yield made
    for s in made:
        s.close(0.5)


def shipper(made: list[FlowShipper], cfg: ShipConfig, start: bool = True) -> FlowShipper:
    s = FlowShipper(cfg)
    made.append(s)
    return s.start() if start else s


def numbered(n: int, records: int = 1) -> list[pb.FlowBatch]:
    """Batches told apart by time_unix_nano = 1..n."""
    out = []
    for i in range(1, n + 1):
        b = batch(records)
        b.time_unix_nano = i
        out.append(b)
    return out


def drops(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if k.startswith("dropped_") and v}


def test_batches_arrive_whole_and_gzipped(loop_thread: LoopThread, shippers: list[FlowShipper]) -> None:
    sink = RecordingSink()
    with loop_thread.serving(sink, config()) as server:
        proxy = CountingProxy(server.port)
        loop_thread.run(proxy.start())
        try:
            sent = []
            for n in (100, 200, 300):
                b = batch(n // 2, n - n // 2, stats=pb.AgentStats(counters={"n": n}))
                sent.append(b)
            s = shipper(shippers, ship_config(proxy.port))
            for b in sent:
                s.submit(b)
            assert s.close(5.0)
        finally:
            loop_thread.run(proxy.stop())
        eventually(lambda: len(sink.batches) == 3, "three batches in the sink")
    assert sink.batches == sent
    assert sink.records == 600
    assert server.counters()["received_records"] == 600
    c = s.counters()
    assert set(c) == set(COUNTERS)
    assert (c["enqueued"], c["sent_batches"], c["sent_records"], c["retries"]) == (3, 3, 600, 0)
    assert drops(c) == {}
    # Repetitive flow records compress several-fold: the wire carried far less than the protobuf bytes.
    raw = sum(b.ByteSize() for b in sent)
    assert proxy.client_bytes < raw / 3, (proxy.client_bytes, raw)


def test_without_gzip_the_wire_carries_the_full_bytes(loop_thread: LoopThread, shippers: list[FlowShipper]) -> None:
    sink = RecordingSink()
    with loop_thread.serving(sink, config()) as server:
        proxy = CountingProxy(server.port)
        loop_thread.run(proxy.start())
        try:
            b = batch(300)
            s = shipper(shippers, ship_config(proxy.port, gzip=False))
            s.submit(b)
            assert s.close(5.0)
        finally:
            loop_thread.run(proxy.stop())
    assert proxy.client_bytes > b.ByteSize()


def test_wrong_schema_version_is_dropped_at_once_without_retry(
    loop_thread: LoopThread, shippers: list[FlowShipper]
) -> None:
    sink = RecordingSink()
    with loop_thread.serving(sink, config()) as server:
        s = shipper(shippers, ship_config(server.port))
        s.submit(batch(5, version=3))
        s.submit(batch(2))
        assert s.close(5.0)
    c = s.counters()
    assert (c["dropped_non_retryable"], c["retries"], c["sent_batches"], c["dropped_records"]) == (1, 0, 1, 5)
    assert server.counters()["rejected_schema_version"] == 1
    assert server.counters()["received_batches"] == 2  # one call for the bad batch: no retry
    assert sink.records == 2


def test_oversized_message_is_resource_exhausted_and_not_retried(
    loop_thread: LoopThread, shippers: list[FlowShipper]
) -> None:
    sink = RecordingSink()
    with loop_thread.serving(sink, config(max_message_bytes=64 * 1024)) as server:
        s = shipper(shippers, ship_config(server.port))
        big = batch()
        big.l4.extend(l4(i, last_drop_reason="X" * 300) for i in range(300))  # ~ 100 KiB
        s.submit(big)
        assert s.close(5.0)
    c = s.counters()
    assert (c["dropped_non_retryable"], c["retries"], c["sent_batches"]) == (1, 0, 0)
    assert sink.batches == []


def test_a_batch_over_the_record_limit_is_split_and_delivered(
    loop_thread: LoopThread, shippers: list[FlowShipper]
) -> None:
    sink = RecordingSink()
    with loop_thread.serving(sink, config(limits=Limits(max_records=1000))) as server:
        s = shipper(shippers, ship_config(server.port, max_records_per_batch=1000))
        s.submit(batch(1500, 1000))
        assert s.close(5.0)
    assert [len(b.l4) + len(b.l7) for b in sink.batches] == [1000, 1000, 500]
    assert s.counters()["enqueued"] == 3
    assert server.counters()["rejected_too_many_records"] == 0


def test_server_down_at_first_then_started(loop_thread: LoopThread, shippers: list[FlowShipper]) -> None:
    port = free_port()
    s = shipper(shippers, ship_config(port))
    s.submit(batch(7))
    eventually(lambda: s.counters()["retries"] >= 3, "retries while nothing listens")
    sink = RecordingSink()
    with loop_thread.serving(sink, config(port)):
        eventually(lambda: s.counters()["sent_batches"] == 1, "delivered once the server is up")
    assert sink.records == 7
    assert drops(s.counters()) == {}


def test_server_restart_mid_stream_resumes_delivery(loop_thread: LoopThread, shippers: list[FlowShipper]) -> None:
    port = free_port()
    sink = RecordingSink()
    batches = numbered(5, records=3)
    server = loop_thread.start_server(sink, config(port))
    s = shipper(shippers, ship_config(port))
    s.submit(batches[0])
    s.submit(batches[1])
    eventually(lambda: s.counters()["sent_batches"] == 2, "first two delivered")
    loop_thread.stop_server(server)
    for b in batches[2:]:
        s.submit(b)
    eventually(lambda: s.counters()["retries"] >= 2, "retrying while the server is away")
    server = loop_thread.start_server(sink, config(port))
    try:
        eventually(lambda: s.counters()["sent_batches"] == 5, "the rest delivered after the restart")
    finally:
        loop_thread.stop_server(server)
    assert [b.time_unix_nano for b in sink.batches] == [1, 2, 3, 4, 5]  # in order, nothing twice
    assert drops(s.counters()) == {}


def test_a_batch_is_dropped_when_its_deadline_passes_and_later_ones_get_through(
    loop_thread: LoopThread, shippers: list[FlowShipper]
) -> None:
    port = free_port()
    sink = RecordingSink()
    s = shipper(shippers, ship_config(port, batch_deadline_s=0.4))
    first, second = numbered(2)
    s.submit(first)
    eventually(lambda: s.counters()["dropped_retry_exhausted"] == 1, "dropped after its deadline", 3.0)
    with loop_thread.serving(sink, config(port)):
        s.submit(second)
        eventually(lambda: s.counters()["sent_batches"] == 1, "the next batch delivered")
    c = s.counters()
    assert c["retries"] >= 1
    assert (c["dropped_retry_exhausted"], c["dropped_records"]) == (1, 1)
    assert [b.time_unix_nano for b in sink.batches] == [2]


def test_full_server_queue_pushes_back_and_the_client_delivers_later(
    loop_thread: LoopThread, shippers: list[FlowShipper]
) -> None:
    gate = threading.Event()
    sink = RecordingSink(gate)
    with loop_thread.serving(sink, config(queue_batches=1, retry_after_s=0.3)) as server:
        # Backoff alone would retry every ~0.05 s; the server's 0.3 s RetryInfo must win.
        s = shipper(shippers, ship_config(server.port, backoff_max_s=0.05))
        for b in numbered(4):
            s.submit(b)
        eventually(lambda: server.counters()["queue_full"] >= 1, "the server pushed back")
        time.sleep(0.9)
        pushed_back = server.counters()["queue_full"]
        assert pushed_back <= 5, f"{pushed_back} UNAVAILABLEs in ~1 s: the server's retry delay was not honoured"
        gate.set()
        eventually(lambda: s.counters()["sent_batches"] == 4, "all four delivered once the sink drains", 5.0)
        eventually(lambda: len(sink.batches) == 4, "all four consumed")
    assert [b.time_unix_nano for b in sink.batches] == [1, 2, 3, 4]
    assert s.counters()["retries"] == server.counters()["queue_full"]  # each push-back retried once
    assert drops(s.counters()) == {}


def test_batches_are_numbered_per_agent_run_and_a_retry_keeps_its_number(
    loop_thread: LoopThread, shippers: list[FlowShipper]
) -> None:
    sink = RecordingSink()
    with loop_thread.serving(sink, config(limits=Limits(max_records=1000))) as server:
        s = shipper(shippers, ship_config(server.port, max_records_per_batch=1000))
        for b in numbered(2, 1500):  # each split in two parts, numbered in order
            s.submit(b)
        assert s.close(5.0)
    assert [b.batch_seq for b in sink.batches] == [1, 2, 3, 4]
    assert len({b.agent_start_time_unix_nano for b in sink.batches}) == 1
    assert abs(sink.batches[0].agent_start_time_unix_nano - time.time_ns()) < 60 * 10**9
    other = shipper(shippers, ship_config(server.port), start=False)
    assert other._start_ns != sink.batches[0].agent_start_time_unix_nano  # a new run, its own numbers


def test_a_lost_answer_does_not_deliver_the_batch_twice(loop_thread: LoopThread, shippers: list[FlowShipper]) -> None:
    sink = RecordingSink()
    with loop_thread.serving(sink, config()) as server:
        proxy = CountingProxy(server.port)
        loop_thread.run(proxy.start())
        try:
            s = shipper(shippers, ship_config(proxy.port, call_timeout_s=0.3))
            first, second = numbered(2, 5)
            s.submit(first)
            eventually(lambda: s.counters()["sent_batches"] == 1, "the connection is up")
            # The processor takes the batch; its answer comes after the agent's deadline: the agent retries.
            proxy.answer_delay_s = 0.6
            s.submit(second)
            eventually(lambda: server.counters()["duplicate_batches"] >= 1, "a retry of a batch already taken")
            proxy.answer_delay_s = 0.0
            eventually(lambda: s.counters()["sent_batches"] == 2, "the retry's answer reaches the agent", 10.0)
        finally:
            loop_thread.run(proxy.stop())
    assert s.counters()["retries"] >= 1
    assert [b.time_unix_nano for b in sink.batches] == [1, 2]  # each batch once
    c = server.counters()
    assert c["duplicate_records"] == 5 * c["duplicate_batches"]
    assert c["accepted_batches"] == 2


def test_client_queue_bound_drops_the_oldest(loop_thread: LoopThread, shippers: list[FlowShipper]) -> None:
    sink = RecordingSink()
    with loop_thread.serving(sink, config()) as server:
        s = shipper(shippers, ship_config(server.port, queue_batches=3), start=False)
        for b in numbered(10, records=2):
            s.submit(b)  # nothing sends yet: the queue holds the newest three
        c = s.counters()
        assert (c["enqueued"], c["dropped_queue_full"], c["dropped_records"], s.queue_depth) == (10, 7, 14, 3)
        s.start()
        assert s.close(5.0)
    assert [b.time_unix_nano for b in sink.batches] == [8, 9, 10]


def test_close_flushes_what_it_can_and_counts_the_rest(loop_thread: LoopThread, shippers: list[FlowShipper]) -> None:
    port = free_port()  # nothing listens: nothing can be flushed
    s = shipper(shippers, ship_config(port))
    for b in numbered(3):
        s.submit(b)
    t0 = time.monotonic()
    assert s.close(0.3) is False
    assert time.monotonic() - t0 < 1.5
    s.submit(batch(1))  # too late: counted, not lost silently
    c = s.counters()
    assert (c["dropped_on_close"], c["sent_batches"], c["dropped_records"]) == (4, 0, 4)


def test_close_cancels_a_call_stuck_on_a_silent_processor(shippers: list[FlowShipper]) -> None:
    # Accepts TCP and never speaks HTTP/2: a hung processor. The call's own deadline is 10 s.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        s = shipper(shippers, ship_config(silent.getsockname()[1], call_timeout_s=10.0, batch_deadline_s=30.0))
        s.submit(batch(2))
        s.submit(batch(3))
        time.sleep(0.2)  # the first attempt is under way
        t0 = time.monotonic()
        assert s.close(0.3) is False
        assert time.monotonic() - t0 < 2.0
    c = s.counters()
    assert (c["dropped_on_close"], c["dropped_records"], c["sent_batches"]) == (2, 5, 0)


def test_tls_to_the_processor(loop_thread: LoopThread, certs: Certs, shippers: list[FlowShipper]) -> None:
    sink = RecordingSink()
    tls = ServerTls(cert_file=certs.server_cert, key_file=certs.server_key)
    with loop_thread.serving(sink, config(tls=tls)) as server:
        ok = shipper(
            shippers, ship_config(server.port, tls=ClientTls(ca_file=certs.ca, server_name="processor.kscope.test"))
        )
        ok.submit(batch(3))
        assert ok.close(5.0)
        wrong_ca = shipper(
            shippers, ship_config(server.port, batch_deadline_s=0.3, tls=ClientTls(ca_file=certs.other_ca))
        )
        wrong_ca.submit(batch(3))
        eventually(lambda: wrong_ca.counters()["dropped_retry_exhausted"] == 1, "untrusted server: dropped")
    assert ok.counters()["sent_records"] == 3
    assert sink.records == 3


def test_mtls_accepts_the_agent_certificate_and_rejects_a_client_without_one(
    loop_thread: LoopThread, certs: Certs, shippers: list[FlowShipper]
) -> None:
    sink = RecordingSink()
    tls = ServerTls(cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca)
    with loop_thread.serving(sink, config(tls=tls)) as server:
        agent = shipper(
            shippers,
            ship_config(
                server.port, tls=ClientTls(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
            ),
        )
        agent.submit(batch(2))
        assert agent.close(5.0)
        anonymous = shipper(shippers, ship_config(server.port, batch_deadline_s=0.3, tls=ClientTls(ca_file=certs.ca)))
        anonymous.submit(batch(5))
        # A refused handshake is UNAVAILABLE to gRPC: retried until the batch deadline, then dropped.
        eventually(lambda: anonymous.counters()["dropped_retry_exhausted"] == 1, "client without a cert: dropped")
        assert anonymous.counters()["retries"] >= 1
        assert server.counters()["received_batches"] == 1
    assert sink.records == 2


def test_config_errors_are_raised_at_construction(certs: Certs) -> None:
    with pytest.raises(ShipConfigError, match="cert_file and key_file"):
        ClientTls(cert_file=certs.client_cert)
    with pytest.raises(ShipConfigError, match="cannot read TLS CA"):
        FlowShipper(ship_config(1, tls=ClientTls(ca_file=certs.ca.with_name("missing.crt"))))
    with pytest.raises(ShipConfigError, match="batch_deadline_s must be positive"):
        ship_config(1, batch_deadline_s=0)


def test_channel_options_reach_grpc(loop_thread: LoopThread, shippers: list[FlowShipper]) -> None:
    # A client-side send limit surfaces as RESOURCE_EXHAUSTED before the wire: dropped, not retried.
    sink = RecordingSink()
    with loop_thread.serving(sink, config()) as server:
        s = shipper(shippers, ship_config(server.port, extra_channel_options=(("grpc.max_send_message_length", 100),)))
        s.submit(batch(20))
        assert s.close(5.0)
    assert s.counters()["dropped_non_retryable"] == 1
    assert server.counters()["received_batches"] == 0
