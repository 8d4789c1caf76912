"""What each aggregate is called on the wire: instrument names and units, attribute keys, error
rules, span names. Pure functions from ``model`` records to ``Sample``s (one interval's
contribution to one metric stream) and to span fields.

Naming follows the OpenTelemetry semantic conventions where one exists (``http.*``, ``rpc.*``
(gRPC: ``rpc``), ``dns.lookup.duration``, ``error.type``), Tempo's service-graph metrics where Grafana expects them,
and ``kscope.*`` for the TCP metrics no convention covers.

Who is who (docs/otel-mapping.md): the observing side ("self") is the resource of its series,
spans and logs (``workload_resource``: ``service.name``, ``service.namespace``,
``k8s.namespace.name``, ``k8s.<kind>.name``, ``k8s.node.name``), as if it were the instrumented
process. The other side is in data-point and record attributes: its ``service.name`` and
``service.namespace`` as ``service.peer.name`` / ``service.peer.namespace`` (the conventions'
names), its other keys with a ``peer.`` prefix (``peer.k8s.deployment.name``: there is no
convention for a peer's Kubernetes identity), and keys that already name their role
(``server.address``, ``client.port``) as the conventions define them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, NamedTuple

from cluster_processor.otlp import rpc
from cluster_processor.otlp.model import (
    Exemplar,
    Histogram,
    Interval,
    L4Point,
    ListenerPoint,
    Protocol,
    RedPoint,
    ServiceGraphPoint,
    SpanRecord,
)
from cluster_processor.resolved import (
    SERVER_PORT,
    SERVICE_NAME,
    SERVICE_NAMESPACE,
    Attrs,
    AttrValue,
    ConnectionType,
    Edge,
    Side,
    attr,
    attrs,
    graph_node_name,
    graph_node_namespace,
)

PEER_PREFIX: Final = "peer."
# The conventions' own names for the peer's service (they replace the deprecated peer.service).
SERVICE_PEER_NAME: Final = "service.peer.name"
SERVICE_PEER_NAMESPACE: Final = "service.peer.namespace"
_PEER_KEYS: Final = {SERVICE_NAME: SERVICE_PEER_NAME, SERVICE_NAMESPACE: SERVICE_PEER_NAMESPACE}
# Keys that say how an end was reached, not who it is: never part of a resource, and they pass to
# the other side's attributes as they are (kscope.peer.*: how the peer was named, e.g. by a Service).
_ROLE_PREFIXES: Final = ("server.", "client.", "network.peer.", "network.local.", "kscope.peer.")

HTTP_METHOD: Final = "http.request.method"
HTTP_METHOD_ORIGINAL: Final = "http.request.method_original"
HTTP_ROUTE: Final = "http.route"
HTTP_STATUS: Final = "http.response.status_code"
ERROR_TYPE: Final = "error.type"
NETWORK_IO_DIRECTION: Final = "network.io.direction"
OVERFLOW: Final = "otel.metric.overflow"
OTHER: Final = "_OTHER"
# The methods the HTTP conventions know (RFC 9110 + PATCH); anything else would be unbounded.
KNOWN_HTTP_METHODS: Final = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})


class Kind(enum.Enum):
    COUNTER = "counter"  # monotonic sum fed with per-interval deltas
    OBSERVED_COUNTER = "observed_counter"  # monotonic sum fed with running totals (self-metrics)
    GAUGE = "gauge"  # last value
    HISTOGRAM = "histogram"  # explicit buckets, fed with per-interval histograms

    __hash__ = object.__hash__  # singletons compared by identity (see resolved.Side)


@dataclass(frozen=True, slots=True)
class Instrument:
    name: str
    unit: str  # UCUM, as OTLP wants: "s", "By", "{request}"
    description: str
    kind: Kind


class Sample(NamedTuple):
    """One interval's contribution to the stream (instrument, attributes, resource). A named tuple
    rather than a frozen dataclass: an interval makes several per edge, and a frozen dataclass's
    ``__init__`` (one ``object.__setattr__`` per field) cost more than applying the sample."""

    instrument: Instrument
    attributes: Attrs
    value: int | float | Histogram
    # The observed workload the stream belongs to (``workload_resource``); () for kscope's own
    # resource of the reporting node (service graph, overflow, self-metrics).
    resource: Attrs = ()
    exemplar: Exemplar | None = None  # a RED histogram's: one of its requests that left as a span


_H, _C, _G = Kind.HISTOGRAM, Kind.COUNTER, Kind.GAUGE
# Members read through module globals in hot code: an Enum class's attribute read takes ~10x a global's.
_SERVER, _CLIENT, _HTTP = Side.SERVER, Side.CLIENT, Protocol.HTTP
HTTP_SERVER_DURATION: Final = Instrument("http.server.request.duration", "s", "Duration of HTTP server requests.", _H)
HTTP_CLIENT_DURATION: Final = Instrument("http.client.request.duration", "s", "Duration of HTTP client requests.", _H)
DNS_LOOKUP_DURATION: Final = Instrument("dns.lookup.duration", "s", "Time taken to perform a DNS lookup.", _H)
# The RPC conventions' current names (``rpc``: they replaced rpc.server.duration in ms).
RPC_SERVER_DURATION: Final = Instrument(
    "rpc.server.call.duration", "s", "Measures the duration of an incoming Remote Procedure Call (RPC).", _H
)
RPC_CLIENT_DURATION: Final = Instrument(
    "rpc.client.call.duration", "s", "Measures the duration of an outgoing Remote Procedure Call (RPC).", _H
)
# No convention for the server side of DNS; the agent pairs queries on DNS servers too.
DNS_SERVER_DURATION: Final = Instrument("kscope.dns.server.request.duration", "s", "Time to answer a DNS query.", _H)

DB_CLIENT_DURATION: Final = Instrument(
    "db.client.operation.duration", "s", "Duration of database client operations.", _H
)
# No convention for the server side of a database operation; the agent pairs them on the server too.
DB_SERVER_DURATION: Final = Instrument(
    "kscope.db.server.operation.duration", "s", "Time a database server took to answer an operation.", _H
)
TCP_BYTES: Final = Instrument("kscope.tcp.bytes", "By", "TCP payload bytes, by network.io.direction.", _C)
TCP_CONNECTIONS: Final = Instrument(
    "kscope.tcp.connections", "{connection}", "TCP connects: established, or failed with error.type.", _C
)
TCP_CONNECT_DURATION: Final = Instrument("kscope.tcp.connect.duration", "s", "Time to establish a TCP connection.", _H)
TCP_RETRANSMITS: Final = Instrument("kscope.tcp.retransmits", "{segment}", "Retransmitted TCP segments.", _C)
TCP_RESETS: Final = Instrument("kscope.tcp.resets", "{reset}", "TCP resets sent or received.", _C)
TCP_DROPS: Final = Instrument("kscope.tcp.drops", "{segment}", "TCP segments dropped by the kernel.", _C)
TCP_RTT: Final = Instrument("kscope.tcp.rtt", "s", "Smoothed TCP round-trip time.", _G)
LISTEN_OVERFLOWS: Final = Instrument(
    "kscope.tcp.listen.overflows", "{connection}", "Handshakes dropped because the accept queue was full.", _C
)
LISTEN_DROPS: Final = Instrument(
    "kscope.tcp.listen.drops", "{segment}", "Segments a listening socket dropped (SYNs for a full accept queue).", _C
)
LISTEN_QUEUE: Final = Instrument("kscope.tcp.listen.queue", "{connection}", "Connections waiting to be accepted.", _G)
LISTEN_QUEUE_LIMIT: Final = Instrument(
    "kscope.tcp.listen.queue.limit", "{connection}", "Accept queue limit (the listen() backlog).", _G
)

# Tempo's metrics-generator names, which Grafana's service graph queries without configuration.
SG_REQUESTS: Final = Instrument(
    "traces_service_graph_request_total", "{request}", "Requests between two nodes of the service graph.", _C
)
SG_FAILED: Final = Instrument(
    "traces_service_graph_request_failed_total", "{request}", "Failed requests between two nodes.", _C
)
SG_SERVER_SECONDS: Final = Instrument(
    "traces_service_graph_request_server_seconds", "s", "Request duration as seen by the server.", _H
)
SG_CLIENT_SECONDS: Final = Instrument(
    "traces_service_graph_request_client_seconds", "s", "Request duration as seen by the client.", _H
)


# ---- endpoint attributes ------------------------------------------------------------------------


def identity(endpoint: Attrs) -> Attrs:
    """Who an endpoint is (pod, workload, service), without how it was reached."""
    # The pairs themselves, the prefix test inline: once per new series or span edge, for every pair.
    return tuple([pair for pair in endpoint if not pair[0].startswith(_ROLE_PREFIXES)])


@lru_cache(maxsize=1024)  # keys are the resolver's semconv names: a few dozen
def _peer_key(key: str) -> str:
    # One string per key, its hash kept: every cache these attributes key hashes it again.
    if key.startswith(_ROLE_PREFIXES):
        return key
    return _PEER_KEYS.get(key) or PEER_PREFIX + key


def peer_attributes(endpoint: Attrs) -> list[tuple[str, AttrValue]]:
    """The other side: its service as ``service.peer.name`` / ``service.peer.namespace`` (equal to
    the peer's own resource's, ``workload_resource``), the rest of its identity under ``peer.``,
    its role keys (``server.address``) as they are."""
    out = [(_peer_key(k), v) for k, v in endpoint]
    if attr(endpoint, SERVICE_NAMESPACE) is None and (namespace := graph_node_namespace(endpoint)):
        out.append((SERVICE_PEER_NAMESPACE, namespace))
    return out


def record_attributes(edge: Edge, side: Side) -> list[tuple[str, AttrValue]]:
    """Attributes of one span or log record: spans are not aggregated, so every role key stays
    (client.port included, it is this request's own), and the peer's identity; the observing
    side's identity is the record's resource."""
    own = [pair for pair in edge.of(side) if pair[0].startswith(_ROLE_PREFIXES)]
    return own + peer_attributes(edge.peer_of(side))


def metric_attributes(edge: Edge, side: Side) -> list[tuple[str, AttrValue]]:
    """Data-point attributes of one edge seen from ``side``: the peer. The observing side's identity
    is the series' resource (``workload_resource``). A server keeps its own listening ``server.*``
    keys (they tell port 8080 from 9090); a client's own ``client.*`` keys are dropped, since an
    ephemeral port would make every connection a new series."""
    own = edge.of(side)
    kept = [(k, v) for k, v in own if k.startswith("server.")] if side is _SERVER else []
    return [*kept, *peer_attributes(edge.peer_of(side))]


# ---- per-protocol rules -------------------------------------------------------------------------


def _http_status_failed(side: Side, status_code: int | None) -> bool:
    # A server fails on 5xx only (a 404 is the client's mistake); a client fails on 4xx too.
    return status_code is not None and status_code >= (500 if side is _SERVER else 400)


def http_failed(side: Side, status_code: int | None, error_type: str) -> bool:
    """HTTP span status rules, plus any request that failed without an error status
    (reset, timeout: ``error_type`` set). (``_http_status_failed`` inline: once per request.)"""
    return (status_code is not None and status_code >= (500 if side is _SERVER else 400)) or bool(error_type)


def http_error_type(side: Side, status_code: int | None, error_type: str) -> str:
    """``error.type``: the status code as a string when it marks an error, else the failure's own
    type; empty for a success."""
    return str(status_code) if _http_status_failed(side, status_code) else error_type


def normal_method(method: str) -> str:
    return method if method in KNOWN_HTTP_METHODS else OTHER


def _http_attributes(
    side: Side, method: str, route: str, status_code: int | None, error_type: str
) -> list[tuple[str, AttrValue]]:
    out: list[tuple[str, AttrValue]] = [(HTTP_METHOD, normal_method(method))]
    if route:
        out.append((HTTP_ROUTE, route))
    if status_code is not None:
        out.append((HTTP_STATUS, status_code))
    if et := http_error_type(side, status_code, error_type):
        out.append((ERROR_TYPE, et))
    return out


def _http_span_name(side: Side, method: str, route: str) -> str:
    m = normal_method(method)
    base = "HTTP" if m == OTHER else m
    # Only a server knows which route it matched; a client's name stays low-cardinality.
    return f"{base} {route}" if route and side is _SERVER else base


# A DNS answer that failed the asker: what error.type names. NXDOMAIN is an answer ("no such name"),
# not a failure: under Kubernetes' ndots:5 most lookups of a healthy cluster are NXDOMAIN answers to
# search-path expansions, and counting them would bury the real failures. Any other code (SERVFAIL,
# REFUSED, FORMERR, NOTIMP, ...) and a query that got no answer (timeout) failed.
DNS_ANSWERED: Final = frozenset({"", "NOERROR", "NXDOMAIN"})
DNS_RESPONSE_CODE: Final = "dns.response_code"  # ECS's name (no OTel attribute yet): NOERROR, NXDOMAIN...


def dns_error_type(rcode: str, timed_out: bool) -> str:
    """``error.type`` of one DNS exchange: "timeout", the failing response code in lower case
    ("servfail"), or "" when the lookup was answered (NOERROR, NXDOMAIN)."""
    if timed_out:
        return "timeout"
    return "" if rcode in DNS_ANSWERED else rcode.lower()


def _dns_failed(side: Side, status_code: int | None, error_type: str) -> bool:
    # error_type is set only for failures (dns_error_type)
    return bool(error_type)


def _dns_attributes(
    side: Side, method: str, route: str, status_code: int | None, error_type: str
) -> list[tuple[str, AttrValue]]:
    return [(ERROR_TYPE, error_type)] if error_type else []


def _dns_span_name(side: Side, method: str, route: str) -> str:
    return f"DNS {method}" if method else "DNS"


# Databases and caches (OTel database conventions): the operation is db.operation.name; the system,
# collection, namespace and response status code are the record's extras (model.DB_METRIC_KEYS); a
# failure is an error the server answered (Redis "-ERR", SQLSTATE class > 02, MySQL ERR packet,
# Memcached SERVER_ERROR/CLIENT_ERROR/ERROR), its error.type as the agent named it. A Redis nil or a
# Memcached miss is an answer, not a failure.
DB_OPERATION_NAME: Final = "db.operation.name"


def _db_failed(side: Side, status_code: int | None, error_type: str) -> bool:
    return bool(error_type)


def _db_attributes(
    side: Side, method: str, route: str, status_code: int | None, error_type: str
) -> list[tuple[str, AttrValue]]:
    out: list[tuple[str, AttrValue]] = [(DB_OPERATION_NAME, method)] if method else []
    if error_type:
        out.append((ERROR_TYPE, error_type))
    return out


def _db_span_name(side: Side, method: str, route: str) -> str:
    # The convention's span name: db.query.summary (the agent's route for a database record), else
    # the operation name.
    return route or method or "DB"


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    client: Instrument
    server: Instrument
    failed: Callable[[Side, int | None, str], bool]
    attributes: Callable[[Side, str, str, int | None, str], list[tuple[str, AttrValue]]]
    span_name: Callable[[Side, str, str], str]


PROTOCOLS: Final[dict[Protocol, ProtocolSpec]] = {
    Protocol.HTTP: ProtocolSpec(
        HTTP_CLIENT_DURATION, HTTP_SERVER_DURATION, http_failed, _http_attributes, _http_span_name
    ),
    Protocol.DNS: ProtocolSpec(DNS_LOOKUP_DURATION, DNS_SERVER_DURATION, _dns_failed, _dns_attributes, _dns_span_name),
    Protocol.RPC: ProtocolSpec(RPC_CLIENT_DURATION, RPC_SERVER_DURATION, rpc.failed, rpc.attributes, rpc.span_name),
    Protocol.DB: ProtocolSpec(DB_CLIENT_DURATION, DB_SERVER_DURATION, _db_failed, _db_attributes, _db_span_name),
}


# ---- samples ------------------------------------------------------------------------------------


_new_tuple: Final = tuple.__new__  # a Sample without NamedTuple's Python-level __new__ (3x the cost)


# Attribute sets are computed once per edge (and side, and RED key) and handed out as the same tuple
# objects every interval: no sorting per point, and the encoder caches their bytes by identity.
# Bounded like every cache fed from the wire.
@lru_cache(maxsize=65_536)
def _metric_base(edge: Edge, side: Side) -> tuple[tuple[str, AttrValue], ...]:
    """``metric_attributes`` once per edge and side: an edge side has many RED keys (method, route,
    status) and L4 attribute sets, which then share these pairs instead of each making its own."""
    return tuple(metric_attributes(edge, side))


@lru_cache(maxsize=65_536)
def _red_attributes(
    edge: Edge, side: Side, protocol: Protocol, method: str, route: str, status: int | None, error_type: str,
    extra: Attrs,
) -> Attrs:  # fmt: skip
    pairs = [*_metric_base(edge, side), *extra]
    pairs += PROTOCOLS[protocol].attributes(side, method, route, status, error_type)
    return attrs(pairs)


@lru_cache(maxsize=65_536)
def _edge_resource(edge: Edge, side: Side, node_name: str) -> Attrs:
    """``workload_resource`` of the observing side, looked up by the edge (its hash is kept) rather
    than by hashing the endpoint's pairs for every point."""
    return workload_resource(edge.of(side), node_name)


def _red_sample(p: RedPoint, node_name: str) -> Sample:
    edge, side, protocol, duration, method, route, status, error_type, extra, exemplar = p
    spec = PROTOCOLS[protocol]
    a = _red_attributes(edge, side, protocol, method, route, status, error_type, extra)
    resource = _edge_resource(edge, side, node_name)
    return _new_tuple(Sample, (spec.client if side is _CLIENT else spec.server, a, duration, resource, exemplar))


@lru_cache(maxsize=65_536)
def _l4_attributes(edge: Edge, side: Side) -> tuple[Attrs, Attrs, Attrs]:
    """(transmit, receive, plain) attribute sets of one edge's L4 metrics seen from ``side``."""
    base = _metric_base(edge, side)
    return (
        attrs([*base, (NETWORK_IO_DIRECTION, "transmit")]),
        attrs([*base, (NETWORK_IO_DIRECTION, "receive")]),
        attrs(base),
    )


@lru_cache(maxsize=4_096)
def _l4_failure_attributes(edge: Edge, side: Side, error_type: str) -> Attrs:
    return attrs([*_metric_base(edge, side), (ERROR_TYPE, error_type)])


def l4_samples(p: L4Point, node_name: str) -> list[Sample]:
    transmit, receive, plain = _l4_attributes(p.edge, p.side)
    res = _edge_resource(p.edge, p.side, node_name)
    new = _new_tuple
    out: list[Sample] = [
        new(Sample, (TCP_BYTES, transmit, p.bytes_sent, res, None)),
        new(Sample, (TCP_BYTES, receive, p.bytes_received, res, None)),
        new(Sample, (TCP_CONNECTIONS, plain, p.connections, res, None)),
        new(Sample, (TCP_RETRANSMITS, plain, p.retransmits, res, None)),
        new(Sample, (TCP_RESETS, plain, p.resets, res, None)),
        new(Sample, (TCP_DROPS, plain, p.drops, res, None)),
    ]
    out += [Sample(TCP_CONNECTIONS, _l4_failure_attributes(p.edge, p.side, et), n, res) for et, n in p.connect_failures]
    if p.connect_duration is not None:
        out.append(Sample(TCP_CONNECT_DURATION, plain, p.connect_duration, res))
    if p.rtt_s is not None:
        out.append(Sample(TCP_RTT, plain, p.rtt_s, res))
    return out


@lru_cache(maxsize=65_536)
def _graph_attributes(
    client: str, server: str, connection_type: ConnectionType, client_namespace: str, server_namespace: str
) -> Attrs:
    # Tempo's label set, plus the namespaces as Tempo names a `service.namespace` dimension
    # (client_service_namespace / server_service_namespace): Grafana still sums by (client, server),
    # and two workloads of one name in two namespaces stay two series instead of adding up.
    pairs = [("client", client), ("server", server), ("connection_type", connection_type.value)]
    if client_namespace:
        pairs.append(("client_service_namespace", client_namespace))
    if server_namespace:
        pairs.append(("server_service_namespace", server_namespace))
    return attrs(pairs)


def service_graph_samples(p: ServiceGraphPoint) -> list[Sample]:
    a = _graph_attributes(p.client, p.server, p.connection_type, p.client_namespace, p.server_namespace)
    new = _new_tuple
    # Under kscope's resource of the reporting node, as the OTel servicegraph connector and Tempo
    # emit theirs (no workload resource: an edge belongs to two workloads).
    out: list[Sample] = [new(Sample, (SG_REQUESTS, a, p.requests, (), None)),
                         new(Sample, (SG_FAILED, a, p.failed, (), None))]  # fmt: skip
    if p.server_duration is not None:
        out.append(new(Sample, (SG_SERVER_SECONDS, a, p.server_duration, (), None)))
    if p.client_duration is not None:
        out.append(new(Sample, (SG_CLIENT_SECONDS, a, p.client_duration, (), None)))
    return out


def listener_samples(p: ListenerPoint, node_name: str) -> list[Sample]:
    """A listening port's accept queue: the owner's series (its resource), by ``server.port``."""
    a = ((SERVER_PORT, p.port),)
    res = workload_resource(p.owner, node_name)
    return [
        Sample(LISTEN_OVERFLOWS, a, p.overflows, res),
        Sample(LISTEN_DROPS, a, p.drops, res),
        Sample(LISTEN_QUEUE, a, p.queue, res),
        Sample(LISTEN_QUEUE_LIMIT, a, p.queue_limit, res),
    ]


def interval_samples(interval: Interval) -> list[Sample]:
    node = interval.node_name
    out: list[Sample] = [_red_sample(p, node) for p in interval.red]
    for l4 in interval.l4:
        out += l4_samples(l4, node)
    for g in interval.service_graph:
        out += service_graph_samples(g)
    for lp in interval.listeners:
        out += listener_samples(lp, node)
    return out


# ---- spans and logs -----------------------------------------------------------------------------


@lru_cache(maxsize=65_536)  # one per observed workload and node: grouping asks once per span
def workload_resource(endpoint: Attrs, node_name: str) -> Attrs:
    """The resource of an observed workload's series, spans and logs, not kscope's: backends
    group, name and graph by the resource's service.name (Prometheus' job from service.namespace and
    service.name). A node is always present: the pod's own, else the reporting node (a series'
    endpoint is workload-level: the reporting node; its writer is told apart by the encoder's
    service.instance.id in any case). A span's endpoint is pod-level: its resource names the pod."""
    base = dict(identity(endpoint))
    base.setdefault(SERVICE_NAME, graph_node_name(endpoint))
    if namespace := graph_node_namespace(endpoint):
        base.setdefault(SERVICE_NAMESPACE, namespace)
    base.setdefault("k8s.node.name", node_name)
    return attrs(base)


span_resource = workload_resource  # a span's or log record's resource


def span_name(s: SpanRecord) -> str:
    return PROTOCOLS[s.protocol].span_name(s.side, s.method, s.route)


def span_protocol_attributes(
    side: Side, protocol: Protocol, method: str, route: str, status_code: int | None, error_type: str
) -> list[tuple[str, AttrValue]]:
    """A span's protocol attributes (method, route, status, error type): they win over the record's
    own extras and the edge's attributes."""
    extra = PROTOCOLS[protocol].attributes(side, method, route, status_code, error_type)
    if protocol is _HTTP and method and normal_method(method) == OTHER:
        extra.append((HTTP_METHOD_ORIGINAL, method))
    elif protocol is Protocol.RPC and method and status_code == rpc.UNIMPLEMENTED:
        extra.append((rpc.RPC_METHOD_ORIGINAL, method))  # rpc.method says _OTHER: the span keeps the text
    return extra


def span_attributes(s: SpanRecord) -> Attrs:
    extra = span_protocol_attributes(s.side, s.protocol, s.method, s.route, s.status_code, s.error_type)
    return attrs([*record_attributes(s.edge, s.side), *s.attributes, *extra])
