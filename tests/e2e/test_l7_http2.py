"""HTTP/2 and gRPC through the L7 probe and pipeline, against real peers between namespaces.

grpcio server and client (unary, server streaming, bidi, OK and error statuses, many streams on one
connection, a connection older than the probe), nghttpd with curl (prior knowledge, and TLS with
ALPN h2 through the OpenSSL uprobes), nghttp and h2load. Each test checks the exact records of its
connections at both ends.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb
from node_exporter.bpf.abi import L7Direction, L7Flags
from node_exporter.l7.pipeline import L7Event
from node_exporter.l7.syscalls import SyscallL7Collector
from node_exporter.protocols import Http2Record, Role
from tests.e2e.agentproc import start_kscope
from tests.e2e.l7trace import L7Trace, count_at_least, self_signed_cert
from tests.e2e.netns import CLI_V4, SRV_V4, Netns, Peer, Topology

pytestmark = pytest.mark.bpf

GRPC_PORT, H2_PORT, H2_TLS_PORT = 50051, 8080, 8443
GRPC_PEER = Path(__file__).with_name("grpcpeer.py")
H2SPLIT = Path(__file__).with_name("h2split.py")
H2FIRST = Path(__file__).with_name("h2first.py")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def h2(events: list[L7Event], side: Role | None = None, **match: Any) -> list[Http2Record]:
    """HTTP/2 records (of ``side``) whose record has every attribute in ``match``."""
    return [
        e.record
        for e in events
        if isinstance(e.record, Http2Record)
        and e.conn.protocol == "http2"
        and (side is None or e.conn.side is side)
        and all(getattr(e.record, k) == v for k, v in match.items())
    ]


def wait_both(trace: L7Trace, n: int, timeout: float = 10, **match: Any) -> tuple[list[Http2Record], list[Http2Record]]:
    trace.until(count_at_least(2 * n, lambda ev: h2(ev, **match)), timeout)
    return h2(trace.events, Role.CLIENT, **match), h2(trace.events, Role.SERVER, **match)


def grpc_peer(topo: Topology, ns: Netns, *args: str) -> Peer:
    proc = topo.spawn(ns, sys.executable, "-u", str(GRPC_PEER), *args,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    return Peer(proc, f"{ns.name}:grpc-{args[0]}")


def grpc_pair(topo: Topology) -> Peer:
    """A grpcio server in the server namespace and a connected client in the client namespace."""
    grpc_peer(topo, topo.srv, "server", "--bind", SRV_V4, "--port", str(GRPC_PORT)).expect("listening", 20)
    client = grpc_peer(topo, topo.cli, "client", "--to", SRV_V4, "--port", str(GRPC_PORT))
    client.expect("connected", 20)
    return client


def statuses(records: list[Http2Record]) -> Counter[int]:
    return Counter(r.grpc_status for r in records)


def check_grpc(records: list[Http2Record], method: str) -> None:
    for r in records:
        assert (r.method, r.path, r.status, r.rpc_system, r.rpc_service, r.rpc_method) == (
            "POST", f"/demo.v1.Echo/{method}", 200, "grpc", "demo.v1.Echo", method)  # fmt: skip
        assert r.latency_ns > 0 and r.request_bytes > 0 and r.response_bytes > 0


def no_parse_errors(trace: L7Trace) -> None:
    c = trace.pipe.counters()
    bad = {k: v for k, v in c.items() if v and (k.startswith("h2_hpack_bad") or k in ("invalid_frames", "gaps"))}
    assert not bad, bad


# ---- gRPC (grpcio) ----------------------------------------------------------------------------


def test_grpc_unary_ok_and_error_statuses_both_ends(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    trace = tracing()
    client = grpc_pair(topo)
    assert client.call("unary 3", "done")["codes"] == {"OK": 3}
    assert client.call("unary 2 fail", "done")["codes"] == {"NOT_FOUND": 2}
    assert client.call("unary 1 boom", "done")["codes"] == {"INTERNAL": 1}
    cli, srv = wait_both(trace, 6, rpc_method="Ping")
    for side in (cli, srv):
        assert len(side) == 6
        check_grpc(side, "Ping")
        assert statuses(side) == Counter({0: 3, 5: 2, 13: 1})
    assert [r.grpc_status for r in cli] == [r.grpc_status for r in srv] == [0, 0, 0, 5, 5, 13]
    # the two ends of each call agree on its bytes; the server's view sits inside the client's
    for c, s in zip(cli, srv, strict=True):
        assert (c.request_bytes, c.response_bytes) == (s.request_bytes, s.response_bytes)
        assert c.start_ns <= s.start_ns + 1_000_000 and s.latency_ns <= c.latency_ns + 1_000_000
    events = [e for e in trace.events if isinstance(e.record, Http2Record)]
    assert len({e.conn.sock_cookie for e in events if e.conn.side is Role.CLIENT}) == 1  # one connection
    assert {(e.conn.local_ip, e.conn.remote_port) for e in events if e.conn.side is Role.CLIENT} == {
        (CLI_V4, GRPC_PORT)}  # fmt: skip
    no_parse_errors(trace)


def test_grpc_server_streaming_and_bidi(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    trace = tracing()
    client = grpc_pair(topo)
    assert client.call("watch 25", "done")["codes"] == {"OK": 1}
    assert client.call("chat 12", "done")["codes"] == {"OK": 1}
    for method, min_resp in (("Watch", 25 * (5 + 6)), ("Chat", 12 * (5 + 7))):
        cli, srv = wait_both(trace, 1, rpc_method=method)
        assert len(cli) == len(srv) == 1, (cli, srv)
        check_grpc(cli + srv, method)
        assert cli[0].grpc_status == srv[0].grpc_status == 0
        # every message counted in the stream's bytes (5-byte gRPC prefix + payload each)
        assert cli[0].response_bytes == srv[0].response_bytes >= min_resp
    no_parse_errors(trace)


def test_grpc_many_concurrent_streams_on_one_connection(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    """200 calls in flight on one connection. grpc-c then writes (and the peer reads) more than the
    4 KiB a call's capture holds in one syscall, now and then: the frames past it are a counted
    truncation, and the streams they carried a counted loss (an orphan response when the request's
    HEADERS was cut, an unanswered request when its response was). So: each side's 200 calls are
    exactly its records plus its counted losses, and a loss only ever comes with a truncation."""
    trace = tracing()
    client = grpc_pair(topo)
    assert client.call("concurrent 200", "done", timeout=30)["codes"] == {"OK": 200}
    client.call("close", "done")  # the connection's close settles the streams still pending

    def accounted(events: list[L7Event]) -> int:
        c = trace.pipe.counters()
        return len(h2(events)) + c["orphan_responses"] + c["unanswered_requests"]

    trace.until(lambda ev: accounted(ev) >= 400, 20)
    c = trace.pipe.counters()
    records = h2(trace.events)
    assert accounted(trace.events) == 400, (len(records), c, trace.truncated)
    cli, srv = h2(trace.events, Role.CLIENT, rpc_method="Ping"), h2(trace.events, Role.SERVER, rpc_method="Ping")
    if not trace.truncated:
        assert len(cli) == len(srv) == 200
    lost = 400 - len(cli) - len(srv)
    assert lost == 0 or trace.truncated > 0, (lost, c)
    # a record the loss left without its path says so (counted), it never names another method
    assert len([r for r in records if not r.path]) == c["h2_requests_unknown_path"] == len(records) - len(cli + srv)
    check_grpc(cli + srv, "Ping")
    assert set(statuses(cli + srv)) <= {0, -1} and statuses(cli + srv)[0] > 0
    no_parse_errors(trace)


@pytest.mark.parametrize("compact", [True, False], ids=["frame-walk", "full-capture"])
def test_grpc_large_messages_past_the_capture(topo: Topology, tracing: Callable[..., L7Trace], compact: bool) -> None:
    """Calls of 200 kB each way: grpc-c writes and reads them in calls far past the 4 KiB a call's head
    capture holds. The kernel's frame walk sends every frame header and header block of those calls
    and none of their DATA payloads, so each call is a record at both ends with exact byte counts
    (the same at both ends, every DATA byte counted) and HPACK stays in step (later calls keep their
    path). The full capture (KSCOPE_L7_H2_FULL_CAPTURE) of the same traffic truncates those calls:
    what this test would see without the walk."""
    size, n = 200_000, 4
    trace = tracing(h2_compact=compact, keep=True)
    client = grpc_pair(topo)
    assert client.call(f"big {n} {size}", "done", timeout=30)["codes"] == {"OK": n}
    assert client.call("unary 2", "done")["codes"] == {"OK": 2}
    if not compact:
        trace.until(lambda ev: trace.truncated > 0, 10)
        assert trace.truncated > 0 and trace.truncated_bytes > 4 * size  # the calls the walk follows
        assert not any(c.flags & L7Flags.KSCOPE_L7_H2_FRAMES for c in trace.chunk_log)
        return
    cli, srv = wait_both(trace, n + 2, rpc_method="Ping")
    assert len(cli) == len(srv) == n + 2, (
        len(cli),
        len(srv),
        h2(trace.events, Role.SERVER)[:3],
        {k: v for k, v in trace.pipe.counters().items() if v},
        {k: v for k, v in trace.kernel_stats().items() if v},
    )
    check_grpc(cli + srv, "Ping")
    for c, s in zip(cli, srv, strict=True):
        assert (c.request_bytes, c.response_bytes) == (s.request_bytes, s.response_bytes)
    big = cli[:n]
    # gRPC message = 5-byte prefix + payload, in DATA frames (9-byte headers; grpc-c allows frames
    # past 16 KiB, so one or more), plus a HEADERS frame (and trailers for the response) of at most
    # a few hundred bytes: every DATA byte counted, though none reached user space
    for r in big:
        for got, msg in ((r.request_bytes, 5 + size), (r.response_bytes, 5 + 5 + size)):
            assert msg + 9 + 9 < got < msg + 9 * -(-msg // 16384) + 600, (got, msg)
    # the warm-table repeat calls are identical on the wire: exactly the same counts
    assert len({(r.request_bytes, r.response_bytes) for r in big[1:]}) == 1
    assert trace.chunks and all(c.flags & L7Flags.KSCOPE_L7_H2_FRAMES for c in trace.chunk_log)
    assert trace.truncated == 0 and trace.kernel_stats()["h2_lost"] == 0
    no_parse_errors(trace)


def test_grpc_connection_older_than_the_probe(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    """Its HPACK tables were filled before we looked: the kernel finds HTTP/2 from frame headers, the
    records come with what static entries and literals tell (method POST) and the path the peers
    send as an index into the unseen table stays empty (counted), never guessed. A new connection
    then parses fully."""
    client = grpc_pair(topo)
    assert client.call("unary 2", "done")["codes"] == {"OK": 2}
    trace = tracing()
    assert client.call("unary 3", "done")["codes"] == {"OK": 3}
    cli, srv = wait_both(trace, 3)
    assert len(cli) == len(srv) == 3
    for r in cli + srv:
        assert (r.method, r.status, r.path, r.rpc_system) == ("POST", 200, "", "")
    c = trace.pipe.counters()
    assert c["h2_hpack_unknown_index"] > 0 and c["h2_requests_unknown_path"] == 6
    assert not any(k.startswith("h2_hpack_bad") and v for k, v in c.items())

    fresh = grpc_peer(topo, topo.cli, "client", "--to", SRV_V4, "--port", str(GRPC_PORT))
    fresh.expect("connected", 20)
    assert fresh.call("unary 1 fail", "done")["codes"] == {"NOT_FOUND": 1}
    cli, srv = wait_both(trace, 1, rpc_method="Ping")
    assert [r.grpc_status for r in cli] == [r.grpc_status for r in srv] == [5]


# ---- nghttp2 (nghttpd, nghttp, h2load) and curl --------------------------------------------


def start_nghttpd(topo: Topology, tmp: Path, *, tls: bool = False) -> None:
    docs = tmp / "docs"
    (docs / "api").mkdir(parents=True, exist_ok=True)
    (docs / "index.html").write_text("hello\n")
    (docs / "api" / "item").write_text("x" * 3000)
    port = H2_TLS_PORT if tls else H2_PORT
    args = ["nghttpd", "-a", SRV_V4, "-d", str(docs), str(port)]
    if tls:
        self_signed_cert(tmp)
        args += [str(tmp / "key.pem"), str(tmp / "cert.pem")]
    else:
        args.insert(1, "--no-tls")
    topo.spawn(topo.srv, *args)
    topo.wait_listening(topo.srv, port)


def test_curl_prior_knowledge(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    start_nghttpd(topo, tmp_path)
    trace = tracing()
    fmt = "%{http_code} %{http_version}"
    # named headers are read (traceparent, x-request-id), any other value never (authorization)
    out = topo.cli.run("curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", fmt,
                       "-H", f"traceparent: {TRACEPARENT}", "-H", "x-request-id: req-7",
                       "-H", "authorization: Bearer hunter2",
                       f"http://{SRV_V4}:{H2_PORT}/api/item?token=secret").stdout  # fmt: skip
    assert out.split() == ["200", "2"]
    cli, srv = wait_both(trace, 1)
    assert len(cli) == len(srv) == 1
    for r in cli + srv:
        assert (r.method, r.path, r.route, r.status, r.rpc_system, r.grpc_status) == ("GET", "/api/item", "/api/item",
                                                                                      200, "", -1)  # fmt: skip
        assert (r.traceparent, r.request_id) == (TRACEPARENT, "req-7")
        assert "hunter2" not in repr(r) and "secret" not in repr(r)
        assert r.response_bytes > 3000  # the DATA frames counted
    assert (cli[0].request_bytes, cli[0].response_bytes) == (srv[0].request_bytes, srv[0].response_bytes)
    no_parse_errors(trace)


def test_frames_cut_across_calls(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    """A client that cuts a frame header after 4 bytes, a header block after 3, and a DATA frame's
    header after 2 (its payload in three writes), each piece its own send call, against nghttpd: the
    kernel's walk keeps its place across the calls, so both ends make the three records with the
    exact bytes the client put on the wire."""
    start_nghttpd(topo, tmp_path)
    trace = tracing(keep=True)
    out = topo.cli.run(sys.executable, str(H2SPLIT), SRV_V4, str(H2_PORT)).stdout
    wire = json.loads(out)
    assert wire["status"] == {"1": "200", "3": "200", "5": "200"}, wire
    cli, srv = wait_both(trace, 3)
    assert len(cli) == len(srv) == 3, (cli, srv)
    for side in (cli, srv):
        assert [(r.method, r.path, r.status) for r in side] == [("GET", "/index.html", 200)] * 2 + [
            ("POST", "/index.html", 200)]  # fmt: skip
        assert [(r.request_bytes, r.response_bytes) for r in side] == [
            (wire["sent"][k], wire["got"][k]) for k in ("1", "3", "5")]  # fmt: skip
    # the 10,000 DATA payload bytes never left the kernel: only frame headers and blocks did
    assert sum(len(c.data) for c in trace.chunk_log if c.direction == L7Direction.KSCOPE_DIR_EGRESS) < 1000
    assert trace.kernel_stats()["h2_lost"] == 0
    no_parse_errors(trace)


def test_walk_step_bound_counted_and_resynced(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    """One send call of 3,000 PING frames (~6,000 walk steps, past the bound of 4,096): the client's
    egress walk gives up on that call (counted, h2_lost), user space sees a gap there, and the walk is
    back in step at the first later call that starts with a whole frame header. The next request's
    header is cut after 4 bytes, so the client loses that one request (inside the counted loss); the
    next two are exact. The server, whose reads the bound did not stop, sees all three."""
    start_nghttpd(topo, tmp_path)
    trace = tracing(keep=True)
    wire = json.loads(topo.cli.run(sys.executable, str(H2SPLIT), SRV_V4, str(H2_PORT), "3000").stdout)
    trace.until(count_at_least(5, lambda ev: h2(ev)), 10)
    cli, srv = h2(trace.events, Role.CLIENT), h2(trace.events, Role.SERVER)
    for side, streams in ((cli, ("3", "5")), (srv, ("1", "3", "5"))):
        assert [(r.path, r.status, r.request_bytes, r.response_bytes) for r in side] == [
            ("/index.html", 200, wire["sent"][k], wire["got"][k]) for k in streams]  # fmt: skip
    c = trace.pipe.counters()
    assert trace.kernel_stats()["h2_lost"] >= 1 and c["gaps"] >= 1


def test_server_that_writes_first(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    """The server's SETTINGS and WINDOW_UPDATE are the connection's first call the kernel sees (HTTP/2
    found from them, the server's reads out of step until a call starts with a frame or the preface):
    the client's preface puts the reads back in step, so each connection's request makes its record at
    both ends (failed before: the server's first read, the preface and the request, was dropped)."""
    topo.spawn(topo.srv, sys.executable, str(H2FIRST), SRV_V4, str(H2_PORT))
    topo.wait_listening(topo.srv, H2_PORT)
    trace = tracing()
    base = f"http://{SRV_V4}:{H2_PORT}"
    for path in ("/a", "/b?x=1"):  # two connections
        assert topo.cli.run("curl", "-sS", "--http2-prior-knowledge", base + path).stdout == "ok\n"
    cli, srv = wait_both(trace, 2)
    for side in (cli, srv):
        assert [(r.method, r.path, r.status) for r in side] == [("GET", "/a", 200), ("GET", "/b", 200)], side
    assert (cli[0].request_bytes, cli[0].response_bytes) == (srv[0].request_bytes, srv[0].response_bytes)
    no_parse_errors(trace)


def test_nghttp_concurrent_requests_with_a_404(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    start_nghttpd(topo, tmp_path)
    trace = tracing()
    base = f"http://{SRV_V4}:{H2_PORT}"
    out = topo.cli.run("nghttp", "-ns", f"{base}/index.html", f"{base}/api/item", f"{base}/missing",
                       f"{base}/index.html?again=1").stdout  # fmt: skip
    assert out.count("/index.html") == 2 and " 404 " in out, out
    cli, srv = wait_both(trace, 4)
    for side in (cli, srv):
        assert Counter((r.path, r.status) for r in side) == Counter(
            {("/index.html", 200): 2, ("/api/item", 200): 1, ("/missing", 404): 1})  # fmt: skip
    no_parse_errors(trace)


def test_h2load_exact_counts(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    start_nghttpd(topo, tmp_path)
    trace = tracing()
    out = topo.cli.run("h2load", "-n", "400", "-c", "2", "-m", "16", f"http://{SRV_V4}:{H2_PORT}/index.html",
                       timeout=60).stdout  # fmt: skip
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    assert m is not None and m.groups() == ("400", "400", "400"), out
    cli, srv = wait_both(trace, 400, timeout=20, path="/index.html")
    assert len(cli) == len(srv) == 400
    assert {r.status for r in cli + srv} == {200}
    no_parse_errors(trace)


def test_curl_http2_over_tls(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    start_nghttpd(topo, tmp_path, tls=True)
    trace = tracing(tls=True)
    out = topo.cli.run("curl", "-sSk", "--http2", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                       f"https://{SRV_V4}:{H2_TLS_PORT}/index.html?q=1").stdout  # fmt: skip
    assert out.split() == ["200", "2"]
    trace.until(count_at_least(2, lambda ev: h2(ev, path="/index.html")), 10)
    events = [(e.conn, e.record) for e in trace.events if isinstance(e.record, Http2Record)]
    assert {(c.side, c.tls, r.path, r.status) for c, r in events} == {
        (Role.CLIENT, True, "/index.html", 200), (Role.SERVER, True, "/index.html", 200)}  # fmt: skip
    assert len(events) == 2
    no_parse_errors(trace)


def test_syscall_fallback_sees_http2(topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace]) -> None:
    start_nghttpd(topo, tmp_path)
    trace = tracing(collector=SyscallL7Collector)
    topo.cli.run("curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", f"http://{SRV_V4}:{H2_PORT}/index.html")
    cli, srv = wait_both(trace, 1)
    assert [(r.path, r.status) for r in cli] == [(r.path, r.status) for r in srv] == [("/index.html", 200)]


def test_run_sums_grpc_calls_past_the_record_rate(topo: Topology, tmp_path: Path) -> None:
    """grpcio calls past a tiny --l7-record-rate through `kscope run --jsonl`, tracing the server's namespace:
    past the node's budget the agent sums calls per socket, method and grpc-status each interval
    (node_exporter/l7/agentsum.py); records and summaries together count exactly the calls the client made,
    by status, and a summary keeps its RPC's names."""
    out, rate = tmp_path / "flows.jsonl", 5
    agent, _ = start_kscope("--l7", "--l7-record-rate", str(rate), "--no-live", "--interval", "0.5", "--duration",
                            "120", "--jsonl", str(out), "--netns-inode", str(topo.srv.ino))  # fmt: skip
    try:
        client = grpc_pair(topo)
        assert client.call("unary 300", "done", 60)["codes"] == {"OK": 300}
        assert client.call("unary 40 fail", "done", 60)["codes"] == {"NOT_FOUND": 40}
        time.sleep(1)  # the last calls' frames reach the ring before the stop
    finally:
        agent.terminate()  # a stop runs a last interval: capture stopped, the ring drained, summaries sent
        _, rest = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest[-3000:]
    rows = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
    calls = [r.l7 for r in rows if r.WhichOneof("record") == "l7" and r.l7.rpc.method == "Ping"]
    counted: Counter[int] = Counter()
    for r in calls:
        counted[r.rpc.grpc_status_code] += r.summary.count if r.HasField("summary") else 1
        assert (r.protocol, r.side, r.rpc.service, r.http.route) == ("http2", pb.ROLE_SERVER, "demo.v1.Echo",
                                                                     "/demo.v1.Echo/Ping")  # fmt: skip
    assert counted == {0: 300, 5: 40}, counted
    summaries = [r for r in calls if r.HasField("summary")]
    assert summaries and len(calls) < 340 / 4, (len(calls), len(summaries))
    for r in summaries:
        assert not r.http.traceparent and r.latency_ns == 0 and sum(r.summary.latency_bucket_counts) == r.summary.count
    stats = [r.stats for r in rows if r.WhichOneof("record") == "stats"][-1].counters
    assert stats["l7_agent_summed"] >= sum(counted.values()) - (len(calls) - len(summaries)), stats
