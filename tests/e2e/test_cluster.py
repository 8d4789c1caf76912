"""The whole pipeline on one node: agent (real probes) -> processor -> OTLP, named by a test APIServer.

pod a-1 (Deployment a) curls the Service VIP of b; the node namespace DNATs it to pod b-1
(Deployment b), an nginx in a kubelet-style cgroup. ``kscope run --nat --l7`` ships to the
processor (in process), which resolves workloads from the test APIServer and exports to a test
OTLP receiver. What arrives there must name the edge a -> b, never the VIP.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from cluster_processor import main as m
from cluster_processor.aggregate import AggregatorSettings
from cluster_processor.ingest import IngestConfig
from cluster_processor.kube.watcher import WatchSettings
from cluster_processor.otlp.exporter import ExporterSettings, RetryPolicy
from cluster_processor.tracejoin import JoinSettings
from tests.cluster_processor.kube import factories as f
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main import _kv as kv
from tests.cluster_processor.test_main import latest, points, spans
from tests.e2e.agentproc import AGENT_LOSS_COUNTERS, AGENT_STAT, AGENT_STAT_NAME
from tests.e2e.nattopo import BACKEND_PORT, VIP_PORT, NatTopology, attach_pod
from tests.e2e.netns import nginx, run
from tests.helpers import eventually_async as eventually

pytestmark = pytest.mark.bpf
REPO = Path(__file__).resolve().parents[2]
KSCOPE = str(REPO / ".venv" / "bin" / "kscope")
NODE = "node-1"
REQUESTS = 5
SERVER, CLIENT = 2, 3  # SpanKind
# Each workload's series sit under a resource describing it (written for the node that reported).
A_RES = {"service.name": "a", "service.namespace": "default", "k8s.namespace.name": "default",
         "k8s.deployment.name": "a", "k8s.node.name": NODE}  # fmt: skip
B_RES = {**A_RES, "service.name": "b", "k8s.deployment.name": "b"}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # aiohttp and gRPC (processor and agent) trust proxy variables: 127.0.0.1 must go direct.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "grpc_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("NODE_NAME", raising=False)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@dataclass
class ClusterTopology(NatTopology):
    """:class:`NatTopology` with addresses of its own: the agent sees every namespace on the machine
    and the processor names endpoints by IP, so another test's 198.18.2.1 must not read as pod b-1."""

    net: int = field(default_factory=lambda: random.randrange(16, 250))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.node_gw = f"198.18.{self.net}.254"
        self.cpod_ip, self.spod_ip = f"198.18.{self.net}.1", f"198.18.{self.net}.2"
        self.vip = f"198.19.{self.net}.{random.randrange(1, 250)}"

    def create(self) -> ClusterTopology:
        for ns in (self.node, self.cli, self.srv):
            run(["ip", "netns", "add", ns.name])
            self._created.append(ns)
            ns.ip("link", "set", "lo", "up")
        self.node.sysctl("net.ipv4.ip_forward", 1)
        for pod, veth, ip in ((self.cli, "vcpod", self.cpod_ip), (self.srv, "vspod", self.spod_ip)):
            attach_pod(self.node, pod, veth, ip, self.node_gw)
        self.dnat(self.vip, VIP_PORT, self.spod_ip, BACKEND_PORT)  # kube-proxy: VIP:80 -> b-1:8080
        return self


@pytest.fixture
def nat_topo() -> Iterator[ClusterTopology]:
    t = ClusterTopology()
    try:
        t.create()
        yield t
    finally:
        t.close()  # kills nginx and the agent, deletes the namespaces


