"""Naming both ends of a flow over a KubeIndex filled through its public apply() with raw API objects."""

from __future__ import annotations

import pytest

from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp.model import Side, attr, graph_node_name
from cluster_processor.otlp.semconv import metric_attributes
from cluster_processor.resolve import (
    EdgeOptions,
    EndpointKind,
    How,
    edge,
    resolve_l4,
    resolve_l7,
    resolve_local,
    resolve_remote,
)
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor.kube import factories as f

NODE = "node-1"
A_IP, B_IP, VIP, NODE_IP, HOST_POD_IP = "10.1.0.5", "10.1.1.7", "10.96.0.20", "192.168.1.10", "192.168.1.10"


@pytest.fixture
def index() -> KubeIndex:
    ix = KubeIndex()
    ix.apply("ADDED", "Deployment", f.workload("a", uid="dep-a"))
    ix.apply(
        "ADDED", "ReplicaSet", f.workload("a-5d8f7c9b6d", uid="rs-a", owners=[f.owner("Deployment", "a", "dep-a")])
    )
    ix.apply("ADDED", "StatefulSet", f.workload("b", uid="ss-b"))
    owners_a = [f.owner("ReplicaSet", "a-5d8f7c9b6d", "rs-a")]
    ix.apply(
        "ADDED", "Pod", f.pod("a-1", uid="uid-a1", ip=A_IP, owners=owners_a, containers=[f"containerd://{f.cid(1)}"])
    )
    ix.apply(
        "ADDED", "Pod", f.pod("b-0", uid="uid-b0", ip=B_IP, node="node-2", owners=[f.owner("StatefulSet", "b", "ss-b")])
    )
    ix.apply("ADDED", "Pod", f.pod("bare", uid="uid-bare", ip="10.1.0.9"))
    ix.apply("ADDED", "Pod", f.pod("hostnet", uid="uid-h", ip=HOST_POD_IP, host_network=True))
    ix.apply("ADDED", "Service", f.service("b", cluster_ips=[VIP]))
    ix.apply("ADDED", "Node", f.node(NODE, internal=NODE_IP))
    return ix


def test_local_by_pod_uid_first(index: KubeIndex) -> None:
    # The UID wins even when the address says otherwise (a stale or shared IP).
    ep = resolve_local(index, NODE, pb.ProcessIdentity(pod_uid="uid-a1"), B_IP)
    assert (ep.kind, ep.how) == (EndpointKind.POD, How.POD_UID)
    assert dict(ep.attributes) == {
        "k8s.namespace.name": "default",
        "k8s.pod.name": "a-1",
        "k8s.deployment.name": "a",
        "k8s.node.name": "node-1",
        "service.name": "a",
    }


def test_local_by_container_id_then_ip(index: KubeIndex) -> None:
    ep = resolve_local(index, NODE, pb.ProcessIdentity(pod_uid="gone", container_id=f.cid(1)), "")
    assert (ep.how, attr(ep.attributes, "k8s.pod.name")) == (How.CONTAINER_ID, "a-1")
    ep = resolve_local(index, NODE, pb.ProcessIdentity(), "::ffff:" + B_IP)
    assert (ep.how, attr(ep.attributes, "k8s.statefulset.name")) == (How.POD_IP, "b")


def test_local_host_process_is_the_reporting_node(index: KubeIndex) -> None:
    # A host-network pod's address is the node's: never the pod.
    ep = resolve_local(index, NODE, pb.ProcessIdentity(host_process=True, pid=1), HOST_POD_IP)
    assert (ep.kind, ep.how) == (EndpointKind.NODE, How.HOST_PROCESS)
    assert dict(ep.attributes) == {"k8s.node.name": NODE, "service.name": NODE}


def test_local_unknown_container_falls_back_to_node_unresolved(index: KubeIndex) -> None:
    ep = resolve_local(index, NODE, pb.ProcessIdentity(container_id=f.cid(99)), "10.9.9.9")
    assert (ep.kind, ep.how) == (EndpointKind.NODE, How.UNRESOLVED)


