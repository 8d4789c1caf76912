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
* An L7 summary (``L7Request.summary``: requests the node's kernel summed instead of sending one by
  one) counts as its ``count`` requests in RED and the service graph, its latency buckets re-bucketed
  exactly into theirs; it makes no span and no log (spans are what the node's sampler picked).
* Spans: one per L7 record, joining a captured traceparent.
* Logs: resets, refused and timed-out connects, DNS failures (``semconv.dns_error_type``), 5xx
  answers (from the side that counts the request, as the service graph). One record per interval
  and (workload edge, side, kind, what tells occurrences apart: the DNS name and code, the status,
  the route) with a count, the first and last time, summed counters (resets): a record per
  occurrence would grow with the traffic it describes. A summary's requests count too.

Everything is bounded per node and interval (edges, RED keys, spans, logs) and per aggregator (the
socket table that remembers NAT answers and first sightings); what does not fit is counted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter
from typing import Any, Final

from cluster_processor.events import EventLog
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import links, rpc, semconv
from cluster_processor.otlp.model import (
    EVENT_CONNECT_REFUSED,
    EVENT_CONNECT_TIMEOUT,
    EVENT_DNS_ERROR,
    EVENT_HTTP_SERVER_ERROR,
    EVENT_RPC_SERVER_ERROR,
    EVENT_TCP_RESET,
    FLAG_SAMPLED,
    HTTP_DURATION_BOUNDS_S,
    SERVICE_GRAPH_BOUNDS_S,
    Exemplar,
    Histogram,
    Interval,
    L4Point,
    ListenerPoint,
    LogEvent,
    Protocol,
    RedPoint,
    ServiceGraphPoint,
    Severity,
    SpanContext,
    SpanRecord,
    parse_traceparent,
    span_context,
)
from cluster_processor.resolve import (
    METRIC_EDGE,
    EdgeRef,
    EdgeSide,
    GraphRef,
    Namer,
    ResolutionCache,
    Route,
    edge,
    namer_of,
    resolve_l4,
)
from cluster_processor.resolved import Attrs, AttrValue, Resolved, Side, graph_node_name
from cluster_processor.tracejoin.join import Held
from kscope.v1 import flow_pb2 as pb
from kscope_common import l4_columns
from kscope_common.latency import rebucket_map

NS_PER_S: Final = 1_000_000_000
# HTTP/2 records are HTTP (network.protocol.version "2"), or RPCs when the agent saw a gRPC call in one.
_PROTOCOLS: Final = {"http1": Protocol.HTTP, "http": Protocol.HTTP, "http2": Protocol.HTTP, "dns": Protocol.DNS,
                     **dict.fromkeys(("redis", "memcached", "postgresql", "mysql"), Protocol.DB)}  # fmt: skip
_H2: Final = "http2"
_V2: Final[tuple[str, AttrValue]] = ("network.protocol.version", "2")
# Enum's .value is a Python-level property: read once here, not per record.
_PROTOCOL_VALUES: Final = {p: p.value for p in Protocol}
_PROTOCOL_OF_VALUE: Final = {p.value: p for p in Protocol}
# Members read through module globals per record: an Enum class's attribute read takes ~10x a global's.
_SIDE_SERVER: Final = Side.SERVER
_DNS: Final = Protocol.DNS
_RPC: Final = Protocol.RPC
_RPC_SERVER_ERRORS: Final = rpc.SERVER_ERRORS
_DB: Final = Protocol.DB
# A database record's extras that label its metric series too (bounded: the system, the one table a
# statement names, the database, the server's status code); the query summary and sanitized text are
# span attributes only.
_DB_METRIC_KEYS: Final = frozenset({"db.system.name", "db.collection.name", "db.namespace", "db.response.status_code"})
_CONNECT_ERRORS: Final = {
    pb.CONNECT_STATUS_REFUSED: "connection_refused",
    pb.CONNECT_STATUS_TIMEOUT: "timeout",
    pb.CONNECT_STATUS_RESET: "connection_reset",
    pb.CONNECT_STATUS_UNREACHABLE: "unreachable",
    pb.CONNECT_STATUS_ABORTED: "aborted",
    pb.CONNECT_STATUS_OTHER: "other",
}
CONNECT_BOUNDS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

COUNTERS: Final = (
    "batches",
    "l4_records",
    "l7_records",
    "l7_summaries",  # L7 records that are node summaries (requests summed in the kernel, no span)
    "l7_summarized_requests",  # the requests those summaries stand for
    "listener_records",  # L4 records of listen sockets: their accept queues, not an edge
    "listeners_overflowed",  # listening (owner, port) pairs past max_listeners in one interval
    "unknown_protocol",  # L7 records of a protocol this processor cannot name
    "edges_overflowed",  # records dropped because their node's interval already had max_edges edges
    "red_overflowed",  # L7 records dropped: max_red_keys reached
    "exemplar_spans_evicted",  # spans forgotten before they left: max_exemplar_spans (no exemplar from them)
    "spans_overflowed",
    "logs_overflowed",  # event occurrences dropped: their node's interval already had max_logs records
    "log_events",  # event occurrences folded into log records
    "sockets_evicted",  # socket table full: the oldest entry forgotten (a NAT answer may be lost)
    "unresolved_local",  # a local end no rule named (a pod not yet in the index)
    "external_remote",  # a remote end resolved to an external address
)


@dataclass(frozen=True, slots=True)
class AggregatorSettings:
    max_edges: int = 2000  # distinct edges per node and interval (L4 and RED together)
    max_red_keys: int = 5000  # distinct RED keys per node and interval
    max_exemplar_spans: int = 65_536  # spans remembered until they leave, for their series' exemplar
    max_spans: int = 10_000  # per node and interval
    # every node's spans together, per interval: 50 nodes at max_spans would hold ~1 GB (bench/memory.py)
    max_spans_total: int = 100_000
    max_logs: int = 2_000  # distinct log records (aggregates) per node and interval
    max_listeners: int = 2_000  # distinct (owner, port) listeners per node and interval
    max_sockets: int = 200_000  # remembered (node, netns, cookie): NAT answers and first sightings
    # Resolutions remembered while the KubeIndex is unchanged (0: resolve every record afresh).
    max_resolutions: int = 65_536
    # Linked spans waiting for their other end (only the matched-share self-metrics use them).
    max_link_pending: int = 65_536
    default_interval_ns: int = 10 * NS_PER_S  # start of a node's first interval: end - this


@dataclass(frozen=True, slots=True)
class NodeReport:
    """One node's interval, ready for ``OtlpPipeline``."""

    interval: Interval
    spans: tuple[SpanRecord, ...]  # every span, with its pairwise ids
    logs: tuple[LogEvent, ...]
    # For the trace join (cluster_processor/tracejoin): spans whose trace is another hop's, and
    # (hop, trace) pairs this interval settled. Whoever exports without a join ignores them.
    held: tuple[Held, ...] = ()
    resolved: tuple[tuple[bytes, bytes], ...] = ()


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
        # As min() and max() would keep them (the first of equals), without two builtin calls.
        lo = self.lo
        if lo is None:
            self.lo = self.hi = v
        elif v < lo:
            self.lo = v
        elif v > self.hi:  # type: ignore[operator]
            self.hi = v

    def add_buckets(self, counts: Sequence[int], total: float, lo: float, hi: float) -> None:
        """Values already counted in the L7 summary buckets (kscope_common.latency), with their sum,
        min and max: each bucket lies within one of ours, so this is what adding them one by one
        would give (the sum up to float rounding)."""
        into = _REBUCKET[self.bounds]
        mine = self.counts
        for i, n in enumerate(counts):
            if n:
                mine[into[i]] += n
        self.total += total
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            if lo < self.lo:
                self.lo = lo
            if hi > self.hi:  # type: ignore[operator]
                self.hi = hi

    def freeze(self) -> Histogram:
        # Trusted: the bounds are this module's constants and the counts only ever grow.
        return Histogram.trusted(self.bounds, tuple(self.counts), self.total, self.lo, self.hi)


# Histogram bounds -> where each L7 summary bucket goes in them (ValueError at import if a bound is
# not a summary bound: then summaries could not be re-bucketed exactly).
_REBUCKET: Final[dict[tuple[float, ...], tuple[int, ...]]] = {
    b: rebucket_map(b) for b in (HTTP_DURATION_BOUNDS_S, SERVICE_GRAPH_BOUNDS_S)
}


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
    socket_drops: int = -1  # a listener's drop counter at its previous record (-1: none yet)


_ABSENT: Final = object()  # not in the socket table (where None is a socket with no state yet)


@dataclass(slots=True)
class _Listener:
    overflows: int = 0
    drops: int = 0
    queue: int = 0
    queue_limit: int = 0


# (edge and side, protocol value, method, route, status, error type, protocol extras: a DNS response
# code, HTTP/2's network.protocol.version)
_RedKey = tuple[EdgeSide, str, str, str, int | None, str, Attrs]


@dataclass(slots=True)
class _NodeState:
    start_ns: int
    logs: EventLog  # at most max_logs records
    edges: set[EdgeRef] = field(default_factory=set)
    l4: dict[EdgeSide, _L4] = field(default_factory=dict)
    red: dict[_RedKey, _Hist] = field(default_factory=dict)
    graph: dict[GraphRef, _Graph] = field(default_factory=dict)
    listeners: dict[tuple[Attrs, int], _Listener] = field(default_factory=dict)
    spans: list[SpanRecord] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    resolved: list[tuple[bytes, bytes]] = field(default_factory=list)


_SERVER: Final = pb.ROLE_SERVER
_CLOSE: Final = pb.RECORD_KIND_CLOSE
_HTTP: Final = attrgetter("method", "route", "path", "request_id", "status_code", "traceparent")
_new_tuple: Final = tuple.__new__  # a SpanRecord without NamedTuple's Python-level __new__
_CLIENT_SIDE: Final = Side.CLIENT
# (columns, _L4 attribute): the delta counters most records leave at zero, summed per edge side
_SPARSE_L4: Final = (
    (("delta_retransmits", "delta_syn_retransmits"), "retransmits"),
    (("delta_resets_sent", "delta_resets_received"), "resets"),
    (("delta_drops",), "drops"),
)


class Aggregator:
    def __init__(self, index: KubeIndex | Namer, settings: AggregatorSettings = AggregatorSettings()) -> None:
        self._index = namer_of(index)  # what names endpoints: the Kubernetes index, or kscope run's local one
        self._settings = settings
        self._nodes: dict[str, _NodeState] = {}
        self._last_end: dict[str, int] = {}  # node -> end of its last flushed interval
        # None: a socket seen with nothing to remember yet (a default _Socket, without the object)
        self._sockets: OrderedDict[tuple[str, int, int], _Socket | None] = OrderedDict()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._spans_held = 0  # every node's spans of this interval
        self._links = links.LinkStats(settings.max_link_pending)
        self._resolutions = ResolutionCache(index, settings.max_resolutions)
        # exemplars: a span's id -> (node, its RED series by value) until the span leaves (the trace
        # join may hold it for seconds: its trace id is final only then), and the slowest one that
        # left per series, put on the series' next point
        self._exemplar_of: OrderedDict[bytes, tuple[str, tuple[Any, ...]]] = OrderedDict()
        self._exemplars: dict[tuple[str, tuple[Any, ...]], Exemplar] = {}

    def counters(self) -> dict[str, int]:
        return {**self._counters, **self._links.counters}

    @property
    def resolutions(self) -> ResolutionCache:
        return self._resolutions

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
            start = self._last_end.get(node, end - self._settings.default_interval_ns)
            st = self._nodes[node] = _NodeState(start, logs=EventLog(self._settings.max_logs, self._counters))
        self._resolutions.check_index()
        closed: list[tuple[str, int, int]] = []
        if batch.l4:  # schema_version 1 (an older agent): its rows, as the columns agents now ship
            c["l4_records"] += len(batch.l4)
            self._add_l4(node, st, l4_columns.to_columns(batch.l4), closed)
        if batch.HasField("l4_columns"):
            c["l4_records"] += batch.l4_columns.count
            self._add_l4(node, st, batch.l4_columns, closed)
        l7 = batch.l7
        c["l7_records"] += len(l7)
        for req in l7:
            self._add_l7(node, st, req)
        # Forgotten only now: this batch's L7 records of a closed socket still need its NAT answer.
        for key in closed:
            self._sockets.pop(key, None)

    def _socket(self, key: tuple[str, int, int]) -> _Socket:
        sock = self._sockets.get(key, _ABSENT)
        if sock is _ABSENT:
            sock = self._sockets[key] = _Socket()
            if len(self._sockets) > self._settings.max_sockets:
                self._sockets.popitem(last=False)
                self._counters["sockets_evicted"] += 1
            return sock
        self._sockets.move_to_end(key)
        if sock is None:
            sock = self._sockets[key] = _Socket()
        return sock  # type: ignore[return-value]

    def _add_listener(self, node: str, st: _NodeState, f: pb.L4Flow) -> None:
        """A listening socket's queue: overflows are deltas already; the socket's drop counter is a
        running total, turned into a delta per socket here (its first record only sets the base)."""
        sock = self._socket((node, f.netns_inode, f.socket_cookie))
        drops = 0 if sock.socket_drops < 0 else max(0, f.socket_drops - sock.socket_drops)
        sock.socket_drops = f.socket_drops
        owner = self._index.local(node, f.process, f.local_ip).identity(pod_level=False)
        key = (owner, f.local_port)
        lst = st.listeners.get(key)
        if lst is None:
            if len(st.listeners) >= self._settings.max_listeners:
                self._counters["listeners_overflowed"] += 1
                return
            lst = st.listeners[key] = _Listener()
        lst.overflows += f.delta.listen_overflows
        lst.drops += drops
        lst.queue = max(lst.queue, f.accept_queue)  # a gauge: the deepest the queue was seen
        lst.queue_limit = max(lst.queue_limit, f.accept_queue_max)

    def _admit(self, st: _NodeState, ref: EdgeRef) -> bool:
        if ref in st.edges:
            return True
        if len(st.edges) >= self._settings.max_edges:
            self._counters["edges_overflowed"] += 1
            return False
        st.edges.add(ref)
        return True

    def _add_l4(self, node: str, st: _NodeState, cols: pb.L4Columns, closed: list[tuple[str, int, int]]) -> None:
        """Every L4 record of a batch, in columns (an older agent's rows are turned into columns first):
        ints read out of columns, not fields out of one message per record. One pass in record order
        does what every record needs (its socket, bytes, RTT, connect outcome); the counters most
        records leave at zero (retransmits, resets, drops) are added in passes over only their non-zero
        records. Rare records (a listener, a reset or failed connect that makes a log) are rebuilt as an
        ``L4Flow`` (``l4_columns.row``) for the code that needs one message."""
        n = cols.count
        c = self._counters
        sides, unresolved, external = self._resolutions.l4_columns(node, cols)
        c["unresolved_local"] += unresolved
        c["external_remote"] += external

        def column(name: str) -> Iterable[int]:
            values = getattr(cols, name)
            return values if values else repeat(0, n)

        sockets = self._sockets
        get_socket, touch = sockets.get, sockets.move_to_end
        max_sockets = self._settings.max_sockets
        strings = cols.strings
        edges, accs = st.edges, st.l4
        get_acc = accs.get
        events: list[tuple[int, str | None]] = []  # (record, failure to log) in record order
        for (i, key, kind, netns, cookie, nat_ip, nat_port, connect_status, srtt_us, sent, received) in zip(
            range(n), sides, column("kind"), column("netns_inode"), column("socket_cookie"), column("nat_remote_ip"),
            column("nat_remote_port"), column("connect_status"), column("srtt_us"), column("delta_bytes_sent"),
            column("delta_bytes_received"), strict=True,
        ):  # fmt: skip
            skey = (node, netns, cookie)
            if kind == _CLOSE:
                closed.append(skey)
            if key is None:  # a listener
                c["listener_records"] += 1
                self._add_listener(node, st, l4_columns.row(cols, i))
                continue
            # As _socket(), inline, and without an object until there is something to remember.
            sock: _Socket | None
            found = get_socket(skey, _ABSENT)
            if found is _ABSENT:
                sock = sockets[skey] = None
                if len(sockets) > max_sockets:
                    sockets.popitem(last=False)
                    c["sockets_evicted"] += 1
            else:
                sock = found  # type: ignore[assignment]
                touch(skey)  # least recently seen first: what a full table forgets
            if nat_ip:
                if sock is None:
                    sock = sockets[skey] = _Socket()
                sock.nat_ip, sock.nat_port = strings[nat_ip], nat_port
            first_connect = False
            failure = None
            if connect_status:  # CONNECT_STATUS_UNSPECIFIED is 0
                if sock is None:
                    sock = sockets[skey] = _Socket()
                first_connect = not sock.connect_seen
                sock.connect_seen = True
                failure = _CONNECT_ERRORS.get(connect_status)
                if first_connect and failure in ("connection_refused", "timeout"):
                    events.append((i, failure))
            acc = get_acc(key)
            if acc is None:
                ref = key.ref
                if ref not in edges and not self._admit(st, ref):
                    continue
                acc = accs[key] = _L4()
            acc.bytes_sent += sent
            acc.bytes_received += received
            if srtt_us:
                acc.rtt_sum_s += srtt_us / 1e6
                acc.rtt_n += 1
            if key.side is _CLIENT_SIDE:
                if kind == _CLOSE and failure is None:
                    acc.connections += 1
                if first_connect:
                    if failure is not None:
                        acc.failures[failure] = acc.failures.get(failure, 0) + 1
                    else:
                        latency_ns = cols.connect_latency_ns[i] if cols.connect_latency_ns else 0
                        if latency_ns:
                            if acc.connect is None:
                                acc.connect = _Hist(CONNECT_BOUNDS_S)
                            acc.connect.add(latency_ns / NS_PER_S)
        # Integer sums, so their order does not matter; a record whose edge was not admitted has no
        # accumulator for its side (admission is per edge and interval).
        for names, attr in _SPARSE_L4:
            for name in names:
                values = getattr(cols, name)
                if not values:
                    continue
                for i in compress(range(n), values):
                    key = sides[i]
                    acc = get_acc(key) if key is not None else None
                    if acc is not None:
                        setattr(acc, attr, getattr(acc, attr) + values[i])
        sent_resets, received_resets = cols.delta_resets_sent, cols.delta_resets_received
        if sent_resets or received_resets:
            resets = set(compress(range(n), sent_resets)) if sent_resets else set()
            if received_resets:
                resets.update(compress(range(n), received_resets))
            failed = dict(events)
            # A listener's resets make no log (its record is no edge).
            events = [(i, failed.get(i)) for i in sorted(resets.union(failed)) if sides[i] is not None]
        for i, failure in events:  # logs in record order, as the row form makes them
            f = l4_columns.row(cols, i)
            side = Side.SERVER if f.role == _SERVER else Side.CLIENT
            self._l4_events(node, st, f, resolve_l4(self._index, node, f), side, failure)

    def _l4_events(self, node: str, st: _NodeState, f: pb.L4Flow, r: Resolved, side: Side, failure: str | None) -> None:
        t = f.time_unix_nano
        d = f.delta
        # Workload level, as metrics: an edge per client port or pod would make a record per socket.
        e = edge(r, METRIC_EDGE)
        if d.resets_sent or d.resets_received:
            body = f"TCP reset ({f.tcp_state or 'unknown state'})"
            sums = (("kscope.tcp.resets_sent", d.resets_sent), ("kscope.tcp.resets_received", d.resets_received))
            st.logs.add(e, side, t, EVENT_TCP_RESET, Severity.WARN, body, (), sums=sums)
        if failure in ("connection_refused", "timeout"):
            name = EVENT_CONNECT_REFUSED if failure == "connection_refused" else EVENT_CONNECT_TIMEOUT
            body = f"connect to {graph_node_name(e.server)}:{r.remote.port} failed: {failure.replace('_', ' ')}"
            extra = (("error.type", failure), ("kscope.tcp.connect_errno", f.connect_errno))
            st.logs.add(e, side, t, name, Severity.WARN, body, extra)

    def _add_l7(self, node: str, st: _NodeState, q: pb.L7Request) -> None:
        protocol = _PROTOCOLS.get(q.protocol)
        if protocol is None:
            self._counters["unknown_protocol"] += 1
            return
        sock = self._sockets.get((node, q.netns_inode, q.socket_cookie))
        nat_ip, nat_port = q.nat_remote_ip, q.nat_remote_port  # UDP (no L4 record): the agent's, on the record
        if sock is not None and sock.nat_ip:  # TCP: the NAT answer of its socket's L4 record
            nat_ip, nat_port = sock.nat_ip, sock.nat_port
        route = self._resolutions.l7(node, q, nat_ip, nat_port)
        c = self._counters
        if route.unresolved:
            c["unresolved_local"] += 1
        if route.external:
            c["external_remote"] += 1
        side = route.side
        h2 = q.protocol == _H2
        if h2 and q.HasField("rpc"):
            protocol = _RPC
        method, route_name, status, error_type, extra, traceparent = _details(protocol, q, h2)
        latency_ns = q.latency_ns
        duration_s = latency_ns / NS_PER_S
        # Read only where the request is counted (see _graph).
        failed = route.count_request and semconv.PROTOCOLS[protocol].failed(side, status, error_type)
        # Checked only where it can be (a summary's latency_ns is 0): one request costs no HasField.
        summary = q.summary if not latency_ns and q.HasField("summary") else None
        n, parts = 1, None
        if summary is not None:
            n, parts = summary.count, _summary_parts(summary)
            c["l7_summaries"] += 1
            c["l7_summarized_requests"] += n
        ref = route.ref
        hist: _Hist | None = None
        if ref in st.edges or self._admit(st, ref):
            # DNS keeps its response code (an NXDOMAIN is no error, yet worth telling from a NOERROR);
            # not the question name, whose cardinality is the callers'.
            red_extra = (
                extra[1:]
                if protocol is _DNS
                else _db_metric_extra(extra)
                if protocol is _DB
                else (_V2,)
                if h2 and protocol is not _RPC
                else ()
            )
            key: _RedKey = (route.key, _PROTOCOL_VALUES[protocol], method, route_name, status, error_type, red_extra)
            hist = st.red.get(key)
            if hist is None and len(st.red) >= self._settings.max_red_keys:
                self._counters["red_overflowed"] += 1
            else:
                if hist is None:
                    hist = st.red[key] = _Hist(HTTP_DURATION_BOUNDS_S)
                if parts is None:
                    hist.add(duration_s)
                else:
                    hist.add_buckets(*parts)
            self._graph(st, route, side, failed, duration_s, n, parts)
        ctx = None
        if summary is None:  # a summary's requests were not picked for spans by the node
            ctx = self._span_ids(st, route, side, protocol, q, latency_ns, method, route_name, status, error_type,
                                 extra, traceparent)  # fmt: skip
            if hist is not None and st.spans and st.spans[-1].context is ctx:  # a span of a counted series
                self._remember(node, ctx.span_id, key)
        if (error_type and protocol is _DNS) or (
            status is not None and (status >= 500 or (protocol is _RPC and status in _RPC_SERVER_ERRORS))
        ):
            self._l7_event(st, route, side, protocol, q, method, route_name, status, error_type, extra, n, ctx)

    def _span_ids(
        self, st: _NodeState, route: Route, side: Side, protocol: Protocol, q: pb.L7Request, latency_ns: int,
        method: str, route_name: str, status: int | None, error_type: str, extra: tuple[tuple[str, AttrValue], ...],
        traceparent: str | None,
    ) -> SpanContext:  # fmt: skip
        """The span's ids (docs/traces.md) and its span: the application's own (valid) traceparent
        wins; else both ends' TCP sequence numbers link the hop's two spans, and a client call made
        inside a server request (``L7Request.parent``) is that server span's child. Spans whose
        trace is another hop's are marked for the trace join (``NodeReport.held``); hops whose trace
        this record settles are listed (``NodeReport.resolved``)."""
        h = q.http
        seqs = protocol is not _DNS and h.tcp_seqs_known
        parent = q.parent if side is _CLIENT_SIDE and q.HasField("parent") else None
        # parsed here only where it decides something (span_context parses it again)
        tp = parse_traceparent(traceparent) if traceparent and (seqs or parent is not None) else None
        if tp is not None:
            parent = None
        held: tuple[bytes, bytes, bytes] | None = None  # (wait, fallback, publish) as join.Held
        resolved: tuple[bytes, bytes] | None = None
        if not seqs and parent is None:
            ctx = span_context(traceparent)  # a header's, or a new trace: as before the links
        elif tp is not None:
            ctx = span_context(traceparent)
            if seqs:  # the header's trace is the hop's; a server span keeps a derivable id for its children
                _, client_id, server_id = links.linked_ids(h.tcp_request_seq, h.tcp_response_seq,
                                                          q.start_time_unix_nano)  # fmt: skip
                if side is _SIDE_SERVER:
                    ctx = ctx._replace(span_id=server_id)
                resolved = (client_id, ctx.trace_id)
        elif parent is not None:
            trace_id, parent_client, parent_server = links.linked_ids(
                parent.tcp_request_seq, parent.tcp_response_seq, parent.start_time_unix_nano
            )
            own = (
                links.linked_ids(h.tcp_request_seq, h.tcp_response_seq, q.start_time_unix_nano)[1]
                if seqs
                else span_context().span_id
            )
            # a child of a span of the same process: a local parent, in the trace of that server span
            ctx = _new_tuple(SpanContext, (trace_id, own, parent_server, FLAG_SAMPLED, "", False))
            held = (parent_client, trace_id, own if seqs else b"")
        else:
            ctx = links.linked_context(side, h.tcp_request_seq, h.tcp_response_seq, q.start_time_unix_nano)
            if side is _SIDE_SERVER:
                held = (ctx.parent_span_id, ctx.trace_id, b"")
            else:
                resolved = (ctx.span_id, ctx.trace_id)
        if resolved is not None:
            st.resolved.append(resolved)
        if self._span(st, route, side, protocol, q, latency_ns, method, route_name, status, error_type, extra, ctx):
            self._links.span(side, ctx, seqs and tp is None, parent is not None)
            if held is not None:
                st.held.append(_new_tuple(Held, (len(st.spans) - 1, *held)))
        return ctx

    def _remember(self, node: str, span_id: bytes, key: _RedKey) -> None:
        """Which RED series a span's request was counted in (by value: interned edges may be pruned
        between intervals), until the span leaves (:meth:`exemplars`)."""
        es = key[0]
        remembered = self._exemplar_of
        remembered[span_id] = (node, (es.ref.edge, es.side, *key[1:]))
        if len(remembered) > self._settings.max_exemplar_spans:
            remembered.popitem(last=False)
            self._counters["exemplar_spans_evicted"] += 1

    def exemplars(self, spans: dict[str, list[SpanRecord]]) -> None:
        """Spans that left (their trace ids final): the slowest of each RED series becomes that
        series' exemplar on its next point (a series with no request in the next interval has no
        point, and its exemplar goes)."""
        remembered, best = self._exemplar_of, self._exemplars
        for spans_of_node in spans.values():
            for s in spans_of_node:
                ctx = s.context
                found = remembered.pop(ctx.span_id, None)
                if found is None:
                    continue
                value = (s.end_unix_nano - s.start_unix_nano) / NS_PER_S
                have = best.get(found)
                if have is None or value > have.value:
                    best[found] = Exemplar(ctx.trace_id, ctx.span_id, value, s.end_unix_nano)

    def _l7_event(
        self, st: _NodeState, route: Route, side: Side, protocol: Protocol, q: pb.L7Request, method: str,
        route_name: str, status: int | None, error_type: str, extra: tuple[tuple[str, AttrValue], ...], n: int,
        ctx: SpanContext | None,
    ) -> None:  # fmt: skip
        """A failed DNS lookup, a 5xx answer or a gRPC code that fails a server (``n`` of them for a
        summary), logged from each side that saw it, under the workload edge. The first occurrence's
        trace, if it had one, is the record's."""
        trace = (ctx.trace_id, ctx.span_id) if ctx is not None else (b"", b"")
        e = route.ref.edge
        t = q.start_time_unix_nano
        if protocol is _DNS:
            body = f"DNS {method} {q.dns.question_name}: {error_type}"
            st.logs.add(e, side, t, EVENT_DNS_ERROR, Severity.WARN, body, (*extra, ("error.type", error_type)),
                      trace, n)  # fmt: skip
            return
        if protocol is _RPC:
            code = rpc.code_name(status or 0)
            # the server's rule for error.type: both sides log what the server failed on
            attrs = rpc.attributes(Side.SERVER, method, "", status, "")
            name = dict(attrs)[rpc.RPC_METHOD]  # _OTHER for a method the server does not have
            st.logs.add(e, side, t, EVENT_RPC_SERVER_ERROR, Severity.WARN, f"gRPC {code} {name}", attrs, trace, n)
            return
        m = semconv.normal_method(method)
        body = f"HTTP {status} {m} {route_name}" if route_name else f"HTTP {status} {m}"
        # The route template only (never the path: it may carry ids, and would make a record per request).
        http: list[tuple[str, AttrValue]] = [("http.request.method", m), ("http.response.status_code", status or 0),
                                             ("error.type", str(status))]  # fmt: skip
        if route_name:
            http.append(("http.route", route_name))
        st.logs.add(e, side, t, EVENT_HTTP_SERVER_ERROR, Severity.WARN, body, http, trace, n)

    def _graph(
        self, st: _NodeState, route: Route, side: Side, failed: bool, duration_s: float, n: int = 1,
        parts: tuple[Sequence[int], float, float, float] | None = None,
    ) -> None:  # fmt: skip
        """One request of ``duration_s``, or a summary's ``n`` requests (all with the same status),
        its latencies as ``parts`` (:func:`_summary_parts`)."""
        gref = route.graph
        assert gref is not None
        g = st.graph.get(gref)
        if g is None:
            g = st.graph[gref] = _Graph()
        if route.count_request:
            g.requests += n
            if failed:
                g.failed += n
        if side is _SIDE_SERVER:
            hist = g.server = g.server or _Hist(SERVICE_GRAPH_BOUNDS_S)
        else:
            hist = g.client = g.client or _Hist(SERVICE_GRAPH_BOUNDS_S)
        if parts is None:
            hist.add(duration_s)
        else:
            hist.add_buckets(*parts)

    def _span(
        self,
        st: _NodeState,
        route: Route,
        side: Side,
        protocol: Protocol,
        q: pb.L7Request,
        latency_ns: int,
        method: str,
        route_name: str,
        status: int | None,
        error_type: str,
        extra: tuple[tuple[str, AttrValue], ...],
        ctx: SpanContext,
    ) -> bool:
        """False: not kept (counted)."""
        span_edge = route.span_edge
        assert span_edge is not None
        start = q.start_time_unix_nano
        if len(st.spans) >= self._settings.max_spans or self._spans_held >= self._settings.max_spans_total:
            self._counters["spans_overflowed"] += 1
            return False
        self._spans_held += 1
        st.spans.append(
            _new_tuple(SpanRecord, (span_edge, side, protocol, ctx, start, start + latency_ns, method, route_name,
                                    status, error_type, extra))
        )  # fmt: skip
        return True

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
                red=tuple(_red_points(st, node, self._exemplars)),
                l4=tuple(_l4_points(st)),
                service_graph=tuple(_graph_points(st)),
                listeners=tuple(
                    ListenerPoint(owner, port, v.overflows, v.drops, v.queue, v.queue_limit)
                    for (owner, port), v in st.listeners.items()
                ),
            )
            out.append(NodeReport(interval, tuple(st.spans), tuple(st.logs.records(end_unix_nano)), tuple(st.held),
                                  tuple(st.resolved)))  # fmt: skip
        self._nodes = {}
        self._exemplars = {}  # those of series without a point this interval go
        self._spans_held = 0
        # No node state refers to the interned edges now: the only moment they may be dropped.
        self._resolutions.prune()
        return out


