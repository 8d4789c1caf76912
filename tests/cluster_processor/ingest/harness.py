"""Test kit for the ingest server and the agent's shipper: the real ``IngestServer`` on 127.0.0.1, run on
an event loop in a background thread so synchronous clients (the shipper, raw channels) can call it from
the test thread; sinks at the ``BatchSink`` seam; certificates made with the openssl command line; and a
byte-counting TCP proxy to see what actually crosses the wire."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster_processor.ingest import IngestConfig, IngestServer
from cluster_processor.ingest.server import BatchSink
from kscope.v1 import flow_pb2 as pb

T = TypeVar("T")


class LoopThread:
    """An asyncio loop on a daemon thread; ``run`` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start_server(self, sink: BatchSink, config: IngestConfig) -> IngestServer:
        server = IngestServer(sink, config)
        self.run(server.start())
        return server

    def stop_server(self, server: IngestServer, grace_s: float | None = 0.2) -> None:
        self.run(server.stop(grace_s))

    @contextlib.contextmanager
    def serving(self, sink: BatchSink, config: IngestConfig) -> Iterator[IngestServer]:
        server = self.start_server(sink, config)
        try:
            yield server
        finally:
            self.stop_server(server)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class RecordingSink:
    """Keeps every batch it is given. With ``gate`` unset, consume() waits until it is set: a stuck
    downstream, so the server's queue fills."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[pb.FlowBatch] = []
        self.gate = gate

    async def consume(self, batch: pb.FlowBatch) -> None:
        while self.gate is not None and not self.gate.is_set():
            await asyncio.sleep(0.005)
        self.batches.append(batch)

    @property
    def records(self) -> int:
        return sum(len(b.l4) + b.l4_columns.count + len(b.l7) for b in self.batches)


class FailingSink:
    def __init__(self) -> None:
        self.calls = 0

    async def consume(self, batch: pb.FlowBatch) -> None:
        self.calls += 1
        raise RuntimeError("downstream is broken")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config(port: int = 0, **kw: Any) -> IngestConfig:
    kw.setdefault("drain_timeout_s", 1.0)
    return IngestConfig(listen=f"127.0.0.1:{port}", **kw)


def eventually(pred: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


# --- batches ---------------------------------------------------------------------------------------------


def l4(i: int = 0, **kw: Any) -> pb.L4Flow:
    fields: dict[str, Any] = {
        "socket_cookie": 1000 + i,
        "role": pb.ROLE_CLIENT,
        "kind": pb.RECORD_KIND_PERIODIC,
        "local_ip": "10.0.0.1",
        "local_port": 40000 + i % 20000,
        "remote_ip": "10.0.0.2",
        "remote_port": 80,
        "ip_family": 4,
        "tcp_state": "ESTABLISHED",
    }
    fields.update(kw)
    return pb.L4Flow(**fields)


def l7(i: int = 0, **kw: Any) -> pb.L7Request:
    fields: dict[str, Any] = {
        "socket_cookie": 1000 + i,
        "side": pb.ROLE_SERVER,
        "protocol": "http1",
        "local_ip": "fd00::1",
        "local_port": 8080,
        "remote_ip": "fd00::2",
        "remote_port": 50000 + i % 10000,
        "ip_family": 6,
        "latency_ns": 1_000_000,
        "http": pb.HttpInfo(method="GET", path="/api/items", route="/api/items", status_code=200),
    }
    fields.update(kw)
    return pb.L7Request(**fields)


def batch(n_l4: int = 0, n_l7: int = 0, node: str = "node-a", version: int = 1, **kw: Any) -> pb.FlowBatch:
    return pb.FlowBatch(
        schema_version=version,
        node_name=node,
        time_unix_nano=1_700_000_000_000_000_000,
        l4=[l4(i) for i in range(n_l4)],
        l7=[l7(i) for i in range(n_l7)],
        **kw,
    )


# --- certificates ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signs nothing here: a client trusting only this must reject the server
    other_client_cert: Path  # signed by other_ca: an mTLS server must reject it
    other_client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    cert, key, csr, extfile = d / f"{name}.crt", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    extfile.write_text(ext)
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        f"/CN={name}",
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca[0],
        "-CAkey",
        ca[1],
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        extfile,
    )
    return cert, key


def make_certs(d: Path) -> Certs:
    ca = _ca(d, "kscope-test-ca")
    other = _ca(d, "other-ca")
    server = _leaf(
        d,
        "processor",
        ca,
        "subjectAltName=DNS:processor.kscope.test,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client = _leaf(d, "agent", ca, "extendedKeyUsage=clientAuth\n")
    stranger = _leaf(d, "stranger", other, "extendedKeyUsage=clientAuth\n")
    return Certs(ca[0], server[0], server[1], client[0], client[1], other[0], stranger[0], stranger[1])


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


# --- a byte-counting proxy -------------------------------------------------------------------------------


class CountingProxy:
    """TCP relay from a local port to ``upstream``, counting the bytes the client sends: what the wire
    carried, after any compression. ``answer_delay_s`` holds back what the server sends (a slow path
    back: the server has the request, the client's deadline passes before it hears so)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.client_bytes = 0
        self.answer_delay_s = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in self._writers:
                w.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if count:
                        self.client_bytes += len(data)
                    elif self.answer_delay_s:
                        await asyncio.sleep(self.answer_delay_s)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
