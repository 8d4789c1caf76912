"""The live service map's state: one row per edge ``client → server``, fed the aggregator's intervals.

Rates and latencies cover a sliding window of the last ``window`` intervals; an edge quiet for
``fade_s`` is shown faded, and forgotten after ``forget_s``. At most ``max_edges`` edges are kept
(the least recently active is forgotten first, counted in ``edges_evicted``), each with at most
``max_routes`` routes (``routes_overflowed``) and its ``max_slowest`` slowest recent requests.

A request is counted once, as the service graph counts it: by the server when kscope sees the server
(``Endpoint.observed``), else by the client. Both sides' latency is kept: the client's includes the
network and queueing the server cannot see.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from operator import add, attrgetter, sub
from typing import Any, Final, cast

from cluster_processor.otlp import rpc, semconv
from cluster_processor.otlp.model import (
    HTTP_DURATION_BOUNDS_S,
    Histogram,
    Interval,
    L4Point,
    Protocol,
    RedPoint,
    SpanRecord,
)
from cluster_processor.otlp.semconv import DNS_RESPONSE_CODE
from cluster_processor.resolved import Attrs, Edge, Side, attr
from node_exporter.local.identity import PROCESS_EXECUTABLE_NAME, label, short_label

_NBUCKETS: Final = len(HTTP_DURATION_BOUNDS_S) + 1
SLOW_RATIO: Final = 2.0  # client latency this many times the server's own (and SLOW_GAP_S above it): a problem
SLOW_GAP_S: Final = 0.010
DB_SYSTEM_NAME: Final = "db.system.name"
DB_RESPONSE_STATUS_CODE: Final = "db.response.status_code"


def quantile(counts: list[int], q: float, lo: float | None, hi: float | None) -> float | None:
    """A histogram's q-quantile, interpolated within its bucket (as Prometheus' histogram_quantile),
    kept within the values' min and max."""
    n = sum(counts)
    if not n:
        return None
    rank, seen = q * n, 0
    bounds = HTTP_DURATION_BOUNDS_S
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            low = bounds[i - 1] if i > 0 else 0.0
            high = bounds[i] if i < len(bounds) else (hi if hi is not None else low)
            v = low + (high - low) * ((rank - seen) / c)
            if lo is not None:
                v = max(v, lo)
            if hi is not None:
                v = min(v, hi)
            return v
        seen += c
    return hi


@dataclass(slots=True)
class Latency:
    counts: list[int] = field(default_factory=lambda: [0] * _NBUCKETS)
    lo: float | None = None
    hi: float | None = None

    def add(self, h: Histogram | Latency, sign: int = 1) -> None:
        """Add (or, ``sign`` -1, take away: the window sliding) another's counts; min and max only add."""
        src = h.bucket_counts if isinstance(h, Histogram) else h.counts
        if len(src) != _NBUCKETS:
            return
        if sign < 0:
            self.counts = list(map(sub, self.counts, src))
            return
        self.counts = list(map(add, self.counts, src))  # in C: the hottest line of a map update
        lo, hi = (h.min, h.max) if isinstance(h, Histogram) else (h.lo, h.hi)
        if lo is not None:
            self.lo = lo if self.lo is None else min(self.lo, lo)
        if hi is not None:
            self.hi = hi if self.hi is None else max(self.hi, hi)

    def q(self, q: float) -> float | None:
        return quantile(self.counts, q, self.lo, self.hi)


# Tick's numeric fields, in its order (EdgeRow.vec)
_FIELDS: Final = ("seconds", "requests", "errors", "bytes", "retransmits", "resets", "connects", "connect_s",
                  "connect_n", "failures", "client_s", "client_n", "server_s", "server_n")  # fmt: skip
_VEC: Final = attrgetter(*_FIELDS)