def _details(
    protocol: Protocol, q: pb.L7Request, h2: bool = False
) -> tuple[str, str, int | None, str, tuple[tuple[str, AttrValue], ...], str | None]:
    """(method, route, status, error type, span extras, traceparent) of one L7 record. ``h2``: it
    came over HTTP/2 (an RPC, or HTTP whose extras say network.protocol.version 2)."""
    if protocol is _DB:
        return _db_details(q)
    if protocol is _DNS:
        d = q.dns
        rcode = d.rcode
        error = semconv.dns_error_type(rcode, d.timed_out)
        # Built in canonical (sorted, as resolved.attrs makes it) order directly: no sort per record.
        question: tuple[str, AttrValue] = ("dns.question.name", d.question_name)
        extra: tuple[tuple[str, AttrValue], ...] = (
            (question, (semconv.DNS_RESPONSE_CODE, rcode)) if rcode else (question,)
        )
        return d.question_type, "", None, error, extra, q.http.traceparent if q.HasField("http") else None
    h = q.http
    method, route, path, request_id, status_code, traceparent = _HTTP(h)
    if request_id:
        rid: tuple[str, AttrValue] = ("http.request.header.x-request-id", request_id)
    if protocol is _RPC:
        r = q.rpc
        code = rpc.status_of(r.grpc_status_code if r.HasField("grpc_status_code") else None, status_code)
        # the path is the method: no url.path
        return f"{r.service}/{r.method}", "", code, "", (rid,) if request_id else (), traceparent
    status = status_code or None
    # Built in canonical (sorted) order: x-request-id, network.protocol.version, url.path.
    extra = ((rid,) if request_id else ()) + ((_V2,) if h2 else ()) + ((("url.path", path),) if path else ())
    # No response at all is a failure the status code cannot express.
    return method, route, status, "" if status is not None else "no_response", extra, traceparent


