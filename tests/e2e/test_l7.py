"""The L7 probe and pipeline against real HTTP/1.1, HTTPS and DNS peers between namespaces.

Each test builds its client/server namespaces (``topo``), starts the real programs
(nginx, curl, wrk, dig, dnsmasq, python peers), traces both namespaces (``tracing``:
collectors filtered to those namespaces in the kernel) and checks the records of
exactly those connections, at both ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from node_exporter.bpf.abi import KscopeL7Exchange
from node_exporter.l7.collector import L7Collector
from node_exporter.l7.exchanges import EXCHANGE_SIZE, ExchangeBatch
from node_exporter.protocols import Role
from tests.e2e.l7peer import request as peer_request
from tests.e2e.l7trace import (
    MS,
    DnsEvent,
    HttpEvent,
    L7Trace,
    both_ends,
    check_pair,
    count_at_least,
    curl,
    dns,
    http,
    keepalive_before_tracing,
    l7peer,
    require,
    start_l7_nginx,
    wrk_requests,
)
from tests.e2e.netns import CLI_V4, SRV_V4, SRV_V6, Topology

pytestmark = pytest.mark.bpf
E = TypeVar("E", HttpEvent, DnsEvent)

PORT, TLS_PORT, UPSTREAM_PORT, SERVFAIL_PORT = 8080, 8443, 9000, 5300
URL = f"http://{SRV_V4}:{PORT}"


def one(events: list[E], what: str) -> E:
    assert len(events) == 1, f"expected one {what} record, got {events}"
    return events[0]


# ---- 1: a plain GET, both ends ----------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_http_get_both_ends(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace], v6: bool) -> None:
    nginx = start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing(tls=True)  # curl and nginx both map libssl: plaintext HTTP is still captured once
    url = f"http://[{SRV_V6}]:{PORT}" if v6 else URL
    got = curl(topo, f"{url}/users/123/orders?token=secret")
    require(got["status"] == 200, f"curl: {got}")

    c_events, s_events = both_ends(trace, path="/users/123/orders")
    c, s = one(c_events, "client"), one(s_events, "server")
    check_pair(c, s, topo, got["port"], v6=v6)
    assert (c.record.method, c.record.route, c.record.status) == ("GET", "/users/{id}/orders", 200)
    assert (c.conn.comm, s.conn.comm) == ("curl", "nginx")
    assert s.conn.tgid == nginx.pid
    assert c.conn.tls is False and s.conn.tls is False
    # Exactly the bytes curl says went over the wire (head + body each way).
    assert (c.record.request_bytes, c.record.response_bytes) == (got["request_bytes"], got["response_bytes"])
    assert c.record.traceparent == c.record.request_id == ""
    # The query string (and its secret) goes nowhere.
    assert "secret" not in repr(trace.events)
    assert "token" not in repr(trace.events)
    # The kernel filter kept everything else on the machine out.
    assert {e.conn.netns_ino for e in trace.events} <= {topo.cli.ino, topo.srv.ino}
    assert trace.pipe.counters()["invalid_frames"] == 0


# ---- 2: an error status; latency through a slow upstream ----------------------------------------


@pytest.mark.parametrize("exchanges", [True, False], ids=["kernel-paired", "chunks"])
def test_http_error_status(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace], exchanges: bool) -> None:
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing(exchanges=exchanges)  # chunks: the path HTTP/1 takes after a fallback
    got = curl(topo, f"{URL}/error")
    require(got["status"] == 500, f"curl: {got}")

    c_events, s_events = both_ends(trace, path="/error")
    c, s = one(c_events, "client"), one(s_events, "server")
    check_pair(c, s, topo, got["port"])
    assert c.record.status == s.record.status == 500
    assert (c.record.request_bytes, c.record.response_bytes) == (got["request_bytes"], got["response_bytes"])
    assert (trace.exchanges > 0, trace.chunks > 0) == (exchanges, not exchanges)


def test_http_latency_through_slow_upstream(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    delay_ns = 300 * MS
    upstream = l7peer(topo, topo.srv, "slow-http", "--bind", "127.0.0.1", "--port", str(UPSTREAM_PORT),
                      "--delay", str(delay_ns / 1e9), "--comm", "ks-upstream")  # fmt: skip
    upstream.expect("listening")
    start_l7_nginx(topo, tmp_path, PORT, upstream=UPSTREAM_PORT)
    trace = tracing()
    t0 = time.monotonic_ns()
    got = curl(topo, f"{URL}/slow/x")
    wall = time.monotonic_ns() - t0
    require(got["status"] == 200 and wall >= delay_ns, f"curl: {got} in {wall / 1e6:.0f} ms")

    # Two exchanges: curl -> nginx, and nginx -> the upstream (nginx is the client there).
    trace.until(count_at_least(4, lambda ev: http(ev, path="/slow/x")))
    c = one(http(trace.events, path="/slow/x", side=Role.CLIENT, comm="curl"), "curl client")
    s = one(http(trace.events, path="/slow/x", side=Role.SERVER, comm="nginx"), "nginx server")
    check_pair(c, s, topo, got["port"])
    nc = one(http(trace.events, path="/slow/x", side=Role.CLIENT, comm="nginx"), "nginx -> upstream client")
    us = one(http(trace.events, path="/slow/x", side=Role.SERVER, comm="ks-upstream"), "upstream server")
    assert (nc.conn.remote_ip, nc.conn.remote_port) == ("127.0.0.1", UPSTREAM_PORT)
    assert (us.conn.local_port, us.conn.tgid) == (UPSTREAM_PORT, upstream.pid)
    assert nc.conn.netns_ino == us.conn.netns_ino == topo.srv.ino
    for e in (c, s, nc, us):
        assert e.record.status == 200
        assert delay_ns <= e.record.latency_ns < delay_ns + 2000 * MS, e
    # Each exchange contains the next one (with a little slack for who ran first).
    assert c.record.latency_ns + MS >= s.record.latency_ns
    assert s.record.latency_ns + MS >= nc.record.latency_ns
    assert nc.record.latency_ns + MS >= us.record.latency_ns
    assert c.record.latency_ns <= wall


# ---- 3: keep-alive load --------------------------------------------------------------------------

# wrk is paced (1 ms between a connection's requests, ~3-4k req/s): unpaced it outruns any
# Python consumer on these 2-CPU machines, and losing chunks under overload is test 8's subject.
WRK_PACING = "function delay()\n  return 1\nend\n"


def test_wrk_keepalive_load_every_request_traced(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]
) -> None:
    conns = 4
    start_l7_nginx(topo, tmp_path, PORT)
    script = tmp_path / "pace.lua"
    script.write_text(WRK_PACING)
    trace = tracing()
    wrk = topo.spawn(topo.cli, "wrk", "-t1", f"-c{conns}", "-d2s", "-s", str(script), f"{URL}/load",
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    while wrk.poll() is None:  # drain while it runs, as the agent would
        trace.poll()
        time.sleep(0.1)
    out = wrk.stdout.read() if wrk.stdout else ""
    require(wrk.returncode == 0, f"wrk exited {wrk.returncode}: {out}")
    n = wrk_requests(out)
    require(n > 1000, f"wrk did only {n} requests")

    # wrk counts completed responses; up to one request per connection was in flight at the end.
    trace.until(lambda ev: len(http(ev, side=Role.SERVER)) >= n, timeout=10)
    trace.poll()
    server = http(trace.events, side=Role.SERVER)
    client = http(trace.events, side=Role.CLIENT)
    assert n <= len(server) <= n + conns
    assert n <= len(client) <= n + conns
    assert {e.conn.comm for e in server} == {"nginx"} and {e.conn.comm for e in client} == {"wrk"}
    assert len({e.conn.sock_cookie for e in server}) == conns, "keep-alive: one connection each"
    for e in server + client:
        assert (e.record.method, e.record.path, e.record.status) == ("GET", "/load", 200), e
    counters, stats = trace.pipe.counters(), trace.kernel_stats()
    assert counters["invalid_frames"] == 0, counters
    # Nothing lost: the only "gaps" are bodies not captured by design (nginx writev()s head
    # and body, and only the first buffer of a vector call is captured).
    assert counters["gaps"] <= trace.truncated and counters["gap_bytes"] <= trace.truncated_bytes, counters
    assert stats["rb_full"] == 0, stats
    assert stats["read_failed"] == 0 and stats["no_buffer"] == 0, stats


# ---- 4: pipelined requests -----------------------------------------------------------------------


def test_pipelined_requests_pair_in_order(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing()
    cli = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(PORT), "--comm", "ks-pipeline")
    cport = cli.expect("connected")["local"][1]
    got = cli.call("pipeline /p1 /p2 /p3", "done")
    require(got["statuses"] == [200, 201, 202], f"nginx answered {got}")

    trace.until(count_at_least(6, lambda ev: http(ev, local_port=cport) + http(ev, remote_port=cport)))
    client = http(trace.events, side=Role.CLIENT, comm="ks-pipeline")
    server = http(trace.events, side=Role.SERVER, comm="nginx")
    expected = list(zip(got["paths"], got["statuses"], got["request_bytes"], got["response_bytes"], strict=True))
    for side in (client, server):
        # Emitted in order, each response paired with its own request (distinct statuses and sizes).
        assert [(e.record.path, e.record.status, e.record.request_bytes, e.record.response_bytes) for e in side] == (
            expected
        )
    for c, s in zip(client, server, strict=True):
        check_pair(c, s, topo, cport)
    # The three requests left in one send: one chunk, one timestamp.
    assert len({e.record.start_ns for e in client}) == 1
    assert trace.pipe.counters()["invalid_frames"] == 0


def test_exchange_heads_exact_and_zero_after(topo: Topology, tmp_path: Path) -> None:
    """A socket's request is read straight into whichever of its two heads the previous exchange does
    not use (no copy): each record still carries exactly its own request's first bytes and zeros after
    them (the ABI), also where a shorter request lands on a longer one's head, and past the head's size."""
    start_l7_nginx(topo, tmp_path, PORT)
    head_size = len(KscopeL7Exchange().head)
    paths = ["/" + "long" * 60, "/s", "/" + "m" * 30, "/x", "/" + "z" * 450, "/y", "/" + "w" * 9]
    records: list[KscopeL7Exchange] = []
    with L7Collector(netns_ino=topo.cli.ino, tls=False, record_rate=0, idle_s=0.05) as col:
        cli = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(PORT))
        cli.expect("connected")
        for path in paths:
            require(cli.call(f"get {path}", "done")["statuses"] == {"200": 1}, path)
        deadline = time.monotonic() + 5
        while len(records) < len(paths) and time.monotonic() < deadline:
            time.sleep(0.1)
            col.sweep()  # the last exchange, idle, leaves by the sweep
            for item in col.poll():
                if isinstance(item, ExchangeBatch):
                    stride = 8 + EXCHANGE_SIZE
                    records += [KscopeL7Exchange.from_buffer_copy(item.data, i * stride + 8) for i in range(item.n)]
    assert [bytes(r.head[: r.head_len]) for r in records] == [peer_request(p)[:head_size] for p in paths]
    assert [r.head_len for r in records] == [min(len(peer_request(p)), head_size) for p in paths]
    assert all(not any(r.head[r.head_len :]) for r in records)


# ---- 5: DNS over UDP: NOERROR, NXDOMAIN, SERVFAIL -------------------------------------------------

# dig's queries leave from its network thread; comm is the name of the thread that made the call.
DIG_COMMS = ("dig",)  # the process name, not its resolver thread's
QUERIES = {"ok.test": ("NOERROR", 1), "foo.nx.test": ("NXDOMAIN", 0), "x.fail.test": ("SERVFAIL", 0)}
_DIG_STATUS = re.compile(r"status: ([A-Z]+),")
_DIG_SIZE = re.compile(r"MSG SIZE\s+rcvd: (\d+)")


def dns_scenario(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> tuple[L7Trace, dict[str, Any]]:
    """dnsmasq answering ok.test itself, NXDOMAIN for nx.test, SERVFAIL (from an upstream) for fail.test;
    one dig per name. Returns the trace (polled until the client records are in) and per-name dig facts."""
    upstream = l7peer(topo, topo.srv, "servfail", "--bind", "127.0.0.1", "--port", str(SERVFAIL_PORT))
    upstream.expect("listening")
    dnsmasq = topo.spawn(topo.srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                         "--user=root", "--port=53", f"--listen-address={SRV_V4}", "--bind-interfaces",
                         "--address=/ok.test/198.18.0.9", "--local=/nx.test/",
                         f"--server=/fail.test/127.0.0.1#{SERVFAIL_PORT}",
                         f"--pid-file={tmp_path}/dnsmasq.pid", f"--log-facility={tmp_path}/dnsmasq.log")  # fmt: skip
    topo.wait_listening(topo.srv, 53)
    trace = tracing()
    facts: dict[str, Any] = {"dnsmasq": dnsmasq.pid}
    for name in QUERIES:
        dig = topo.spawn(topo.cli, "dig", "+tries=1", "+time=3", f"@{SRV_V4}", name, "A",
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
        out, _ = dig.communicate(timeout=10)
        status, size = _DIG_STATUS.search(out), _DIG_SIZE.search(out)
        require(dig.returncode == 0 and status and size, f"dig {name}: {out}")
        assert status is not None and size is not None
        require(status.group(1) == QUERIES[name][0], f"dnsmasq answered {name} with {status.group(1)}")
        facts[name] = {"pid": dig.pid, "response_bytes": int(size.group(1))}
    trace.until(count_at_least(len(QUERIES), lambda ev: dns(ev, side=Role.CLIENT)))
    return trace, facts


def test_dns_client_records(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    trace, facts = dns_scenario(topo, tmp_path, tracing)
    client = dns(trace.events, side=Role.CLIENT)
    assert sorted(e.record.name for e in client) == sorted(QUERIES)
    for e in client:
        r, (rcode, answers) = e.record, QUERIES[e.record.name]
        assert (r.qtype, r.rcode, r.answers, r.timed_out) == ("A", rcode, answers, False), e
        assert r.response_bytes == facts[r.name]["response_bytes"], e
        assert r.request_bytes > 12 + len(r.name) and 0 < r.latency_ns < 3000 * MS, e
        assert e.conn.protocol == "dns" and e.conn.tls is False
        assert e.conn.netns_ino == topo.cli.ino
        assert (e.conn.local_ip, e.conn.remote_ip, e.conn.remote_port) == (CLI_V4, SRV_V4, 53)
        assert e.conn.tgid == facts[r.name]["pid"] and e.conn.comm in DIG_COMMS, e
    assert trace.pipe.counters()["invalid_frames"] == 0


def test_dns_server_records_dnsmasq(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    trace, facts = dns_scenario(topo, tmp_path, tracing)
    client = {e.record.name: e for e in dns(trace.events, side=Role.CLIENT)}
    require(sorted(client) == sorted(QUERIES), f"client records: {client}")
    trace.until(count_at_least(len(QUERIES), lambda ev: dns(ev, side=Role.SERVER)), timeout=2)
    server = dns(trace.events, side=Role.SERVER)
    assert sorted(e.record.name for e in server) == sorted(QUERIES), server
    for e in server:
        r, c = e.record, client[e.record.name].record
        assert (r.id, r.qtype, r.rcode, r.answers, r.timed_out) == (c.id, c.qtype, c.rcode, c.answers, False)
        assert (r.request_bytes, r.response_bytes) == (c.request_bytes, c.response_bytes)
        assert (e.conn.comm, e.conn.tgid, e.conn.netns_ino) == ("dnsmasq", facts["dnsmasq"], topo.srv.ino)
        assert (e.conn.local_port, e.conn.remote_ip) == (53, CLI_V4), e  # the peer named from the reply
        assert (e.conn.local_ip, e.conn.local_port) == (SRV_V4, 53)
        assert (e.conn.remote_ip, e.conn.remote_port) == (CLI_V4, client[r.name].conn.local_port)


# ---- 6: HTTPS: plaintext from the OpenSSL uprobes ----------------------------------------------


def test_https_plaintext_both_ends(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    nginx = start_l7_nginx(topo, tmp_path, PORT, tls_port=TLS_PORT)
    trace = tracing(tls=True)
    require(any("libssl" in lib for lib in trace.tls_libraries()), f"no libssl attached: {trace.tls_libraries()}")
    got = curl(topo, f"https://{SRV_V4}:{TLS_PORT}/users/42/orders?token=secret", "-k")
    require(got["status"] == 200, f"curl: {got}")

    c_events, s_events = both_ends(trace, path="/users/42/orders")
    c, s = one(c_events, "client"), one(s_events, "server")
    check_pair(c, s, topo, got["port"], TLS_PORT, slack_ns=20 * MS)  # uretprobe stamps: see check_pair
    assert c.conn.tls is True and s.conn.tls is True
    assert (c.conn.comm, s.conn.comm, s.conn.tgid) == ("curl", "nginx", nginx.pid)
    assert (c.record.method, c.record.route, c.record.status) == ("GET", "/users/{id}/orders", 200)
    # Plaintext sizes: what curl counted above TLS.
    assert (c.record.request_bytes, c.record.response_bytes) == (got["request_bytes"], got["response_bytes"])
    # The ciphertext of those sockets makes no records and no parse errors.
    assert len(trace.events) == 2, trace.events
    assert "secret" not in repr(trace.events)
    assert trace.pipe.counters()["invalid_frames"] == 0


# ---- 7: a keep-alive connection older than the collector --------------------------------------


def test_keepalive_connection_opened_before_tracing(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]
) -> None:
    start_l7_nginx(topo, tmp_path, PORT)
    _, _, client, server = keepalive_before_tracing(topo, tracing, PORT)
    assert {e.conn.comm for e in server} == {"nginx"}
    for c in client:
        assert c.record.status == 200
        assert c.record.route == "/after/{id}"


# ---- 8: overload: a ring smaller than the burst --------------------------------------------------


def test_overload_drops_chunks_not_requests(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    burst = 2000
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing(ring_bytes=16384, capture_bytes=4096)
    cli = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(PORT), "--comm", "ks-burst")
    cport = cli.expect("connected")["local"][1]
    require(cli.call("get /warmup", "done")["statuses"] == {"200": 1}, "warm-up request")
    both_ends(trace, path="/warmup")

    # No polling from here on until both bursts are done.
    wrk = topo.cli.run("wrk", "-t1", "-c4", "-d1s", f"{URL}/wrk", timeout=20)
    n_wrk = wrk_requests(wrk.stdout)  # raises on socket errors or non-2xx: the application was hurt
    done = cli.call(f"get /burst {burst}", "done", timeout=30)
    assert done["statuses"] == {"200": burst}, done
    stats = trace.kernel_stats()
    assert stats["rb_full"] > 0, stats

    trace.poll()  # frees the ring; what was dropped is gone
    trace.poll()
    after = len(trace.events)
    # The same connection goes on after the loss: the next exchange is whole again.
    require(cli.call("get /after-burst", "done")["statuses"] == {"200": 1}, "request after the burst")
    c_events, s_events = both_ends(trace, path="/after-burst")
    c, s = one(c_events, "client"), one(s_events, "server")
    check_pair(c, s, topo, cport)
    assert c.record.status == 200

    bursts = http(trace.events[:after], path="/burst")
    wrks = http(trace.events[:after], path="/wrk")
    # Plain HTTP/1 is paired in the kernel: what the full ring loses is whole exchange records,
    # each counted there, never a made-up or half record. Every exchange of every request
    # (both ends) was either received or counted as dropped; nothing was lost in between.
    trace.poll()
    stats = trace.kernel_stats()
    assert stats["exchange_rb_full"] > 0, stats
    assert trace.exchanges == stats["exchanges"], (trace.exchanges, stats)
    ended = stats["exchanges"] + stats["exchange_rb_full"]
    made = 2 + burst + n_wrk  # warm-up, after-burst, the burst and wrk's completed requests
    assert 2 * made <= ended <= 2 * (made + 4), (ended, made)  # + wrk's in flight at its end
    assert trace.pipe.counters()["invalid_frames"] == 0
    assert len(http(bursts, side=Role.CLIENT)) < burst and len(http(bursts, side=Role.SERVER)) < burst
    assert len(http(wrks, side=Role.CLIENT)) < n_wrk and len(http(wrks, side=Role.SERVER)) < n_wrk
    assert len(http(trace.events)) == len(trace.events)
    for e in http(trace.events):
        assert e.record.status == 200 and e.record.method == "GET", e
        assert e.record.path in {"/warmup", "/wrk", "/burst", "/after-burst"}, e
    assert all(l7.stats.decode_errors == 0 for _, l7 in trace.pairs)


# ---- 9: HTTP/1 paired in the kernel: bodies, 100-continue, idle keep-alive, upgrade, fallback ----

PEER_PORT = 9100


def peer_server(topo: Topology) -> Any:
    server = l7peer(topo, topo.srv, "http-server", "--bind", SRV_V4, "--port", str(PEER_PORT), "--comm", "ks-server")
    server.expect("listening")
    return server


def peer_client(topo: Topology, port: int = PEER_PORT, comm: str = "ks-client") -> tuple[Any, int]:
    cli = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(port), "--comm", comm)
    return cli, cli.expect("connected")["local"][1]


@pytest.mark.parametrize("expect", [False, True], ids=["body", "100-continue"])
def test_post_body_chunked_response_sizes_exact(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace], expect: bool
) -> None:
    """A POST whose body leaves in two sends after its head, answered by a chunked body in five
    writes: the exchange counts every byte of each at both ends, and nothing else (a 100
    Continue is an interim response: not the response's bytes, and not its first byte)."""
    server = peer_server(topo)
    trace = tracing()
    cli, cport = peer_client(topo)
    got = cli.call("post /chunked?k=secret 5000" + (" expect" if expect else ""), "done")
    served = server.expect("served")
    require(got["status"] == served["status"] == 200, f"client {got}, server {served}")
    require(got["response_bytes"] == served["response_bytes"], f"client {got}, server {served}")
    require(got["interim_bytes"] == served["interim_bytes"] == (25 if expect else 0), f"{got} {served}")
    cli.call("close", "closed")

    c_events, s_events = both_ends(trace, path="/chunked")
    c, s = one(c_events, "client"), one(s_events, "server")
    check_pair(c, s, topo, cport, PEER_PORT)
    assert (c.conn.comm, s.conn.comm) == ("ks-client", "ks-server")
    for e in (c, s):
        assert (e.record.method, e.record.status) == ("POST", 200)
        assert e.record.request_bytes == got["request_bytes"] == served["request_bytes"], e
        assert e.record.response_bytes == got["response_bytes"], e
        # the server waits 200 ms after the body before answering: a 100 Continue must not end the wait
        assert e.record.latency_ns >= 200 * MS, e
    assert "secret" not in repr(trace.events)
    assert trace.chunks == 0 and trace.exchanges == 2, (trace.chunks, trace.exchanges)
    stats = trace.kernel_stats()
    assert stats["fallback"] == stats["orphan_responses"] == stats["late_calls"] == 0, stats


def test_idle_keepalive_exchange_reported_by_sweep(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]
) -> None:
    """The last request of a keep-alive connection that stays open is reported once it has been
    idle for the collector's idle time (the kernel sweep), not at the next request or the close."""
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing(idle_s=0.3, sweep_s=0.1)
    cli, cport = peer_client(topo, PORT, "ks-idle")
    t0 = time.monotonic()
    require(cli.call("get /idle/1", "done")["statuses"] == {"200": 1}, "request")
    c_events, s_events = both_ends(trace, path="/idle/1", timeout=3)
    waited = time.monotonic() - t0
    c, s = one(c_events, "client"), one(s_events, "server")
    check_pair(c, s, topo, cport)
    assert 0.3 <= waited < 1.5, waited
    # still the same open connection: the next exchange on it is whole and reported too
    require(cli.call("get /idle/2", "done")["statuses"] == {"200": 1}, "second request")
    c2, s2 = both_ends(trace, path="/idle/2", timeout=3)
    assert one(c2, "client").conn.sock_cookie == c.conn.sock_cookie
    assert one(s2, "server").conn.sock_cookie == s.conn.sock_cookie
    assert len(http(trace.events)) == 4, trace.events
    assert trace.kernel_stats()["late_calls"] == 0


