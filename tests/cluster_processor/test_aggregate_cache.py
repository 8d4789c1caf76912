"""The aggregator's resolution caches: random records aggregated with the caches give exactly what
resolving every record afresh gives (``max_resolutions=0``); an index change is seen at once; tiny
bounds still give the same answers."""

from __future__ import annotations

import random

import pytest

from cluster_processor.aggregate import Aggregator, AggregatorSettings
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import model
from cluster_processor.otlp.model import attr
from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import to_columns
from tests.cluster_processor.kube import factories as f

T0 = 1_700_000_000_000_000_000
S = 1_000_000_000
PODS = {f"p{i}": f"10.1.{i // 4}.{i % 4 + 2}" for i in range(12)}
VIPS = {f"svc{d}": f"10.96.0.{d + 1}" for d in range(3)}
NODE_IPS = {"node-1": "192.168.0.1", "node-2": "192.168.0.2"}
OTHER = ["203.0.113.7", "198.51.100.1", "::ffff:10.1.0.2", "10.9.9.9"]  # external, mapped IPv4, unknown


def build_index() -> KubeIndex:
    ix = KubeIndex()
    for n, ip in NODE_IPS.items():
        ix.apply("ADDED", "Node", f.node(n, internal=ip, uid=f"uid-{n}"))
    for d in range(3):
        ix.apply("ADDED", "Deployment", f.workload(f"d{d}", uid=f"dep-{d}"))
        owners = [f.owner("Deployment", f"d{d}", f"dep-{d}")]
        ix.apply("ADDED", "ReplicaSet", f.workload(f"d{d}-5d8f7c9b6d", uid=f"rs-{d}", owners=owners))
        ix.apply("ADDED", "Service", f.service(f"svc{d}", uid=f"svc-{d}", cluster_ips=[VIPS[f"svc{d}"]]))
    for i, (name, ip) in enumerate(PODS.items()):
        owners = [f.owner("ReplicaSet", f"d{i % 3}-5d8f7c9b6d", f"rs-{i % 3}")] if i < 10 else []
        ix.apply("ADDED", "Pod", f.pod(name, uid=f"uid-{name}", ip=ip, node=f"node-{i % 2 + 1}", owners=owners,
                                       containers=[f"containerd://{f.cid(i)}"]))  # fmt: skip
    # svc0's ready endpoints are all d0's pods (named d0), svc1's are d1's and d2's (named svc1); svc2 has none
    for svc, pods in (("svc0", ["p0", "p3"]), ("svc1", ["p1", "p2"])):
        endpoints = [(PODS[p], f"uid-{p}") for p in pods]
        ix.apply("ADDED", "EndpointSlice", f.endpoint_slice(f"{svc}-x", svc, endpoints, uid=f"es-{svc}"))
    return ix


def random_process(r: random.Random) -> pb.ProcessIdentity:
    i = r.randrange(len(PODS))
    x = r.random()
    if x < 0.6:
        return pb.ProcessIdentity(pid=i, pod_uid=f"uid-p{i}")
    if x < 0.75:
        return pb.ProcessIdentity(pid=i, container_id=f.cid(i))
    if x < 0.85:
        return pb.ProcessIdentity(pid=i, host_process=True)
    if x < 0.92:
        return pb.ProcessIdentity(pid=i, container_id="ab" * 32)  # a container the index does not know
    return pb.ProcessIdentity(pid=i)


def random_ends(r: random.Random) -> dict[str, object]:
    local = r.choice([*PODS.values(), *NODE_IPS.values()])
    x = r.random()
    nat_ip, nat_port = "", 0
    if x < 0.4:
        remote, port = r.choice(list(VIPS.values())), r.choice([80, 443])
        if r.random() < 0.7:
            nat_ip, nat_port = r.choice([*PODS.values(), *NODE_IPS.values(), "10.200.0.1"]), r.choice([0, 8080, 9090])
    elif x < 0.8:
        remote, port = r.choice([*PODS.values(), *NODE_IPS.values()]), r.choice([8080, 9090, r.randint(32768, 60999)])
    else:
        remote, port = r.choice(OTHER), r.choice([443, 53])
    return {"local_ip": local, "local_port": r.choice([8080, r.randint(32768, 60999)]), "remote_ip": remote,
            "remote_port": port, "nat_remote_ip": nat_ip, "nat_remote_port": nat_port}  # fmt: skip


