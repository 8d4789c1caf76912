"""Name both ends of a flow: pure functions over a ``KubeIndex``, no I/O.

The local end is the socket's owner as the node saw it (pod UID, container id, then its address);
a host process is the reporting node. The remote end is an address: the conntrack answer
(``nat_remote_ip``) when the agent had one, because behind a Service VIP it names the backend
that really answered; else the remote address itself as a pod, a Service VIP, a node, or, failing
all of these, an external address kept as it is. A Service VIP names the workload behind it when
every ready endpoint of the Service is a pod of that one workload (``kscope.peer.resolved_by=service``
says the backend was inferred, not seen), else the Service (docs/attribution.md).

An ``Endpoint`` carries semantic-convention attributes (``k8s.namespace.name``, ``k8s.pod.name``,
``k8s.<kind>.name`` of the workload a person would name, ``k8s.node.name``, ``service.name``) and
the address; ``edge`` turns two of them into an ``Edge`` (those types: ``resolved``).

``ResolutionCache`` keeps those answers for the aggregator while the index's ``generation`` stays
the same: the same pods talk to each other record after record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, getitem
from typing import Any, Final, Protocol

from cluster_processor.kube.index import KubeIndex
from cluster_processor.kube.model import Node, Pod, Service, canonical_ip
from cluster_processor.resolved import (
    CLIENT_ADDRESS,
    CLIENT_PORT,
    K8S_NAMESPACE,
    K8S_NODE,
    K8S_POD,
    K8S_SERVICE,
    RESOLVED_BY,
    SERVER_ADDRESS,
    SERVER_PORT,
    SERVICE_NAME,
    AttrValue,
    ConnectionType,
    Edge,
    Endpoint,
    EndpointKind,
    How,
    Resolved,
    Side,
    attrs,
    graph_node_name,
    graph_node_namespace,
)
from kscope.v1 import flow_pb2 as pb

# Workload kinds whose semconv key is k8s.<lowercase kind>.name; others (a CRD controller) get none.
_WORKLOAD_KEY: Final = {
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "CronJob": "k8s.cronjob.name",
    "Job": "k8s.job.name",
    "ReplicaSet": "k8s.replicaset.name",
}


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


def service_endpoint(index: KubeIndex, svc: Service, address: str, port: int = 0) -> Endpoint:
    """A Service VIP with no NAT answer: the workload behind it when every ready endpoint is a known pod
    of that one workload (whichever pod answered, the workload is the same), else the Service."""
    pods = index.ready_backends(svc)
    workloads = {(pod.namespace, *index.workload_of(pod)) for pod in pods or ()}
    if len(workloads) == 1:
        ((namespace, kind, name),) = workloads
        pairs: dict[str, AttrValue] = {K8S_NAMESPACE: namespace, K8S_SERVICE: svc.name, SERVICE_NAME: name}
        key = _WORKLOAD_KEY.get(kind)
        if key is not None:
            pairs[key] = name
        pairs[RESOLVED_BY] = "service"
        return Endpoint(EndpointKind.WORKLOAD, How.SERVICE_WORKLOAD, attrs(pairs), address, port, (kind, name))
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
    as a pod, a Service VIP (its one workload, else the Service), a node, else external."""
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
        return service_endpoint(index, svc, ip, remote_port)
    node = index.node_by_ip(ip)
    if node is not None:
        return node_endpoint(node.name, How.NODE_IP, ip, remote_port)
    return external_endpoint(ip, remote_port)


class Namer(Protocol):
    """What the resolver asks to name an endpoint: the seam between resolving/aggregating and where
    names come from. ``KubeNamer`` asks the Kubernetes index (the processor); ``kscope run`` names
    processes from local metadata (node_exporter/local/namer.py). ``generation`` changes whenever an
    answer may have (the resolution cache forgets its answers then)."""

    @property
    def generation(self) -> int: ...

    @property
    def process_keyed(self) -> bool:
        """Whether names read the process (pid, comm, cgroup id) and the ports, not only the pod and
        the address: the resolution cache then keys on those too."""
        ...

    def local(self, node_name: str, process: pb.ProcessIdentity, local_ip: str, local_port: int = 0) -> Endpoint: ...

    def remote(
        self, remote_ip: str, remote_port: int = 0, nat_remote_ip: str = "", nat_remote_port: int = 0
    ) -> Endpoint: ...


