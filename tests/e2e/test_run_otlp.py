"""`kscope run --otlp` and `--prometheus`: the processor's own OTLP, sent by the one local process to a
test receiver (the real OTLP/gRPC services), and its Prometheus view, over real traffic; and the plain
output when stdout is no terminal."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node_exporter.local.pipeline import TRACE_WAIT_S
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main import spans
from tests.e2e.agentproc import KSCOPE
from tests.e2e.netns import SRV_V4, Topology, nginx
from tests.e2e.otlpview import View
from tests.e2e.realcluster import MESHAPP
from tests.e2e.test_l7_kv import REDIS_PORT, commandstats, redis_server

pytestmark = pytest.mark.bpf
PORT = 8080
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "grpc_proxy")


def test_run_otlp_sends_red_graph_and_spans_named_locally(topo: Topology, tmp_path: Path) -> None:
    server = f'listen {SRV_V4}:{PORT}; location / {{ return 200 "ok\\n"; }} location = /error {{ return 500; }}'
    nginx(topo, tmp_path / "nginx", server, (PORT,))
    for path in ("/", "/error"):
        topo.spawn(topo.srv, "sh", "-c", f"while :; do curl -s -o /dev/null http://{SRV_V4}:{PORT}{path}; "
                   "sleep 0.2; done")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in _PROXIES}  # 127.0.0.1 goes direct

    async def body() -> tuple[View, subprocess.CompletedProcess[str], int]:
        async with OtlpReceiver() as rx:
            argv = [KSCOPE, "run", "--netns-inode", str(topo.srv.ino), "--interval", "0.5", "--duration", "6",
                    "--otlp", f"http://{rx.endpoint}"]  # fmt: skip
            done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=120, env=env)
            return View(rx), done, rx.items("traces")

    view, done, spans = asyncio.run(body())
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    # nginx runs in no container and no service here: named by its process, its peer curl likewise
    served = view.of("http.server.request.duration", "nginx")
    assert {(p.peer, p.get("http.response.status_code")) for p in served} == {("curl", 200), ("curl", 500)}
    assert all(p.resource.get("process.executable.name") == "nginx" for p in served), served
    client = view.of("http.client.request.duration", "curl")
    assert {p.get("http.response.status_code") for p in client} == {200, 500}
    graph = view.of("traces_service_graph_request_total", None)
    assert any(p.get("client") == "curl" and p.get("server") == "nginx" for p in graph), view.names()
    assert view.total("traces_service_graph_request_failed_total") > 0
    assert spans > 0
    # stdout was no terminal: one JSON object per interval, the same edges
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) >= 6
    edges = {(e["client"], e["server"]) for e in lines[-1]["edges"]}
    assert ("curl@host", f"nginx@host:{PORT}") in edges, lines[-1]


def _until_started(stderr: Any) -> Iterator[str]:
    """The agent's stderr lines up to its ``agent_started`` line; AssertionError if it exits first."""
    for line in stderr:
        yield line
        if "agent_started" in line:
            return
    raise AssertionError("kscope run exited before its probes were attached")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 goes direct
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def test_run_prometheus_serves_the_same_metrics_named_for_prometheus(topo: Topology, tmp_path: Path) -> None:
    server = f'listen {SRV_V4}:{PORT}; location / {{ return 200 "ok\\n"; }} location = /error {{ return 500; }}'
    nginx(topo, tmp_path / "nginx", server, (PORT,))
    topo.spawn(topo.srv, "sh", "-c", f"while :; do curl -s -o /dev/null http://{SRV_V4}:{PORT}/error; sleep 0.2; done")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in _PROXIES}
    argv = [KSCOPE, "run", "--netns-inode", str(topo.srv.ino), "--interval", "0.5", "--prometheus", f"127.0.0.1:{port}"]
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    want = re.compile(r'^http_server_request_duration_seconds_count\{[^}]*http_response_status_code="500"[^}]*'
                      r'job="nginx"[^}]*\} [1-9]', re.M)  # fmt: skip
    text = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not want.search(text := _scrape(port)):
            time.sleep(0.5)
    finally:
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=60)
    assert want.search(text), text
    assert re.search(r'^traces_service_graph_request_failed_total\{[^}]*client="curl"[^}]*server="nginx"', text, re.M)
    assert re.search(r'^target_info\{[^}]*job="nginx"[^}]*process_executable_name="nginx"', text, re.M), text
    assert agent.returncode == 0 and "Traceback" not in err, err


