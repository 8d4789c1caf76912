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
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.e2e.agentproc import KSCOPE
from tests.e2e.netns import SRV_V4, Topology, nginx
from tests.e2e.otlpview import View

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
