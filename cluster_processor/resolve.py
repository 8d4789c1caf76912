"""Name both ends of a flow: pure functions over a ``KubeIndex``, no I/O.

The local end is the socket's owner as the node saw it (pod UID, container id, then its address);
a host process is the reporting node. The remote end is an address: the conntrack answer
(``nat_remote_ip``) when the agent had one, because behind a Service VIP it names the backend
that really answered; else the remote address itself as a pod, a Service VIP (backend unknown), a
node, or, failing all of these, an external address kept as it is.

An ``Endpoint`` carries semantic-convention attributes (``k8s.namespace.name``, ``k8s.pod.name``,
``k8s.<kind>.name`` of the workload a person would name, ``k8s.node.name``, ``service.name``) and
the address; ``edge`` turns two of them into an ``otlp.model.Edge``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from cluster_processor.kube.index import KubeIndex
from cluster_processor.kube.model import Node, Pod, Service, canonical_ip
from cluster_processor.otlp.model import (
    CLIENT_ADDRESS,
    K8S_NAMESPACE,
    K8S_NODE,
    K8S_POD,
    SERVER_ADDRESS,
    SERVER_PORT,
    SERVICE_NAME,
    Attrs,
    AttrValue,
    Edge,
    attrs,
)
from kscope.v1 import flow_pb2 as pb

K8S_SERVICE: Final = "k8s.service.name"  # no convention names a Service; the k8s.* pattern does
# Workload kinds whose semconv key is k8s.<lowercase kind>.name; others (a CRD controller) get none.
_WORKLOAD_KEY: Final = {
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "CronJob": "k8s.cronjob.name",
    "Job": "k8s.job.name",
    "ReplicaSet": "k8s.replicaset.name",
}
# Keys that name one pod (or where it runs) rather than its workload: dropped at workload level.
_POD_LEVEL_KEYS: Final = frozenset({K8S_POD, K8S_NODE})


class EndpointKind(enum.Enum):
    POD = "pod"
    SERVICE = "service"  # a Service VIP whose backend is unknown (no conntrack answer)
    NODE = "node"  # a host process or host-network pod: the node is all we can name
    EXTERNAL = "external"  # not in the cluster (or not yet in the index): the address is kept


class How(enum.Enum):
    """Which rule named the endpoint: for counters and tests."""

    POD_UID = "pod_uid"
    CONTAINER_ID = "container_id"
    POD_IP = "pod_ip"
    NAT_POD_IP = "nat_pod_ip"
    NAT_NODE_IP = "nat_node_ip"
    SERVICE_IP = "service_ip"
    NODE_IP = "node_ip"
    HOST_PROCESS = "host_process"
    UNRESOLVED = "unresolved"


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: EndpointKind
    how: How
    attributes: Attrs  # identity only (no address or port keys)
    address: str  # the address this end was reached at (for a NAT'ed remote: the backend's)
    port: int = 0
    workload: tuple[str, str] = ("", "")  # (kind, name) for a pod

    @property
    def observed(self) -> bool:
        """Whether kscope watches this end's sockets itself (an agent runs on every node)."""
        return self.kind in (EndpointKind.POD, EndpointKind.NODE)

    def identity(self, pod_level: bool = True) -> Attrs:
        if pod_level or self.kind is not EndpointKind.POD:
            return self.attributes
        return tuple((k, v) for k, v in self.attributes if k not in _POD_LEVEL_KEYS)


def pod_endpoint(index: KubeIndex, pod: Pod, how: How, address: str, port: int = 0) -> Endpoint:
    kind, name = index.workload_of(pod)
    pairs: dict[str, AttrValue] = {K8S_NAMESPACE: pod.namespace, K8S_POD: pod.name, SERVICE_NAME: name}
    if pod.node_name:
        pairs[K8S_NODE] = pod.node_name
    key = _WORKLOAD_KEY.get(kind)
    if key is not None:
        pairs[key] = name
    return Endpoint(EndpointKind.POD, how, attrs(pairs), address, port, (kind, name))


def node_endpoint(node_name: str, how: How, address: str, port: int = 0) -> Endpoint:
    return Endpoint(EndpointKind.NODE, how, attrs({K8S_NODE: node_name, SERVICE_NAME: node_name}), address, port)


def service_endpoint(svc: Service, address: str, port: int = 0) -> Endpoint:
    pairs = {K8S_NAMESPACE: svc.namespace, K8S_SERVICE: svc.name, SERVICE_NAME: svc.name}
    return Endpoint(EndpointKind.SERVICE, How.SERVICE_IP, attrs(pairs), address, port)


def external_endpoint(address: str, port: int = 0) -> Endpoint:
    return Endpoint(EndpointKind.EXTERNAL, How.UNRESOLVED, (), address, port)


