"""What resolving a flow yields: who each end is, as OpenTelemetry semantic-convention attributes.

``resolve`` names both ends of a record (an ``Endpoint`` each, a ``Resolved`` pair) and turns them
into an ``Edge``; aggregation keys its state by edges and sides, and export (``otlp/``) writes them
out. Attributes are sorted ``(key, value)`` tuples: hashable, so they can key aggregation maps, and
small. Nothing here knows about protobuf, the Kubernetes index or OTLP.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, overload

AttrValue = str | bool | int | float
Attrs = tuple[tuple[str, AttrValue], ...]

# Semantic-convention keys an endpoint is described with.
K8S_NAMESPACE: Final = "k8s.namespace.name"
K8S_POD: Final = "k8s.pod.name"
K8S_NODE: Final = "k8s.node.name"
CONTAINER_ID: Final = "container.id"
SERVICE_NAME: Final = "service.name"
SERVICE_NAMESPACE: Final = "service.namespace"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
CLIENT_ADDRESS: Final = "client.address"
CLIENT_PORT: Final = "client.port"
# Workload kinds in the order that names a graph node best: the controller a user deployed
# comes before the ReplicaSet or Job it creates.
WORKLOAD_KEYS: Final = (
    "k8s.deployment.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.cronjob.name",
    "k8s.job.name",
    "k8s.replicaset.name",
)
K8S_SERVICE: Final = "k8s.service.name"  # no convention names a Service; the k8s.* pattern does
# How a peer was named when that was not by its own address or a NAT answer (kept as is on data points)
RESOLVED_BY: Final = "kscope.peer.resolved_by"
# Keys that name one pod (or where it runs) rather than its workload: dropped at workload level.
_POD_LEVEL_KEYS: Final = frozenset({K8S_POD, K8S_NODE})


_KEY: Final = operator.itemgetter(0)


@overload
def attrs(pairs: Mapping[str, AttrValue]) -> Attrs: ...
@overload
def attrs(pairs: Iterable[tuple[str, AttrValue]] = ()) -> Attrs: ...
def attrs(pairs: Mapping[str, AttrValue] | Iterable[tuple[str, AttrValue]] = ()) -> Attrs:
    """Canonical attributes: sorted by key, the last value of a repeated key wins. Two equal sets
    are then equal tuples, which is what keying a stream by its attributes needs."""
    # Sorted by key alone: the keys are unique once in a dict, so it is the order of the pairs,
    # with string comparisons instead of tuple ones.
    if isinstance(pairs, (list, tuple)):  # the usual input, checked without the Mapping ABC
        d = dict(pairs)
        if len(d) == len(pairs):  # no key repeated: the pairs themselves, not new ones
            return tuple(sorted(pairs, key=_KEY))
        return tuple(sorted(d.items(), key=_KEY))
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return tuple(sorted(dict(items).items(), key=_KEY))


def attr(attributes: Attrs, key: str) -> AttrValue | None:
    for k, v in attributes:
        if k == key:
            return v
    return None


class Side(enum.Enum):
    """Which end of an edge observed the data: the eBPF probe sits on one socket at a time."""

    CLIENT = "client"
    SERVER = "server"

    # Members are singletons compared by identity: hash them by identity too. Enum's own hash is a
    # Python-level method, and these key many tables and caches per record.
    __hash__ = object.__hash__


# Members read through module globals in hot code: an Enum class's attribute read takes ~10x a global's.
_CLIENT: Final = Side.CLIENT


class ConnectionType(enum.Enum):
    """Tempo's ``connection_type`` label: empty for a plain service-to-service edge."""

    NONE = ""
    VIRTUAL_NODE = "virtual_node"  # the other end is not observed (outside the cluster)
    DATABASE = "database"
    MESSAGING_SYSTEM = "messaging_system"

    # Members are singletons compared by identity: hash them by identity too. Enum's own hash is a
    # Python-level method, and these key many tables and caches per record.
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Edge:
    """Who talked to whom. Each side's attributes use semantic-convention keys as if that side
    were the instrumented one; export decides which side is "self" and which the peer."""

    client: Attrs
    server: Attrs
    # Edges key many tables and caches per record (span templates, RED keys, interning): their two
    # attribute tuples are hashed once here, not on every lookup (a tuple does not keep its hash).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.client, self.server)))

    def __hash__(self) -> int:
        return self._hash

    def of(self, side: Side) -> Attrs:
        return self.client if side is _CLIENT else self.server

    def peer_of(self, side: Side) -> Attrs:
        return self.server if side is _CLIENT else self.client


def graph_node_name(endpoint: Attrs) -> str:
    """The name a service graph gives an endpoint: its service, else its workload, else its pod,
    else its address. Every signal names nodes this way, so graph edges and span resources agree."""
    for key in (SERVICE_NAME, *WORKLOAD_KEYS, K8S_POD, SERVER_ADDRESS, CLIENT_ADDRESS):
        value = attr(endpoint, key)
        if value not in (None, ""):
            return str(value)
    return "unknown"


def graph_node_namespace(endpoint: Attrs) -> str:
    """The namespace that goes with :func:`graph_node_name` ("" outside Kubernetes): two workloads of
    one name in two namespaces are two graph nodes, not one."""
    for key in (SERVICE_NAMESPACE, K8S_NAMESPACE):
        value = attr(endpoint, key)
        if value not in (None, ""):
            return str(value)
    return ""


class EndpointKind(enum.Enum):
    POD = "pod"
    WORKLOAD = "workload"  # a Service VIP whose ready endpoints are all one workload's pods
    SERVICE = "service"  # a Service VIP whose backend is unknown (no conntrack answer, several workloads)
    NODE = "node"  # a host process or host-network pod: the node is all we can name
    PROCESS = "process"  # a process named from local metadata (``kscope run``: no Kubernetes)
    EXTERNAL = "external"  # not in the cluster (or not yet in the index): the address is kept


class How(enum.Enum):
    """Which rule named the endpoint: for counters and tests."""

    POD_UID = "pod_uid"
    CONTAINER_ID = "container_id"
    POD_IP = "pod_ip"
    NAT_POD_IP = "nat_pod_ip"
    NAT_NODE_IP = "nat_node_ip"
    SERVICE_WORKLOAD = "service_workload"
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
        return self.kind in (EndpointKind.POD, EndpointKind.WORKLOAD, EndpointKind.NODE, EndpointKind.PROCESS)

    def identity(self, pod_level: bool = True) -> Attrs:
        if pod_level or self.kind is not EndpointKind.POD:
            return self.attributes
        return tuple((k, v) for k, v in self.attributes if k not in _POD_LEVEL_KEYS)


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
