"""What the aggregator hands to OTLP export: plain frozen records, one interval at a time.

Each record names its ends with an ``Edge`` of semantic-convention attributes (``resolved``, what
resolving a flow yields). Nothing here knows about protobuf or gRPC; the records are the contract
between aggregation and export.

Durations are seconds, timestamps are Unix epoch nanoseconds (OTLP's unit), counts are per
interval (deltas): turning them into cumulative streams is ``cumulative``'s job.
"""

from __future__ import annotations

import enum
import operator
import random
import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple

from cluster_processor.otlp.errors import InvalidAggregateError
from cluster_processor.resolved import Attrs, ConnectionType, Edge, Side

# Buckets the HTTP semantic conventions recommend for request durations (seconds).
HTTP_DURATION_BOUNDS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# Tempo's default service-graph buckets, so graphs from kscope and from Tempo compare directly.
SERVICE_GRAPH_BOUNDS_S: Final = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)

# Log event names (the LogRecord's event_name).
EVENT_TCP_RESET: Final = "kscope.tcp.reset"
EVENT_CONNECT_REFUSED: Final = "kscope.tcp.connect.refused"
EVENT_CONNECT_TIMEOUT: Final = "kscope.tcp.connect.timeout"
EVENT_DNS_ERROR: Final = "kscope.dns.error"
EVENT_HTTP_SERVER_ERROR: Final = "kscope.http.server_error"  # 5xx answers
EVENT_RPC_SERVER_ERROR: Final = "kscope.rpc.server_error"  # gRPC codes that fail a server (otlp/rpc.py)


class Protocol(enum.Enum):
    HTTP = "http"  # HTTP/1 and HTTP/2 (network.protocol.version tells them apart)
    DNS = "dns"
    RPC = "rpc"  # gRPC calls (HTTP/2 with content-type application/grpc*): status_code is the grpc code
    DB = "db"  # databases and caches (Redis, Memcached, PostgreSQL, MySQL): db.system.name tells them apart

    # Members are singletons compared by identity: hash them by identity too. Enum's own hash is a
    # Python-level method, and these key many tables and caches per record.
    __hash__ = object.__hash__


class Severity(enum.IntEnum):
    """OpenTelemetry SeverityNumber values (the first of each range)."""

    DEBUG = 5
    INFO = 9
    WARN = 13
    ERROR = 17


@dataclass(frozen=True, slots=True)
class Histogram:
    """Explicit-bucket histogram of one interval (or, once accumulated, of a stream's lifetime).

    OTLP semantics: bucket i counts values v with bounds[i-1] < v <= bounds[i]; the last bucket
    counts v > bounds[-1]. The count is derived from the buckets so the two can never disagree."""

    bounds: tuple[float, ...]  # upper bounds, strictly increasing, in the metric's unit (seconds)
    bucket_counts: tuple[int, ...]  # len(bounds) + 1
    sum: float
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if len(self.bucket_counts) != len(self.bounds) + 1:
            raise InvalidAggregateError(f"{len(self.bucket_counts)} bucket counts for {len(self.bounds)} bounds")
        if any(b >= a for b, a in zip(self.bounds, self.bounds[1:], strict=False)) or any(
            c < 0 for c in self.bucket_counts
        ):
            raise InvalidAggregateError("bounds must increase strictly and counts must not be negative")

    @property
    def count(self) -> int:
        return sum(self.bucket_counts)

    @classmethod
    def of(cls, bounds: Iterable[float], values: Iterable[float]) -> Histogram:
        bounds = tuple(bounds)
        counts = [0] * (len(bounds) + 1)
        total = 0.0
        lo: float | None = None
        hi: float | None = None
        for v in values:
            counts[bisect_left(bounds, v)] += 1  # first bound >= v: upper bounds are inclusive
            total += v
            lo = v if lo is None else min(lo, v)
            hi = v if hi is None else max(hi, v)
        return cls(bounds, tuple(counts), total, lo, hi)

    @classmethod
    def trusted(
        cls, bounds: tuple[float, ...], counts: tuple[int, ...], total: float, lo: float | None, hi: float | None
    ) -> Histogram:
        """A histogram from parts already known to be valid (the merge of two valid ones, the
        buckets of validated bounds): skips the checks, which cost more than the merge itself."""
        h = object.__new__(cls)
        # Frozen: written through the slots' own descriptors (what object.__setattr__, the
        # documented way around __setattr__, ends in), without its name lookups.
        set_bounds, set_counts, set_sum, set_min, set_max = _HISTOGRAM_SLOTS
        set_bounds(h, bounds)
        set_counts(h, counts)
        set_sum(h, total)
        set_min(h, lo)
        set_max(h, hi)
        return h

    def merge(self, other: Histogram) -> Histogram:
        if other.bounds != self.bounds:
            raise InvalidAggregateError("cannot merge histograms with different bounds")
        if len(other.bucket_counts) != len(self.bucket_counts):
            raise InvalidAggregateError("cannot merge histograms with different bucket counts")
        # min() and max() of the two (the first of equals), None for a side without values, without
        # the calls: a cumulative stream merges once per interval.
        lo, other_lo = self.min, other.min
        if lo is None or (other_lo is not None and other_lo < lo):
            lo = other_lo
        hi, other_hi = self.max, other.max
        if hi is None or (other_hi is not None and other_hi > hi):
            hi = other_hi
        return Histogram.trusted(
            self.bounds, tuple(map(operator.add, self.bucket_counts, other.bucket_counts)), self.sum + other.sum, lo, hi
        )