class KubeNamer:
    """``Namer`` over a ``KubeIndex``: ``resolve_local`` / ``resolve_remote``."""

    __slots__ = ("index",)

    def __init__(self, index: KubeIndex) -> None:
        self.index = index

    @property
    def generation(self) -> int:
        return self.index.generation

    @property
    def process_keyed(self) -> bool:
        return False

    def local(self, node_name: str, process: pb.ProcessIdentity, local_ip: str, local_port: int = 0) -> Endpoint:
        return resolve_local(self.index, node_name, process, local_ip, local_port)

    def remote(
        self, remote_ip: str, remote_port: int = 0, nat_remote_ip: str = "", nat_remote_port: int = 0
    ) -> Endpoint:
        return resolve_remote(self.index, remote_ip, remote_port, nat_remote_ip, nat_remote_port)


def namer_of(source: KubeIndex | Namer) -> Namer:
    return KubeNamer(source) if isinstance(source, KubeIndex) else source


def resolve_l4(index: KubeIndex | Namer, node_name: str, flow: pb.L4Flow) -> Resolved:
    namer = namer_of(index)
    local = namer.local(node_name, flow.process, flow.local_ip, flow.local_port)
    remote = namer.remote(flow.remote_ip, flow.remote_port, flow.nat_remote_ip, flow.nat_remote_port)
    return Resolved(local, remote, flow.role != pb.ROLE_SERVER)


def resolve_l7(
    index: KubeIndex | Namer, node_name: str, req: pb.L7Request, nat_remote_ip: str = "", nat_remote_port: int = 0
) -> Resolved:
    """The caller passes the NAT answer: the one its socket's L4 record had (TCP, joined on netns
    inode + socket cookie), else the record's own (a client-side UDP flow), if any."""
    namer = namer_of(index)
    local = namer.local(node_name, req.process, req.local_ip, req.local_port)
    remote = namer.remote(req.remote_ip, req.remote_port, nat_remote_ip, nat_remote_port)
    return Resolved(local, remote, req.side != pb.ROLE_SERVER)


@dataclass(frozen=True, slots=True)
class EdgeOptions:
    pod_level: bool = True  # keep k8s.pod.name / k8s.node.name (spans); metrics use workload level
    client_port: bool = False  # a client's ephemeral port: spans only, never metric attributes
    extra: tuple[tuple[str, AttrValue], ...] = field(default=())


def edge(r: Resolved, options: EdgeOptions = EdgeOptions()) -> Edge:
    """The ``Edge`` of a resolved record. Addresses are kept for ends that have no
    identity (external), and always at pod level; a server keeps its port (8080 vs 9090)."""
    client, server = r.client, r.server
    c = list(client.identity(options.pod_level))
    s = list(server.identity(options.pod_level))
    if options.pod_level or client.kind is EndpointKind.EXTERNAL:
        if client.address:
            c.append((CLIENT_ADDRESS, client.address))
        if options.client_port and client.port:
            c.append((CLIENT_PORT, client.port))
    if (options.pod_level or server.kind is EndpointKind.EXTERNAL) and server.address:
        s.append((SERVER_ADDRESS, server.address))
    if server.port:
        s.append((SERVER_PORT, server.port))
    return Edge(client=attrs(c), server=attrs(s))


# ---- cached resolution --------------------------------------------------------------------------
#
# Resolving is pure, so its answers can be kept while the index does not change (its generation).
# Edges are interned so the aggregator keys its state by identity (one id hash) instead of hashing
# two attribute tuples per record, and equal edges share one accumulator.

METRIC_EDGE: Final = EdgeOptions(pod_level=False)
SPAN_EDGE: Final = EdgeOptions(pod_level=True, client_port=True)
_PROCESS: Final = attrgetter("pod_uid", "container_id", "host_process")
_PROCESS_FIELDS: Final = ("pod_uid", "container_id", "host_process", "pid", "comm", "cgroup_id")
_PROCESS_LOCAL: Final = attrgetter(*_PROCESS_FIELDS)
_ENDS: Final = attrgetter("local_ip", "local_port", "remote_ip", "remote_port")
_LISTENER: Final = pb.ROLE_LISTENER
_SERVER: Final = pb.ROLE_SERVER
_UNRESOLVED: Final = attrgetter("unresolved")
_EXTERNAL: Final = attrgetter("external")
_MKEY: Final = attrgetter("mkey")
_NAT: Final = attrgetter("nat")


class EdgeRef:
    """One distinct metric ``Edge``, interned, with one key object per side."""

    __slots__ = ("client", "edge", "server")

    def __init__(self, e: Edge) -> None:
        self.edge = e
        self.client = EdgeSide(self, Side.CLIENT)
        self.server = EdgeSide(self, Side.SERVER)