def resolve_local(
    index: KubeIndex, node_name: str, process: pb.ProcessIdentity, local_ip: str, local_port: int = 0
) -> Endpoint:
    """The socket's owner: pod UID, else container id, else the local address (never a host-network
    pod: ``pod_by_ip`` skips those), else a host process is the reporting node."""
    ip = canonical_ip(local_ip)
    pod: Pod | None = None
    how = How.UNRESOLVED
    if process.pod_uid:
        pod, how = index.pod_by_uid(process.pod_uid), How.POD_UID
    if pod is None and process.container_id:
        pod, how = index.pod_by_container_id(process.container_id), How.CONTAINER_ID
    if pod is None and ip:
        pod, how = index.pod_by_ip(ip), How.POD_IP
    if pod is not None:
        return pod_endpoint(index, pod, how, ip, local_port)
    if process.host_process or not (process.pod_uid or process.container_id):
        # No container at all, or no identity: the process runs on (or as) the node.
        return node_endpoint(node_name, How.HOST_PROCESS, ip, local_port)
    # A container the index does not know yet (a pod younger than the watch): the node is still true.
    return node_endpoint(node_name, How.UNRESOLVED, ip, local_port)


def resolve_remote(
    index: KubeIndex, remote_ip: str, remote_port: int = 0, nat_remote_ip: str = "", nat_remote_port: int = 0
) -> Endpoint:
    """The peer: the NAT answer as a pod (or a node, for a host-network backend), else the address
    as a pod, a Service VIP, a node, else external."""
    if nat_remote_ip:
        nat_ip = canonical_ip(nat_remote_ip)
        port = nat_remote_port or remote_port
        pod = index.pod_by_ip(nat_ip)
        if pod is not None:
            return pod_endpoint(index, pod, How.NAT_POD_IP, nat_ip, port)
        node: Node | None = index.node_by_ip(nat_ip)
        if node is not None:
            return node_endpoint(node.name, How.NAT_NODE_IP, nat_ip, port)
    ip = canonical_ip(remote_ip)
    pod = index.pod_by_ip(ip)
    if pod is not None:
        return pod_endpoint(index, pod, How.POD_IP, ip, remote_port)
    svc = index.service_by_cluster_ip(ip)
    if svc is not None:
        return service_endpoint(svc, ip, remote_port)
    node = index.node_by_ip(ip)
    if node is not None:
        return node_endpoint(node.name, How.NODE_IP, ip, remote_port)
    return external_endpoint(ip, remote_port)


@dataclass(frozen=True, slots=True)
class Resolved:
    """Both ends of one record, and which of them is the client."""

    local: Endpoint
    remote: Endpoint
    local_is_client: bool

    @property
    def client(self) -> Endpoint:
        return self.local if self.local_is_client else self.remote

    @property
    def server(self) -> Endpoint:
        return self.remote if self.local_is_client else self.local


def resolve_l4(index: KubeIndex, node_name: str, flow: pb.L4Flow) -> Resolved:
    local = resolve_local(index, node_name, flow.process, flow.local_ip, flow.local_port)
    remote = resolve_remote(index, flow.remote_ip, flow.remote_port, flow.nat_remote_ip, flow.nat_remote_port)
    return Resolved(local, remote, flow.role != pb.ROLE_SERVER)


def resolve_l7(
    index: KubeIndex, node_name: str, req: pb.L7Request, nat_remote_ip: str = "", nat_remote_port: int = 0
) -> Resolved:
    """L7 records carry no NAT answer of their own: the caller passes the one its socket's L4
    record had (joined on netns inode + socket cookie), if any."""
    local = resolve_local(index, node_name, req.process, req.local_ip, req.local_port)
    remote = resolve_remote(index, req.remote_ip, req.remote_port, nat_remote_ip, nat_remote_port)
    return Resolved(local, remote, req.side != pb.ROLE_SERVER)


@dataclass(frozen=True, slots=True)
class EdgeOptions:
    pod_level: bool = True  # keep k8s.pod.name / k8s.node.name (spans); metrics use workload level
    client_port: bool = False  # a client's ephemeral port: spans only, never metric attributes
    extra: tuple[tuple[str, AttrValue], ...] = field(default=())


def edge(r: Resolved, options: EdgeOptions = EdgeOptions()) -> Edge:
    """The ``otlp.model.Edge`` of a resolved record. Addresses are kept for ends that have no
    identity (external), and always at pod level; a server keeps its port (8080 vs 9090)."""
    client, server = r.client, r.server
    c = list(client.identity(options.pod_level))
    s = list(server.identity(options.pod_level))
    if options.pod_level or client.kind is EndpointKind.EXTERNAL:
        if client.address:
            c.append((CLIENT_ADDRESS, client.address))
        if options.client_port and client.port:
            c.append(("client.port", client.port))
    if (options.pod_level or server.kind is EndpointKind.EXTERNAL) and server.address:
        s.append((SERVER_ADDRESS, server.address))
    if server.port:
        s.append((SERVER_PORT, server.port))
    return Edge(client=attrs(c), server=attrs(s))