@dataclass(slots=True)
class Tick:
    """One interval of one edge (or, as ``EdgeRow.sums``, the window's totals)."""

    seconds: float
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    retransmits: int = 0
    resets: int = 0
    connects: int = 0
    connect_s: float = 0.0  # summed latency of successful connects (their buckets differ from requests')
    connect_n: int = 0
    failures: int = 0
    client_s: float = 0.0  # summed request latency seen by the client (its mean orders the rows)
    client_n: int = 0
    server_s: float = 0.0
    server_n: int = 0
    # The interval's histograms as they came, merged only when a row is shown (most never are); None
    # until a request is seen: most ticks of most edges have none.
    client: list[Histogram] | None = None
    server: list[Histogram] | None = None


_PENDING: Final = 32  # histograms a route keeps unmerged (only an open edge's routes are read)


@dataclass(slots=True)
class RouteStats:
    statuses: dict[str, int] = field(default_factory=dict)  # "200", "NXDOMAIN", "no_response"
    merged: Latency = field(default_factory=Latency)
    pending: list[Histogram] = field(default_factory=list)

    def add(self, h: Histogram) -> None:
        self.pending.append(h)
        if len(self.pending) >= _PENDING:
            self._merge()

    def _merge(self) -> None:
        for h in self.pending:
            self.merged.add(h)
        self.pending.clear()

    @property
    def latency(self) -> Latency:
        self._merge()
        return self.merged


@dataclass(slots=True)
class Slow:
    seconds: float
    method: str
    what: str  # route or path, or a DNS name
    status: str
    side: str
    at: float = 0.0  # monotonic seconds of the interval it came in


@dataclass(slots=True)
class EdgeRow:
    """One edge: its last ``window`` intervals, and their running totals (``sums``), kept as the
    window slides so that reading a row costs the same whatever the window."""

    client: str
    server: str
    short: str = ""  # "curl → nginx:8080", for narrow terminals
    protocols: set[str] = field(default_factory=set)
    ticks: deque[Tick] = field(default_factory=deque)
    # The window's totals as one vector in _FIELDS order: a slide is two vector operations in C
    vec: list[float] = field(default_factory=lambda: [0.0] * len(_FIELDS))
    last_active: float = 0.0
    routes: dict[tuple[str, str], RouteStats] = field(default_factory=dict)
    rcodes: dict[str, int] = field(default_factory=dict)
    slowest: list[tuple[float, int, Slow]] = field(default_factory=list)  # a min-heap of the slowest
    slowest_oldest: float = 0.0  # when the oldest of them came in
    server_seen: bool = False  # the server is a local process: it counts the requests (not the client)
    last_protocol: Protocol | None = None  # the protocol last added to ``protocols``
    _problems: list[str] | None = None
    _sums: Tick | None = None
    _latency: dict[str, Latency] | None = None

    def push(self, t: Tick, window: int, empty: bool = False) -> None:
        """The next interval (``empty``: the shared tick of an interval with nothing on this edge)."""
        vec = self.vec
        if len(self.ticks) >= window:
            vec = list(map(sub, vec, _VEC(self.ticks.popleft())))
        self.ticks.append(t)
        if empty:
            vec[0] += t.seconds
        else:
            vec = list(map(add, vec, _VEC(t)))
        self.vec = vec
        self._problems = self._sums = self._latency = None

    @property
    def sums(self) -> Tick:
        """The window's totals (made when read: most rows are not read every interval)."""
        if self._sums is None:
            self._sums = Tick(*cast("list[Any]", self.vec))  # _FIELDS is Tick's order (counts as floats)
        return self._sums

    # ---- window figures ----
    @property
    def seconds(self) -> float:
        return self.sums.seconds or 1.0

    def rate(self, name: str) -> float:
        return float(getattr(self.sums, name)) / self.seconds

    def total(self, name: str) -> int:
        return int(getattr(self.sums, name))

    def latency(self, side: str) -> Latency:
        """The window's latency histogram on one side, merged when asked (only shown rows ask) and
        kept until the window moves."""
        if self._latency is None:
            self._latency = {}
        found = self._latency.get(side)
        if found is None:
            found = self._latency[side] = Latency()
            hists = [h for t in self.ticks for h in getattr(t, side) or () if len(h.bucket_counts) == _NBUCKETS]
            if hists:
                found.counts = list(map(sum, zip(*(h.bucket_counts for h in hists), strict=True)))
                found.lo = min((h.min for h in hists if h.min is not None), default=None)
                found.hi = max((h.max for h in hists if h.max is not None), default=None)
        return found

    @property
    def connect_ms(self) -> float | None:
        n = self.sums.connect_n
        return 1000.0 * self.sums.connect_s / n if n else None

    @property
    def error_pct(self) -> float | None:
        n = self.sums.requests
        return 100.0 * self.sums.errors / n if n else None

    @property
    def protocol(self) -> str:
        return "+".join(sorted(self.protocols)) or "tcp"

    def problems(self) -> list[str]:
        """Why this edge is shown first: errors, latency the server does not account for,
        retransmits, failed connects, resets. Kept until the window moves."""
        if self._problems is not None:
            return self._problems
        out = []
        sums = self.sums
        if sums.errors:
            out.append("errors")
        if sums.client_n and sums.server_n:  # means: cheap for every row, every interval
            c, s = sums.client_s / sums.client_n, sums.server_s / sums.server_n
            if c > SLOW_RATIO * s and c - s > SLOW_GAP_S:
                out.append("slow")
        if sums.retransmits:
            out.append("retrans")
        if sums.failures:
            out.append("connect")
        if sums.resets:
            out.append("resets")
        self._problems = out
        return out


