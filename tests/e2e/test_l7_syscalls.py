"""The syscall-exit L7 fallback (l7_syscalls.bpf.o) against real peers, forced on this kernel.

This kernel has the socket tracepoints, so the agent would pick l7.bpf.o; these tests load
the fallback directly (:class:`SyscallL7Collector`) and check it yields the same records:
per namespace one L4 collector (whose final records close the parsers, and whose cookie is
the join key) and one fallback collector, both filtered to the namespace in the kernel, feeding
one :class:`L7Pipeline` in the agent's order.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node_exporter.l7.syscalls import SyscallL7Collector
from node_exporter.protocols import DnsRecord, HttpRecord, Role
from tests.e2e import l7trace
from tests.e2e.l7trace import (
    HttpEvent,
    L7Trace,
    both_ends,
    count_at_least,
    curl,
    dns,
    http,
    keepalive_before_tracing,
    l7peer,
    require,
)
from tests.e2e.netns import CLI_V4, SRV_V4, SRV_V6, Topology, nginx

pytestmark = pytest.mark.bpf

PORT = 8080
URL = f"http://{SRV_V4}:{PORT}"
SERVER = f"""listen {SRV_V4}:{PORT}; listen [{SRV_V6}]:{PORT};
        location / {{ return 200 "ok\\n"; }}
        location = /error {{ return 500; }}"""


@pytest.fixture
def tracing(topo: Topology) -> Iterator[Callable[..., L7Trace]]:
    """``tracing(**SyscallL7Collector kw)`` traces both namespaces from now with the fallback,
    keeping every chunk and L4 record; closed after the test."""
    made: list[L7Trace] = []

    def start(**kw: Any) -> L7Trace:
        t = L7Trace((topo.cli, topo.srv), collector=SyscallL7Collector, keep=True, **kw)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()


def check_pair(c: HttpEvent, s: HttpEvent, topo: Topology, client_port: int, v6: bool = False) -> None:
    """The same plain-text exchange seen from each end of one TCP connection."""
    assert not c.conn.tls and not s.conn.tls
    l7trace.check_pair(c, s, topo, client_port, PORT, v6=v6)


def l4_cookie(trace: L7Trace, netns_ino: int, local_port: int, remote_port: int) -> int:
    """The L4 collector's cookie of the one socket with these ports in that namespace."""
    cookies = {r.sock_cookie for r in trace.l4_log
               if (r.netns_ino, r.local_port, r.remote_port) == (netns_ino, local_port, remote_port)}  # fmt: skip
    assert len(cookies) == 1, cookies
    return cookies.pop()


# ---- HTTP through nginx and curl, both ends, and the join key with L4 --------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_http_get_both_ends(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace], v6: bool) -> None:
    srv = nginx(topo, tmp_path, SERVER, (PORT,))
    trace = tracing()
    got = curl(topo, f"http://[{SRV_V6}]:{PORT}/users/7?q=secret" if v6 else f"{URL}/users/7?q=secret")
    require(got["status"] == 200, f"curl: {got}")

    client, server = both_ends(trace, path="/users/7")
    assert len(client) == 1 and len(server) == 1, trace.events
    c, s = client[0], server[0]
    check_pair(c, s, topo, got["port"], v6=v6)
    assert isinstance(c.record, HttpRecord)
    assert (c.record.method, c.record.route, c.record.status) == ("GET", "/users/{id}", 200)
    assert (c.record.request_bytes, c.record.response_bytes) == (got["request_bytes"], got["response_bytes"])
    assert (c.conn.comm, s.conn.comm, s.conn.tgid) == ("curl", "nginx", srv.pid)
    assert "secret" not in repr(trace.events)
    assert trace.pipe.counters()["invalid_frames"] == 0
    assert {ch.netns_ino for ch in trace.chunk_log} <= {topo.cli.ino, topo.srv.ino}


