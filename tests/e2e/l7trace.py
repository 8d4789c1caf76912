"""L7 tracing of a test's namespaces, and the servers the L7 tests talk to.

:class:`L7Trace` runs an L4 and an L7 collector per namespace, each filtered to its
namespace in the kernel (``netns_ino``), and feeds one :class:`L7Pipeline` in the order
the agent does (L4 first: its final records close the L7 parsers). Filtering in the kernel
rather than in the test keeps other traffic on the machine (another test run, a benchmark
on loopback) out of our ring buffers: unfiltered, a busy neighbour fills an 8 MiB ring
between two polls and the test's own chunks are the ones dropped. ``collector`` picks the
L7 probe: :class:`L7Collector` or the syscall fallback, which keeps its interface.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_exporter.l4.collector import L4Collector
from node_exporter.l4.records import L4Record
from node_exporter.l7.chunks import Chunk
from node_exporter.l7.collector import L7Collector
from node_exporter.l7.exchanges import ExchangeBatch
from node_exporter.l7.pipeline import ConnInfo, L7Event, L7Pipeline
from node_exporter.protocols import DnsRecord, HttpRecord, Role
from tests.e2e.netns import CLI_V4, CLI_V6, SRV_V4, SRV_V6, Netns, Peer, Topology, nginx, run

L7PEER = Path(__file__).with_name("l7peer.py")
MS = 1_000_000
HTTP_PORT = 8080
CURL_W = "%{http_code} %{size_request} %{size_header} %{size_download} %{local_port}"


class L7Trace:
    def __init__(
        self, namespaces: Iterable[Netns], collector: Callable[..., Any] = L7Collector, keep: bool = False, **l7_kw: Any
    ) -> None:
        """``keep``: also keep every chunk (``chunk_log``) and L4 record (``l4_log``)."""
        self.pairs: list[tuple[L4Collector, Any]] = []
        try:
            for ns in namespaces:
                l4 = L4Collector(netns_ino=ns.ino)
                try:
                    l7 = collector(netns_ino=ns.ino, **l7_kw)
                except BaseException:
                    l4.close()
                    raise
                self.pairs.append((l4, l7))
        except BaseException:
            self.close()
            raise
        self.pipe = L7Pipeline()
        self.events: list[L7Event] = []
        self.chunks = 0
        self.exchanges = 0  # exchange records (plain-text HTTP/1 paired in the kernel)
        # Chunks whose call moved more than was captured (a bound, or a vector call's first
        # buffer): the pipeline feeds the rest to its parser as a gap of known size.
        self.truncated = 0
        self.truncated_bytes = 0
        self.keep = keep
        self.chunk_log: list[Chunk] = []
        self.l4_log: list[L4Record] = []

    def poll(self) -> list[L7Event]:
        out: list[L7Event] = []
        for l4, l7 in self.pairs:
            records = l4.poll()  # first, as the agent: a final record closes the socket's parser
            items = l7.poll()
            for c in items:
                if isinstance(c, ExchangeBatch):
                    self.exchanges += len(c)
                    continue
                self.chunks += 1
                if self.keep:
                    self.chunk_log.append(c)
                if c.length > len(c.data):
                    self.truncated += 1
                    self.truncated_bytes += c.length - len(c.data)
            if self.keep:
                self.l4_log += records
            out += self.pipe.feed(items)
            out += self.pipe.close_sockets(r.sock_cookie for r in records if r.is_close)
        out += self.pipe.expire(time.monotonic_ns())
        self.events += out
        return out

    def drain(self) -> None:
        """Poll and forget: what a test did before the part it checks."""
        self.poll()
        self.events.clear()

    def until(self, done: Callable[[list[L7Event]], bool], timeout: float = 5) -> list[L7Event]:
        """Poll until ``done(events)`` or the deadline; returns the events either way."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if done(self.events) or time.monotonic() >= deadline:
                return self.events
            time.sleep(0.05)

    def kernel_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for _, l7 in self.pairs:
            for k, v in l7.kernel_stats().items():
                total[k] = total.get(k, 0) + v
        return total

    def tls_libraries(self) -> set[str]:
        return {path for _, l7 in self.pairs if l7.tls is not None for path in l7.tls.attached.values()}

    def close(self) -> None:
        for l4, l7 in self.pairs:
            with contextlib.suppress(Exception):
                l7.close()
            with contextlib.suppress(Exception):
                l4.close()
        self.pairs.clear()