@dataclass(frozen=True, slots=True)
class MapSettings:
    max_edges: int = 10_000
    window: int = 10  # intervals the rates and latencies cover
    fade_s: float = 30.0
    forget_s: float = 300.0
    max_routes: int = 50
    max_slowest: int = 10
    slowest_s: float = 60.0  # how long a slow request stays among the "recent" ones


@dataclass(frozen=True, slots=True)
class Totals:
    """The header's figures over every edge."""

    active: int = 0  # edges not faded
    request_rate: float = 0.0
    requests: int = 0
    errors: int = 0
    byte_rate: float = 0.0


class ServiceMap:
    def __init__(self, settings: MapSettings = MapSettings()) -> None:
        self.settings = settings
        self.edges: OrderedDict[tuple[str, str], EdgeRow] = OrderedDict()  # least recently active first
        self.counters = {"edges_evicted": 0, "routes_overflowed": 0, "edges_forgotten": 0}
        self.intervals = 0
        self._order: tuple[tuple[int, int], list[EdgeRow]] | None = None
        self._totals: tuple[tuple[int, int], Totals] | None = None

    def _row(self, client: str, server: str, edge: Edge) -> EdgeRow:
        key = (client, server)
        row = self.edges.get(key)
        if row is None:
            short = f"{short_label(edge.client)} → {short_label(edge.server)}"
            seen = attr(edge.server, PROCESS_EXECUTABLE_NAME) is not None
            row = self.edges[key] = EdgeRow(client, server, short, server_seen=seen)
            if len(self.edges) > self.settings.max_edges:
                self.edges.popitem(last=False)
                self.counters["edges_evicted"] += 1
        return row

    def update(self, interval: Interval, spans: tuple[SpanRecord, ...], now: float) -> None:
        """Fold one interval (and its spans) in; ``now`` is monotonic seconds."""
        self.intervals += 1
        seconds = max((interval.end_unix_nano - interval.start_unix_nano) / 1e9, 1e-3)
        ticks: dict[tuple[str, str], tuple[Tick, EdgeRow]] = {}
        # The aggregator interns its edges: the points of one edge share one object, alive while the
        # interval is, so its id() finds its row without hashing its attributes again.
        by_id: dict[int, tuple[Tick, EdgeRow]] = {}

        def tick(e: Edge) -> tuple[Tick, EdgeRow]:
            found = by_id.get(id(e))
            if found is None:
                key = (label(e.client), label(e.server))
                found = ticks.get(key)
                if found is None:  # each edge's row looked up (or made) once per interval
                    found = ticks[key] = (Tick(seconds), self._row(*key, e))
                by_id[id(e)] = found
            return found

        for p in interval.red:
            self._red(p, *tick(p.edge))
        for lp in interval.l4:
            _l4(lp, tick(lp.edge)[0])
        for key, (t, _) in ticks.items():
            if key in self.edges and (t.requests or t.bytes or t.connects or t.failures or t.retransmits or t.resets):
                self.edges[key].last_active = now
                self.edges.move_to_end(key)
        for s in spans:
            found = self.edges.get((label(s.edge.client), label(s.edge.server)))
            if found is not None:
                _slow(found, s, self.settings, now)
        self._age(now, seconds, ticks)

    def _red(self, p: RedPoint, t: Tick, row: EdgeRow) -> None:
        protocol = p.protocol
        if protocol is not row.last_protocol:  # an edge's points are of one protocol, mostly
            row.protocols.add(protocol_label(protocol, p.attributes))
            row.last_protocol = protocol
        h = p.duration
        n = sum(h.bucket_counts)
        server = p.side is Side.SERVER
        if server:
            if t.server is None:
                t.server = []
            t.server.append(h)
            t.server_s += h.sum
            t.server_n += n
        else:
            if t.client is None:
                t.client = []
            t.client.append(h)
            t.client_s += h.sum
            t.client_n += n
        # Counted once: by the server when kscope sees it (a local process), else by the client.
        if server != row.server_seen:
            return
        t.requests += n
        # HTTP's rule inline: a dict keyed by an Enum hashes it in Python, once per point
        if protocol is Protocol.HTTP:
            failed = semconv.http_failed(p.side, p.status_code, p.error_type)
        else:
            failed = semconv.PROTOCOLS[protocol].failed(p.side, p.status_code, p.error_type)
        if failed:
            t.errors += n
        status = status_label(protocol, p.status_code, p.error_type, p.attributes)
        if protocol is Protocol.DNS:
            row.rcodes[status] = row.rcodes.get(status, 0) + n
        # A database operation's route is its query summary, which for a command (Redis GET) is the
        # operation itself: shown once.
        key = (p.method, p.route if p.route != p.method else "")
        rs = row.routes.get(key)
        if rs is None:
            if len(row.routes) >= self.settings.max_routes:
                self.counters["routes_overflowed"] += n
                return
            rs = row.routes[key] = RouteStats()
        rs.statuses[status] = rs.statuses.get(status, 0) + n
        rs.add(h)

    def _age(self, now: float, seconds: float, ticks: dict[tuple[str, str], tuple[Tick, EdgeRow]]) -> None:
        """Slide every window (a quiet edge's interval is an empty one); forget edges quiet for
        forget_s (they are least recently active first)."""
        window = self.settings.window
        empty = Tick(seconds)  # one for every quiet edge of this interval: never changed
        for key, row in self.edges.items():
            found = ticks.get(key)
            row.push(found[0] if found is not None else empty, window, found is None)
        while self.edges:
            key, row = next(iter(self.edges.items()))
            if now - row.last_active <= self.settings.forget_s:
                break
            del self.edges[key]
            self.counters["edges_forgotten"] += 1

    def faded(self, row: EdgeRow, now: float) -> bool:
        return now - row.last_active > self.settings.fade_s

    def totals(self, now: float) -> Totals:
        """Summed once per interval and second, as ``ordered`` sorts."""
        stamp = (self.intervals, int(now))
        if self._totals is None or self._totals[0] != stamp:
            rows = self.edges.values()
            self._totals = (stamp, Totals(
                sum(not self.faded(r, now) for r in rows), sum(r.rate("requests") for r in rows),
                sum(r.total("requests") for r in rows), sum(r.total("errors") for r in rows),
                sum(r.rate("bytes") for r in rows),
            ))  # fmt: skip
        return self._totals[1]

    def ordered(self, now: float) -> list[EdgeRow]:
        """Edges with problems first (more problems, then more errors), then the busiest; faded last.
        Sorted once per interval and second (every redraw and key press asks)."""
        stamp = (self.intervals, int(now))
        if self._order is not None and self._order[0] == stamp:
            return self._order[1]

        def key(r: EdgeRow) -> tuple[bool, int, float, float, float]:
            return (self.faded(r, now), -len(r.problems()), -(r.error_pct or 0.0), -r.rate("requests"),
                    -r.rate("bytes"))  # fmt: skip

        order = sorted(self.edges.values(), key=key)
        self._order = (stamp, order)
        return order


