"""Issue 18's chain across nodes and processor replicas, run once for its tests.

Pods on four nodes, one agent per node: each ``kscope-agent --l7 --nat`` sees only its node's pod
(``--netns-inode``), as a DaemonSet's agent sees only its node's pods. Two processor replicas (in
process), each taking two of the nodes' streams, export to one test OTLP receiver; a test APIServer
names the pods, their nodes and the Services.

    loadgen ──/a/N──> front ──> middle ──> back          three thread-per-request services
    loadgen ──/b/N──> gate (nginx, an event loop) ──> middle ──> back
    loadgen ──/t/N──> front ──> middle ──> back          each request with its own traceparent
    loadgen ──/x/N──> gate ──> middle ──> back           each request with its own X-Request-ID

Every call goes to the next hop's Service VIP (kube-proxy-style DNAT on the node); each service
forwards the path it was asked for (``meshapp.py serve --forward-path``), so a span's ``url.path``
names the incoming request that caused it: the ground truth of the trace tree. ``loadgen`` runs on
no observed node (a caller outside the cluster). Replica 0 takes node-a (front) and node-c (back),
replica 1 node-b (middle) and node-d (gate): every hop of chain a crosses replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster_processor.tracejoin import JoinSettings
from tests.cluster_processor.kube import factories as f
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main_tracejoin import free_port
from tests.e2e.agentproc import AgentProcess
from tests.e2e.meshtopo import MeshTopology
from tests.e2e.netns import NGINX_CONF
from tests.e2e.realcluster import apiserver, meshapp_load
from tests.e2e.test_cluster import processor_config

if TYPE_CHECKING:
    from cluster_processor.main import Processor, ProcessorConfig

REPO = Path(__file__).resolve().parents[2]
AGENT = str(REPO / ".venv" / "bin" / "kscope-agent")
MESHAPP = Path(__file__).with_name("meshapp.py")
NS = "default"
PORT = 9080
RATE, LOAD_S = 4.0, 6.0  # per chain: requests per second, seconds
DELAY_S = 0.05  # middle holds each request a while: several are in flight at once, in different threads
NODE_OF = {"front": "node-a", "middle": "node-b", "back": "node-c", "gate": "node-d"}
REPLICA_OF = {"node-a": 0, "node-c": 0, "node-b": 1, "node-d": 1}
VIP_HOST = {"front": 20, "middle": 21, "back": 22, "gate": 23}
WORKLOADS = ("loadgen", "front", "middle", "back", "gate")
LOAD_NODE = "node-z"  # loadgen's node: no agent runs there
# a span waits this long for the trace of the hop before it: long enough that a starved CI machine does not
# cut a hop (a wait running out leaves a span in its own trace); the roots (loadgen is untraced) wait it all
TRACE_JOIN = JoinSettings(wait_s=15.0, exchange_interval_s=0.2)


@dataclass
class Scene:
    rx: OtlpReceiver
    served: dict[str, list[str]]  # service -> the paths it answered (its own log)
    load: dict[str, dict[str, Any]]  # chain ("a", "b") -> loadgen's done line
    counters: list[dict[str, int]]  # each replica's aggregator counters
    agent_logs: dict[str, str]


def populate(server: FakeApiServer, topo: MeshTopology) -> None:
    """Deployments -> ReplicaSets -> Pods on their nodes, a Service with one endpoint per hop, the nodes."""
    uids = {}
    for name in WORKLOADS:
        rs, dep_uid, rs_uid = f"{name}-5c7d9f6b8", str(uuid.uuid4()), str(uuid.uuid4())
        server.put("Deployment", f.workload(name, namespace=NS, uid=dep_uid))
        server.put(
            "ReplicaSet", f.workload(rs, namespace=NS, uid=rs_uid, owners=[f.owner("Deployment", name, dep_uid)])
        )
        _, uids[name], cid = topo.containers[name]
        server.put("Pod", f.pod(f"{rs}-q8x2z", namespace=NS, uid=uids[name], ip=topo.ips[name],
                                node=NODE_OF.get(name, LOAD_NODE), owners=[f.owner("ReplicaSet", rs, rs_uid)],
                                containers=[f"containerd://{cid}"]))  # fmt: skip
    for name, host in VIP_HOST.items():
        svc = f.service(name, namespace=NS, cluster_ips=[topo.vip(host)])
        svc["spec"]["ports"] = [{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]
        server.put("Service", svc)
        eps = f.endpoint_slice(f"{name}-x7k2p", name, [(topo.ips[name], uids[name])], namespace=NS)
        eps["endpoints"][0]["targetRef"]["name"] = f"{name}-5c7d9f6b8-q8x2z"
        eps["ports"] = [{"name": "http", "port": PORT, "protocol": "TCP"}]
        server.put("EndpointSlice", eps)
    for i, node in enumerate(sorted({*NODE_OF.values(), LOAD_NODE})):
        server.put("Node", f.node(node, internal=f"198.18.{topo.net}.{200 + i}"))


def build(topo: MeshTopology, tmp: Path) -> None:
    """The pods, the VIPs, the three Python services and nginx."""
    for name in WORKLOADS:
        topo.add_pod(name)
    for name, host in VIP_HOST.items():
        topo.service(topo.vip(host), PORT, name, PORT)
    url = {name: f"http://{topo.vip(host)}:{PORT}" for name, host in VIP_HOST.items()}
    apps = {
        "back": [],
        "middle": ["--next", url["back"], "--forward-path", "--delay", str(DELAY_S)],
        "front": ["--next", url["middle"], "--forward-path"],
    }
    for name, extra in apps.items():
        out, err = (tmp / f"{name}.jsonl").open("w"), (tmp / f"{name}.err").open("w")
        topo.start(name, sys.executable, "-u", str(MESHAPP), "serve", "--name", name, "--bind", topo.ips[name],
                   "--port", str(PORT), "--timeout", "20", *extra, stdout=out, stderr=err)  # fmt: skip
        topo.wait_listening(topo.pods[name], PORT)
    gate = tmp / "gate"
    gate.mkdir()
    body = f"listen {topo.ips['gate']}:{PORT}; location / {{ proxy_pass {url['middle']}; }}"
    (gate / "nginx.conf").write_text(NGINX_CONF.format(tmp=gate, server=body))
    topo.start("gate", "nginx", "-p", str(gate), "-e", str(gate / "error.log"), "-c", str(gate / "nginx.conf"))
    topo.wait_listening(topo.pods["gate"], PORT)


class Agent(AgentProcess):
    """``kscope-agent`` for one node: only its pod's network namespace, shipping to one replica."""

    def __init__(self, topo: MeshTopology, service: str, ingest_port: int) -> None:
        self.node = NODE_OF[service]
        ino = os.stat(f"/run/netns/{topo.pods[service].name}").st_ino
        super().__init__(
            [AGENT, "--l7", "--nat", "--conntrack-netns", topo.node.path, "--netns-inode", str(ino),
             "--processor", f"127.0.0.1:{ingest_port}", "--interval", "0.5", "--duration", "120",
             "--node-name", self.node],
            topo.procs, f"agent of {self.node}",
        )  # fmt: skip


