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
from operator import add, sub
from typing import Final

from cluster_processor.otlp import semconv
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
from cluster_processor.resolved import Edge, Side, attr
from node_exporter.local.identity import PROCESS_EXECUTABLE_NAME, label, short_label

_NBUCKETS: Final = len(HTTP_DURATION_BOUNDS_S) + 1
SLOW_RATIO: Final = 2.0  # client latency this many times the server's own (and SLOW_GAP_S above it): a problem
SLOW_GAP_S: Final = 0.010


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


_COUNTS: Final = ("requests", "errors", "bytes", "retransmits", "resets", "connects", "connect_n", "failures",
                   "client_n", "server_n")  # fmt: skip
_SECONDS: Final = ("connect_s", "client_s", "server_s")


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
    client: Latency | None = None  # made when a request is seen: most ticks of most edges have none
    server: Latency | None = None

    def side(self, name: str) -> Latency:
        found: Latency | None = getattr(self, name)
        if found is None:
            found = Latency()
            setattr(self, name, found)
        return found


@dataclass(slots=True)
class RouteStats:
    statuses: dict[str, int] = field(default_factory=dict)  # "200", "NXDOMAIN", "no_response"
    latency: Latency = field(default_factory=Latency)


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
    sums: Tick = field(default_factory=lambda: Tick(0.0))
    last_active: float = 0.0
    routes: dict[tuple[str, str], RouteStats] = field(default_factory=dict)
    rcodes: dict[str, int] = field(default_factory=dict)
    slowest: list[tuple[float, int, Slow]] = field(default_factory=list)  # a min-heap of the slowest
    _problems: list[str] | None = None

    def push(self, t: Tick, window: int, empty: bool) -> None:
        """The next interval (``empty``: the shared tick of an interval with nothing on this edge)."""
        if len(self.ticks) >= window:
            self._fold(self.ticks.popleft(), -1)
        self.ticks.append(t)
        if empty:
            self.sums.seconds += t.seconds
        else:
            self._fold(t, 1)
        self._problems = None

    def _fold(self, t: Tick, sign: int) -> None:
        sums = self.sums
        sums.seconds += sign * t.seconds
        if t.client is None and t.server is None and not (t.bytes or t.connects or t.failures or t.retransmits
                                                           or t.resets or t.connect_n):  # fmt: skip
            return  # an empty tick: only its seconds
        for name in _COUNTS:
            if v := getattr(t, name):
                setattr(sums, name, getattr(sums, name) + sign * v)
        for name in _SECONDS:
            if v := getattr(t, name):
                setattr(sums, name, getattr(sums, name) + sign * v)

    # ---- window figures ----
    @property
    def seconds(self) -> float:
        return self.sums.seconds or 1.0

    def rate(self, name: str) -> float:
        return float(getattr(self.sums, name)) / self.seconds

    def total(self, name: str) -> int:
        return int(getattr(self.sums, name))

    def latency(self, side: str) -> Latency:
        """The window's latency histogram on one side, merged when asked (only shown rows ask)."""
        out = Latency()
        if getattr(self.sums, f"{side}_n"):
            for t in self.ticks:
                lat = getattr(t, side)
                if lat is not None:
                    out.add(lat)
        return out

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


class ServiceMap:
    def __init__(self, settings: MapSettings = MapSettings()) -> None:
        self.settings = settings
        self.edges: OrderedDict[tuple[str, str], EdgeRow] = OrderedDict()  # least recently active first
        self.counters = {"edges_evicted": 0, "routes_overflowed": 0, "edges_forgotten": 0}
        self.intervals = 0
        self._order: tuple[tuple[int, int], list[EdgeRow]] | None = None

    def _row(self, client: str, server: str, edge: Edge) -> EdgeRow:
        key = (client, server)
        row = self.edges.get(key)
        if row is None:
            row = self.edges[key] = EdgeRow(client, server, f"{short_label(edge.client)} → {short_label(edge.server)}")
            if len(self.edges) > self.settings.max_edges:
                self.edges.popitem(last=False)
                self.counters["edges_evicted"] += 1
        return row

    def update(self, interval: Interval, spans: tuple[SpanRecord, ...], now: float) -> None:
        """Fold one interval (and its spans) in; ``now`` is monotonic seconds."""
        self.intervals += 1
        seconds = max((interval.end_unix_nano - interval.start_unix_nano) / 1e9, 1e-3)
        ticks: dict[tuple[str, str], tuple[Tick, EdgeRow]] = {}

        def tick(e: Edge) -> tuple[Tick, EdgeRow]:
            key = (label(e.client), label(e.server))
            found = ticks.get(key)
            if found is None:  # each edge's row looked up (or made) once per interval
                found = ticks[key] = (Tick(seconds), self._row(*key, e))
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
        row.protocols.add(p.protocol.value)
        h = p.duration
        n = sum(h.bucket_counts)
        if p.side is Side.SERVER:
            t.side("server").add(h)
            t.server_s += h.sum
            t.server_n += n
        else:
            t.side("client").add(h)
            t.client_s += h.sum
            t.client_n += n
        # Counted once: by the server when kscope sees it (a local process), else by the client.
        server_seen = attr(p.edge.server, PROCESS_EXECUTABLE_NAME) is not None
        if (p.side is Side.SERVER) != server_seen:
            return
        t.requests += n
        failed = semconv.PROTOCOLS[p.protocol].failed(p.side, p.status_code, p.error_type)
        if failed:
            t.errors += n
        status = str(p.status_code) if p.status_code is not None else (p.error_type or "no_response")
        if p.protocol is Protocol.DNS:
            rcode = attr(p.attributes, DNS_RESPONSE_CODE)
            status = str(rcode).upper() if rcode else (p.error_type or "NOERROR")
            row.rcodes[status] = row.rcodes.get(status, 0) + n
        key = (p.method, p.route)
        rs = row.routes.get(key)
        if rs is None:
            if len(row.routes) >= self.settings.max_routes:
                self.counters["routes_overflowed"] += n
                return
            rs = row.routes[key] = RouteStats()
        rs.statuses[status] = rs.statuses.get(status, 0) + n
        rs.latency.add(h)

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


def _slow(row: EdgeRow, s: SpanRecord, settings: MapSettings, now: float) -> None:
    if row.slowest and min(x[2].at for x in row.slowest) < now - settings.slowest_s:
        row.slowest = [x for x in row.slowest if x[2].at >= now - settings.slowest_s]  # recent ones only
        heapq.heapify(row.slowest)
    seconds = (s.end_unix_nano - s.start_unix_nano) / 1e9
    what = s.route or str(attr(s.attributes, "url.path") or attr(s.attributes, "dns.question.name") or "")
    status = str(s.status_code) if s.status_code is not None else (s.error_type or "")
    # A counter breaks ties: id() of a span freed since is reused, and two Slow cannot be compared.
    item = (seconds, next(_TIEBREAK), Slow(seconds, s.method, what, status, s.side.value, now))
    if len(row.slowest) < settings.max_slowest:
        heapq.heappush(row.slowest, item)
    elif seconds > row.slowest[0][0]:
        heapq.heapreplace(row.slowest, item)