_HISTOGRAM_SLOTS: Final = tuple(
    getattr(Histogram, name).__set__ for name in ("bounds", "bucket_counts", "sum", "min", "max")
)


class Exemplar(NamedTuple):
    """One request of a RED series that left as a span: its trace and span ids (final, after the
    trace join), its duration and end, for the histogram point's ``exemplars``."""

    trace_id: bytes
    span_id: bytes
    value: float  # seconds
    time_unix_nano: int


class RedPoint(NamedTuple):
    """Request rate, errors and duration for one edge, protocol, method, route and status. A named
    tuple, as ``SpanRecord``: an interval hands over thousands."""

    edge: Edge
    side: Side
    protocol: Protocol
    duration: Histogram  # seconds
    # HTTP method as seen on the wire (unknown ones export as _OTHER); DNS: the query type; RPC: the
    # fully-qualified method ("package.Service/Method")
    method: str = ""
    route: str = ""  # low-cardinality route template ("/users/{id}"); "" when unknown
    status_code: int | None = None  # None when no response was seen (reset, timeout); RPC: the grpc code
    error_type: str = ""  # why a request failed without an error status ("timeout"), or a DNS rcode name
    attributes: Attrs = ()  # protocol extras with semconv keys: a DNS response code (dns.response_code)
    exemplar: Exemplar | None = None  # the slowest of the series' requests that left as spans lately


@dataclass(frozen=True, slots=True)
class L4Point:
    """TCP counters for one edge over one interval, seen from ``side``'s sockets."""

    edge: Edge
    side: Side
    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0  # connections established
    connect_failures: tuple[tuple[str, int], ...] = ()  # (error.type, count), e.g. ("connection_refused", 3)
    retransmits: int = 0  # retransmitted segments
    resets: int = 0  # RSTs sent or received
    drops: int = 0  # segments the kernel dropped for these sockets
    connect_duration: Histogram | None = None  # seconds, successful connects
    rtt_s: float | None = None  # smoothed RTT at the end of the interval, averaged over sockets


@dataclass(frozen=True, slots=True)
class ListenerPoint:
    """The accept queue of one workload's listening port over one interval (all its listening sockets
    on the reporting node summed): the classic hidden cause of slow connects."""

    owner: Attrs  # who listens (workload-level identity)
    port: int
    overflows: int = 0  # handshakes dropped at completion: the accept queue was full
    drops: int = 0  # the listeners' own drop counter: SYNs refused for a full accept queue
    queue: int = 0  # connections waiting to be accepted: the deepest seen in the interval
    queue_limit: int = 0  # the listen() backlog


class ServiceGraphPoint(NamedTuple):
    """One edge of the service graph, named as Grafana draws it (a named tuple, as ``RedPoint``).

    Each request must be counted once even when both ends were observed (possibly by different
    replicas): the aggregator counts a request from the server side when the server is a pod kscope
    observes, and from the client side only when it is not (``ConnectionType.VIRTUAL_NODE``)."""

    client: str  # graph_node_name of the client endpoint
    server: str
    requests: int
    failed: int = 0
    connection_type: ConnectionType = ConnectionType.NONE
    server_duration: Histogram | None = None  # seconds, as the server saw it
    client_duration: Histogram | None = None  # seconds, as the client saw it
    client_namespace: str = ""  # graph_node_namespace of the client endpoint
    server_namespace: str = ""


@dataclass(frozen=True, slots=True)
class Interval:
    """Everything one node reported over [start, end). The reporting node is the single writer
    of every stream built from it."""

    node_name: str
    start_unix_nano: int
    end_unix_nano: int
    red: tuple[RedPoint, ...] = ()
    l4: tuple[L4Point, ...] = ()
    service_graph: tuple[ServiceGraphPoint, ...] = ()
    listeners: tuple[ListenerPoint, ...] = ()


# ---- traces -------------------------------------------------------------------------------------