# ---- selecting events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpEvent:
    conn: ConnInfo
    record: HttpRecord


@dataclass(frozen=True, slots=True)
class DnsEvent:
    conn: ConnInfo
    record: DnsRecord


AnyEvent = L7Event | HttpEvent | DnsEvent


def http(events: Iterable[AnyEvent], **match: Any) -> list[HttpEvent]:
    """HTTP events whose connection or record has every attribute in ``match``."""
    return [HttpEvent(e.conn, e.record) for e in events if isinstance(e.record, HttpRecord) and _matches(e, match)]


def dns(events: Iterable[AnyEvent], **match: Any) -> list[DnsEvent]:
    return [DnsEvent(e.conn, e.record) for e in events if isinstance(e.record, DnsRecord) and _matches(e, match)]


def _matches(e: AnyEvent, match: dict[str, Any]) -> bool:
    for k, v in match.items():
        obj = e.conn if hasattr(e.conn, k) else e.record
        if getattr(obj, k) != v:
            return False
    return True


def count_at_least(n: int, select: Callable[[list[L7Event]], list[Any]]) -> Callable[[list[L7Event]], bool]:
    return lambda events: len(select(events)) >= n


def both_ends(trace: L7Trace, n: int = 1, timeout: float = 5, **match: Any) -> tuple[list[HttpEvent], list[HttpEvent]]:
    """Poll until ``n`` client and ``n`` server HTTP records match; returns (client, server)."""
    trace.until(count_at_least(2 * n, lambda ev: http(ev, **match)), timeout)
    return http(trace.events, side=Role.CLIENT, **match), http(trace.events, side=Role.SERVER, **match)


def check_pair(
    c: HttpEvent,
    s: HttpEvent,
    topo: Topology,
    client_port: int,
    server_port: int = HTTP_PORT,
    v6: bool = False,
    slack_ns: int = MS,
) -> None:
    """The two ends of one exchange: the same request seen from each side of one TCP connection.
    ``slack_ns``: how far the stamps may cross. Socket tracepoints stamp inside the syscall (1 ms);
    TLS records are stamped when SSL_write/SSL_read return, so a client descheduled between its write
    syscall and SSL_write's return (a loaded CI machine) stamps its start after the server answered."""
    cli_ip, srv_ip, family = (CLI_V6, SRV_V6, 10) if v6 else (CLI_V4, SRV_V4, 2)
    assert c.conn.side is Role.CLIENT and s.conn.side is Role.SERVER
    assert c.conn.protocol == s.conn.protocol == "http1"
    assert (c.conn.netns_ino, s.conn.netns_ino) == (topo.cli.ino, topo.srv.ino)
    assert (c.conn.local_ip, c.conn.local_port, c.conn.remote_ip, c.conn.remote_port) == (
        cli_ip, client_port, srv_ip, server_port)  # fmt: skip
    assert (s.conn.local_ip, s.conn.local_port, s.conn.remote_ip, s.conn.remote_port) == (
        srv_ip, server_port, cli_ip, client_port)  # fmt: skip
    assert c.conn.family == s.conn.family == family
    assert c.conn.sock_cookie != s.conn.sock_cookie
    cr, sr = c.record, s.record
    assert (cr.method, cr.path, cr.route, cr.status) == (sr.method, sr.path, sr.route, sr.status)
    assert (cr.request_bytes, cr.response_bytes) == (sr.request_bytes, sr.response_bytes)
    assert cr.latency_ns > 0 and sr.latency_ns > 0
    # One clock (CLOCK_MONOTONIC): the server's view of the exchange sits inside the client's.
    assert sr.latency_ns <= cr.latency_ns + slack_ns
    assert cr.start_ns - slack_ns <= sr.start_ns <= cr.start_ns + cr.latency_ns + slack_ns