def test_sweep_walks_only_namespaces_with_exchanges_in_flight(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]
) -> None:
    """The sweep walks a namespace only while one of its sockets has an exchange the sweep may
    have to send: none before the first request, some until the idle one is sent, none after."""
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing(idle_s=0.3, sweep_s=0.1)
    walkers = [l7.netns for _, l7 in trace.pairs]
    cli, cport = peer_client(topo, PORT, "ks-idle")
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        trace.poll()
        time.sleep(0.05)
    assert [w.walked for w in walkers] == [0, 0], "a namespace without exchanges was walked"
    require(cli.call("get /idle/1", "done")["statuses"] == {"200": 1}, "request")
    c, s = both_ends(trace, path="/idle/1", timeout=3)
    check_pair(one(c, "client"), one(s, "server"), topo, cport)
    assert all(w.walked > 0 for w in walkers)
    time.sleep(0.2)
    trace.poll()  # the sweep that found the exchanges gone
    walked = [w.walked for w in walkers]
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        trace.poll()
        time.sleep(0.05)
    assert [w.walked for w in walkers] == walked, "walked on after the exchanges were sent"
    assert trace.kernel_stats()["netns_pending_full"] == 0


def test_sweep_marks_past_their_map_walk_every_namespace(topo: Topology, tmp_path: Path) -> None:
    """The sweep's map of marked namespaces holds one here, and one collector (every namespace)
    sees both ends with an exchange in flight: the kernel asks for a walk of every namespace
    instead (counted), and each end's idle exchange is still sent by the sweep."""
    start_l7_nginx(topo, tmp_path, PORT)

    def every_namespace(netns_ino: int, **kw: Any) -> L7Collector:
        return L7Collector(netns_pending_entries=1, **kw)

    trace = L7Trace((topo.cli,), collector=every_namespace, tls=False, idle_s=0.2, sweep_s=0.1)
    try:
        cli, cport = peer_client(topo, PORT, "ks-full")
        require(cli.call("get /idle/1", "done")["statuses"] == {"200": 1}, "request")
        c, s = both_ends(trace, path="/idle/1", timeout=3)
        check_pair(one(c, "client"), one(s, "server"), topo, cport)
        ((_, both),) = trace.pairs
        assert both.kernel_stats()["netns_pending_full"] >= 1
        assert both.pending.sweeps_of_all >= 1
    finally:
        trace.close()