# chain -> the service loadgen calls; chain t's requests carry a traceparent (an instrumented caller)
CHAINS = {"a": "front", "b": "gate", "t": "front", "x": "gate"}


def run_load(topo: MeshTopology, chain: str, entry: str) -> dict[str, Any]:
    """loadgen's numbered requests (/CHAIN/0, /CHAIN/1, ...) to ``entry``'s VIP; its ``done`` line."""
    extra = {"t": ("--number", "--traceparent"), "x": ("--number", "--request-id", "unique")}.get(chain, ("--number",))
    return meshapp_load(topo, f"http://{topo.vip(VIP_HOST[entry])}:{PORT}/{chain}", RATE, LOAD_S, 20, *extra)


def served(tmp: Path, name: str) -> list[str]:
    lines = (tmp / f"{name}.jsonl").read_text().splitlines()
    return [e["path"] for e in map(json.loads, lines) if e.get("event") == "served" and e.get("answered")]


async def run_scene(topo: MeshTopology, tmp: Path) -> Scene:
    from cluster_processor import main as m

    async with apiserver(tmp, lambda server: populate(server, topo)) as kubeconfig, OtlpReceiver() as rx:
        peers = tuple(f"127.0.0.1:{free_port()}" for _ in range(2))
        configs = [replica_config(processor_config(kubeconfig, rx.endpoint), i, peers) for i in range(2)]
        async with m.Processor(configs[0]) as p0, m.Processor(configs[1]) as p1:
            procs = (p0, p1)
            for p in procs:
                assert p.watcher is not None and await p.watcher.wait_synced(10)
            agents = [Agent(topo, s, procs[REPLICA_OF[NODE_OF[s]]].ingest.port) for s in NODE_OF]
            for a in agents:
                await asyncio.to_thread(a.wait_started, 60)
            loads = await asyncio.gather(*(asyncio.to_thread(run_load, topo, c, e) for c, e in CHAINS.items()))
            logs = {a.node: await asyncio.to_thread(a.stop) for a in agents}
            truth = {name: served(tmp, name) for name in ("front", "middle", "back")}
            await settle(rx, procs, len(truth["back"]))
            return Scene(rx, truth, dict(zip(CHAINS, loads, strict=True)),
                         [{**p.aggregator.counters(), **p.join.counters} for p in procs], logs)  # fmt: skip


def replica_config(base: ProcessorConfig, index: int, peers: tuple[str, ...]) -> ProcessorConfig:
    """Replica ``index`` of ``peers`` (every replica's trace-join address): its own name and address."""
    return replace(base, replica=f"kscope-processor-{index}", trace=TRACE_JOIN, trace_listen=peers[index],
                   trace_self=peers[index], trace_peers=peers)  # fmt: skip


async def settle(rx: OtlpReceiver, procs: tuple[Processor, ...], want_back: int) -> None:
    """Until back's server spans reach what back answered (or a deadline: the tests say what is
    missing), then two more intervals of each replica delivered."""
    from tests.cluster_processor.test_main import spans

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        backs = [s for r, s in spans(rx) if r.get("service.name") == "back" and s.kind == 2]  # SERVER
        if len(backs) >= want_back:
            break
        await asyncio.sleep(0.2)
    ticks = [p.ticks + 2 for p in procs]
    deadline = time.monotonic() + 10
    while any(p.ticks < t for p, t in zip(procs, ticks, strict=True)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def paths(spans: list[tuple[dict[str, Any], Any]]) -> Counter[str]:
    return Counter(str(r.get("service.name")) for r, _ in spans)