class EdgeSide:
    __slots__ = ("ref", "side")

    def __init__(self, ref: EdgeRef, side: Side) -> None:
        self.ref = ref
        self.side = side


class GraphRef:
    """One interned service-graph edge (client name and namespace, server name and namespace,
    connection type)."""

    __slots__ = ("client", "client_namespace", "ctype", "server", "server_namespace")

    def __init__(
        self, client: str, server: str, ctype: ConnectionType, client_namespace: str = "", server_namespace: str = ""
    ) -> None:
        self.client, self.server, self.ctype = client, server, ctype
        self.client_namespace, self.server_namespace = client_namespace, server_namespace


class Route:
    """What resolving one L7 record decided (its metric edge, span edge, service-graph edge)."""

    __slots__ = ("count_request", "external", "graph", "key", "ref", "side", "span_edge", "unresolved")

    def __init__(self, r: Resolved, ref: EdgeRef, graph: GraphRef) -> None:
        self.side = Side.CLIENT if r.local_is_client else Side.SERVER
        self.ref = ref
        self.key = ref.client if r.local_is_client else ref.server
        self.unresolved = r.local.how is How.UNRESOLVED
        self.external = r.remote.kind is EndpointKind.EXTERNAL
        self.span_edge = edge(r, SPAN_EDGE)
        self.graph = graph
        # A request is counted once: by the server when kscope observes it, else by the client.
        self.count_request = self.side is Side.SERVER or not r.server.observed


class _MKey:
    """An interned token for one end's metric identity: hashed by id, compared by identity. Holds the
    first endpoint seen with it: any endpoint with the same token gives ``edge`` the same answer."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint


class _End:
    """One end resolved without its port: ``mkey`` stands for what a metric edge reads of it."""

    __slots__ = ("endpoint", "external", "mkey", "nat", "unresolved")

    def __init__(self, endpoint: Endpoint, mkey: _MKey, nat: bool = False) -> None:
        self.endpoint = endpoint
        self.mkey = mkey
        self.nat = nat  # a remote end named through its NAT answer: its port is the answer's
        self.unresolved = endpoint.how is How.UNRESOLVED
        self.external = endpoint.kind is EndpointKind.EXTERNAL


class _Memo(dict[Any, Any]):
    """A dict that computes a missing value with ``fn`` and keeps it: ``map(memo.__getitem__, keys)``
    looks every key up in C and calls back into Python only for a key it has not seen."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def __missing__(self, key: Any) -> Any:
        value = self[key] = self.fn(key)
        return value