def test_bare_pod_is_its_own_workload(index: KubeIndex) -> None:
    ep = resolve_remote(index, "10.1.0.9", 80)
    assert ep.workload == ("Pod", "bare")
    assert attr(ep.attributes, "service.name") == "bare"
    assert not any(k.startswith("k8s.deployment") for k, _ in ep.attributes)


def test_remote_nat_answer_names_the_backend_not_the_vip(index: KubeIndex) -> None:
    ep = resolve_remote(index, VIP, 80, nat_remote_ip=B_IP, nat_remote_port=8080)
    assert (ep.kind, ep.how, ep.address, ep.port) == (EndpointKind.POD, How.NAT_POD_IP, B_IP, 8080)
    assert attr(ep.attributes, "service.name") == "b"


def test_remote_vip_without_nat_keeps_the_service(index: KubeIndex) -> None:
    ep = resolve_remote(index, VIP, 80)
    assert (ep.kind, ep.how) == (EndpointKind.SERVICE, How.SERVICE_IP)
    assert dict(ep.attributes) == {"k8s.namespace.name": "default", "k8s.service.name": "b", "service.name": "b"}
    # A NAT answer the index does not know falls back to the address itself.
    assert resolve_remote(index, VIP, 80, nat_remote_ip="10.7.7.7").kind is EndpointKind.SERVICE


def test_remote_node_and_external(index: KubeIndex) -> None:
    ep = resolve_remote(index, NODE_IP, 10250)
    assert (ep.kind, attr(ep.attributes, "k8s.node.name")) == (EndpointKind.NODE, NODE)
    ep = resolve_remote(index, "203.0.113.5", 443)
    assert (ep.kind, ep.attributes, ep.address) == (EndpointKind.EXTERNAL, (), "203.0.113.5")
    # A host-network backend behind a NodePort/VIP resolves to its node.
    assert resolve_remote(index, VIP, 80, nat_remote_ip=NODE_IP).how is How.NAT_NODE_IP


def client_flow(**kw: object) -> pb.L4Flow:
    fields: dict[str, object] = {
        "role": pb.ROLE_CLIENT,
        "local_ip": A_IP,
        "local_port": 40000,
        "remote_ip": VIP,
        "remote_port": 80,
        "nat_remote_ip": B_IP,
        "nat_remote_port": 8080,
        "process": pb.ProcessIdentity(pod_uid="uid-a1"),
    }
    fields.update(kw)
    return pb.L4Flow(**fields)


def test_flow_edge_client_a_server_b(index: KubeIndex) -> None:
    r = resolve_l4(index, NODE, client_flow())
    assert r.local_is_client and r.client.how is How.POD_UID and r.server.how is How.NAT_POD_IP
    e = edge(r)
    assert graph_node_name(e.client) == "a" and graph_node_name(e.server) == "b"
    assert attr(e.server, "server.address") == B_IP and attr(e.server, "server.port") == 8080
    assert attr(e.client, "client.port") is None  # never by default: one series per connection
    assert attr(edge(r, EdgeOptions(client_port=True)).client, "client.port") == 40000
    # Workload level: no pod, node or address keys, so pods of one workload share a stream.
    w = edge(r, EdgeOptions(pod_level=False))
    assert dict(w.client) == {"k8s.namespace.name": "default", "k8s.deployment.name": "a", "service.name": "a"}
    assert dict(w.server) == {
        "k8s.namespace.name": "default",
        "k8s.statefulset.name": "b",
        "service.name": "b",
        "server.port": 8080,
    }


def test_server_side_flow_swaps_roles(index: KubeIndex) -> None:
    flow = pb.L4Flow(
        role=pb.ROLE_SERVER,
        local_ip=B_IP,
        local_port=8080,
        remote_ip=A_IP,
        remote_port=40000,
        process=pb.ProcessIdentity(container_id="deadbeef" * 8),
    )
    r = resolve_l4(index, "node-2", flow)
    assert not r.local_is_client
    assert graph_node_name(r.client.attributes) == "a" and graph_node_name(r.server.attributes) == "b"
    assert r.server.how is How.POD_IP