def _l4(p: L4Point, t: Tick) -> None:
    # Bytes once (the larger side's view: each side counts the same bytes); both sides retransmit their
    # own segments; an RST is seen by both ends, so the larger count.
    t.bytes = max(t.bytes, p.bytes_sent + p.bytes_received)
    t.retransmits += p.retransmits
    t.resets = max(t.resets, p.resets)
    if p.side is Side.CLIENT:
        t.connects += p.connections
        t.failures += sum(n for _, n in p.connect_failures)
        if p.connect_duration is not None:
            t.connect_s += p.connect_duration.sum
            t.connect_n += sum(p.connect_duration.bucket_counts)


_TIEBREAK: Final = itertools.count()


def protocol_label(protocol: Protocol, attributes: Attrs) -> str:
    """What the protocol column says: a database by its system (redis, postgresql), gRPC as grpc."""
    if protocol is Protocol.DB:
        return str(attr(attributes, DB_SYSTEM_NAME) or protocol.value)
    return rpc.GRPC if protocol is Protocol.RPC else protocol.value


def status_label(protocol: Protocol, status_code: int | None, error_type: str, attributes: Attrs) -> str:
    """A request's outcome as the map shows it: an HTTP status, a gRPC code by name (NOT_FOUND), a DNS
    response code, a database's own status (Redis ERR, a SQLSTATE) or OK; else why there was none."""
    if protocol is Protocol.DNS:
        rcode = attr(attributes, DNS_RESPONSE_CODE)
        return str(rcode).upper() if rcode else (error_type or "NOERROR")
    if protocol is Protocol.DB:  # answered: no status_code, its own in db.response.status_code
        code = attr(attributes, DB_RESPONSE_STATUS_CODE)
        return str(code) if code else (error_type or "OK")
    if status_code is None:
        return error_type or "no_response"
    return rpc.code_name(status_code) if protocol is Protocol.RPC else str(status_code)


def _slow(row: EdgeRow, s: SpanRecord, settings: MapSettings, now: float) -> None:
    if row.slowest and row.slowest_oldest < now - settings.slowest_s:
        row.slowest = [x for x in row.slowest if x[2].at >= now - settings.slowest_s]  # recent ones only
        heapq.heapify(row.slowest)
        row.slowest_oldest = min((x[2].at for x in row.slowest), default=now)
    if not row.slowest:
        row.slowest_oldest = now
    seconds = (s.end_unix_nano - s.start_unix_nano) / 1e9
    what = s.route or str(attr(s.attributes, "url.path") or attr(s.attributes, "dns.question.name") or "")
    status = status_label(s.protocol, s.status_code, s.error_type, s.attributes)
    # A counter breaks ties: id() of a span freed since is reused, and two Slow cannot be compared.
    item = (seconds, next(_TIEBREAK), Slow(seconds, s.method, what, status, s.side.value, now))
    if len(row.slowest) < settings.max_slowest:
        heapq.heappush(row.slowest, item)
    elif seconds > row.slowest[0][0] and heapq.heapreplace(row.slowest, item)[2].at == row.slowest_oldest:
        row.slowest_oldest = min(x[2].at for x in row.slowest)  # the oldest may have left