def random_batch(r: random.Random, node: str, k: int) -> pb.FlowBatch:
    b = pb.FlowBatch(schema_version=1, node_name=node, time_unix_nano=T0 + k * S)
    cookies = list(range(1, 30))
    for _ in range(r.randrange(20, 60)):
        ends = random_ends(r)
        role = r.choice([pb.ROLE_CLIENT, pb.ROLE_CLIENT, pb.ROLE_SERVER, pb.ROLE_LISTENER, pb.ROLE_UNSPECIFIED])
        fl = pb.L4Flow(socket_cookie=r.choice(cookies), netns_inode=4026531840 + r.randrange(3), role=role,
                       kind=r.choice([pb.RECORD_KIND_PERIODIC, pb.RECORD_KIND_CLOSE]), ip_family=4,
                       process=random_process(r), time_unix_nano=T0 + k * S, srtt_us=r.randint(0, 900),
                       connect_status=r.choice([0, pb.CONNECT_STATUS_OK, pb.CONNECT_STATUS_REFUSED]),
                       connect_latency_ns=r.randint(0, 10**7), **ends)  # fmt: skip
        fl.delta.bytes_sent, fl.delta.bytes_received = r.randint(0, 10**6), r.randint(0, 10**6)
        fl.delta.resets_received = int(r.random() < 0.05)
        b.l4.append(fl)
    for _ in range(r.randrange(0, 30)):
        ends = random_ends(r)
        if r.random() < 0.7:  # L7 takes its socket's NAT answer; a UDP record (no socket's) has its own
            del ends["nat_remote_ip"], ends["nat_remote_port"]
        q = pb.L7Request(socket_cookie=r.choice(cookies), netns_inode=4026531840 + r.randrange(3),
                         side=r.choice([pb.ROLE_CLIENT, pb.ROLE_SERVER]), protocol=r.choice(["http1", "dns"]),
                         ip_family=4, process=random_process(r), start_time_unix_nano=T0 + k * S,
                         latency_ns=r.randint(1, 10**9), **ends)  # fmt: skip
        if q.protocol == "dns":
            q.dns.question_name, q.dns.rcode = "x.example.", r.choice(["", "NXDOMAIN"])
        else:
            q.http.method, q.http.route = r.choice(["GET", "POST"]), r.choice(["/a/{id}", ""])
            q.http.status_code = r.choice([200, 404, 503, 0])
        b.l7.append(q)
    return b


@pytest.mark.parametrize(("seed", "limit"), [(1, 65_536), (2, 65_536), (3, 3), (4, 1)])
def test_cached_resolution_equals_resolving_every_record(seed: int, limit: int) -> None:
    r = random.Random(seed)
    batches = [[random_batch(r, n, k) for n in ("node-1", "node-2", "node-1")] for k in range(4)]
    index = build_index()
    reference = Aggregator(index, AggregatorSettings(max_resolutions=0))
    cached = Aggregator(index, AggregatorSettings(max_resolutions=limit))
    for k, interval in enumerate(batches):
        model._RNG.seed(k)
        for b in interval:
            reference.add(b, T0 + k * S)
        want = reference.flush(T0 + (k + 1) * S)
        model._RNG.seed(k)
        for b in interval:
            cached.add(b, T0 + k * S)
        got = cached.flush(T0 + (k + 1) * S)
        assert got == want, k
        sizes = cached._resolutions.sizes()
        assert max(sizes["locals"], sizes["remotes"], sizes["routes"]) <= limit
    assert cached.counters() == reference.counters()
    assert reference.counters()["unresolved_local"] and reference.counters()["external_remote"]


def as_form(batch: pb.FlowBatch, form: str) -> pb.FlowBatch:
    """``batch`` as an agent of that form ships it: L4 rows (schema_version 1) or L4Columns (2)."""
    if form == "rows":
        return batch
    out = pb.FlowBatch(schema_version=2, node_name=batch.node_name, time_unix_nano=batch.time_unix_nano)
    out.l4_columns.CopyFrom(to_columns(batch.l4))
    out.l7.extend(batch.l7)
    return out