def test_external_ends_keep_their_address_at_workload_level(index: KubeIndex) -> None:
    req = pb.L7Request(side=pb.ROLE_SERVER, local_ip=B_IP, local_port=8080, remote_ip="198.51.100.4", remote_port=5)
    e = edge(resolve_l7(index, "node-2", req), EdgeOptions(pod_level=False))
    assert dict(e.client) == {"client.address": "198.51.100.4"}
    assert graph_node_name(e.client) == "198.51.100.4"


# ---- a Service VIP without a NAT answer: its one workload, else the Service --------------------------


def add_b_backends(index: KubeIndex, endpoints: list[tuple[str, str]], not_ready: frozenset[str] = frozenset()) -> None:
    index.apply("ADDED", "EndpointSlice", f.endpoint_slice("b-x", "b", endpoints, uid="es-b", not_ready=not_ready))


def test_vip_whose_ready_endpoints_are_one_workload_names_that_workload(index: KubeIndex) -> None:
    index.apply("ADDED", "Pod", f.pod("b-1", uid="uid-b1", ip="10.1.1.8", owners=[f.owner("StatefulSet", "b", "ss-b")]))
    add_b_backends(index, [(B_IP, "uid-b0"), ("10.1.1.8", "uid-b1"), ("10.1.0.9", "uid-bare")], frozenset({"10.1.0.9"}))
    ep = resolve_remote(index, VIP, 80)
    assert (ep.kind, ep.how, ep.address, ep.port, ep.workload) == (
        EndpointKind.WORKLOAD, How.SERVICE_WORKLOAD, VIP, 80, ("StatefulSet", "b"))  # fmt: skip
    assert dict(ep.attributes) == {  # no pod or node: which pod answered is not known
        "k8s.namespace.name": "default",
        "k8s.service.name": "b",
        "k8s.statefulset.name": "b",
        "service.name": "b",
        "kscope.peer.resolved_by": "service",
    }
    assert ep.observed  # its pods' own agents count its requests, as for a NAT answer
    # On a client's data points the peer is the workload, and says how it was named.
    r = resolve_l4(index, NODE, client_flow(nat_remote_ip="", nat_remote_port=0))
    point = dict(metric_attributes(edge(r, EdgeOptions(pod_level=False)), Side.CLIENT))
    assert point["service.peer.name"] == "b" and point["kscope.peer.resolved_by"] == "service"
    assert graph_node_name(edge(r).server) == "b"
    # A NAT answer still wins: it names the pod that really answered.
    assert resolve_remote(index, VIP, 80, nat_remote_ip=B_IP, nat_remote_port=8080).how is How.NAT_POD_IP


@pytest.mark.parametrize(
    "endpoints",
    [
        [(B_IP, "uid-b0"), ("10.1.0.9", "uid-bare")],  # two workloads behind one VIP
        [(B_IP, "uid-b0"), ("10.1.5.5", "")],  # an endpoint that is no pod (targetRef a node, or none)
        [(B_IP, "uid-b0"), ("10.1.5.6", "uid-unlisted")],  # a pod the index does not know yet
        [],  # no ready endpoint
    ],
)
def test_vip_names_the_service_when_its_backends_are_not_one_known_workload(
    index: KubeIndex, endpoints: list[tuple[str, str]]
) -> None:
    add_b_backends(index, endpoints)
    ep = resolve_remote(index, VIP, 80)
    assert (ep.kind, ep.how) == (EndpointKind.SERVICE, How.SERVICE_IP)
    assert dict(ep.attributes) == {"k8s.namespace.name": "default", "k8s.service.name": "b", "service.name": "b"}


def test_one_workload_of_the_same_name_in_two_namespaces_is_two_workloads(index: KubeIndex) -> None:
    index.apply("ADDED", "Pod", f.pod("b-0", uid="uid-ob0", ip="10.1.9.9", namespace="other",
                                      owners=[f.owner("StatefulSet", "b", "ss-ob")]))  # fmt: skip
    add_b_backends(index, [(B_IP, "uid-b0"), ("10.1.9.9", "uid-ob0")])
    assert resolve_remote(index, VIP, 80).kind is EndpointKind.SERVICE