def keepalive_before_tracing(
    topo: Topology, start: Callable[[], L7Trace], port: int = HTTP_PORT
) -> tuple[L7Trace, int, list[HttpEvent], list[HttpEvent]]:
    """A keep-alive connection (and its first exchange) older than the trace ``start()``
    makes: both ends see exactly the two later exchanges, paired, each end on one socket.
    Returns (trace, the client's port, client records, server records) for further checks."""
    cli = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(port), "--comm", "ks-keepalive")
    cport = int(cli.expect("connected")["local"][1])
    require(cli.call("get /before/1", "done")["statuses"] == {"200": 1}, "first request")

    trace = start()  # the connection and its first exchange are older than the probe
    for path in ("/after/1", "/after/2"):
        require(cli.call(f"get {path}", "done")["statuses"] == {"200": 1}, path)
    trace.until(count_at_least(4, http))

    client, server = http(trace.events, side=Role.CLIENT), http(trace.events, side=Role.SERVER)
    assert [e.record.path for e in client] == [e.record.path for e in server] == ["/after/1", "/after/2"]
    assert {e.conn.comm for e in client} == {"ks-keepalive"} and {e.conn.tgid for e in client} == {cli.pid}
    assert len({e.conn.sock_cookie for e in client}) == len({e.conn.sock_cookie for e in server}) == 1
    for c, s in zip(client, server, strict=True):
        check_pair(c, s, topo, cport, port)
    assert trace.pipe.counters()["invalid_frames"] == 0
    return trace, cport, client, server


def require(cond: object, what: str) -> None:
    """A precondition of the scenario: not an AssertionError, so an xfail never hides it."""
    if not cond:
        raise RuntimeError(f"scenario broken: {what}")


def curl(topo: Topology, url: str, *extra: str) -> dict[str, int]:
    """curl in the client namespace: status, bytes each way (head + body) and its local port."""
    out = topo.cli.run("curl", "-sS", "-o", "/dev/null", "-w", CURL_W, *extra, url).stdout.split()
    code, req, head, body, port = map(int, out)
    return {"status": code, "request_bytes": req, "response_bytes": head + body, "port": port}


# ---- servers and clients --------------------------------------------------------------------

L7_LOCATIONS = """\
        location / { return 200 "ok\\n"; }
        location = /error { return 500; }
        location /slow/ { proxy_pass http://127.0.0.1:%(upstream)d; }
        location = /p1 { return 200 "one\\n"; }
        location = /p2 { return 201 "two!\\n"; }
        location = /p3 { return 202 "three\\n"; }"""

TLS_CONF = "listen {ip}:{port} ssl; ssl_certificate {tmp}/cert.pem; ssl_certificate_key {tmp}/key.pem;"


def self_signed_cert(tmp: Path) -> None:
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kscope.test",
         "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")])  # fmt: skip


def start_l7_nginx(
    topo: Topology, tmp: Path, port: int, *, tls_port: int | None = None, upstream: int = 9000
) -> subprocess.Popen[Any]:
    """nginx in the server namespace with the L7 tests' locations (and TLS on ``tls_port``)."""
    tls = ""
    ports: tuple[int, ...] = (port,)
    if tls_port is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        self_signed_cert(tmp)
        tls = TLS_CONF.format(ip=SRV_V4, port=tls_port, tmp=tmp)
        ports = (port, tls_port)
    server = f"listen {SRV_V4}:{port}; listen [{SRV_V6}]:{port}; {tls}\n" + L7_LOCATIONS % {"upstream": upstream}
    return nginx(topo, tmp, server, ports)


def l7peer(topo: Topology, ns: Netns, *args: str, label: str | None = None) -> Peer:
    """Start ``tests/e2e/l7peer.py ARGS`` in ``ns`` (unbuffered pipes both ways)."""
    proc = topo.spawn(ns, sys.executable, "-u", str(L7PEER), *args,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    return Peer(proc, label or f"{ns.name}:{args[0]}")


_WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.M)


def wrk_requests(output: str) -> int:
    """Completed requests from wrk's summary; a run with socket errors or non-2xx is an error."""
    m = _WRK_REQUESTS.search(output)
    if m is None:
        raise RuntimeError(f"no request count in wrk output:\n{output}")
    if "Socket errors" in output or "Non-2xx" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    return int(m.group(1))
