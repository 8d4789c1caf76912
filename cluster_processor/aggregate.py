"""Flow batches in, one interval's OTLP records out, per reporting node. Pure: no I/O, time passed in.

``Aggregator.add`` resolves both ends of every record (``resolve``) and folds it into per-node state;
``Aggregator.flush`` hands back, per node, what ``OtlpPipeline.export_interval`` / ``export_spans`` /
``export_logs`` take, and starts the next interval. The reporting node names every stream, so each
stream has one writer even when many replicas aggregate.

Counting rules (each fact counted once, even when both ends of a connection are observed):

* L4 per (edge, side): bytes from the per-socket delta counters; a connection is the CLOSE record of
  a CLIENT socket that connected; a failed connect is counted once per socket, when first seen with
  its failure; connect latency once per socket, when first seen; RTT is the mean over the sockets
  that reported in the interval.
* RED per (edge, side, protocol, method, route, status, error) from L7 records.
* Service graph: a request is counted from the server side when the server end is observed by
  kscope (a pod or a node), and from the client side only when it is not (a Service whose backend is
  unknown, an external address): ``otlp.model.ServiceGraphPoint``. The client side still adds its
  duration histogram.
* Spans: one per L7 record, joining a captured traceparent. Logs: resets, refused and timed-out
  connects, DNS errors and timeouts.

Everything is bounded per node and interval (edges, RED keys, spans, logs) and per aggregator (the
socket table that remembers NAT answers and first sightings); what does not fit is counted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import semconv
from cluster_processor.otlp.model import (
    EVENT_CONNECT_REFUSED,
    EVENT_CONNECT_TIMEOUT,
    EVENT_DNS_ERROR,
    EVENT_TCP_RESET,
    HTTP_DURATION_BOUNDS_S,
    SERVICE_GRAPH_BOUNDS_S,
    AttrValue,
    ConnectionType,
    Edge,
    Histogram,
    Interval,
    L4Point,
    LogEvent,
    Protocol,
    RedPoint,
    ServiceGraphPoint,
    Severity,
    Side,
    SpanRecord,
    attrs,
    graph_node_name,
    span_context,
)
from cluster_processor.resolve import EdgeOptions, EndpointKind, How, Resolved, edge, resolve_l4, resolve_l7
from kscope.v1 import flow_pb2 as pb

NS_PER_S: Final = 1_000_000_000
_PROTOCOLS: Final = {"http1": Protocol.HTTP, "http": Protocol.HTTP, "dns": Protocol.DNS}
_CONNECT_ERRORS: Final = {
    pb.CONNECT_STATUS_REFUSED: "connection_refused",
    pb.CONNECT_STATUS_TIMEOUT: "timeout",
    pb.CONNECT_STATUS_RESET: "connection_reset",
    pb.CONNECT_STATUS_UNREACHABLE: "unreachable",
    pb.CONNECT_STATUS_ABORTED: "aborted",
    pb.CONNECT_STATUS_OTHER: "other",
}
CONNECT_BOUNDS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_METRIC_EDGE: Final = EdgeOptions(pod_level=False)
_SPAN_EDGE: Final = EdgeOptions(pod_level=True, client_port=True)

COUNTERS: Final = (
    "batches",
    "l4_records",
    "l7_records",
    "listener_records",  # L4 records of listen sockets: not an edge
    "unknown_protocol",  # L7 records of a protocol this processor cannot name
    "edges_overflowed",  # records dropped because their node's interval already had max_edges edges
    "red_overflowed",  # L7 records dropped: max_red_keys reached
    "spans_overflowed",
    "logs_overflowed",
    "sockets_evicted",  # socket table full: the oldest entry forgotten (a NAT answer may be lost)
    "unresolved_local",  # a local end no rule named (a pod not yet in the index)
    "external_remote",  # a remote end resolved to an external address
)


@dataclass(frozen=True, slots=True)
class AggregatorSettings:
    max_edges: int = 2000  # distinct edges per node and interval (L4 and RED together)
    max_red_keys: int = 5000  # distinct RED keys per node and interval
    max_spans: int = 10_000  # per node and interval
    max_logs: int = 2_000  # per node and interval
    max_sockets: int = 200_000  # remembered (node, netns, cookie): NAT answers and first sightings
    default_interval_ns: int = 10 * NS_PER_S  # start of a node's first interval: end - this


@dataclass(frozen=True, slots=True)
class NodeReport:
    """One node's interval, ready for ``OtlpPipeline``."""

    interval: Interval
    spans: tuple[SpanRecord, ...]
    logs: tuple[LogEvent, ...]


