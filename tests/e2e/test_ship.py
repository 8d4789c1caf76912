"""`kscope run --processor`: the agent's batches reach a real ingest server over gRPC; an absent
processor costs counted drops, not a crash."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from cluster_processor.ingest import IngestConfig, IngestServer
from kscope.v1 import flow_pb2 as pb
from kscope_common import l4_columns
from tests.node_exporter.test_cli import _exchange

pytestmark = pytest.mark.bpf
REPO = Path(__file__).resolve().parents[2]
KSCOPE = str(REPO / ".venv" / "bin" / "kscope")


class Collect:
    def __init__(self) -> None:
        self.batches: list[pb.FlowBatch] = []

    async def consume(self, batch: pb.FlowBatch) -> None:
        self.batches.append(batch)


@pytest.fixture
def ingest() -> Iterator[tuple[int, Collect]]:
    sink = Collect()
    loop = asyncio.new_event_loop()
    server = IngestServer(sink, IngestConfig(listen="127.0.0.1:0"))
    port = loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port, sink
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _agent(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([KSCOPE, "run", "--no-live", "--interval", "0.5", *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "agent_started" in line:
            break
    return proc


def _traffic(up: int, down: int) -> int:
    ports: list[int] = []
    started = threading.Event()
    t = threading.Thread(target=_exchange, args=(ports, started, up, down))
    t.start()
    started.set()
    t.join(30)
    return ports[0]


def test_batches_reach_the_processor(ingest: tuple[int, Collect]) -> None:
    port, sink = ingest
    agent = _agent("--duration", "3", "--processor", f"127.0.0.1:{port}", "--node-name", "node-a")
    server_port = _traffic(54_321, 12_345)
    assert agent.wait(timeout=60) == 0
    assert sink.batches, "no batch arrived"
    # The agent ships its L4 records as columns (schema_version 2), never as rows.
    assert {(b.schema_version, b.node_name) for b in sink.batches} == {(2, "node-a")}
    assert not any(b.l4 for b in sink.batches)
    flows = [f for b in sink.batches for f in l4_columns.rows(b.l4_columns)
             if f.remote_port == server_port and f.role == pb.ROLE_CLIENT]  # fmt: skip
    assert flows and flows[-1].kind == pb.RECORD_KIND_CLOSE
    assert (flows[-1].total.bytes_sent, flows[-1].total.bytes_received) == (54_321, 12_345)
    # every interval's batch carries the agent's counters (a busy node splits one into parts: the first
    # part carries them; the parts share the interval's time)
    with_counters = {b.time_unix_nano for b in sink.batches if b.stats.counters}
    assert with_counters == {b.time_unix_nano for b in sink.batches}


def test_absent_processor_is_counted_not_fatal(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    out = tmp_path / "flows.jsonl"
    agent = _agent("--duration", "2", "--processor", f"127.0.0.1:{dead}", "--jsonl", str(out))
    _traffic(1000, 1000)
    assert agent.wait(timeout=60) == 0
    stats = json_format.Parse(out.read_text().splitlines()[-1], pb.NodeRecord()).stats.counters
    assert stats["ship_enqueued"] >= 1
    assert stats["ship_sent_batches"] == 0
    lost = sum(v for k, v in stats.items() if k.startswith("ship_dropped") and k != "ship_dropped_records")
    assert lost + stats.get("ship_retries", 0) >= 1  # undelivered batches are counted
