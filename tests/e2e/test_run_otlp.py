"""`kscope run --otlp`: the processor's own OTLP, sent by the one local process to a test receiver
(the real OTLP/gRPC services), over real traffic; and the plain output when stdout is no terminal."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
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
    server = view.of("http.server.request.duration", "nginx")
    assert {(p.peer, p.get("http.response.status_code")) for p in server} == {("curl", 200), ("curl", 500)}
    assert all(p.resource.get("process.executable.name") == "nginx" for p in server), server
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
