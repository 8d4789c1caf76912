"""The agent leaves its own sockets alone (``skip_own``): its gRPC to the processor and the OTLP
that ``kscope run`` sends would only describe kscope to itself. Here the test process plays the
agent: it loads the probe and makes an HTTP call itself, from a thread inside the client
namespace, beside curl's call to the same nginx."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from node_exporter.l7.collector import L7Collector
from node_exporter.l7.syscalls import SyscallL7Collector
from node_exporter.netns import setns_net
from node_exporter.protocols import Role
from tests.e2e.l7trace import L7Trace, both_ends, curl, http, require, start_l7_nginx
from tests.e2e.netns import SRV_V4, Netns, Topology

pytestmark = pytest.mark.bpf

PORT = 8080


def get_from(ns: Netns, path: str) -> int:
    """A GET made by this process, from a thread that entered ``ns`` (setns is per thread)."""
    status: list[int] = []

    def call() -> None:
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns_net(fd)
        finally:
            os.close(fd)
        conn = HTTPConnection(SRV_V4, PORT, timeout=10)
        conn.request("GET", path)
        status.append(conn.getresponse().status)
        conn.close()

    t = threading.Thread(target=call)
    t.start()
    t.join(15)
    require(bool(status), f"GET {path} from this process failed")
    return status[0]


@pytest.mark.parametrize("collector", [L7Collector, SyscallL7Collector], ids=["sockets", "syscalls"])
@pytest.mark.parametrize("skip_own", [True, False], ids=["skip-own", "keep-own"])
def test_own_sockets_are_not_parsed(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace], collector: Any, skip_own: bool
) -> None:
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing(collector=collector, skip_own=skip_own)
    assert get_from(topo.cli, "/own") == 200
    got = curl(topo, f"http://{SRV_V4}:{PORT}/theirs")
    require(got["status"] == 200, f"curl: {got}")
    # curl's call at both ends, whatever skip_own says
    c, s = both_ends(trace, path="/theirs")
    assert [e.conn.comm for e in c] == ["curl"] and [e.conn.comm for e in s] == ["nginx"]
    # nginx's side of this process's call is nginx's: always recorded
    trace.until(lambda ev: bool(http(ev, path="/own", side=Role.SERVER)))
    assert len(http(trace.events, path="/own", side=Role.SERVER)) == 1
    mine = [e for e in trace.events if e.conn.tgid == os.getpid()]
    own = sum(l7.kernel_stats()["own"] for _, l7 in trace.pairs)
    if skip_own:
        assert mine == [] and not http(trace.events, path="/own", side=Role.CLIENT)
        assert own >= 1  # the socket was given up on, counted
    else:
        assert [e.record.path for e in http(mine)] == ["/own"] and len(mine) == 1
        assert own == 0
