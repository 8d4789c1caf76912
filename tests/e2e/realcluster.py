"""The real-shaped cluster of issue 12, run once: Bookinfo's chain behind Service VIPs and a cluster DNS.

On one node (:class:`MeshTopology`): loadgen -> productpage -> reviews -> ratings, each hop a real
HTTP server (``meshapp.py``) that calls the next by its Service DNS name through glibc's resolver,
with the kubelet's ``search <ns>.svc.cluster.local svc.cluster.local cluster.local`` and
``ndots:5``; the nameserver is the kube-dns VIP, DNAT'ed (UDP and TCP 53) to dnsmasq in the
coredns pod, which answers the cluster names and forwards the rest to an upstream that answers
SERVFAIL. productpage calls ``reviews.default`` (its first search expansion is NXDOMAIN) and tries
``details``, whose only backend drops every packet (its connects time out, conntrack never answers);
reviews also looks up an external name per request (NXDOMAIN x3, then SERVFAIL, retried), and 30 % of
the packets between reviews and ratings are dropped in the node's FORWARD chain.

``kscope run --nat --l7`` ships to the processor (in process), which names workloads from a test
APIServer (Deployments, ReplicaSets, Pods, Services, EndpointSlices) and exports to a test OTLP
receiver. :func:`run_scene` returns what the receiver got, and the ground truth the programs
themselves logged (requests served, dnsmasq's query log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster_processor.otlp.exporter import Signal
from tests.cluster_processor.kube import factories as f
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.e2e.agentproc import AgentProcess
from tests.e2e.l7trace import l7peer
from tests.e2e.meshtopo import MeshTopology
from tests.e2e.test_cluster import KSCOPE, NODE, processor_config

if TYPE_CHECKING:
    from cluster_processor.main import Processor

MESHAPP = Path(__file__).with_name("meshapp.py")
APP_NS, DNS_NS = "default", "kube-system"
PORT = 9080
RATE, LOAD_S = 3.0, 20.0  # loadgen: requests per second, seconds
LOSS = 0.3
EXTERNAL = "api.payments.example"  # its upstream answers SERVFAIL
PRIVATE = "jason"  # in loadgen's query string: must never leave
# Deployment -> Service in front of it (loadgen has none; upstream-dns is no pod of the cluster).
SERVICE_OF = {"productpage-v1": "productpage", "reviews-v2": "reviews", "ratings-v1": "ratings",
              "details-v1": "details", "coredns": "kube-dns"}  # fmt: skip
WORKLOAD_NS = {"loadgen": APP_NS, "productpage-v1": APP_NS, "reviews-v2": APP_NS, "ratings-v1": APP_NS,
               "details-v1": APP_NS, "coredns": DNS_NS}  # fmt: skip
VIP_HOST = {"kube-dns": 10, "productpage": 20, "reviews": 21, "ratings": 22, "details": 23}
BLACKHOLED = "details-v1"  # every packet to it dropped: productpage's calls to details never connect
HTTP_EDGES = (("loadgen", "productpage-v1"), ("productpage-v1", "reviews-v2"), ("reviews-v2", "ratings-v1"))
LOSSY_EDGE = ("reviews-v2", "ratings-v1")
DNS_CALLERS = ("loadgen", "productpage-v1", "reviews-v2")
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "grpc_proxy")
_QUERY = re.compile(r"query\[(\w+)\] (\S+) from (\S+)")


@dataclass
class Scene:
    rx: OtlpReceiver  # stopped; its ``received`` holds every export
    ips: dict[str, str]  # pod -> address
    served: dict[str, Counter[int]]  # server workload -> status (0: unanswered) -> requests it received
    load: dict[str, Any]  # loadgen's ``done`` line
    dns_queries: Counter[tuple[str, str]]  # (caller workload, question name) -> queries dnsmasq logged
    dropped: int  # packets the loss rule dropped
    run_s: float  # from the agent's start to the last export
    agent_log: str
    processor_counters: dict[str, int] = field(default_factory=dict)


def populate(server: FakeApiServer, topo: MeshTopology) -> None:
    """Deployments through ReplicaSets, their pods at the namespaces' addresses, Services with the
    VIPs and EndpointSlices naming the backend pods, the node."""
    uids = {}
    for name, ns in WORKLOAD_NS.items():
        rs_name, dep_uid, rs_uid = f"{name}-7d4b9c8f5", str(uuid.uuid4()), str(uuid.uuid4())
        server.put("Deployment", f.workload(name, namespace=ns, uid=dep_uid))
        server.put("ReplicaSet", f.workload(rs_name, namespace=ns, uid=rs_uid,
                                            owners=[f.owner("Deployment", name, dep_uid)]))  # fmt: skip
        _, uids[name], cid = topo.containers[name]
        server.put("Pod", f.pod(f"{rs_name}-x2k4q", namespace=ns, uid=uids[name], ip=topo.ips[name], node=NODE,
                                owners=[f.owner("ReplicaSet", rs_name, rs_uid)],
                                containers=[f"containerd://{cid}"]))  # fmt: skip
    for workload, svc in SERVICE_OF.items():
        ns = WORKLOAD_NS[workload]
        port, protos = (53, ("UDP", "TCP")) if svc == "kube-dns" else (PORT, ("TCP",))
        ports = [{"name": p.lower(), "port": port, "targetPort": port, "protocol": p} for p in protos]
        obj = f.service(svc, namespace=ns, cluster_ips=[topo.vip(VIP_HOST[svc])])
        obj["spec"]["ports"] = ports
        server.put("Service", obj)
        eps = f.endpoint_slice(f"{svc}-abcde", svc, [(topo.ips[workload], uids[workload])], namespace=ns)
        eps["endpoints"][0]["targetRef"]["name"] = f"{workload}-7d4b9c8f5-x2k4q"
        eps["ports"] = [{"name": p["name"], "port": port, "protocol": p["protocol"]} for p in ports]
        server.put("EndpointSlice", eps)
    server.put("Node", f.node(NODE, internal=topo.node_gw))


def build(topo: MeshTopology, tmp: Path) -> None:
    """Namespaces, Services, loss, resolv.conf files, upstream DNS, dnsmasq and the HTTP servers."""
    for name in WORKLOAD_NS:
        topo.add_pod(name)
    topo.add_pod("upstream-dns", container=False)  # off the cluster in spirit: no pod, no container
    for workload, svc in SERVICE_OF.items():
        vip = topo.vip(VIP_HOST[svc])
        if svc == "kube-dns":
            topo.service(vip, 53, workload, 53, "udp")
            topo.service(vip, 53, workload, 53, "tcp")
        else:
            topo.service(vip, PORT, workload, PORT)
    topo.lossy(*LOSSY_EDGE, LOSS)
    topo.blackhole(BLACKHOLED)
    for name in ("loadgen", "productpage-v1", "reviews-v2", "ratings-v1", "details-v1"):
        topo.resolv_conf(name, topo.vip(VIP_HOST["kube-dns"]), APP_NS)

    upstream = l7peer(topo, topo.pods["upstream-dns"], "servfail", "--bind", topo.ips["upstream-dns"], "--port", "53")
    upstream.expect("listening")
    records = [f"--host-record={svc}.{WORKLOAD_NS[w]}.svc.cluster.local,{topo.vip(VIP_HOST[svc])}"
               for w, svc in SERVICE_OF.items()]  # fmt: skip
    topo.start("coredns", "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
               "--user=root", "--port=53", f"--listen-address={topo.ips['coredns']}", "--bind-interfaces",
               "--local=/cluster.local/", f"--server={topo.ips['upstream-dns']}", *records, "--log-queries",
               f"--pid-file={tmp}/dnsmasq.pid", f"--log-facility={tmp}/dnsmasq.log",
               stderr=(tmp / "dnsmasq.stderr").open("w"))  # fmt: skip
    # (--no-daemon echoes its log on stderr: a pipe nobody reads fills up and dnsmasq stops answering.)
    topo.wait_listening(topo.pods["coredns"], 53)

    apps = {
        "details-v1": [],
        "ratings-v1": [],
        "reviews-v2": ["--next", f"http://ratings:{PORT}/ratings/0", "--lookup", EXTERNAL, "--timeout", "8"],
        "productpage-v1": [
            "--next",
            f"http://reviews.{APP_NS}:{PORT}/reviews/0",
            "--timeout",
            "25",
            "--also",
            f"http://details:{PORT}/details/0",
        ],
    }
    for name, extra in apps.items():
        out, err = (tmp / f"{name}.jsonl").open("w"), (tmp / f"{name}.stderr").open("w")
        topo.start(name, sys.executable, "-u", str(MESHAPP), "serve", "--name", name,
                   "--bind", topo.ips[name], "--port", str(PORT), *extra, stdout=out, stderr=err)  # fmt: skip
        topo.wait_listening(topo.pods[name], PORT)
    # The resolver path works before anything is measured (the agent is not running yet).
    got = topo.pods["productpage-v1"].run("getent", "ahostsv4", f"reviews.{APP_NS}").stdout
    assert topo.vip(VIP_HOST["reviews"]) in got, got


class Agent(AgentProcess):
    """``kscope run --nat --l7`` in the root namespace (it sees every namespace)."""

    def __init__(self, topo: MeshTopology, ingest_port: int) -> None:
        super().__init__(
            [KSCOPE, "run", "--no-live", "--nat", "--conntrack-netns", topo.node.path, "--l7",
             "--processor", f"127.0.0.1:{ingest_port}", "--interval", "0.5", "--duration", "150",
             "--node-name", NODE],
            topo.procs,
        )  # fmt: skip


def run_load(topo: MeshTopology, duration_s: float = LOAD_S) -> dict[str, Any]:
    """loadgen's requests, from inside its container's cgroup; its ``done`` line."""
    return meshapp_load(topo, f"http://productpage:{PORT}/productpage?u={PRIVATE}", RATE, duration_s, 40)


def meshapp_load(topo: MeshTopology, url: str, rate: float, duration_s: float, timeout_s: float,
                 *extra: str) -> dict[str, Any]:  # fmt: skip
    """``meshapp.py load`` in the loadgen pod, started once it is in its container's cgroup; its
    ``done`` line."""
    proc = topo.start("loadgen", sys.executable, str(MESHAPP), "load", "--url", url, "--rate", str(rate),
                      "--duration", str(duration_s), "--timeout", str(timeout_s), "--gate", *extra,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate("go\n", timeout=duration_s + timeout_s + 30)
    assert proc.returncode == 0, err
    done: dict[str, Any] = json.loads(out.splitlines()[-1])
    return done


def served(tmp: Path, name: str) -> Counter[int]:
    lines = (tmp / f"{name}.jsonl").read_text().splitlines()
    events = [e for e in map(json.loads, lines) if e.get("event") == "served"]
    return Counter(int(e["status"]) if e["answered"] else 0 for e in events)


def dns_queries(log: str, ips: dict[str, str]) -> Counter[tuple[str, str]]:
    who = {ip: name for name, ip in ips.items()}
    return Counter((who.get(ip, ip), name) for _, name, ip in _QUERY.findall(log))


@contextlib.asynccontextmanager
async def apiserver(tmp: Path, fill: Callable[[FakeApiServer], None]) -> AsyncIterator[Path]:
    """A test APIServer that ``fill`` put the scene's objects in; its kubeconfig."""
    server = FakeApiServer()
    await server.start()
    try:
        fill(server)
        yield server.write_kubeconfig(tmp / "kubeconfig")
    finally:
        await server.close()


