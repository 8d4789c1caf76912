"""Debian's Prometheus scrapes the processor's ``--prometheus-port`` on a real multi-service scene, and
every Grafana dashboard the chart ships is checked query by query against what it stored.

The scene is issue 12's real-shaped cluster (``realcluster.py``: loadgen -> productpage -> reviews ->
ratings by Service DNS names through a dnsmasq "coredns", SERVFAILing external lookups, 30 % loss
between reviews and ratings, a details backend that drops every packet), plus two workloads for the
accept-queue and reset panels: ``queue-v1`` listens with a backlog of 1 and never accepts, ``batch``
floods it with connects and also connects to a port of it where nothing listens (refused: a RST).
The real agent (``kscope run --nat --l7``) ships to the processor (in process, named by the test
APIServer); Prometheus scrapes it every second with honor_labels, as the chart's ServiceMonitor does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.cluster_processor.kube import factories as f
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.e2e import dashcheck
from tests.e2e.meshtopo import MeshTopology
from tests.e2e.netns import NGINX_CONF, PEER, PYTHON, Peer
from tests.e2e.promserver import Prometheus
from tests.e2e.realcluster import PROXY_VARS, WORKLOAD_NS, Agent, build, populate, run_load
from tests.e2e.test_cluster import NODE, processor_config

pytestmark = pytest.mark.bpf

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "charts" / "kscope" / "dashboards").glob("*.json"))
EXTRA = {"queue-v1": "default", "batch": "default"}  # the accept-queue and reset workloads
QUEUE_PORT, CLOSED_PORT, HTTP_PORT = 7000, 7001, 8080
ERRORS = 3
LOAD_S = 6.0
EXPECTED = {*WORKLOAD_NS, *EXTRA, NODE}  # the node: the agents' counters, by instance
# Workloads each dashboard must show somewhere (the scene's HTTP chain, its DNS, its TCP trouble).
MUST_SHOW = {
    "kscope-service-map": {"loadgen", "productpage-v1", "reviews-v2", "ratings-v1"},
    "kscope-red": {"loadgen", "productpage-v1", "reviews-v2", "ratings-v1"},
    "kscope-network": {"reviews-v2", "ratings-v1", "productpage-v1", "queue-v1", "batch"},
    "kscope-dns": {"loadgen", "productpage-v1", "reviews-v2", "coredns"},
}


@dataclass
class Scraped:
    prom: Prometheus
    start: float  # Unix seconds: the agent's start
    at: float  # when the panels are evaluated: the load's end, plus time for it to reach Prometheus


def populate_extra(server: FakeApiServer, topo: MeshTopology) -> None:
    for name, ns in EXTRA.items():
        rs_name, dep_uid, rs_uid = f"{name}-6c9d7f8b4", str(uuid.uuid4()), str(uuid.uuid4())
        server.put("Deployment", f.workload(name, namespace=ns, uid=dep_uid))
        server.put("ReplicaSet", f.workload(rs_name, namespace=ns, uid=rs_uid,
                                            owners=[f.owner("Deployment", name, dep_uid)]))  # fmt: skip
        _, pod_uid, cid = topo.containers[name]
        server.put("Pod", f.pod(f"{rs_name}-q7w2e", namespace=ns, uid=pod_uid, ip=topo.ips[name], node=NODE,
                                owners=[f.owner("ReplicaSet", rs_name, rs_uid)],
                                containers=[f"containerd://{cid}"]))  # fmt: skip


def peer(topo: MeshTopology, pod: str, *args: str) -> Peer:
    """``peer.py`` in ``pod``'s container cgroup (so the agent names it by its pod)."""
    proc = topo.start(pod, PYTHON, "-u", str(PEER), *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    return Peer(proc, f"{pod}:{args[0]}")


def tcp_trouble(topo: MeshTopology) -> None:
    """batch -> queue-v1: a full accept queue (a backlog of 1, never accepted) overflowing, and a
    refused connect. Overflows as tests/e2e/test_l4.py makes them: handshakes held half-open (batch's
    pure ACKs dropped) until data completes them with the queue full, so the kernel drops them at
    completion; connects past that have their SYNs dropped (the listener's drops)."""
    queue = topo.ips["queue-v1"]
    flood = peer(topo, "batch", "flood", "--to", queue, "--port", str(QUEUE_PORT))
    flood.expect("ready")
    assert flood.call("connect 1", "connects")["connected"] == 1  # the accept queue: 1 of 2
    topo.pods["batch"].iptables("-A", "OUTPUT", "-p", "tcp", "--dport", str(QUEUE_PORT),
                                "--tcp-flags", "SYN,ACK,FIN,RST,PSH", "ACK", "-j", "DROP")  # fmt: skip
    assert flood.call("connect 2", "connects")["connected"] == 3
    flood.call("poke", "poked")  # PSH|ACK completes both: one fits the queue, the other overflows
    flood.call("connect 4", "connects")  # SYNs for a full queue
    for _ in range(ERRORS):  # HTTP errors: queue-v1's nginx answers 503
        curl = topo.start("batch", "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://{queue}:{HTTP_PORT}/jobs/7", stdout=subprocess.PIPE, text=True)  # fmt: skip
        out, err = curl.communicate(timeout=10)
        assert out == "503", out + err
    refused = peer(topo, "batch", "connect", "--to", queue, "--port", str(CLOSED_PORT))
    refused.expect("connect_error")
    flood.send("exit")


async def run(topo: MeshTopology, tmp: Path, prom_box: list[Prometheus]) -> Scraped:
    from cluster_processor import main as m

    server = FakeApiServer()
    await server.start()
    try:
        populate(server, topo)
        populate_extra(server, topo)
        cfg = processor_config(server.write_kubeconfig(tmp / "kubeconfig"), "127.0.0.1:9")
        async with OtlpReceiver() as rx:
            cfg = dataclasses.replace(cfg, otlp=dataclasses.replace(cfg.otlp, endpoint=rx.endpoint),
                                      prometheus_port=0, metrics_addr="127.0.0.1")  # fmt: skip
            async with m.Processor(cfg) as proc:
                assert proc.watcher is not None and await proc.watcher.wait_synced(10)
                prom = Prometheus(f"127.0.0.1:{proc.prometheus_port}")
                prom_box.append(prom)
                await asyncio.to_thread(prom.wait_ready)
                agent = Agent(topo, proc.ingest.port)
                await asyncio.to_thread(agent.wait_started)
                start = time.time()
                await asyncio.to_thread(tcp_trouble, topo)
                load = await asyncio.to_thread(run_load, topo, LOAD_S)
                # Evaluated once Prometheus holds every request loadgen sent (each interval's series
                # arrive together), plus two scrapes; with the agent still up.
                await until_scraped(prom, load["sent"])
                at = time.time() + 2
                await asyncio.sleep(at - time.time() + 1)
                log = await asyncio.to_thread(agent.stop)
                assert "Traceback" not in log, log[-4000:]
                return Scraped(prom, start, at)
    finally:
        await server.close()


async def until_scraped(prom: Prometheus, sent: int, timeout_s: float = 30) -> None:
    query = 'sum(traces_service_graph_request_total{client="loadgen"})'
    deadline = time.monotonic() + timeout_s
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(prom.query, query, time.time())
        if seen and float(seen[0]["value"][1]) >= sent:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"Prometheus never held loadgen's {sent} requests: {seen}\n{prom.log_tail()}")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    tmp: Path = tmp_path_factory.mktemp("prometheus")
    prom_box: list[Prometheus] = []
    with pytest.MonkeyPatch.context() as mp:
        for var in (*PROXY_VARS, "KUBERNETES_SERVICE_HOST", "NODE_NAME"):
            mp.delenv(var, raising=False)
        topo = MeshTopology()
        try:
            topo.create()
            for name in EXTRA:
                topo.add_pod(name)
            build(topo, tmp)
            listener = peer(topo, "queue-v1", "listen", "--bind", topo.ips["queue-v1"], "--port", str(QUEUE_PORT),
                            "--backlog", "1", "--no-accept")  # fmt: skip
            listener.expect("listening")
            nginx_503(topo, tmp / "nginx")
            result = asyncio.run(asyncio.wait_for(run(topo, tmp, prom_box), 120))
            yield result
        finally:
            topo.close()  # namespaces, processes, resolv.conf files, iptables (with the node namespace)
            for prom in prom_box:
                prom.close()
            structlog.reset_defaults()