def populate(server: FakeApiServer, topo: ClusterTopology, b_uid: str, b_cid: str) -> None:
    """Deployments a and b through their ReplicaSets; a-1 and b-1 on node-1 with the namespaces'
    addresses; Service b with the VIP; node-1 whose InternalIP is the node namespace's address."""
    for name in ("a", "b"):
        server.put("Deployment", f.workload(name, uid=f"dep-{name}"))
        owners = [f.owner("Deployment", name, f"dep-{name}")]
        server.put("ReplicaSet", f.workload(f"{name}-5d8f7c9b6d", uid=f"rs-{name}", owners=owners))
    rs = {n: [f.owner("ReplicaSet", f"{n}-5d8f7c9b6d", f"rs-{n}")] for n in ("a", "b")}
    server.put("Pod", f.pod("a-5d8f7c9b6d-1", uid=str(uuid.uuid4()), ip=topo.cpod_ip, node=NODE, owners=rs["a"],
                            containers=[f"containerd://{secrets.token_hex(32)}"]))  # fmt: skip
    server.put("Pod", f.pod("b-5d8f7c9b6d-1", uid=b_uid, ip=topo.spod_ip, node=NODE, owners=rs["b"],
                            containers=[f"containerd://{b_cid}"]))  # fmt: skip
    server.put("Service", f.service("b", cluster_ips=[topo.vip]))
    server.put("Node", f.node(NODE, internal=topo.node_gw))


def processor_config(kubeconfig: Path, otlp_endpoint: str) -> m.ProcessorConfig:
    return m.ProcessorConfig(
        ingest=IngestConfig(listen="127.0.0.1:0", drain_timeout_s=2.0),
        otlp=ExporterSettings(
            otlp_endpoint,
            timeout_s=1.0,
            max_elapsed_s=5.0,
            retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2),
            reconnect_backoff_max_s=0.1,
        ),
        kubeconfig=str(kubeconfig),
        interval_s=1.0,
        metrics_port=None,
        replica="kscope-processor-0",
        node_name=NODE,  # the one node: the processor's own metrics are written for it too
        watch=WatchSettings(watch_timeout_s=30, backoff_initial_s=0.02, backoff_max_s=0.2, expire_interval_s=0.05),
        aggregator=AggregatorSettings(default_interval_ns=1_000_000_000),
        shutdown_timeout_s=2.0,
        # a server span whose caller is not traced waits this long for its trace (docs/traces.md)
        trace=JoinSettings(wait_s=2.0, exchange_interval_s=0.2),
    )


@contextlib.asynccontextmanager
async def cluster(
    topo: ClusterTopology, tmp_path: Path, b_uid: str, b_cid: str
) -> AsyncIterator[tuple[OtlpReceiver, m.Processor]]:
    """A test APIServer describing the scene, an OTLP receiver and the processor, synced."""
    server = FakeApiServer()
    await server.start()
    try:
        populate(server, topo, b_uid, b_cid)
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        async with OtlpReceiver() as rx, m.Processor(processor_config(kubeconfig, rx.endpoint)) as proc:
            assert proc.watcher is not None and await proc.watcher.wait_synced(5)
            yield rx, proc
    finally:
        await server.close()


def start_nginx(topo: ClusterTopology, tmp: Path, scope: Path) -> subprocess.Popen[Any]:
    """nginx in pod b on 8080, moved into b-1's container cgroup before any connection."""
    server = f'listen {topo.spod_ip}:{BACKEND_PORT}; location / {{ return 200 "order\\n"; }}'
    proc = nginx(topo, tmp, server, (BACKEND_PORT,))
    (scope / "cgroup.procs").write_text(str(proc.pid))  # from outside the namespace (KERNEL.md)
    assert scope.name in Path(f"/proc/{proc.pid}/cgroup").read_text()
    return proc