class _Hist:
    __slots__ = ("bounds", "counts", "hi", "lo", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.lo: float | None = None
        self.hi: float | None = None

    def add(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.total += v
        self.lo = v if self.lo is None else min(self.lo, v)
        self.hi = v if self.hi is None else max(self.hi, v)

    def freeze(self) -> Histogram:
        return Histogram(self.bounds, tuple(self.counts), self.total, self.lo, self.hi)


@dataclass(slots=True)
class _L4:
    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    retransmits: int = 0
    resets: int = 0
    drops: int = 0
    connect: _Hist | None = None
    rtt_sum_s: float = 0.0
    rtt_n: int = 0


@dataclass(slots=True)
class _Graph:
    requests: int = 0
    failed: int = 0
    server: _Hist | None = None
    client: _Hist | None = None


@dataclass(slots=True)
class _Socket:
    nat_ip: str = ""
    nat_port: int = 0
    connect_seen: bool = False  # connect latency / failure already counted for this socket


_RedKey = tuple[Edge, Side, Protocol, str, str, int | None, str, tuple[tuple[str, AttrValue], ...]]
_GraphKey = tuple[str, str, ConnectionType]


@dataclass(slots=True)
class _NodeState:
    start_ns: int
    edges: set[Edge] = field(default_factory=set)
    l4: dict[tuple[Edge, Side], _L4] = field(default_factory=dict)
    red: dict[_RedKey, _Hist] = field(default_factory=dict)
    graph: dict[_GraphKey, _Graph] = field(default_factory=dict)
    spans: list[SpanRecord] = field(default_factory=list)
    logs: list[LogEvent] = field(default_factory=list)


class Aggregator:
    def __init__(self, index: KubeIndex, settings: AggregatorSettings = AggregatorSettings()) -> None:
        self._index = index
        self._settings = settings
        self._nodes: dict[str, _NodeState] = {}
        self._last_end: dict[str, int] = {}  # node -> end of its last flushed interval
        self._sockets: OrderedDict[tuple[str, int, int], _Socket] = OrderedDict()
        self._counters = dict.fromkeys(COUNTERS, 0)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    @property
    def sockets_tracked(self) -> int:
        return len(self._sockets)

    # ---- input -------------------------------------------------------------------------------

    def add(self, batch: pb.FlowBatch, now_unix_nano: int | None = None) -> None:
        """Fold one batch into its node's current interval. L4 first: an L7 record may need the NAT
        answer its socket's L4 record carries."""
        c = self._counters
        c["batches"] += 1
        node = batch.node_name
        st = self._nodes.get(node)
        if st is None:
            end = now_unix_nano or batch.time_unix_nano
            st = self._nodes[node] = _NodeState(self._last_end.get(node, end - self._settings.default_interval_ns))
        closed: list[tuple[str, int, int]] = []
        for flow in batch.l4:
            c["l4_records"] += 1
            self._add_l4(node, st, flow)
            if flow.kind == pb.RECORD_KIND_CLOSE:
                closed.append((node, flow.netns_inode, flow.socket_cookie))
        for req in batch.l7:
            c["l7_records"] += 1
            self._add_l7(node, st, req)
        # Forgotten only now: this batch's L7 records of a closed socket still need its NAT answer.
        for key in closed:
            self._sockets.pop(key, None)

    def _socket(self, node: str, netns: int, cookie: int) -> _Socket:
        key = (node, netns, cookie)
        sock = self._sockets.get(key)
        if sock is None:
            sock = self._sockets[key] = _Socket()
            if len(self._sockets) > self._settings.max_sockets:
                self._sockets.popitem(last=False)
                self._counters["sockets_evicted"] += 1
        else:
            self._sockets.move_to_end(key)
        return sock

    def _count_resolution(self, r: Resolved) -> None:
        if r.local.how is How.UNRESOLVED:
            self._counters["unresolved_local"] += 1
        if r.remote.kind is EndpointKind.EXTERNAL:
            self._counters["external_remote"] += 1

    def _admit(self, st: _NodeState, e: Edge) -> bool:
        if e in st.edges:
            return True
        if len(st.edges) >= self._settings.max_edges:
            self._counters["edges_overflowed"] += 1
            return False
        st.edges.add(e)
        return True

    def _add_l4(self, node: str, st: _NodeState, f: pb.L4Flow) -> None:
        if f.role == pb.ROLE_LISTENER:
            self._counters["listener_records"] += 1
            return
        r = resolve_l4(self._index, node, f)
        self._count_resolution(r)
        side = Side.CLIENT if r.local_is_client else Side.SERVER
        sock = self._socket(node, f.netns_inode, f.socket_cookie)
        if f.nat_remote_ip:
            sock.nat_ip, sock.nat_port = f.nat_remote_ip, f.nat_remote_port
        first_connect = not sock.connect_seen and f.connect_status != pb.CONNECT_STATUS_UNSPECIFIED
        if first_connect:
            sock.connect_seen = True
        failure = _CONNECT_ERRORS.get(f.connect_status)
        # Events are bounded on their own (max_logs): a full edge table must not hide a reset.
        self._l4_events(node, st, f, r, side, failure if first_connect else None)
        e = edge(r, _METRIC_EDGE)
        if not self._admit(st, e):
            return
        acc = st.l4.get((e, side))
        if acc is None:
            acc = st.l4[(e, side)] = _L4()
        d = f.delta
        acc.bytes_sent += d.bytes_sent
        acc.bytes_received += d.bytes_received
        acc.retransmits += d.retransmits + d.syn_retransmits
        acc.resets += d.resets_sent + d.resets_received
        acc.drops += d.drops
        if f.srtt_us:
            acc.rtt_sum_s += f.srtt_us / 1e6
            acc.rtt_n += 1
        if side is Side.CLIENT:
            if f.kind == pb.RECORD_KIND_CLOSE and failure is None:
                acc.connections += 1
            if first_connect and failure is not None:
                acc.failures[failure] = acc.failures.get(failure, 0) + 1
            if first_connect and failure is None and f.connect_latency_ns:
                if acc.connect is None:
                    acc.connect = _Hist(CONNECT_BOUNDS_S)
                acc.connect.add(f.connect_latency_ns / NS_PER_S)

    def _l4_events(self, node: str, st: _NodeState, f: pb.L4Flow, r: Resolved, side: Side, failure: str | None) -> None:
        t = f.time_unix_nano
        d = f.delta
        if d.resets_sent or d.resets_received:
            body = f"TCP reset: {d.resets_sent} sent, {d.resets_received} received ({f.tcp_state or 'unknown state'})"
            extra = (("kscope.tcp.resets_sent", d.resets_sent), ("kscope.tcp.resets_received", d.resets_received))
            self._log(st, r, side, t, EVENT_TCP_RESET, Severity.WARN, body, extra)
        if failure in ("connection_refused", "timeout"):
            name = EVENT_CONNECT_REFUSED if failure == "connection_refused" else EVENT_CONNECT_TIMEOUT
            body = f"connect to {r.remote.address}:{r.remote.port} failed: {failure.replace('_', ' ')}"
            extra = (("error.type", failure), ("kscope.tcp.connect_errno", f.connect_errno))
            self._log(st, r, side, t, name, Severity.WARN, body, extra)

    def _log(
        self,
        st: _NodeState,
        r: Resolved,
        side: Side,
        t: int,
        name: str,
        severity: Severity,
        body: str,
        extra: Iterable[tuple[str, AttrValue]],
        trace: tuple[bytes, bytes] = (b"", b""),
    ) -> None:
        if len(st.logs) >= self._settings.max_logs:
            self._counters["logs_overflowed"] += 1
            return
        st.logs.append(LogEvent(edge(r, _SPAN_EDGE), side, t, name, severity, body, attrs(extra), *trace))

    def _add_l7(self, node: str, st: _NodeState, q: pb.L7Request) -> None:
        protocol = _PROTOCOLS.get(q.protocol)
        if protocol is None:
            self._counters["unknown_protocol"] += 1
            return
        sock = self._sockets.get((node, q.netns_inode, q.socket_cookie))
        nat_ip, nat_port = (sock.nat_ip, sock.nat_port) if sock is not None else ("", 0)
        r = resolve_l7(self._index, node, q, nat_ip, nat_port)
        self._count_resolution(r)
        side = Side.CLIENT if r.local_is_client else Side.SERVER
        method, route, status, error_type, extra = _details(protocol, q)
        duration_s = q.latency_ns / NS_PER_S
        failed = semconv.PROTOCOLS[protocol].failed(side, status, error_type)
        e = edge(r, _METRIC_EDGE)
        if self._admit(st, e):
            key: _RedKey = (e, side, protocol, method, route, status, error_type, ())
            hist = st.red.get(key)
            if hist is None and len(st.red) >= self._settings.max_red_keys:
                self._counters["red_overflowed"] += 1
            else:
                if hist is None:
                    hist = st.red[key] = _Hist(HTTP_DURATION_BOUNDS_S)
                hist.add(duration_s)
            self._graph(st, e, r, side, failed, duration_s)
        self._span(st, r, side, protocol, q, method, route, status, error_type, extra)

    def _graph(self, st: _NodeState, e: Edge, r: Resolved, side: Side, failed: bool, duration_s: float) -> None:
        client, server = graph_node_name(e.client), graph_node_name(e.server)
        counts = side is Side.SERVER or not r.server.observed
        both_observed = r.server.observed and r.client.kind is not EndpointKind.EXTERNAL
        ctype = ConnectionType.NONE if both_observed else ConnectionType.VIRTUAL_NODE
        g = st.graph.get((client, server, ctype))
        if g is None:
            g = st.graph[(client, server, ctype)] = _Graph()
        if counts:
            g.requests += 1
            g.failed += int(failed)
        if side is Side.SERVER:
            g.server = g.server or _Hist(SERVICE_GRAPH_BOUNDS_S)
            g.server.add(duration_s)
        else:
            g.client = g.client or _Hist(SERVICE_GRAPH_BOUNDS_S)
            g.client.add(duration_s)

    def _span(
        self,
        st: _NodeState,
        r: Resolved,
        side: Side,
        protocol: Protocol,
        q: pb.L7Request,
        method: str,
        route: str,
        status: int | None,
        error_type: str,
        extra: tuple[tuple[str, AttrValue], ...],
    ) -> None:
        ctx = span_context(q.http.traceparent if q.HasField("http") else None)
        if protocol is Protocol.DNS and error_type:
            body = f"DNS {method} {q.dns.question_name}: {error_type}"
            self._log(
                st,
                r,
                side,
                q.start_time_unix_nano,
                EVENT_DNS_ERROR,
                Severity.WARN,
                body,
                extra,
                (ctx.trace_id, ctx.span_id),
            )
        if len(st.spans) >= self._settings.max_spans:
            self._counters["spans_overflowed"] += 1
            return
        start = q.start_time_unix_nano
        st.spans.append(
            SpanRecord(
                edge(r, _SPAN_EDGE), side, protocol, ctx, start, start + q.latency_ns,
                method, route, status, error_type, extra,
            )
        )  # fmt: skip

    # ---- output ------------------------------------------------------------------------------

    def flush(self, end_unix_nano: int) -> list[NodeReport]:
        """Close every node's interval at ``end_unix_nano`` and start the next one."""
        out: list[NodeReport] = []
        for node, st in self._nodes.items():
            start = min(st.start_ns, end_unix_nano - 1)
            self._last_end[node] = end_unix_nano
            interval = Interval(
                node_name=node,
                start_unix_nano=start,
                end_unix_nano=end_unix_nano,
                red=tuple(_red_points(st)),
                l4=tuple(_l4_points(st)),
                service_graph=tuple(_graph_points(st)),
            )
            out.append(NodeReport(interval, tuple(st.spans), tuple(st.logs)))
        self._nodes = {}
        return out


def _details(
    protocol: Protocol, q: pb.L7Request
) -> tuple[str, str, int | None, str, tuple[tuple[str, AttrValue], ...]]:
    """(method, route, status, error type, span extras) of one L7 record."""
    if protocol is Protocol.DNS:
        d = q.dns
        error = "timeout" if d.timed_out else ("" if d.rcode in ("", "NOERROR") else d.rcode)
        extra: list[tuple[str, AttrValue]] = [("dns.question.name", d.question_name)]
        if d.rcode:
            extra.append(("dns.response_code", d.rcode))
        return d.question_type, "", None, error, attrs(extra)
    h = q.http
    status = h.status_code or None
    extra = [("url.path", h.path)] if h.path else []
    if h.request_id:
        extra.append(("http.request.header.x-request-id", h.request_id))
    # No response at all is a failure the status code cannot express.
    return h.method, h.route, status, "" if status is not None else "no_response", attrs(extra)


def _red_points(st: _NodeState) -> Iterable[RedPoint]:
    for (e, side, protocol, method, route, status, error_type, extra), hist in st.red.items():
        yield RedPoint(e, side, protocol, hist.freeze(), method, route, status, error_type, extra)


def _l4_points(st: _NodeState) -> Iterable[L4Point]:
    for (e, side), a in st.l4.items():
        yield L4Point(
            e,
            side,
            a.bytes_sent,
            a.bytes_received,
            a.connections,
            tuple(sorted(a.failures.items())),
            a.retransmits,
            a.resets,
            a.drops,
            a.connect.freeze() if a.connect is not None else None,
            a.rtt_sum_s / a.rtt_n if a.rtt_n else None,
        )


def _graph_points(st: _NodeState) -> Iterable[ServiceGraphPoint]:
    for (client, server, ctype), g in st.graph.items():
        yield ServiceGraphPoint(
            client,
            server,
            g.requests,
            g.failed,
            ctype,
            g.server.freeze() if g.server is not None else None,
            g.client.freeze() if g.client is not None else None,
        )