def nginx_503(topo: MeshTopology, tmp: Path) -> None:
    """Debian's nginx in queue-v1's container, answering 503 (the error panels need errors)."""
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    server = f'listen {topo.ips["queue-v1"]}:{HTTP_PORT}; location / {{ return 503 "busy\\n"; }}'
    conf.write_text(NGINX_CONF.format(tmp=tmp, server=server))
    topo.start("queue-v1", "nginx", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf))
    topo.wait_listening(topo.pods["queue-v1"], HTTP_PORT)


def boards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in DASHBOARDS]


def test_the_spec_names_reach_prometheus(scraped: Scraped) -> None:
    prom, at = scraped.prom, scraped.at
    graph = prom.query('traces_service_graph_request_total{client="productpage-v1"}', at)
    assert {r["metric"]["server"] for r in graph} >= {"reviews-v2"}, graph
    assert all(r["metric"]["job"] == "kscope" for r in graph)  # the graph is kscope's, not a workload's
    buckets = prom.query('http_server_request_duration_seconds_bucket{job="default/ratings-v1", le="+Inf"}', at)
    assert buckets and {r["metric"]["service_peer_name"] for r in buckets} == {"reviews-v2"}, buckets
    info = prom.query('target_info{job="default/ratings-v1"}', at)
    assert info and info[0]["metric"]["k8s_deployment_name"] == "ratings-v1", info
    assert info[0]["metric"]["instance"] == f"kscope-processor-0/{NODE}"