def curl_requests(topo: ClusterTopology) -> None:
    for _ in range(REQUESTS):
        r = topo.cli.run("curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                         f"http://{topo.vip}:{VIP_PORT}/orders/123")  # fmt: skip
        assert r.stdout == "200", r.stdout + r.stderr


def run_agent_and_traffic(
    topo: ClusterTopology,
    ingest_port: int,
    duration_s: float,
    traffic: Callable[[ClusterTopology], object] = curl_requests,
    *extra: str,
) -> str:
    """The agent in the root namespace (it sees every namespace), then the client's requests;
    returns the agent's stderr once it has exited."""
    agent = subprocess.Popen(
        [KSCOPE, "run", "--no-live", "--nat", "--conntrack-netns", topo.node.path, "--l7",
         "--processor", f"127.0.0.1:{ingest_port}", "--interval", "0.5", "--duration", str(duration_s),
         "--node-name", NODE, *extra],
        stderr=subprocess.PIPE, text=True,  # inherits the proxy-free environment
    )  # fmt: skip
    topo.procs.append(agent)  # killed by the topology's teardown if the test fails first
    assert agent.stderr is not None
    seen = []
    for line in agent.stderr:  # traffic only once the probes are attached
        seen.append(line)
        if "agent_started" in line:
            break
    else:
        raise AssertionError(f"agent did not start: exit {agent.wait(10)}: {''.join(seen)}")
    traffic(topo)
    _, rest = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest
    return "".join(seen) + rest


def dump(rx: OtlpReceiver) -> str:
    """What the receiver holds, compactly, for failure messages."""
    lines = []
    for req in rx.received["metrics"]:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    lines.append(metric.name)
    names = sorted(set(lines))
    out = [f"metrics: {names}"]
    for name in ("traces_service_graph_request_total", "http.server.request.duration", "kscope.tcp.connections"):
        out += [f"  {name} {r.get('service.name')} {a} = {v}" for r, a, v in points(rx, name)]
    out += [f"  span kind={s.kind} name={s.name} service={r.get('service.name')}" for r, s in spans(rx)]
    return "\n".join(out)


def test_pod_a_calls_service_b_through_its_vip(
    nat_topo: ClusterTopology, pod_cgroup: tuple[Path, str, str], tmp_path: Path
) -> None:
    scope, b_uid, b_cid = pod_cgroup
    start_nginx(nat_topo, tmp_path / "nginx", scope)

    async def body() -> None:
        async with cluster(nat_topo, tmp_path, b_uid, b_cid) as (rx, proc):
            stderr = await asyncio.to_thread(run_agent_and_traffic, nat_topo, proc.ingest.port, 4)
            assert "Traceback" not in stderr, stderr
            await check(rx, nat_topo.vip, lambda: f"agent stderr:\n{stderr[-4000:]}\n{dump(rx)}")

    asyncio.run(asyncio.wait_for(body(), 60))


async def check(rx: OtlpReceiver, vip: str, diag: Callable[[], str]) -> None:
    sg = "traces_service_graph_request_total"
    await eventually(lambda: latest(rx, sg, client="a", server="b") == REQUESTS, "service graph a -> b = 5", diag=diag)
    server_dur = {"service.peer.name": "a", "http.route": "/orders/{id}"}
    await eventually(lambda: latest(rx, "http.server.request.duration", B_RES, **server_dur) == REQUESTS,
                     "http.server.request.duration count 5 for b <- a on /orders/{id}", diag=diag)  # fmt: skip
    await eventually(lambda: len([s for r, s in spans(rx) if s.kind == SERVER and r.get("k8s.deployment.name") == "b"])
                     == REQUESTS, "5 SERVER spans of b", diag=diag)  # fmt: skip
    await eventually(lambda: any(s.kind == CLIENT and r.get("service.name") == "a" for r, s in spans(rx)),
                     "CLIENT spans of a", diag=diag)  # fmt: skip
    await asyncio.sleep(1.5)  # one more processor interval: nothing else (e.g. a VIP edge) may arrive late

    # The service graph: a -> b once per request, as a direct edge. Without the conntrack answer the
    # client side would only know the Service, and add a "virtual_node" a -> b series.
    graph = {
        a.get("connection_type"): v for _, a, v in points(rx, sg) if (a.get("client"), a.get("server")) == ("a", "b")
    }
    assert graph == {"": REQUESTS}, diag()
    namespaces = {(a.get("client_service_namespace"), a.get("server_service_namespace"))
                  for _, a, _ in points(rx, sg) if (a.get("client"), a.get("server")) == ("a", "b")}  # fmt: skip
    assert namespaces == {("default", "default")}, namespaces
    # b's nginx listened before the agent started: the start-up walk found it, and its accept queue
    # reached the processor as b's, on the port it listens on.
    assert latest(rx, "kscope.tcp.listen.queue.limit", B_RES, **{"server.port": BACKEND_PORT}) > 0, diag()
    assert latest(rx, "traces_service_graph_request_client_seconds", client="a", server="b") == REQUESTS, diag()
    assert latest(rx, "traces_service_graph_request_server_seconds", client="a", server="b") == REQUESTS, diag()
    assert latest(rx, "http.server.request.duration", B_RES, **server_dur) == REQUESTS, diag()
    # The client side of the same calls: the peer is b-1's Deployment on the port that answered
    # (8080), not the Service on its port 80 (the socket only ever knew the VIP).
    to_b = {"service.peer.name": "b", "peer.k8s.deployment.name": "b", "server.port": BACKEND_PORT}
    client_dur = {**to_b, "http.route": "/orders/{id}", "http.response.status_code": 200}
    assert latest(rx, "http.client.request.duration", A_RES, **client_dur) == REQUESTS, diag()
    # L4 for the a -> b edge: one connection per curl, bytes both ways.
    assert latest(rx, "kscope.tcp.connections", A_RES, **to_b) == REQUESTS, diag()
    assert latest(rx, "kscope.tcp.connect.duration", A_RES, **to_b) == REQUESTS, diag()
    tx = latest(rx, "kscope.tcp.bytes", A_RES, **to_b, **{"network.io.direction": "transmit"})
    rx_bytes = latest(rx, "kscope.tcp.bytes", A_RES, **to_b, **{"network.io.direction": "receive"})
    assert tx >= REQUESTS * len("GET /orders/123 HTTP/1.1\r\n") and rx_bytes >= REQUESTS * len("order\n"), diag()
    a_side = [(r, a) for name in ("kscope.tcp.bytes", "kscope.tcp.connections", "http.client.request.duration")
              for r, a, _ in points(rx, name) if r.get("service.name") == "a"]  # fmt: skip
    assert a_side and not [a for _, a in a_side if "peer.k8s.service.name" in a], a_side
    # a's own identity is its resource (with the writer's instance id), never repeated on its points.
    assert all(r == {**A_RES, "service.instance.id": r["service.instance.id"]} for r, _ in a_side), a_side
    assert not [a for _, a in a_side if "service.name" in a or "k8s.deployment.name" in a], a_side
    # Spans (the agent sees the whole machine: other tests' traffic is there too, named otherwise):
    # 5 SERVER spans of deployment b (pod b-1) for our route, CLIENT spans of a calling it.
    server_spans = [s for r, s in spans(rx) if s.kind == SERVER and r.get("k8s.deployment.name") == "b"]
    assert len(server_spans) == REQUESTS, diag()
    assert all(kv(s.attributes).get("url.path") == "/orders/123" for s in server_spans), server_spans
    b_res = [r for r, s in spans(rx) if s.kind == SERVER and r.get("k8s.deployment.name") == "b"]
    assert all(r["service.name"] == "b" and r["k8s.pod.name"] == "b-5d8f7c9b6d-1" for r in b_res), b_res
    client_spans = [s for r, s in spans(rx) if s.kind == CLIENT and r.get("service.name") == "a"]
    assert len(client_spans) == REQUESTS, diag()
    a_res = [r for r, s in spans(rx) if s.kind == CLIENT and r.get("service.name") == "a"]
    assert all(r["k8s.pod.name"] == "a-5d8f7c9b6d-1" and r["k8s.deployment.name"] == "a" for r in a_res), a_res
    # Never the VIP as a workload, anywhere; every stream written for node-1.
    for req in rx.received["metrics"]:
        for rm in req.resource_metrics:
            assert kv(rm.resource.attributes).get("k8s.node.name") == NODE, rm.resource
    for name in {mt.name for req in rx.received["metrics"] for rm in req.resource_metrics
                 for sm in rm.scope_metrics for mt in sm.metrics}:  # fmt: skip
        for res, attrs, _ in points(rx, name):
            assert vip not in str(attrs), (name, attrs)
            assert res.get("k8s.node.name") == NODE, (name, res)
    for res, _ in spans(rx):
        assert res.get("k8s.node.name") == NODE, res
        assert res.get("service.name") != vip, res


def test_requests_summed_in_the_kernel_count_in_the_metrics(
    nat_topo: ClusterTopology, pod_cgroup: tuple[Path, str, str], tmp_path: Path
) -> None:
    """Keep-alive load past the agent's --l7-record-rate: most requests leave the kernel as summaries,
    yet b's request-duration histogram and the service graph count every request wrk completed,
    while spans are only the sampled ones."""
    scope, b_uid, b_cid = pod_cgroup
    start_nginx(nat_topo, tmp_path / "nginx", scope)
    conns, rate = 2, 20
    completed: list[int] = []

    def wrk(topo: ClusterTopology) -> None:
        out = topo.cli.run("wrk", "-t1", f"-c{conns}", "-d1s", f"http://{topo.vip}:{VIP_PORT}/orders/123").stdout
        found = re.search(r"(\d+) requests in", out)
        assert found is not None and "Socket errors" not in out and "Non-2xx" not in out, out
        completed.append(int(found.group(1)))

    async def body() -> None:
        async with cluster(nat_topo, tmp_path, b_uid, b_cid) as (rx, proc):
            stderr = await asyncio.to_thread(
                run_agent_and_traffic, nat_topo, proc.ingest.port, 3, wrk, "--l7-record-rate", str(rate)
            )
            assert "Traceback" not in stderr, stderr
            n = completed[0]
            assert n > 50 * rate, f"wrk did only {n} requests"

            server_dur = {"service.peer.name": "a", "http.route": "/orders/{id}"}
            client_dur = {"service.peer.name": "b", "http.route": "/orders/{id}"}

            def counts() -> tuple[float, float, float]:
                return (latest(rx, "http.server.request.duration", B_RES, **server_dur),
                        latest(rx, "http.client.request.duration", A_RES, **client_dur),
                        latest(rx, "traces_service_graph_request_total", client="a", server="b"))  # fmt: skip

            def losses() -> dict[str, float]:
                """What the agent counted as lost (this agent saw only this test's traffic): a request
                may be missing from a count only if counted here (e.g. a ring full on a loaded machine)."""
                found = {c: latest(rx, AGENT_STAT, **{AGENT_STAT_NAME: c}) for c in AGENT_LOSS_COUNTERS}
                return {c: v for c, v in found.items() if v}

            def diag() -> str:
                return f"wrk: {n}\n(server, client, graph): {counts()}\nagent losses: {losses()}\n" \
                       f"agent stderr:\n{stderr[-3000:]}\n{dump(rx)}"  # fmt: skip

            await eventually(lambda: min(counts()) >= n - sum(losses().values()),
                             f"server, client and graph counts >= {n} (less what the agent counted lost)",
                             diag=diag)  # fmt: skip
            await asyncio.sleep(1.5)  # one more processor interval: nothing may arrive late
            floor = n - sum(losses().values())
            server, client, graph = counts()
            # at most one request per connection in flight when wrk stopped: sent, never answered
            assert floor <= server <= n + conns and floor <= client <= n + conns and floor <= graph <= n + conns, diag()
            seconds = latest(rx, "traces_service_graph_request_server_seconds", client="a", server="b")
            assert seconds == graph, diag()
            b_spans = [s for r, s in spans(rx) if s.kind == SERVER and r.get("k8s.deployment.name") == "b"]
            assert 0 < len(b_spans) < n / 10, (len(b_spans), n)  # sampled: the rest were summed

    asyncio.run(asyncio.wait_for(body(), 60))