@pytest.mark.parametrize("form", ["rows", "columns"])
def test_an_index_change_is_seen_by_the_next_batch(form: str) -> None:
    index = build_index()
    agg = Aggregator(index)
    new_ip = "10.1.7.7"
    flow = pb.L4Flow(socket_cookie=1, role=pb.ROLE_CLIENT, local_ip=PODS["p0"], local_port=40000, remote_ip=new_ip,
                     remote_port=8080, ip_family=4, process=pb.ProcessIdentity(pod_uid="uid-p0"))  # fmt: skip
    flow.delta.bytes_sent = 1
    batch = as_form(pb.FlowBatch(schema_version=1, node_name="node-1", l4=[flow]), form)
    agg.add(batch, T0)
    (before,) = agg.flush(T0 + S)
    assert attr(before.interval.l4[0].edge.server, "server.address") == new_ip  # external: kept as an address
    owners = [f.owner("ReplicaSet", "d1-5d8f7c9b6d", "rs-1")]
    index.apply("ADDED", "Pod", f.pod("late", uid="uid-late", ip=new_ip, node="node-2", owners=owners))
    agg.add(batch, T0 + S)
    (after,) = agg.flush(T0 + 2 * S)
    server = after.interval.l4[0].edge.server
    assert attr(server, "k8s.deployment.name") == "d1" and attr(server, "server.address") is None
    # The local end too: a container younger than the index names only its node, then its pod.
    young = f.cid(99)
    young_flow = pb.L4Flow()
    young_flow.CopyFrom(flow)
    young_flow.process.CopyFrom(pb.ProcessIdentity(container_id=young))
    young_flow.local_ip = "10.1.7.8"
    young_batch = as_form(pb.FlowBatch(schema_version=1, node_name="node-1", l4=[young_flow]), form)
    agg.add(young_batch, T0 + 2 * S)
    (young_before,) = agg.flush(T0 + 3 * S)
    assert attr(young_before.interval.l4[0].edge.client, "k8s.deployment.name") is None
    index.apply("ADDED", "Pod", f.pod("young", uid="uid-young", ip="10.1.7.8", node="node-1", owners=owners,
                                      containers=[f"containerd://{young}"]))  # fmt: skip
    agg.add(young_batch, T0 + 3 * S)
    (young_after,) = agg.flush(T0 + 4 * S)
    assert attr(young_after.interval.l4[0].edge.client, "k8s.deployment.name") == "d1"
    assert agg.counters()["unresolved_local"] == 1
    # And a delete, once its grace is over, is seen too.
    index = KubeIndex(delete_grace_s=0)
    agg = Aggregator(index)
    index.apply("ADDED", "Pod", f.pod("late", uid="uid-late", ip=new_ip, node="node-2", owners=owners))
    agg.add(batch, T0)
    assert attr(agg.flush(T0 + S)[0].interval.l4[0].edge.server, "k8s.deployment.name") == "d1"
    index.apply("DELETED", "Pod", f.pod("late", uid="uid-late", ip=new_ip, node="node-2", owners=owners))
    agg.add(batch, T0 + S)
    assert attr(agg.flush(T0 + 2 * S)[0].interval.l4[0].edge.server, "server.address") == new_ip


def test_generation_moves_with_every_change() -> None:
    now = [0.0]
    ix = KubeIndex(delete_grace_s=5, clock=lambda: now[0])
    g0 = ix.generation
    ix.apply("ADDED", "Pod", f.pod("a", uid="uid-a", ip="10.0.0.1"))
    g1 = ix.generation
    ix.apply("DELETED", "Pod", f.pod("a", uid="uid-a", ip="10.0.0.1"))
    g2 = ix.generation
    assert g0 < g1 < g2
    assert ix.expire() == 0 and ix.generation == g2  # nothing released: nothing changed
    now[0] = 10.0
    assert ix.expire() > 0 and ix.generation > g2
    g3 = ix.generation
    ix.replace("Service", [])
    assert ix.generation > g3
    assert not ix.apply("BOGUS", "Pod", f.pod("b", uid="uid-b")) and ix.generation == g3 + 1


def test_an_endpoint_slice_change_renames_a_vip_peer_in_the_next_batch() -> None:
    """A DNS client record to svc0's VIP without a NAT answer: svc0's ready endpoints are d0's pods, so d0;
    once a d1 pod is a ready endpoint too, svc0; a UDP record's own NAT answer names its backend pod."""
    index = build_index()
    agg = Aggregator(index)
    q = pb.L7Request(socket_cookie=5, side=pb.ROLE_CLIENT, protocol="dns", local_ip=PODS["p4"], local_port=40000,
                     remote_ip=VIPS["svc0"], remote_port=53, ip_family=4, process=pb.ProcessIdentity(pod_uid="uid-p4"),
                     start_time_unix_nano=T0, latency_ns=10**6)  # fmt: skip
    q.dns.question_name = "x.example."

    def server_of(nat: tuple[str, int] = ("", 0)) -> tuple[str, object]:
        r = pb.L7Request()
        r.CopyFrom(q)
        r.nat_remote_ip, r.nat_remote_port = nat
        agg.add(pb.FlowBatch(schema_version=1, node_name="node-1", l7=[r]), T0)
        (red,) = agg.flush(T0 + S)[0].interval.red
        return model.graph_node_name(red.edge.server), attr(red.edge.server, "kscope.peer.resolved_by")

    assert server_of() == ("d0", "service")
    slice_ = [(PODS[p], f"uid-{p}") for p in ("p0", "p3", "p1")]
    index.apply("MODIFIED", "EndpointSlice", f.endpoint_slice("svc0-x", "svc0", slice_, uid="es-svc0"))
    assert server_of() == ("svc0", None)
    assert server_of((PODS["p1"], 5353)) == ("d1", None)  # the agent's conntrack answer for a UDP flow
    index.apply("MODIFIED", "EndpointSlice", f.endpoint_slice("svc0-x", "svc0", slice_, uid="es-svc0",
                                                               not_ready={PODS["p1"]}))  # fmt: skip
    assert server_of() == ("d0", "service")