def test_every_panel_returns_series_for_the_scene(scraped: Scraped) -> None:
    prom, at = scraped.prom, scraped.at
    found: list[str] = []
    for board in boards():
        values = dashcheck.variables(board, prom, scraped.start, at)
        assert "default" in values["namespace"] and "kube" in values["namespace"], values
        shown: set[str] = set()
        for t in dashcheck.targets(board):
            found += dashcheck.problems(t, values, prom, at, scraped.start, EXPECTED)
            try:
                shown |= dashcheck.workloads(prom.query(dashcheck.substitute(t.expr, values), at))
            except Exception as exc:  # reported by problems() already
                found.append(f"{t.board} / {t.panel}: {exc}")
        missing = MUST_SHOW[board["uid"]] - shown
        if missing:
            found.append(f"{board['uid']}: no panel shows {sorted(missing)}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("kscope_tcp_retransmits_total", "kscope_tcp_retransmit_total", "does not exist"),
        ("by (job, service_peer_name)", "by (job, peer_service)", "label peer_service"),
        ('error_type!=""', 'error_typ!=""', "label error_typ"),
        ("{{service_peer_name}}", "{{peer}}", "legend label peer"),
        ('"source", "$1", "client"', '"source", "$1", "caller"', "label caller"),
    ],
)
def test_a_panel_naming_what_does_not_exist_fails(scraped: Scraped, old: str, new: str, complaint: str) -> None:
    """The check above catches a bad panel: the same dashboards with one name misspelt fail it."""
    prom, at = scraped.prom, scraped.at
    hit = 0
    for board in boards():
        values = dashcheck.variables(board, prom, scraped.start, at)
        for t in dashcheck.targets(board):
            bad = dataclasses.replace(t, expr=t.expr.replace(old, new), legend=t.legend.replace(old, new))
            if bad == t:
                continue
            hit += 1
            assert dashcheck.problems(t, values, prom, at, scraped.start, EXPECTED) == []
            found = dashcheck.problems(bad, values, prom, at, scraped.start, EXPECTED)
            assert any(complaint in p for p in found), (bad, found)
    assert hit, f"no panel has {old!r}"