def _db_details(
    q: pb.L7Request,
) -> tuple[str, str, int | None, str, tuple[tuple[str, AttrValue], ...], str | None]:
    """A database operation: its name is the method, its query summary the route (the span's name);
    the rest are extras in canonical (sorted) order. No traceparent travels in these protocols."""
    d = q.db
    pairs: list[tuple[str, AttrValue]] = [("db.system.name", d.system or q.protocol)]
    for key, value in (("db.collection.name", d.collection), ("db.namespace", d.namespace),
                       ("db.query.summary", d.query_summary), ("db.query.text", d.query_text),
                       ("db.response.status_code", d.status_code)):  # fmt: skip
        if value:
            pairs.append((key, value))
    pairs.sort()
    return d.operation, d.query_summary or d.operation, None, d.error_type, tuple(pairs), None


def _db_metric_extra(extra: tuple[tuple[str, AttrValue], ...]) -> tuple[tuple[str, AttrValue], ...]:
    return tuple(p for p in extra if p[0] in _DB_METRIC_KEYS)


def _summary_parts(s: pb.L7Summary) -> tuple[Sequence[int], float, float, float]:
    """An L7 summary as :meth:`_Hist.add_buckets` takes it: bucket counts, sum, min, max (seconds)."""
    to_s = NS_PER_S
    return s.latency_bucket_counts, s.latency_sum_ns / to_s, s.latency_min_ns / to_s, s.latency_max_ns / to_s