def test_busy_socket_sends_its_due_summaries_without_a_sweep(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]
) -> None:
    """A socket with requests coming sends each due summary at its next response, so summaries of
    busy connections keep their pace with the sweep (a walk of the namespace) far apart (here:
    never); what is still summed when the requests stop goes with the final sweep."""
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing(record_rate=1, summary_s=0.3, sweep_s=3600)
    cli, _ = peer_client(topo, PORT, "ks-busy")
    n = 14
    for _ in range(n):
        require(cli.call("get /idle/1", "done")["statuses"] == {"200": 1}, "request")
        trace.poll()
        time.sleep(0.1)
    trace.poll()
    assert [l7.netns.walked for _, l7 in trace.pairs] == [0, 0]
    for side in (Role.CLIENT, Role.SERVER):
        early = [e.record.summary for e in http(trace.events, side=side) if e.record.summary is not None]
        assert len(early) >= 2 and all(s.count >= 1 for s in early), early  # due every 0.3 s, n * 0.1 s
    for _, l7 in trace.pairs:
        l7.final_sweep()
    trace.poll()
    for side in (Role.CLIENT, Role.SERVER):
        events = http(trace.events, side=side)
        assert sum(e.record.summary.count if e.record.summary else 1 for e in events) == n, events
    assert trace.kernel_stats()["summary_lost"] == 0