class ResolutionCache:
    """Answers of ``resolve_l4``/``resolve_l7`` + ``edge`` for the aggregator, cached.

    L4 records resolve each end on its own (the local end by node, process identity and address;
    the remote by address and NAT answer: one entry per pod or address, where whole records would
    give one per pair of pods) and join them through interned metric keys. L7 records, which also
    need the pod-level span edge with the client's port, are cached per socket 5-tuple.
    ``max_entries`` bounds each table (cleared when full); 0 resolves every record afresh (the
    reference path). A ``process_keyed`` namer (``kscope run``'s, whose names read the pid, comm,
    cgroup id and ports) has those in its keys too: its local ends by process and address (and by
    port for a socket no process touched), its remote ends by address and port."""

    def __init__(self, index: KubeIndex | Namer, max_entries: int) -> None:
        self._index = namer_of(index)
        self._limit = max_entries
        self._by_process = self._index.process_keyed
        self.cleared = 0  # tables dropped whole for room (an answer then costs a resolution again)
        self._process = _PROCESS_LOCAL if self._by_process else _PROCESS
        self._generation = self._index.generation
        self._routes: dict[tuple[Any, ...], Route] = {}
        self._locals: dict[tuple[Any, ...], _End] = {}
        # (remote address, NAT answer) -> that end; a _Memo so l4_columns looks records up in C
        self._remotes = _Memo(self._new_remote_end)
        # Interning tables: dropped only in prune(), when nothing refers to their objects.
        self._refs: dict[Edge, EdgeRef] = {}
        # (client, client namespace, server, server namespace, connection type)
        self._graph_refs: dict[tuple[str, str, str, str, ConnectionType], GraphRef] = {}
        self._graph_of: dict[tuple[EdgeRef, bool], GraphRef] = {}  # (metric edge, both ends observed)
        self._mkeys: dict[tuple[Any, ...], _MKey] = {}
        self._edge_refs: dict[tuple[Any, ...], EdgeRef] = {}
        # (local _MKey, remote _MKey, remote named by NAT, role, server port, NAT port) -> edge side,
        # for l4_columns: holds interned refs, so cleared whenever those are.
        self._sides = _Memo(self._side)

    def sizes(self) -> dict[str, int]:
        return {"routes": len(self._routes), "locals": len(self._locals), "remotes": len(self._remotes),
                "edges": len(self._refs)}  # fmt: skip

    def check_index(self) -> None:
        """Forget answers the index may have changed since (a pod came, an IP moved); call before
        each batch. One int compare when nothing changed."""
        if self._index.generation != self._generation:
            self._routes.clear()
            self._locals.clear()
            self._remotes.clear()
            self._generation = self._index.generation

    def prune(self) -> None:
        """Drop every table once the interning ones outgrow the bound; call when no aggregation
        state refers to interned objects (between intervals)."""
        limit = max(self._limit, 1)
        if max(len(self._refs), len(self._graph_refs), len(self._mkeys), len(self._edge_refs)) > limit:
            for table in (self._refs, self._graph_refs, self._graph_of, self._mkeys, self._edge_refs, self._routes,
                          self._locals, self._remotes, self._sides):  # fmt: skip
                table.clear()

    def _cache(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        if self._limit > 0:
            if len(table) >= self._limit:
                self._clear(table)
            table[key] = value

    def _clear(self, table: dict[Any, Any]) -> None:
        table.clear()
        self.cleared += 1

    def _intern_ref(self, e: Edge) -> EdgeRef:
        ref = self._refs.get(e)
        if ref is None:
            ref = self._refs[e] = EdgeRef(e)
        return ref

    def _end(self, endpoint: Endpoint, nat: bool = False) -> _End:
        # Exactly what ``edge`` reads of an end at workload level: its identity, and its address
        # when it has no identity (external).
        ident = (endpoint.identity(False), endpoint.address if endpoint.kind is EndpointKind.EXTERNAL else None)
        mkey = self._mkeys.get(ident)
        if mkey is None:
            mkey = self._mkeys[ident] = _MKey(endpoint)
        return _End(endpoint, mkey, nat)

    def l4_columns(self, node: str, cols: pb.L4Columns) -> tuple[list[EdgeSide | None], int, int]:
        """``l4`` for every record of a columnar batch at once: (the metric edge side of each record,
        None for a listener; how many records had an unresolved local end; how many an external remote).

        Looked up in C (``map`` over ``_Memo.__getitem__``), calling back into Python only for what
        was not seen before: each record's local end by its string-table ints (process identity and
        address; per batch), its remote end by address and NAT answer (``l4``'s table), and its edge
        side by the two ends' metric identities (``_MKey``: workload level, so few), whether the remote
        was named through its NAT answer, role, and the ports a metric edge keeps (the server's: the
        local port of a server socket, else the remote one; and the NAT answer's), never a client's
        ephemeral port."""
        n = cols.count
        strings = list(cols.strings) or [""]

        def column(name: str) -> Iterable[int]:
            values = getattr(cols, name)
            return values if values else repeat(0, n)

        if self._limit <= 0:  # the reference path: every record resolved afresh
            return self._l4_columns_afresh(node, strings, column)

        text = strings.__getitem__

        def local(key: tuple[int, ...]) -> _End:
            pod_uid, container_id, host, local_ip, *owner = key
            proc = (text(pod_uid), text(container_id), bool(host))
            if not owner:
                return self._local_end(node, proc, text(local_ip))
            pid, comm, cgroup_id, port = owner
            return self._local_end(node, (*proc, pid, text(comm), cgroup_id), text(local_ip), port)

        # Each record's ends: the local one by its ints (a node's few pods), the remote one by its text.
        local_columns: list[Iterable[Any]] = [column("process_pod_uid"), column("process_container_id"),
                                              column("process_host_process"), column("local_ip")]  # fmt: skip
        remote_columns: list[Iterable[Any]] = [map(text, column("remote_ip")), map(text, column("nat_remote_ip"))]
        if self._by_process:
            pids, comms = list(column("process_pid")), list(column("process_comm"))
            # The port names a socket no process touched (the owner of its address), else it is left out
            # of the key: a client's ephemeral port would make every connection a key of its own.
            anonymous = [not pid and not text(comm) for pid, comm in zip(pids, comms, strict=True)]
            local_columns += [pids, comms, column("process_cgroup_id"),
                              map(getitem, zip(repeat(0), column("local_port")), anonymous)]  # fmt: skip
            remote_columns += [column("remote_port"), column("nat_remote_port")]
        ends = list(map(_Memo(local).__getitem__, zip(*local_columns, strict=True)))
        remotes = list(map(self._remotes.__getitem__, zip(*remote_columns, strict=True)))
        # Then its edge side, by the two ends' metric identities (workload level: few), role and ports:
        # (local, remote)[is client] is a server's own port, else the peer's.
        ports = map(getitem, zip(column("local_port"), column("remote_port"), strict=True),
                    map(_SERVER.__ne__, column("role")))  # fmt: skip
        side_keys = zip(map(_MKEY, ends), map(_MKEY, remotes), map(_NAT, remotes), column("role"), ports,
                        column("nat_remote_port"), strict=True)  # fmt: skip
        sides = list(map(self._sides.__getitem__, side_keys))
        unresolved = sum(map(_UNRESOLVED, ends))
        external = sum(map(_EXTERNAL, remotes))
        if None in sides:  # listeners: no edge, so not counted (as in ``l4``, which they never reach)
            listeners = [side is None for side in sides]
            unresolved -= sum(compress(map(_UNRESOLVED, ends), listeners))
            external -= sum(compress(map(_EXTERNAL, remotes), listeners))
        return sides, unresolved, external

    def _side(self, key: tuple[_MKey, _MKey, bool, int, int, int]) -> EdgeSide | None:
        """The metric edge side of ends with these metric identities, remote named by its NAT answer
        or not, role, server port and NAT port (``l4``'s rules); ``_sides`` keeps it."""
        local, remote, nat, role, port, nat_port = key
        if role == _LISTENER:
            return None
        if len(self._sides) >= self._limit:
            self._clear(self._sides)
        if role == _SERVER:
            return self._edge_ref((remote, local, port), local.endpoint, remote.endpoint, False, port, 0).server
        remote_port = (nat_port or port) if nat else port
        ekey = (local, remote, remote_port)
        return self._edge_ref(ekey, local.endpoint, remote.endpoint, True, 0, remote_port).client

    def _l4_columns_afresh(
        self, node: str, strings: list[str], column: Callable[[str], Iterable[int]]
    ) -> tuple[list[EdgeSide | None], int, int]:
        sides: list[EdgeSide | None] = []
        unresolved = external = 0
        for (role, pod_uid, container_id, host, local_ip, local_port, remote_ip, remote_port, nat_ip, nat_port, pid,
             comm, cgroup_id) in zip(
            column("role"), column("process_pod_uid"), column("process_container_id"),
            column("process_host_process"), column("local_ip"), column("local_port"), column("remote_ip"),
            column("remote_port"), column("nat_remote_ip"), column("nat_remote_port"), column("process_pid"),
            column("process_comm"), column("process_cgroup_id"), strict=True,
        ):  # fmt: skip
            if role == _LISTENER:
                sides.append(None)
                continue
            is_client = role != _SERVER
            process = pb.ProcessIdentity(
                pod_uid=strings[pod_uid], container_id=strings[container_id], host_process=bool(host),
                pid=pid, comm=strings[comm], cgroup_id=cgroup_id,
            )  # fmt: skip
            local = self._index.local(node, process, strings[local_ip], local_port)
            remote = self._index.remote(strings[remote_ip], remote_port, strings[nat_ip], nat_port)
            ref = self._intern_ref(edge(Resolved(local, remote, is_client), METRIC_EDGE))
            unresolved += local.how is How.UNRESOLVED
            external += remote.kind is EndpointKind.EXTERNAL
            sides.append(ref.client if is_client else ref.server)
        return sides, unresolved, external

    def _local_end(self, node: str, proc: tuple[Any, ...], local_ip: str, local_port: int = 0) -> _End:
        """``proc``: (pod uid, container id, host process), and for a process-keyed namer (pid, comm,
        cgroup id) after them; ``local_port`` only for a socket no process touched."""
        lkey = (node, proc, local_ip, local_port)
        le = self._locals.get(lkey)
        if le is None:
            process = pb.ProcessIdentity(**dict(zip(_PROCESS_FIELDS, proc, strict=False)))  # 3 or 6 fields
            le = self._end(self._index.local(node, process, local_ip, local_port))
            self._cache(self._locals, lkey, le)
        return le

    def _new_remote_end(self, key: tuple[Any, ...]) -> _End:
        """A remote end not in ``_remotes`` (which keeps what this returns): bounded like ``_cache``.
        ``key``: (address, NAT answer's address), and their ports for a process-keyed namer."""
        if len(self._remotes) >= self._limit:
            self._clear(self._remotes)
        remote_ip, nat_ip, *ports = key
        remote_port, nat_port = ports or (0, 0)
        endpoint = self._index.remote(remote_ip, remote_port, nat_ip, nat_port)
        nat = endpoint.how in (How.NAT_POD_IP, How.NAT_NODE_IP)
        if ports and nat_ip and endpoint.kind is not EndpointKind.EXTERNAL:
            nat = endpoint.address == canonical_ip(nat_ip)  # a local process at the NAT answer's address
        return self._end(endpoint, nat=nat)

    def _edge_ref(
        self, ekey: tuple[Any, ...], local: Endpoint, remote: Endpoint, client: bool, local_port: int, remote_port: int
    ) -> EdgeRef:
        found = self._edge_refs.get(ekey)
        if found is None:
            # Built by ``edge`` itself from the two ends with their ports: the key holds all it reads.
            local, remote = _with_port(local, local_port), _with_port(remote, remote_port)
            found = self._edge_refs[ekey] = self._intern_ref(edge(Resolved(local, remote, client), METRIC_EDGE))
        return found

    def l7(self, node: str, q: pb.L7Request, nat_ip: str, nat_port: int) -> Route:
        """The route of one L7 record; its NAT answer is its socket's L4 record's (TCP) or its own (UDP)."""
        # Spans name pod, node and the client's own port: every field resolution reads is in the key.
        key = (node, self._process(q.process), q.side, *_ENDS(q), nat_ip, nat_port)
        route = self._routes.get(key)
        if route is None:
            if self._by_process and self._limit > 0:
                route = self._l7_by_ends(node, q, nat_ip, nat_port)
            else:
                r = resolve_l7(self._index, node, q, nat_ip, nat_port)
                route = self._route(r, self._intern_ref(edge(r, METRIC_EDGE)))
            self._cache(self._routes, key, route)
        return route

    def _l7_by_ends(self, node: str, q: pb.L7Request, nat_ip: str, nat_port: int) -> Route:
        """A process-keyed namer's route from its cached ends (as ``l4_columns`` resolves): a socket's
        5-tuple is new for every connection, its ends (process, server address) are not."""
        p = q.process
        anonymous = not p.pid and not p.comm
        local = self._local_end(node, self._process(p), q.local_ip, q.local_port if anonymous else 0)
        remote = self._remotes[(q.remote_ip, nat_ip, q.remote_port, nat_port)]
        if q.side == _SERVER:
            port = q.local_port
            ref = self._edge_ref((remote.mkey, local.mkey, port), local.endpoint, remote.endpoint, False, port, 0)
        else:
            port = (nat_port or q.remote_port) if remote.nat else q.remote_port
            ref = self._edge_ref((local.mkey, remote.mkey, port), local.endpoint, remote.endpoint, True, 0, port)
        r = Resolved(_with_port(local.endpoint, q.local_port), remote.endpoint, q.side != _SERVER)
        return self._route(r, ref)

    def _route(self, r: Resolved, ref: EdgeRef) -> Route:
        both_observed = r.server.observed and r.client.kind is not EndpointKind.EXTERNAL
        # The graph edge reads only the metric edge and both_observed: one per interned edge and flag
        # (every new socket of an edge would otherwise name its graph nodes again).
        g = self._graph_of.get((ref, both_observed))
        if g is None:
            g = self._graph_of[(ref, both_observed)] = self._graph_ref(ref, both_observed)
        return Route(r, ref, g)

    def _graph_ref(self, ref: EdgeRef, both_observed: bool) -> GraphRef:
        e = ref.edge
        client, server = graph_node_name(e.client), graph_node_name(e.server)
        client_ns, server_ns = graph_node_namespace(e.client), graph_node_namespace(e.server)
        ctype = ConnectionType.NONE if both_observed else ConnectionType.VIRTUAL_NODE
        gkey = (client, client_ns, server, server_ns, ctype)
        g = self._graph_refs.get(gkey)
        if g is None:
            g = self._graph_refs[gkey] = GraphRef(client, server, ctype, client_ns, server_ns)
        return g


def _with_port(e: Endpoint, port: int) -> Endpoint:
    return Endpoint(e.kind, e.how, e.attributes, e.address, port, e.workload)