def _red_points(
    st: _NodeState, node: str, exemplars: dict[tuple[str, tuple[Any, ...]], Exemplar]
) -> Iterable[RedPoint]:
    new, protocols = _new_tuple, _PROTOCOL_OF_VALUE
    for (es, protocol, method, route, status, error_type, extra), hist in st.red.items():
        edge, side = es.ref.edge, es.side
        ex = None
        if exemplars:
            ex = exemplars.get((node, (edge, side, protocol, method, route, status, error_type, extra)))
        yield new(RedPoint, (edge, side, protocols[protocol], hist.freeze(), method, route, status, error_type, extra,
                             ex))  # fmt: skip


def _l4_points(st: _NodeState) -> Iterable[L4Point]:
    for es, a in st.l4.items():
        yield L4Point(
            es.ref.edge,
            es.side,
            a.bytes_sent,
            a.bytes_received,
            a.connections,
            tuple(sorted(a.failures.items())) if a.failures else (),
            a.retransmits,
            a.resets,
            a.drops,
            a.connect.freeze() if a.connect is not None else None,
            a.rtt_sum_s / a.rtt_n if a.rtt_n else None,
        )


def _graph_points(st: _NodeState) -> Iterable[ServiceGraphPoint]:
    for gref, g in st.graph.items():
        yield _new_tuple(
            ServiceGraphPoint,
            (
                gref.client,
                gref.server,
                g.requests,
                g.failed,
                gref.ctype,
                g.server.freeze() if g.server is not None else None,
                g.client.freeze() if g.client is not None else None,
                gref.client_namespace,
                gref.server_namespace,
            ),
        )