async def run_scene(topo: MeshTopology, tmp: Path) -> Scene:
    from cluster_processor import main as m

    async with (
        apiserver(tmp, lambda server: populate(server, topo)) as kubeconfig,
        OtlpReceiver() as rx,
        m.Processor(processor_config(kubeconfig, rx.endpoint)) as proc,
    ):
        assert proc.watcher is not None and await proc.watcher.wait_synced(10)
        agent = Agent(topo, proc.ingest.port)
        await asyncio.to_thread(agent.wait_started)
        t0 = time.monotonic()
        log_from = (tmp / "dnsmasq.log").stat().st_size  # only queries the agent can have seen
        load = await asyncio.to_thread(run_load, topo)
        agent_log = await asyncio.to_thread(agent.stop)
        truth = {name: served(tmp, name) for name in ("productpage-v1", "reviews-v2", "ratings-v1")}
        with (tmp / "dnsmasq.log").open() as fh:
            fh.seek(log_from)
            queries = dns_queries(fh.read(), topo.ips)
        await settle(rx, proc, truth, queries)
        # the aggregator's, the trace join's and the span exporter's counters: for failure messages
        traces = proc.exporter.stats()[Signal.TRACES]
        outcomes = ("submitted", "exported", "rejected", "dropped_queue_full", "dropped_non_retryable",
                    "dropped_retry_exhausted", "queued")  # fmt: skip
        counters = {**proc.aggregator.counters(), **proc.join.counters, "join_held": proc.join.sizes()["held"],
                    **{f"otlp_spans_{k}": getattr(traces, k) for k in outcomes}}  # fmt: skip
        return Scene(rx, dict(topo.ips), truth, load, queries,
                     topo.dropped(), time.monotonic() - t0, agent_log, counters)  # fmt: skip


async def settle(
    rx: OtlpReceiver, proc: Processor, truth: dict[str, Counter[int]], queries: Counter[tuple[str, str]]
) -> None:
    """Until the server sides of the chain and of the DNS server have reached what the programs
    themselves counted (or a deadline: the tests then say what is missing), then two more processor
    intervals delivered: the agent has stopped, so they hold whatever arrived late."""
    from tests.e2e.otlpview import View

    want_http = sum(truth["ratings-v1"].values())
    want_dns = sum(n for (caller, _), n in queries.items() if caller in DNS_CALLERS)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        v = View(rx)
        if v.total("http.server.request.duration", "ratings-v1") >= want_http and \
                v.total("kscope.dns.server.request.duration", "coredns") >= want_dns:  # fmt: skip
            break
        await asyncio.sleep(0.2)
    deadline = time.monotonic() + 10
    while proc.join.sizes()["held"] and time.monotonic() < deadline:  # no span waiting for its trace,
        await asyncio.sleep(0.05)
    ticks = proc.ticks + 2  # and the ones it released exported at a tick after that
    deadline = time.monotonic() + 10
    while proc.ticks < ticks and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await proc.exporter.flush(10)