def test_upgrade_stops_parsing(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    """101 Switching Protocols ends HTTP/1 on the connection: request-looking bytes after it
    (echoed by the server) make no records at either end."""
    server = peer_server(topo)
    trace = tracing()
    cli, cport = peer_client(topo)
    got = cli.call("upgrade /upgrade", "done")
    require(got["status"] == 101 and got["echoed"] == 3, f"client {got}")
    server.expect("served")
    trace.until(count_at_least(2, lambda ev: http(ev)), timeout=3)
    time.sleep(0.3)
    trace.poll()
    c, s = one(http(trace.events, side=Role.CLIENT), "client"), one(http(trace.events, side=Role.SERVER), "server")
    check_pair(c, s, topo, cport, PEER_PORT)
    for e in (c, s):
        assert (e.record.path, e.record.status) == ("/upgrade", 101)
        assert (e.record.request_bytes, e.record.response_bytes) == (got["request_bytes"], got["response_bytes"])
    assert trace.chunks == 0
    assert not http(trace.events, path="/after-upgrade")


def test_pipelining_falls_back_to_chunks(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    """Requests sent ahead of their responses (each in its own send): the client's socket cannot
    be paired in the kernel. It falls back to chunks for good, counted, with the request it held
    handed over as a chunk, so every exchange is still reported, in order, at both ends."""
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing()
    cli, cport = peer_client(topo, PORT, "ks-ahead")
    got = cli.call("ahead /p1 /p2 /p3", "done")
    require(got["statuses"] == [200, 201, 202], f"nginx answered {got}")
    require(cli.call("get /p1", "done")["statuses"] == {"200": 1}, "request after")
    cli.call("close", "closed")

    trace.until(count_at_least(8, lambda ev: http(ev)))
    expected = list(zip(got["paths"], got["statuses"], got["request_bytes"], got["response_bytes"], strict=True))
    expected.append(expected[0])
    client = http(trace.events, side=Role.CLIENT)
    server = http(trace.events, side=Role.SERVER)
    for side in (client, server):
        assert [(e.record.path, e.record.status, e.record.request_bytes, e.record.response_bytes) for e in side] == (
            expected
        )
    for c, s in zip(client, server, strict=True):
        check_pair(c, s, topo, cport)
    stats = trace.kernel_stats()
    # nginx answered each request before the next arrived (50 ms apart): only the client fell back
    assert stats["fallback"] == 1, stats
    assert trace.chunks > 0
    assert trace.pipe.counters()["invalid_frames"] == 0
    assert trace.pipe.counters()["orphan_responses"] == 0


def test_pipelined_in_one_send_counts_fallback(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    start_l7_nginx(topo, tmp_path, PORT)
    trace = tracing()
    cli, _ = peer_client(topo, PORT, "ks-pipeline")
    require(cli.call("pipeline /p1 /p2 /p3", "done")["statuses"] == [200, 201, 202], "pipeline")
    trace.until(count_at_least(6, lambda ev: http(ev)))
    # both ends saw three heads in one call (the server in one read)
    assert trace.kernel_stats()["fallback"] == 2
    assert trace.exchanges == 0


# ---- summaries: past the sampler's rate the kernel sums requests; every request still counts ----

# Round robin over the targets (one wrk thread: one counter for all its connections): a query
# string that must not survive, a 201, a 500 (never summed), paths under "/". Four summable keys
# (method, route, status) fit a socket's eight slots; nine do not, and the least used slot's
# summary is sent early (evicted). /load/7, /load/8 and /load/9 are one key: /load/{id}.
WRK_MIX = """
local targets = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", targets[(i %% #targets) + 1])
end
"""
# A request line too long for a summary's 128 bytes: always a record of its own (never summed); a
# segment this long is taken for an id by the route template.
LONG = "/long/" + "x" * 114
FEW = {"/p1?token=secret": ("/p1", "/p1", 200), "/p2": ("/p2", "/p2", 201), "/error": ("/error", "/error", 500),
       "/load/7": ("/load/7", "/load/{id}", 200)}  # fmt: skip
MANY = {**FEW, "/p3": ("/p3", "/p3", 202), "/load/8": ("/load/8", "/load/{id}", 200),
        "/load/9?x=1": ("/load/9", "/load/{id}", 200), "/a/b": ("/a/b", "/a/b", 200),
        "/a/c": ("/a/c", "/a/c", 200), "/a/d": ("/a/d", "/a/d", 200), "/a/e": ("/a/e", "/a/e", 200),
        "/a/f": ("/a/f", "/a/f", 200), LONG: (LONG, "/long/{id}", 200)}  # fmt: skip


@pytest.mark.parametrize("targets", [FEW, MANY], ids=["fits-slots", "evicts"])
def test_summaries_count_every_request_under_load(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace], targets: dict[str, tuple[str, str, int]]
) -> None:
    conns, rate = 4, 50
    start_l7_nginx(topo, tmp_path, PORT)
    script = tmp_path / "mix.lua"
    script.write_text(WRK_MIX % ", ".join(f'"{t}"' for t in targets))
    trace = tracing(record_rate=rate, summary_s=0.3)
    t0 = time.monotonic()
    wrk = topo.spawn(topo.cli, "wrk", "-t1", f"-c{conns}", "-d2s", "-s", str(script), f"{URL}/",
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    while wrk.poll() is None:
        trace.poll()
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    out = wrk.stdout.read() if wrk.stdout else ""
    m = re.search(r"(\d+) requests in", out)
    require(wrk.returncode == 0 and m is not None and "Socket errors" not in out, f"wrk failed: {out}")
    assert m is not None
    n = int(m.group(1))
    require(n > 20 * rate * elapsed, f"wrk did only {n} requests: not past the sampler's rate")
    time.sleep(0.4)  # every summary is due; the next sweep (poll) sends them
    trace.until(lambda ev: False, timeout=0.6)
    for _, l7 in trace.pairs:
        l7.final_sweep()  # as the agent before it stops: whatever is still summed (nothing, by now)
    trace.poll()

    stats = trace.kernel_stats()
    # What the ring had no room for is counted, per request: an exchange record, or a request that
    # found every slot taken and no room for the evicted summary. (A due summary without room stays
    # in its slot for the next sweep; the final sweep found room, or summary_lost says so.)
    lost = stats["exchange_rb_full"] + stats["summary_lost"]
    assert (stats["slots_full"] > 0) == (targets is MANY), stats
    assert stats["summarized"] > n, stats  # most requests, at both ends, were summed
    totals = []
    for side in (Role.SERVER, Role.CLIENT):
        events = http(trace.events, side=side)
        singles = [e for e in events if e.record.summary is None]
        summaries = [e for e in events if e.record.summary is not None]
        total = len(singles) + sum(e.record.summary.count for e in summaries if e.record.summary)
        # wrk counts completed responses; up to one request per connection was in flight at the end
        assert n - lost <= total <= n + conns, (side, n, total, lost, len(singles), len(summaries), stats,
                                                trace.pipe.counters())  # fmt: skip
        totals.append(total)
        # summed by route: a summary's path is its first request's, its count every request of the route
        by_route: dict[tuple[str, int], int] = {}
        for e in events:
            r = e.record
            assert (r.path, r.route, r.status) in targets.values(), r
            by_route[r.route, r.status] = by_route.get((r.route, r.status), 0) + (r.summary.count if r.summary else 1)
        shares = Counter((route, status) for _, route, status in targets.values())
        assert set(by_route) == set(shares), by_route
        for key, count in by_route.items():  # round robin: the same share per target
            assert abs(count - total * shares[key] / len(targets)) <= (conns + 1 + lost) * shares[key], by_route
        # 5xx are always records of their own (a trace to look at); the rest past the rate are summed
        assert not [e for e in summaries if e.record.status >= 500 or e.record.path == LONG]
        sampled = [e for e in singles if e.record.status < 500 and e.record.path != LONG]
        cpus = os.cpu_count() or 1
        assert 0 < len(sampled) <= rate * cpus * (elapsed + 2), (len(sampled), elapsed)
        for e in summaries:
            s = e.record.summary
            assert s is not None and s.count >= 1 and sum(s.buckets) == s.count, s
            assert s.latency_min_ns <= s.latency_max_ns and s.latency_min_ns * s.count <= s.latency_sum_ns, s
            assert e.record.latency_ns == 0 and e.record.traceparent == "" and e.record.start_ns <= s.end_ns, e
        assert {e.conn.comm for e in events} == {"nginx" if side is Role.SERVER else "wrk"}
    assert 2 * n <= sum(totals) + lost <= 2 * (n + conns), (n, totals, stats)
    # every summary the kernel sent was read (one the ring had no room for was not sent)
    assert stats["summaries"] == sum(1 for e in trace.events if getattr(e.record, "summary", None) is not None)
