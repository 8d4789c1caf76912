"""`kscope run`'s live map (tmux) over a database and gRPC: redis-server under a redis-cli loop whose
INCR of a string fails, and a grpcio server whose "fail" calls end NOT_FOUND. The rows name the
protocols (redis, grpc), the drill-downs show each command or method with its outcome by name (OK,
ERR, NOT_FOUND), never a number or "no_response"."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.agentproc import KSCOPE
from tests.e2e.netns import SRV_V4, Peer, Topology
from tests.e2e.test_run_map import open_edge, row_index, rows
from tests.e2e.tmuxterm import Tmux

pytestmark = pytest.mark.bpf
REDIS, GRPC = 6379, 50051
GRPC_PEER = Path(__file__).with_name("grpcpeer.py")
PYTHON = Path(sys.executable).name[:15]  # the grpc peers' comm


def grpc_calls(topo: Topology, stop: threading.Event) -> None:
    """A client started after the probes (HTTP/2 is read from a connection's first bytes): OK and
    NOT_FOUND calls until ``stop``."""
    proc = topo.spawn(topo.srv, sys.executable, "-u", str(GRPC_PEER), "client", "--to", SRV_V4, "--port",
                      str(GRPC), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    client = Peer(proc, "grpc-client")
    client.expect("connected", 20)
    while not stop.is_set():
        client.call("unary 3 hello", "done")
        client.call("unary 2 fail", "done")
        stop.wait(0.3)


def test_live_map_names_redis_and_grpc_outcomes(topo: Topology, tmp_path: Path) -> None:
    # On the namespace's loopback: over its 198.18.0.2 redis-server's protected mode (the default) refuses
    # the client with -DENIED (tests/e2e/test_l7_one_netns.py), and this test wants SET/GET to succeed.
    topo.spawn(topo.srv, "redis-server", "--bind", "127.0.0.1", "--port", str(REDIS), "--save", "", "--appendonly",
               "no")  # fmt: skip
    server = topo.spawn(topo.srv, sys.executable, "-u", str(GRPC_PEER), "server", "--bind", SRV_V4, "--port",
                        str(GRPC), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    Peer(server, "grpc-server").expect("listening", 20)
    topo.wait_listening(topo.srv, REDIS)
    redis_edge = f"redis-cli@host → redis-server@host:{REDIS}"
    grpc_edge = f"{PYTHON}@host → {PYTHON}@host:{GRPC}"
    term = Tmux(200, 50)
    stop = threading.Event()
    caller = threading.Thread(target=grpc_calls, args=(topo, stop), daemon=True)
    try:
        term.start([KSCOPE, "run", "--netns-inode", str(topo.srv.ino), "--interval", "1"], tmp_path / "rc",
                   stderr=tmp_path / "stderr")  # fmt: skip
        term.wait(lambda s: s.startswith("kscope run"), "the map", timeout=60)
        cli = f"redis-cli -p {REDIS}"
        topo.spawn(topo.srv, "sh", "-c", f"while :; do {cli} SET k v; {cli} GET k; {cli} INCR k; sleep 0.2; done")
        caller.start()

        def row(s: str, edge: str) -> str:
            i = row_index(s, edge)
            return rows(s)[i] if i >= 0 else ""

        # Each edge's requests (its L4 row comes first): the protocol column names them.
        screen = term.wait(lambda s: " redis " in row(s, redis_edge) and " grpc " in row(s, grpc_edge),
                           "the redis and grpc edges with their requests", timeout=60)  # fmt: skip
        errors = re.search(r" redis +[\d.]+ +([\d.]+) ", row(screen, redis_edge))
        assert errors and float(errors.group(1)) > 0, row(screen, redis_edge)  # every INCR fails
        assert row(screen, redis_edge).startswith("!"), screen
        (tmp_path / "map-200x50.txt").write_text(screen)

        detail = open_edge(term, redis_edge)
        (tmp_path / "redis-edge.txt").write_text(detail)
        routes = detail.split("slowest recent requests", 1)[0]
        assert re.search(r"\bSET\s+-\s+OK×\d", routes) and re.search(r"\bGET\s+-\s+OK×\d", routes), detail
        assert re.search(r"\bINCR\s+-\s+ERR×\d", routes), detail
        assert "no_response" not in detail
        term.keys("Escape")
        term.wait(lambda s: row_index(s, grpc_edge) >= 0, "back on the map")

        detail = open_edge(term, grpc_edge)
        (tmp_path / "grpc-edge.txt").write_text(detail)
        ping = next(line for line in detail.splitlines() if "demo.v1.Echo/Ping" in line)
        assert re.search(r"NOT_FOUND×\d", ping) and re.search(r"\bOK×\d", ping), detail
        slow = detail.split("slowest recent requests", 1)[1]
        calls = [line.split() for line in slow.splitlines() if "demo.v1.Echo/Ping" in line]
        assert calls and all(c[-1] in ("OK", "NOT_FOUND") for c in calls), detail
        term.keys("q")
        deadline = time.monotonic() + 30
        while not (tmp_path / "rc").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "rc").read_text().strip() == "0", (tmp_path / "stderr").read_text()
    finally:
        stop.set()
        term.close()