def test_socket_cookie_is_the_l4_cookie(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    nginx(topo, tmp_path, SERVER, (PORT,))
    trace = tracing()
    got = curl(topo, f"{URL}/cookie")
    require(got["status"] == 200, f"curl: {got}")
    client, server = both_ends(trace, path="/cookie")
    # the L4 final records of both sockets (curl closes, nginx closes after it)
    trace.until(lambda _: len([r for r in trace.l4_log if r.is_close and PORT in (r.local_port, r.remote_port)]) >= 2)

    c, s = client[0], server[0]
    assert c.conn.sock_cookie == l4_cookie(trace, topo.cli.ino, got["port"], PORT) != 0
    assert s.conn.sock_cookie == l4_cookie(trace, topo.srv.ino, PORT, got["port"]) != 0
    # The L4 probe assigns cookies from the connect/accept on, so no chunk had to say 0.
    assert trace.kernel_stats()["no_cookie"] == 0


def test_http_error_status(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    nginx(topo, tmp_path, SERVER, (PORT,))
    trace = tracing()
    got = curl(topo, f"{URL}/error")
    require(got["status"] == 500, f"curl: {got}")
    client, server = both_ends(trace, path="/error")
    assert len(client) == len(server) == 1
    check_pair(client[0], server[0], topo, got["port"])
    assert isinstance(client[0].record, HttpRecord)
    assert client[0].record.status == 500
    assert (client[0].record.request_bytes, client[0].record.response_bytes) == (
        got["request_bytes"], got["response_bytes"])  # fmt: skip


# ---- DNS: dig against dnsmasq -------------------------------------------------------------------

QUERIES = {"ok.test": ("NOERROR", 1), "foo.nx.test": ("NXDOMAIN", 0)}
_DIG_STATUS = re.compile(r"status: ([A-Z]+),")
_DIG_SIZE = re.compile(r"MSG SIZE\s+rcvd: (\d+)")


def test_dns_client_records(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    topo.spawn(topo.srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
               "--user=root", "--port=53", f"--listen-address={SRV_V4}", "--bind-interfaces",
               "--address=/ok.test/198.18.0.9", "--local=/nx.test/", f"--pid-file={tmp_path}/dnsmasq.pid",
               f"--log-facility={tmp_path}/dnsmasq.log")  # fmt: skip
    topo.wait_listening(topo.srv, 53)
    trace = tracing()
    facts = {}
    for name, (rcode, _) in QUERIES.items():
        dig = topo.spawn(topo.cli, "dig", "+tries=1", "+time=3", f"@{SRV_V4}", name, "A",
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
        out, _ = dig.communicate(timeout=10)
        status, size = _DIG_STATUS.search(out), _DIG_SIZE.search(out)
        require(dig.returncode == 0 and status and size, f"dig {name}: {out}")
        assert status is not None and size is not None
        require(status.group(1) == rcode, f"dnsmasq answered {name} with {status.group(1)}")
        facts[name] = (dig.pid, int(size.group(1)))

    trace.until(count_at_least(len(QUERIES), lambda ev: dns(ev, side=Role.CLIENT)))
    client = dns(trace.events, side=Role.CLIENT)
    assert sorted(e.record.name for e in client if isinstance(e.record, DnsRecord)) == sorted(QUERIES)
    for e in client:
        r = e.record
        assert isinstance(r, DnsRecord)
        rcode, answers = QUERIES[r.name]
        assert (r.qtype, r.rcode, r.answers, r.timed_out) == ("A", rcode, answers, False), e
        assert (e.conn.tgid, r.response_bytes) == facts[r.name], e
        assert r.request_bytes > 12 + len(r.name) and r.latency_ns > 0
        assert (e.conn.protocol, e.conn.comm, e.conn.netns_ino) == ("dns", "dig", topo.cli.ino)
        assert (e.conn.local_ip, e.conn.remote_ip, e.conn.remote_port) == (CLI_V4, SRV_V4, 53)
    assert trace.pipe.counters()["invalid_frames"] == 0


# ---- a keep-alive connection older than the collector ------------------------------------------


def test_keepalive_connection_opened_before_tracing(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]
) -> None:
    nginx(topo, tmp_path, SERVER, (PORT,))
    trace, cport, client, server = keepalive_before_tracing(topo, tracing, PORT)
    assert not any(e.conn.tls for e in client + server)
    # Its stream offsets count from the first call seen, not the connection's first byte.
    assert min(ch.seq for ch in trace.chunk_log if ch.local_port == cport) == 0


# ---- files and pipes are never sockets ----------------------------------------------------------

FILE_IO = """
import os, sys
head = b"GET /not-a-socket HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"
path = sys.argv[1]
for _ in range(50):
    with open(path, "wb") as f:
        f.write(head)
    with open(path, "rb") as f:
        f.read()
    r, w = os.pipe()
    os.write(w, b"HTTP/1.1 200 OK\\r\\n\\r\\n")
    os.read(r, 100)
    os.close(r); os.close(w)
print(os.getpid())
"""


def test_file_and_pipe_io_makes_no_records(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    nginx(topo, tmp_path, SERVER, (PORT,))
    trace = tracing()
    out = topo.cli.run(sys.executable, "-c", FILE_IO, str(tmp_path / "http.txt")).stdout
    writer = int(out.split()[-1])
    got = curl(topo, f"{URL}/after-files")  # the collector is live: this one is traced
    require(got["status"] == 200, f"curl: {got}")
    both_ends(trace, path="/after-files")

    assert http(trace.events, path="/after-files"), trace.events
    assert not [ch for ch in trace.chunk_log if ch.tgid == writer]
    assert not http(trace.events, path="/not-a-socket")


# ---- bounds: the per-socket LRU and the ring ----------------------------------------------------


def test_socket_state_lru_pushed_past_its_bound(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]
) -> None:
    entries, conns = 16, 40  # two sockets a connection: 80 sockets through 16 entries
    nginx(topo, tmp_path, SERVER, (PORT,))
    trace = tracing(socket_entries=entries)
    for i in range(conns):
        require(curl(topo, f"{URL}/lru/{i}")["status"] == 200, f"curl {i}")
        if i % 8 == 7:
            trace.poll()
    got = curl(topo, f"{URL}/lru-last")
    require(got["status"] == 200, "last curl")
    trace.until(count_at_least(2, lambda ev: http(ev, path="/lru-last")))

    stats = trace.kernel_stats()
    # Each collector tracked only its namespace's sockets, and saw more than it could hold.
    assert stats["sockets_tracked"] >= 2 * (conns + 1), stats
    assert stats["sockets_evicted_min"] >= 2 * (conns + 1) - 2 * entries, stats
    assert all(l7.socket_entries == entries for _, l7 in trace.pairs)
    # Nothing broke: every record is a real exchange, and the probe kept working to the end.
    for e in http(trace.events):
        assert isinstance(e.record, HttpRecord)
        assert e.record.status == 200 and e.record.path.startswith("/lru"), e
    client = http(trace.events, side=Role.CLIENT, path="/lru-last")
    server = http(trace.events, side=Role.SERVER, path="/lru-last")
    assert len(client) == len(server) == 1
    check_pair(client[0], server[0], topo, got["port"])
    assert all(l7.stats.decode_errors == 0 for _, l7 in trace.pairs)


def test_ring_overflow_is_counted(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    burst = 2000
    nginx(topo, tmp_path, SERVER, (PORT,))
    trace = tracing(ring_bytes=16384, capture_bytes=4096)
    cli = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(PORT), "--comm", "ks-burst")
    cport = cli.expect("connected")["local"][1]
    require(cli.call("get /warmup", "done")["statuses"] == {"200": 1}, "warm-up")
    both_ends(trace, path="/warmup")

    # No polling until the burst is done: the application never waits for the ring.
    done = cli.call(f"get /burst {burst}", "done", timeout=30)
    assert done["statuses"] == {"200": burst}, done
    before = trace.kernel_stats()
    assert before["rb_full"] > 0, before
    trace.poll()
    trace.poll()
    stats = trace.kernel_stats()
    # Every chunk the probe decided to send either reached us or was counted as dropped.
    assert stats["captured"] == trace.chunks, (stats, trace.chunks)
    assert len(http(trace.events, path="/burst", side=Role.CLIENT)) < burst

    require(cli.call("get /after-burst", "done")["statuses"] == {"200": 1}, "after the burst")
    client, server = both_ends(trace, path="/after-burst")
    assert len(client) == len(server) == 1
    check_pair(client[0], server[0], topo, cport)
    for e in http(trace.events):
        assert isinstance(e.record, HttpRecord)
        assert e.record.status == 200 and e.record.path in {"/warmup", "/burst", "/after-burst"}, e
    assert all(l7.stats.decode_errors == 0 for _, l7 in trace.pairs)


def test_same_interface_as_l7collector(topo: Topology) -> None:
    """What the agent asks of L7Collector; TLS and in-kernel pairing say why they are off."""
    with SyscallL7Collector(netns_ino=topo.cli.ino, tls=True, exchanges=True, ring_bytes=1 << 16) as l7:
        assert {"l7.capture", "l7.cookie"} <= l7.report.enabled
        assert set(l7.report.disabled) == {"l7.tls", "l7.exchanges"}
        assert l7.tls is None
        assert l7.poll() == []
        l7.sweep()
        stats = l7.kernel_stats()
        assert stats["captured"] == stats["rb_full"] == 0 and "sockets_evicted_min" in stats
