"""`kscope run --l7` from the outside: curl -> nginx (plain and TLS) in namespaces, JSON lines out."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb
from tests.e2e.agentproc import start_kscope
from tests.e2e.l7trace import l7peer, start_l7_nginx
from tests.e2e.netns import SRV_V4, Topology

pytestmark = pytest.mark.bpf
PORT, TLS_PORT, UPSTREAM_PORT = 8080, 8443, 9000


def test_run_l7_writes_requests_from_both_ends(topo: Topology, tmp_path: Path) -> None:
    start_l7_nginx(topo, tmp_path / "nginx", PORT, tls_port=TLS_PORT)
    out = tmp_path / "flows.jsonl"
    agent, _ = start_kscope("--l7", "--no-live", "--duration", "5", "--interval", "0.5", "--jsonl", str(out),
                            "--netns-inode", str(topo.srv.ino))  # fmt: skip
    topo.cli.run("curl", "-sS", "-o", "/dev/null", f"http://{SRV_V4}:{PORT}/users/77/orders?card=4111")
    topo.cli.run("curl", "-sSk", "-o", "/dev/null", f"https://{SRV_V4}:{TLS_PORT}/error")
    assert agent.wait(timeout=60) == 0
    lines = out.read_text().splitlines()
    records = [json_format.Parse(line, pb.NodeRecord()) for line in lines]
    l7 = [r.l7 for r in records if r.WhichOneof("record") == "l7"]
    plain = [r for r in l7 if not r.tls]
    tls = [r for r in l7 if r.tls]
    # only the server namespace is traced: nginx's side of each request
    assert [(r.side, r.http.method, r.http.path, r.http.route, r.http.status_code) for r in plain] == [
        (pb.ROLE_SERVER, "GET", "/users/77/orders", "/users/{id}/orders", 200)
    ]
    assert [(r.side, r.http.path, r.http.status_code, r.local_port) for r in tls] == [
        (pb.ROLE_SERVER, "/error", 500, TLS_PORT)
    ]
    assert all(r.process.comm == "nginx" and r.netns_inode == topo.srv.ino for r in l7)
    assert all(r.latency_ns > 0 and r.request_bytes > 0 and r.response_bytes > 0 for r in l7)
    assert "4111" not in out.read_text()  # query strings never leave the agent
    stats = records[-1].stats.counters
    assert stats["l7_requests"] == 2 and stats["l7_kernel_rb_full"] == 0


def test_run_l7_on_the_syscall_fallback(topo: Topology, tmp_path: Path) -> None:
    """The same scene with the capture a kernel older than 6.3 would get (forced here): plain HTTP is
    traced through syscall exits, TLS is said to be unavailable (no uprobes in the fallback)."""
    start_l7_nginx(topo, tmp_path / "nginx", PORT, tls_port=TLS_PORT)
    out = tmp_path / "flows.jsonl"
    agent, seen = start_kscope("--l7", "--l7-probe", "syscalls", "--no-live", "--duration", "5", "--interval",
                               "0.5", "--jsonl", str(out), "--netns-inode", str(topo.srv.ino))  # fmt: skip
    topo.cli.run("curl", "-sS", "-o", "/dev/null", f"http://{SRV_V4}:{PORT}/users/77/orders?card=4111")
    topo.cli.run("curl", "-sSk", "-o", "/dev/null", f"https://{SRV_V4}:{TLS_PORT}/error")
    _, rest = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest
    log = "".join(seen) + rest
    assert "l7_syscall_fallback" in log and "Traceback" not in log
    records = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
    l7 = [r.l7 for r in records if r.WhichOneof("record") == "l7"]
    assert [(r.side, r.http.method, r.http.path, r.http.route, r.http.status_code, r.tls) for r in l7] == [
        (pb.ROLE_SERVER, "GET", "/users/77/orders", "/users/{id}/orders", 200, False)
    ]
    assert l7[0].process.comm == "nginx" and l7[0].latency_ns > 0 and l7[0].response_bytes > 0
    assert "4111" not in out.read_text()
    stats = records[-1].stats
    assert stats.counters["l7_requests"] == 1
    disabled = {entry.split(":", 1)[0] for entry in stats.disabled_capabilities}
    assert {"l7.tls", "l7.exchanges"} <= disabled, stats.disabled_capabilities


def test_run_l7_counts_every_request_past_the_record_rate(topo: Topology, tmp_path: Path) -> None:
    """Unpaced wrk past a tiny --l7-record-rate: most requests arrive as kernel summaries, and the
    JSON lines still account for every request wrk completed, up to the agent's last interval (what
    the kernel still summed when the run ended goes out with it)."""
    start_l7_nginx(topo, tmp_path / "nginx", PORT)
    out = tmp_path / "flows.jsonl"
    conns, rate = 2, 20
    agent, _ = start_kscope("--l7", "--l7-record-rate", str(rate), "--no-live", "--duration", "3.5", "--interval",
                            "1", "--jsonl", str(out), "--netns-inode", str(topo.srv.ino))  # fmt: skip
    wrk = topo.cli.run("wrk", "-t1", f"-c{conns}", "-d2s", f"http://{SRV_V4}:{PORT}/users/5").stdout
    m = re.search(r"(\d+) requests in", wrk)
    assert m is not None, wrk
    n = int(m.group(1))
    assert n > 50 * rate, f"wrk did only {n} requests"
    _, rest = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest
    records = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
    l7 = [r.l7 for r in records if r.WhichOneof("record") == "l7"]
    summaries = [r for r in l7 if r.HasField("summary")]
    singles = [r for r in l7 if not r.HasField("summary")]
    total = len(singles) + sum(r.summary.count for r in summaries)
    assert n <= total <= n + conns, (n, total, len(singles), len(summaries))
    assert 0 < len(singles) <= rate * (os.cpu_count() or 1) * 5
    assert all((r.http.path, r.http.route, r.http.status_code) == ("/users/5", "/users/{id}", 200) for r in l7)
    for r in summaries:
        s = r.summary
        assert sum(s.latency_bucket_counts) == s.count and r.latency_ns == 0 and s.latency_sum_ns > 0, r
    stats = records[-1].stats.counters
    # summaries: the kernel's, and (--l7-trace-ratio auto) records its share did not pick, summaries of one
    summed = stats["l7_summarized_requests"] + stats["l7_unpicked_records"]
    assert stats["l7_requests"] == total and summed == total - len(singles), stats
    assert stats["l7_kernel_rb_full"] == 0 and stats["l7_kernel_summary_lost"] == 0, stats


def test_run_l7_stopped_right_after_the_last_request(topo: Topology, tmp_path: Path) -> None:
    """The agent stops (SIGTERM) a few ms after a keep-alive client's last answer: its probes are
    detached first, then the kernel gives up what it still holds (the last exchange, not idle yet;
    summaries, not due yet), so every request is reported. A request still waiting for its
    response is neither reported as unanswered nor silently gone: counted as pending."""
    start_l7_nginx(topo, tmp_path / "nginx", PORT, upstream=UPSTREAM_PORT)
    upstream = l7peer(topo, topo.srv, "slow-http", "--bind", "127.0.0.1", "--port", str(UPSTREAM_PORT),
                      "--delay", "30")  # fmt: skip
    upstream.expect("listening")
    out = tmp_path / "flows.jsonl"
    agent, _ = start_kscope("--l7", "--l7-record-rate", "5", "--no-live", "--duration", "60", "--interval", "1",
                            "--jsonl", str(out), "--netns-inode", str(topo.srv.ino))  # fmt: skip
    slow = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(PORT))
    slow.expect("connected")
    slow.send("get /slow/x")  # nginx -> upstream: waits 30 s for its answer
    upstream.expect("received")
    fast = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(PORT))
    fast.expect("connected")
    n = 300
    fast.send(f"get /users/5 {n}")
    assert fast.expect("done", timeout=30)["statuses"] == {"200": n}
    agent.terminate()  # the connection stays open: no close retires its last exchange
    _, rest = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest
    records = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
    l7 = [r.l7 for r in records if r.WhichOneof("record") == "l7"]
    users = [r for r in l7 if r.http.path == "/users/5"]
    total = sum(r.summary.count if r.HasField("summary") else 1 for r in users)
    assert total == n, (total, len(users))
    assert any(r.HasField("summary") for r in users)  # past the record rate: summed, sent at the stop
    assert not [r for r in l7 if r.http.path.startswith("/slow")]  # not answered: not reported
    stats = records[-1].stats.counters
    # nginx's side of /slow/x, its proxied request upstream, and the upstream's side of it
    assert stats["l7_kernel_stop_pending"] == 3, stats
    assert stats["l7_kernel_rb_full"] == 0 and stats["l7_kernel_summary_lost"] == 0, stats


def test_run_on_the_syscall_fallback_sums_past_the_record_rate(topo: Topology, tmp_path: Path) -> None:
    """On the syscall fallback nothing is paired or summed in the kernel: past a tiny --l7-record-rate the
    agent sums the HTTP/1 requests it pairs itself (node_exporter/l7/agentsum.py), and records and
    summaries still account for every request the client made."""
    start_l7_nginx(topo, tmp_path / "nginx", PORT)
    out, n = tmp_path / "flows.jsonl", 300
    agent, _ = start_kscope("--l7", "--l7-probe", "syscalls", "--l7-record-rate", "5", "--no-live", "--interval",
                            "0.5", "--duration", "120", "--jsonl", str(out),
                            "--netns-inode", str(topo.srv.ino))  # fmt: skip
    try:
        client = l7peer(topo, topo.cli, "http-client", "--to", SRV_V4, "--port", str(PORT))
        client.expect("connected")
        assert client.call(f"get /users/5 {n}", "done", 60)["statuses"] == {"200": n}
        client.send("close")
        time.sleep(1)  # the last answers reach the ring before the stop
    finally:
        agent.terminate()  # a stop runs a last interval: the ring drained, summaries sent
        _, rest = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest[-3000:]
    records = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
    l7 = [r.l7 for r in records if r.WhichOneof("record") == "l7" and r.l7.http.path == "/users/5"]
    summaries = [r for r in l7 if r.HasField("summary")]
    total = len(l7) - len(summaries) + sum(r.summary.count for r in summaries)
    assert total == n and summaries and len(l7) < n / 5, (total, len(l7), len(summaries))
    assert all((r.http.route, r.http.status_code, r.side) == ("/users/{id}", 200, pb.ROLE_SERVER) for r in l7)
    stats = records[-1].stats.counters
    assert stats["l7_agent_summed"] == total - (len(l7) - len(summaries)), stats
    assert stats["l7_agent_summaries"] == len(summaries) and stats["l7_kernel_rb_full"] == 0, stats