# W3C Trace Context, version-format: lowercase hex only; versions after 00 may append fields.
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_ZERO_TRACE_ID: Final = bytes(16)
_ZERO_SPAN_ID: Final = bytes(8)
FLAG_SAMPLED: Final = 0x01
_new_tuple: Final = tuple.__new__
_RNG: Final = random.Random()  # ids need uniqueness, not secrecy; os.urandom per span costs a syscall


class SpanContext(NamedTuple):
    """A span's W3C context. A named tuple rather than a frozen dataclass, as ``SpanRecord``."""

    trace_id: bytes  # 16 bytes
    span_id: bytes  # 8 bytes
    parent_span_id: bytes = b""  # 8 bytes, or empty for a root span
    trace_flags: int = FLAG_SAMPLED  # W3C trace-flags
    trace_state: str = ""
    remote_parent: bool = False  # the parent came from a traceparent header (another process)


def parse_traceparent(header: str) -> tuple[bytes, bytes, int] | None:
    """(trace id, parent span id, flags) of a W3C traceparent, or None when it is not valid:
    a header we cannot trust starts a new trace instead of corrupting an existing one."""
    h = header.strip()
    if len(h) == 55 and h[:3] == "00-" and h[35] == "-" and h[52] == "-":
        # Version 00, the one headers carry, has this one shape: its three fields decoded without
        # the regular expression, in one call (a header per request). The fields are lowercase hex
        # exactly when their text survives the round trip (fromhex also takes upper case and
        # spaces, and raises on anything else).
        text = h[3:35] + h[36:52] + h[53:]
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            return None
        if raw.hex() != text:
            return None
        trace_id, span_id = raw[:16], raw[16:24]
        if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
            return None
        return trace_id, span_id, raw[24]
    return _parse_traceparent(h)


def _parse_traceparent(header: str) -> tuple[bytes, bytes, int] | None:
    """``parse_traceparent`` by the regular expression: every version."""
    m = _TRACEPARENT.fullmatch(header)
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return bytes.fromhex(trace_id), bytes.fromhex(span_id), int(flags, 16)


def span_context(
    traceparent: str | None = None, tracestate: str = "", *, rng: random.Random | None = None
) -> SpanContext:
    """The context of a span kscope creates for one observed request.

    A captured traceparent makes the span a child of the span that sent it: for a SERVER span
    that is the caller's client span, exactly W3C's meaning; for a CLIENT span it is the span in
    the calling process that injected the header. Reusing the header's parent id as our own span
    id would instead collide with that span whenever the app is instrumented itself.
    Without a (valid) header the span starts a new trace."""
    gen = rng or _RNG
    v = gen.getrandbits(64)  # all-zero ids are invalid in W3C and OTLP
    while v == 0:
        v = gen.getrandbits(64)
    span_id = v.to_bytes(8, "big")
    parsed = parse_traceparent(traceparent) if traceparent else None
    if parsed is None:
        v = gen.getrandbits(128)
        while v == 0:
            v = gen.getrandbits(128)
        return _new_tuple(SpanContext, (v.to_bytes(16, "big"), span_id, b"", FLAG_SAMPLED, "", False))
    trace_id, parent, flags = parsed
    return _new_tuple(SpanContext, (trace_id, span_id, parent, flags, tracestate, True))


class SpanRecord(NamedTuple):
    """One observed request as a span (SERVER or CLIENT after ``side``). A named tuple rather than
    a frozen dataclass: one is made per request, and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) costs more than the rest of recording it; the aggregator
    builds it with ``tuple.__new__`` (all fields, in order), skipping NamedTuple's Python-level
    ``__new__``."""

    edge: Edge
    side: Side
    protocol: Protocol
    context: SpanContext
    start_unix_nano: int
    end_unix_nano: int
    method: str = ""
    route: str = ""
    status_code: int | None = None
    error_type: str = ""
    attributes: Attrs = ()  # extras with semconv keys (url.path scrubbed of its query, ...)


# ---- logs ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogEvent:
    """A network or protocol event (resets, refused connects, DNS errors, 5xx answers) on one edge:
    every occurrence of one kind in one interval, aggregated (a log per occurrence would scale with
    the traffic it describes)."""

    edge: Edge  # workload level: who to whom
    side: Side  # whose socket saw it
    time_unix_nano: int  # the first occurrence
    name: str  # one of the EVENT_* names
    severity: Severity
    body: str
    attributes: Attrs = ()
    trace_id: bytes = b""  # the first occurrence's trace, when it belongs to one
    span_id: bytes = b""
    count: int = 1  # occurrences in the interval
    last_unix_nano: int = 0  # the last occurrence (0: the first is the only one)
    observed_unix_nano: int = 0  # when kscope reported it: the end of its interval (0: the first occurrence)