def test_run_otlp_and_prometheus_address_errors(tmp_path: Path) -> None:
    """Bad values are one line and exit 2, a busy port exit 3: before any probe loads."""
    bad = subprocess.run([KSCOPE, "run", "--prometheus", "localhost:http"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--prometheus: expected [HOST:]PORT" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([KSCOPE, "run", "--otlp", "ftp://collector:4317"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--otlp ftp://collector:4317: expected http://HOST:PORT" in bad.stderr
    assert "Traceback" not in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([KSCOPE, "run", "--no-live", "--prometheus", str(taken.getsockname()[1])],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert busy.returncode == 3 and "cannot serve Prometheus metrics on 127.0.0.1" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr


def test_run_otlp_joins_a_local_chain_into_one_trace_per_request(topo: Topology, tmp_path: Path) -> None:
    """Issue 18 on one host: three thread-per-request services (meshapp) a -> b -> c in one namespace,
    each forwarding the path it was asked for, called from another namespace kscope does not watch (a
    caller it cannot trace). `kscope run --otlp` joins each request's five spans into ONE trace with
    the exact tree, as the cluster processor does; the caller's hop waits, then leaves with its
    pairwise trace, which the hops below take. b also stores a value in memcached per request
    (pymemcache): that call, paired from chunks in user space, is b's server span's child in the same trace."""
    ports = {"a": 9101, "b": 9102, "c": 9103, "mc": 9111}
    topo.spawn(topo.srv, "memcached", "-u", "root", "-l", SRV_V4, "-p", str(ports["mc"]), "-U", "0")
    topo.wait_listening(topo.srv, ports["mc"])
    for name, nxt in (("c", ""), ("b", "c"), ("a", "b")):
        extra = ["--next", f"http://{SRV_V4}:{ports[nxt]}", "--forward-path"] if nxt else []
        if name == "b":
            extra += ["--memcached", f"{SRV_V4}:{ports['mc']}"]
        topo.spawn(topo.srv, sys.executable, "-u", str(MESHAPP), "serve", "--name", name, "--bind", SRV_V4,
                   "--port", str(ports[name]), *extra)  # fmt: skip
        topo.wait_listening(topo.srv, ports[name])
    env = {k: v for k, v in os.environ.items() if k not in _PROXIES}
    sent = 12

    async def body() -> tuple[list[tuple[dict[str, Any], Any]], int, str]:
        async with OtlpReceiver() as rx:
            argv = [KSCOPE, "run", "--netns-inode", str(topo.srv.ino), "--interval", "0.5", "--duration", "60",
                    "--otlp", f"http://{rx.endpoint}"]  # fmt: skip
            agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            topo.procs.append(agent)  # killed by the teardown if the test fails first
            assert agent.stderr is not None
            seen = [line for line in _until_started(agent.stderr)]  # the requests must be seen whole
            for batch in ("r", "s"):
                load = [sys.executable, str(MESHAPP), "load", "--url", f"http://{SRV_V4}:{ports['a']}/{batch}",
                        "--number", "--rate", "6", "--duration", str(sent / 6), "--timeout", "10"]  # fmt: skip
                out = await asyncio.to_thread(topo.cli.run, *load)
                assert json.loads(out.stdout.splitlines()[-1])["ok"] == sent, out.stdout
                if batch == "r":  # these leave when the caller's hop times out (TRACE_WAIT_S)
                    await asyncio.sleep(TRACE_WAIT_S + 1.5)
            agent.send_signal(signal.SIGTERM)  # the last interval sends every span still waiting: /s/*
            _, rest = await asyncio.to_thread(agent.communicate, timeout=60)
            return spans(rx), agent.returncode, "".join(seen) + rest

    got, rc, stderr = asyncio.run(body())
    assert rc == 0 and "Traceback" not in stderr, stderr
    by_path: dict[str, list[Any]] = defaultdict(list)
    cache_calls: dict[bytes, list[Any]] = defaultdict(list)
    for _, s in got:
        attrs = {kv.key: kv.value.string_value for kv in s.attributes}
        if attrs.get("url.path", "").startswith(("/r/", "/s/")):
            by_path[attrs["url.path"]].append(s)
        elif attrs.get("db.system.name") == "memcached" and s.kind == 3:  # SPAN_KIND_CLIENT
            cache_calls[s.trace_id].append(s)
    assert sorted(by_path) == sorted(f"/{b}/{i}" for b in "rs" for i in range(sent)), sorted(by_path)
    for path, ss in by_path.items():
        # a: server, client; b: server, client; c: server: one trace, a path of parents (the start times
        # of a send and of the receive it wakes are in no fixed order, the links are)
        assert len(ss) == 5 and len({s.trace_id for s in ss}) == 1, (path, len(ss))
        child_of = {s.parent_span_id: s for s in ss}
        ids = {s.span_id for s in ss}
        (root,) = [s for s in ss if s.parent_span_id not in ids]
        chain = [root]
        while chain[-1].span_id in child_of:
            chain.append(child_of[chain[-1].span_id])
        assert [s.kind for s in chain] == [2, 3, 2, 3, 2], path
        # b's cache call: a client span in the request's trace, under b's server span
        (cached,) = cache_calls.pop(ss[0].trace_id, [None])
        assert cached is not None, (path, "no cache call in its trace")
        assert cached.parent_span_id == chain[2].span_id, path
    assert cache_calls == {}, f"cache calls in no request's trace: {len(cache_calls)}"


def test_run_otlp_counts_every_redis_operation_past_the_record_rate(topo: Topology, tmp_path: Path) -> None:
    """redis-benchmark past a tiny --l7-record-rate with `kscope run --otlp`, tracing redis-server's
    namespace: the agent sums the operations past its budget (node_exporter/l7/agentsum.py), and the
    exported database metric still counts each operation the server counted, per command; the spans
    are the budget's few."""
    redis_server(topo)
    topo.cli.run("redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT), "CONFIG", "RESETSTAT")
    env = {k: v for k, v in os.environ.items() if k not in _PROXIES}

    async def body() -> tuple[View, dict[str, int], str, int, int | None]:
        async with OtlpReceiver() as rx:
            argv = [KSCOPE, "run", "--no-live", "--netns-inode", str(topo.srv.ino), "--interval", "0.5",
                    "--l7-record-rate", "5", "--capture-bytes", "1024", "--otlp", f"http://{rx.endpoint}"]  # fmt: skip
            agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            try:
                await asyncio.to_thread(lambda: list(_until_started(agent.stderr)))
                await asyncio.to_thread(topo.cli.run, "redis-benchmark", "-h", SRV_V4, "-p", str(REDIS_PORT), "-t",
                                        "set,get", "-n", "3000", "-c", "2", "-P", "16", "-q", timeout=120)  # fmt: skip
                served = dict(await asyncio.to_thread(commandstats, topo))
                await asyncio.sleep(2)  # the summaries of the last intervals are exported
            finally:
                agent.send_signal(signal.SIGINT)
                _, err = await asyncio.to_thread(agent.communicate, None, 60)
            return View(rx), served, err, rx.items("traces"), agent.returncode

    view, served, err, spans, rc = asyncio.run(body())
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    counted: dict[str, float] = defaultdict(float)
    for p in view.of("kscope.db.server.operation.duration", "redis-server"):
        counted[p.get("db.operation.name")] += p.value
    assert served["SET"] >= 3000 and served["GET"] >= 3000, served
    assert (counted["SET"], counted["GET"]) == (served["SET"], served["GET"]), (dict(counted), served)
    assert 0 < spans < (served["SET"] + served["GET"]) / 10, spans
