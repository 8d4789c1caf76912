"""Kernel chunks and exchanges -> request/response records with their context.

Plain-text HTTP/1 arrives already paired (one exchange record per request and side,
node_exporter/l7/exchanges.py): only its head is parsed. Everything else (DNS, TLS
plaintext, HTTP/1 sockets the kernel gave up pairing) arrives as chunks, fed to one
ConnectionTracker per connection (TCP: socket and whether it is TLS plaintext;
unconnected UDP: socket and peer), bounded by an LRU: an evicted connection's state is
dropped and counted. Python sees one batch per interval and never blocks the kernel.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from kscope_common.latency import LATENCY_BOUNDS_NS, LATENCY_BUCKETS
from node_exporter.bpf.abi import L7Direction, L7Emit, L7ExchangeFlags, L7Flags, L7Protocol
from node_exporter.bpf.abi import Role as KRole
from node_exporter.l4.records import _comm_text, ip_text
from node_exporter.l7.causal import HOLD_NS, CausalLinker, Parent
from node_exporter.l7.chunks import Chunk
from node_exporter.l7.exchanges import (
    DISCARD_BIT,
    EXCHANGE_TYPE,
    SLOT,
    SLOT_HEAD,
    SUMMARY_HEAD,
    SUMMARY_HEAD_OFFSET,
    SUMMARY_TAIL,
    SUMMARY_TAIL_OFFSET,
    SUMMARY_TYPE,
    ExchangeBatch,
    HeadParser,
)
from node_exporter.l7.pick import link_mix
from node_exporter.protocols import (
    PROTOCOLS,
    ConnectionTracker,
    DbRecord,
    Direction,
    DnsRecord,
    HttpRecord,
    Role,
    TrackerLimits,
)
from node_exporter.protocols.http1 import HttpLinkedRecord, HttpSummary, HttpSummaryRecord
from node_exporter.protocols.http2_session import COUNTERS as H2_COUNTERS
from node_exporter.protocols.tracker import COUNTERS

IPPROTO_TCP, IPPROTO_UDP = 6, 17
_ROLE = {int(KRole.KSCOPE_ROLE_CLIENT): Role.CLIENT, int(KRole.KSCOPE_ROLE_SERVER): Role.SERVER}
_DIRECTION = {L7Direction.KSCOPE_DIR_EGRESS: Direction.EGRESS, L7Direction.KSCOPE_DIR_INGRESS: Direction.INGRESS}
EMIT_CLOSE = int(L7Emit.KSCOPE_EMIT_CLOSE)
IDLE_DATAGRAM_NS = 60 * 1_000_000_000  # forget an idle UDP peer's parser after this (its timeouts first)
MAX_EXCHANGE_CONNS = 16384  # ConnInfo of exchange sockets remembered (bounded; rebuilt from a record)


@dataclass(frozen=True, slots=True)
class ConnInfo:
    sock_cookie: int
    netns_ino: int
    side: Role  # which end observed the request
    protocol: str  # "http1", "http2", "dns"
    tls: bool
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    family: int
    tgid: int
    comm: str
    ip_proto: int = IPPROTO_TCP  # or IPPROTO_UDP (a UDP client's NAT answer is looked up by the agent)


@dataclass(frozen=True, slots=True)
class L7Event:
    conn: ConnInfo
    record: HttpRecord | DnsRecord | DbRecord  # an HttpSummaryRecord (record.summary set) counts summary.count requests


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot descriptors' setters of a frozen slots dataclass, in field order.

    The exchange path builds two frozen dataclasses per request at whatever rate the node
    serves; their generated __init__ goes through object.__setattr__ per field and costs
    twice as much (bench/RESULTS.md, hot-path choices). Setting the slots directly is
    what that __init__ does, minus the lookups. The field list is checked here so a field
    added to the dataclass fails at import, not silently.
    """
    if tuple(f.name for f in fields(cls)) != names:
        raise ImportError(f"{cls.__name__} fields changed: {[f.name for f in fields(cls)]}")
    return tuple(getattr(cls, n).__set__ for n in names)


# A client connection's sends made inside a server request of their thread that no record has named
# yet (by the send's time: a record's start is the time of the send holding its request's first byte)
MAX_SENDS_WITH_PARENT: Final = 32


class _Conn:
    __slots__ = ("info", "last_ns", "sent", "tracker")

    def __init__(self, info: ConnInfo, tracker: ConnectionTracker) -> None:
        self.info = info
        self.tracker = tracker
        self.last_ns = 0
        # send time -> (tgid, tid, the server exchange's start): a record starting then is its child
        self.sent: dict[int, tuple[int, int, int]] | None = None


# The kernel's protocol -> the PROTOCOLS entry that parses it (DNS: by transport, below).
_PROTOCOL_NAMES: dict[int, str] = {
    L7Protocol.KSCOPE_PROTO_HTTP1: "http1",
    L7Protocol.KSCOPE_PROTO_HTTP2: "http2",
    L7Protocol.KSCOPE_PROTO_REDIS: "redis",
    L7Protocol.KSCOPE_PROTO_MEMCACHED: "memcached",
    L7Protocol.KSCOPE_PROTO_POSTGRESQL: "postgresql",
    L7Protocol.KSCOPE_PROTO_MYSQL: "mysql",
}
# Registry entries reported under another protocol's name.
_CONN_PROTOCOL: dict[str, str] = {"dns_tcp": "dns", "http2_frames": "http2"}
# HTTP/2 is a TCP protocol: a datagram socket the kernel called HTTP/2 is nothing we parse.
_TCP_ONLY: frozenset[int] = frozenset({L7Protocol.KSCOPE_PROTO_HTTP2})


def _protocol_name(chunk: Chunk) -> str | None:
    if chunk.protocol == L7Protocol.KSCOPE_PROTO_DNS:
        return "dns" if chunk.ip_proto == IPPROTO_UDP else "dns_tcp"
    if chunk.protocol in _TCP_ONLY and chunk.ip_proto == IPPROTO_UDP:
        return None
    if chunk.flags & L7Flags.KSCOPE_L7_H2_FRAMES:
        return "http2_frames" if chunk.protocol == L7Protocol.KSCOPE_PROTO_HTTP2 else None
    return _PROTOCOL_NAMES.get(chunk.protocol)


_RECORD_SETTERS = _slot_setters(
    HttpRecord, ("method", "path", "route", "status", "request_bytes", "response_bytes", "start_ns", "latency_ns",
                 "traceparent", "request_id"),
)  # fmt: skip
# (a linked record has every HttpRecord field and its TCP sequence numbers)
_LINK_SETTER = _slot_setters(HttpLinkedRecord, (*(f.name for f in fields(HttpRecord)), "tcp_seqs"))[-1]
_EVENT_SETTERS = _slot_setters(L7Event, ("conn", "record"))
_ONE_SUMMARY_SETTERS = _slot_setters(
    HttpSummary, ("count", "latency_sum_ns", "latency_min_ns", "latency_max_ns", "buckets", "end_ns")
)
_SUMMARY_SLOT = _slot_setters(HttpSummaryRecord, tuple(f.name for f in fields(HttpSummaryRecord)))[-1]
# a summary of one request: its bucket's counts, one tuple per bucket, shared
_ONE_IN_BUCKET = tuple(tuple(int(i == j) for j in range(LATENCY_BUCKETS)) for i in range(LATENCY_BUCKETS))
_X_TCP_SEQ = int(L7ExchangeFlags.KSCOPE_X_TCP_SEQ)
_X_PARENT = int(L7ExchangeFlags.KSCOPE_X_PARENT) | _X_TCP_SEQ  # a tentative parent (client), both set
_X_PARENT_OK = int(L7ExchangeFlags.KSCOPE_X_PARENT_OK)
_K_SERVER = int(KRole.KSCOPE_ROLE_SERVER)
_K_CLIENT = int(KRole.KSCOPE_ROLE_CLIENT)
_CONN_FIELDS = ("sock_cookie", "netns_ino", "side", "protocol", "tls", "local_ip", "local_port", "remote_ip",
                "remote_port", "family", "tgid", "comm", "ip_proto")  # fmt: skip
_CONN_SETTERS = tuple(zip(_slot_setters(ConnInfo, _CONN_FIELDS), range(len(_CONN_FIELDS)), strict=True))
# A summary's head, counted from where its tail (count, ...) starts: where an exchange's head would.
_SUMMARY_HEAD_AFTER_TAIL = SUMMARY_HEAD_OFFSET - SUMMARY_TAIL_OFFSET


def _summary_of_one(latency: int, start: int) -> HttpSummary:
    """The summary of one request, slot by slot with a shared bucket tuple (see _slot_setters): under
    churn past the record rate nearly every record is one (frozen __init__s: 4.4 us, this: ~2.1 us)."""
    summary = object.__new__(HttpSummary)
    s_count, s_sum, s_min, s_max, s_buckets, s_end = _ONE_SUMMARY_SETTERS
    s_count(summary, 1)
    s_sum(summary, latency)
    s_min(summary, latency)
    s_max(summary, latency)
    s_buckets(summary, _ONE_IN_BUCKET[bisect_left(LATENCY_BOUNDS_NS, latency)])
    s_end(summary, start)
    return summary


def _relink(ev: L7Event, rec: HttpRecord | DnsRecord | DbRecord) -> L7Event:
    return L7Event(ev.conn, rec)


class L7Pipeline:
    def __init__(
        self,
        max_connections: int = 16384,
        limits: TrackerLimits | None = None,
        *,
        causal: bool = True,
        causal_refused: Callable[[int], bool] | None = None,
        causal_hold_ns: int = HOLD_NS,
        link_pick: int = 0,
    ) -> None:
        """``causal``: link client calls to the server request they were made inside of
        (node_exporter/l7/causal.py); False when the kernel's refusal hooks are not attached
        (their tentative parents are then dropped, counted). ``causal_refused(tgid)``: processes
        never linked. ``causal_hold_ns``: how long a child waits for its parent's record. ``link_pick``:
        the kernel's (node_exporter/l7/pick.py): a record it did not pick is made a summary of one."""
        self.link_pick = link_pick
        self.max_connections = max_connections
        self.limits = limits or TrackerLimits()
        self._conns: OrderedDict[tuple[object, ...], _Conn] = OrderedDict()
        self._by_cookie: dict[int, set[tuple[object, ...]]] = {}
        # counters of trackers already gone: COUNTERS, and HTTP/2 sessions' (h2_*) from the first one
        self._retired = dict.fromkeys(COUNTERS, 0) | dict.fromkeys(H2_COUNTERS, 0)
        self.connections_evicted = 0
        self.chunks_unusable = 0  # no role or unknown protocol (counted, not parsed)
        self._heads = HeadParser()
        # sock_cookie -> ConnInfo of exchange sockets, oldest first. An OrderedDict: evicting a plain
        # dict's first key over and over is O(n) (the deleted entries ahead of it are walked each time:
        # the agent's largest cost under connection churn; bench/RESULTS.md, hot-path choices).
        self._xconns: OrderedDict[int, ConnInfo] = OrderedDict()
        self.exchange_records = 0
        self.exchange_unanswered = 0  # the kernel saw no final response (counted, not reported)
        self.exchange_bad_head = 0  # the request head did not parse (counted, not reported)
        self.exchange_bad_role = 0
        self.exchange_bad_type = 0
        self.summaries = 0  # summary records turned into events
        self.summarized_requests = 0  # the requests those summaries count
        self.unpicked_records = 0  # records --l7-trace-ratio did not pick, sent as summaries of one
        self.summary_malformed = 0  # count 0, buckets not summing to count, min > max, ... (dropped, counted)
        self.summary_bad_head = 0  # the summary's request head did not parse (dropped, counted)
        self.causal_sends_forgotten = 0  # sends inside a server request past MAX_SENDS_WITH_PARENT per connection
        self.causal = CausalLinker[L7Event](_relink, enabled=causal, refused=causal_refused, hold_ns=causal_hold_ns)

    def __len__(self) -> int:
        return len(self._conns)

    def _key(self, c: Chunk) -> tuple[object, ...]:
        if c.ip_proto == IPPROTO_UDP:
            if c.role == KRole.KSCOPE_ROLE_SERVER:
                # One unconnected server socket answers every peer, and a received datagram's
                # peer is not readable yet when the tracepoint fires (the kernel copies it out
                # after): pair per socket by DNS id and question, name the peer from the reply.
                return (c.sock_cookie, "udp-server", 0)
            return (c.sock_cookie, c.remote_ip, c.remote_port)
        return (c.sock_cookie, bool(c.flags & L7Flags.KSCOPE_L7_TLS))

    def _conn_for(self, c: Chunk) -> _Conn | None:
        key = self._key(c)
        conn = self._conns.get(key)
        if conn is not None:
            self._conns.move_to_end(key)
            return conn
        name, role = _protocol_name(c), _ROLE.get(c.role)
        if name is None or role is None:
            return None
        info = ConnInfo(
            sock_cookie=c.sock_cookie, netns_ino=c.netns_ino, side=role, protocol=_CONN_PROTOCOL.get(name, name),
            tls=bool(c.flags & L7Flags.KSCOPE_L7_TLS), local_ip=c.local_ip, local_port=c.local_port,
            remote_ip=c.remote_ip, remote_port=c.remote_port, family=c.family, tgid=c.tgid, comm=c.comm,
            ip_proto=c.ip_proto,
        )  # fmt: skip
        conn = _Conn(info, ConnectionTracker(PROTOCOLS[name], role, self.limits))
        self._conns[key] = conn
        self._by_cookie.setdefault(c.sock_cookie, set()).add(key)
        while len(self._conns) > self.max_connections:
            old_key, old = self._conns.popitem(last=False)
            self._retire(old_key, old)
            self.connections_evicted += 1
        return conn

    def _retire(self, key: tuple[object, ...], conn: _Conn) -> None:
        for name, value in conn.tracker.counters().items():  # COUNTERS and a session's (h2_*)
            self._retired[name] = self._retired.get(name, 0) + value
        keys = self._by_cookie.get(conn.info.sock_cookie)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_cookie[conn.info.sock_cookie]

    def feed(self, items: Iterable[Chunk | ExchangeBatch]) -> list[L7Event]:
        out: list[L7Event] = []
        for c in items:
            if isinstance(c, ExchangeBatch):
                out += self.feed_exchanges(c)
                continue
            conn = self._conn_for(c)
            if conn is None:
                self.chunks_unusable += 1
                continue
            conn.last_ns = c.ts_ns
            direction = _DIRECTION[c.direction]
            if c.ip_proto == IPPROTO_UDP:
                records = conn.tracker.feed(direction, c.data, c.ts_ns)
            else:
                records = conn.tracker.feed(direction, c.data, c.ts_ns, c.seq, length=c.length)
            info = conn.info
            if records and c.ip_proto == IPPROTO_UDP and c.direction == L7Direction.KSCOPE_DIR_EGRESS:
                info = replace(info, remote_ip=c.remote_ip, remote_port=c.remote_port)
            if c.parent_ns:  # sent inside a server request of this thread (l7_causal.h)
                sent = conn.sent
                if sent is None:
                    sent = conn.sent = {}
                sent[c.ts_ns] = (c.tgid, c.pid, c.parent_ns)
                if len(sent) > MAX_SENDS_WITH_PARENT:  # its record, if one comes, goes unlinked
                    del sent[next(iter(sent))]
                    self.causal_sends_forgotten += 1
            if not records:
                continue
            if conn.sent is None:
                out.extend(L7Event(info, r) for r in records)
                continue
            now = time.monotonic_ns()
            for r in records:
                ev = L7Event(info, r)
                key = conn.sent.get(r.start_ns)
                if key is None:
                    out.append(ev)
                    continue
                linked = self.causal.child(ev, r, key, now)
                if linked is not None:
                    out.append(linked)
        if self.causal.waiting():
            out += self.causal.evicted()
        return out

    def feed_exchanges(self, batch: ExchangeBatch) -> list[L7Event]:
        """Exchange records -> events: unpack, parse the head, reuse the socket's ConnInfo. Summary
        records (rare: at most about one per socket, method, route and status a second) share the
        ring and its prefix; they leave the loop at the type check, so exchanges pay nothing for them."""
        out: list[L7Event] = []
        conns = self._xconns
        parse = self._heads.parse
        new = object.__new__
        r_method, r_path, r_route, r_status, r_req, r_resp, r_start, r_latency, r_tp, r_rid = _RECORD_SETTERS
        e_conn, e_record = _EVENT_SETTERS
        data = batch.data
        pick = self.link_pick
        off = SLOT_HEAD - SLOT.size
        now = time.monotonic_ns()
        waiting = self.causal.waiting
        for (ring_len, rtype, role, _, reason, netns, cookie, start, latency, req_bytes, resp_bytes, saddr, daddr, tgid,
             tid, sport, dport, family, status, head_len, flags, comm, req_seq, resp_seq, parent_start
             ) in batch.slots():  # fmt: skip
            off += SLOT.size
            if ring_len & DISCARD_BIT:
                continue  # a slot the kernel reserved and gave back
            if role == _K_SERVER and rtype == EXCHANGE_TYPE:
                # a server exchange whose calls wait for it, or may still come (causal.py)
                if flags & _X_PARENT_OK:
                    out += self.causal.parent((tgid, tid, start), Parent(req_seq, resp_seq, start), now)
                elif waiting():
                    out += self.causal.unconfirmed((tgid, tid, start))
            if rtype != EXCHANGE_TYPE:
                if rtype == SUMMARY_TYPE:
                    sev = self._summary(data, off, role, netns, cookie, start, latency, req_bytes, resp_bytes, saddr,
                                        daddr, tgid, sport, dport, family, status, head_len, comm, reason)  # fmt: skip
                    if sev is not None:
                        out.append(sev)
                else:
                    self.exchange_bad_type += 1
                continue
            self.exchange_records += 1
            if not status:
                self.exchange_unanswered += 1
                continue
            h = parse(data[off : off + head_len])
            if h is None:
                self.exchange_bad_head += 1
                continue
            # a socket's last record (sent at its close): its ConnInfo is forgotten, nothing more will come
            info = conns.get(cookie) if reason != EMIT_CLOSE else conns.pop(cookie, None)
            if info is None:
                info = self._new_xconn(cookie, role, netns, saddr, daddr, sport, dport, family, tgid, comm,
                                       remember=reason != EMIT_CLOSE)  # fmt: skip
                if info is None:
                    continue
            # a record --l7-trace-ratio did not pick (the kernel sends a connection's only request
            # whatever the pick): a summary of one, counted in the metrics, no span, as at the other end,
            # which made the same choice by the same numbers
            unpicked = bool(pick) and flags & _X_TCP_SEQ and status < 500 and not flags & _X_PARENT_OK and \
                link_mix(req_seq, resp_seq) >= pick  # fmt: skip
            rec: HttpRecord
            if unpicked:
                rec = new(HttpSummaryRecord)
                _SUMMARY_SLOT(rec, _summary_of_one(latency, start))
                self.unpicked_records += 1
            elif flags & _X_TCP_SEQ:
                rec = new(HttpLinkedRecord)
                _LINK_SETTER(rec, (req_seq, resp_seq))
            else:
                rec = new(HttpRecord)
            r_method(rec, h[0])
            r_path(rec, h[1])
            r_route(rec, h[2])
            r_status(rec, status)
            r_req(rec, req_bytes)
            r_resp(rec, resp_bytes)
            r_start(rec, start)
            r_latency(rec, 0 if unpicked else latency)  # a summary's sum is in its summary
            r_tp(rec, "" if unpicked else h[3])
            r_rid(rec, "" if unpicked else h[4])
            ev = new(L7Event)
            e_conn(ev, info)
            e_record(ev, rec)
            if unpicked:
                out.append(ev)
                continue
            if flags & _X_PARENT == _X_PARENT and role == _K_CLIENT:
                linked = self.causal.child(ev, rec, (tgid, tid, parent_start), now)
                if linked is not None:
                    out.append(linked)
                continue
            if h[4]:  # an X-Request-ID: the header may link what threads cannot (causal.RequestIdLinker)
                if role == _K_CLIENT:
                    linked = self.causal.rid_child(ev, rec, (tgid, h[4]), now)
                    if linked is not None:
                        out.append(linked)
                    continue
                if flags & _X_TCP_SEQ:
                    out.append(ev)
                    out += self.causal.rid_parent((tgid, h[4]), start, latency, Parent(req_seq, resp_seq, start), now)
                    continue
            out.append(ev)
        if waiting():
            out += self.causal.evicted()
        return out

    def _new_xconn(
        self, cookie: int, role: int, netns: int, saddr: bytes, daddr: bytes, sport: int, dport: int, family: int,
        tgid: int, comm: bytes, remember: bool = True,
    ) -> ConnInfo | None:  # fmt: skip
        """The ConnInfo of an exchange socket not seen yet (remembered, bounded, if ``remember``);
        None: no role (counted)."""
        side = _ROLE.get(role)
        if side is None:
            self.exchange_bad_role += 1
            return None
        # slot by slot (see _slot_setters): under connection churn this runs for every record
        info = object.__new__(ConnInfo)
        values = (cookie, netns, side, "http1", False, ip_text(saddr), sport, ip_text(daddr), dport, family, tgid,
                  _comm_text(comm), IPPROTO_TCP)  # fmt: skip
        for setter, i in _CONN_SETTERS:
            setter(info, values[i])
        if remember:
            conns = self._xconns
            if len(conns) >= MAX_EXCHANGE_CONNS:
                conns.popitem(last=False)  # the oldest entry; it is rebuilt if its socket speaks again
            conns[cookie] = info
        return info

    def _summary(
        self, data: bytes, off: int, role: int, netns: int, cookie: int, start: int, latency_sum: int,
        req_bytes: int, resp_bytes: int, saddr: bytes, daddr: bytes, tgid: int, sport: int, dport: int,
        family: int, status: int, head_len: int, comm: bytes, reason: int,
    ) -> L7Event | None:  # fmt: skip
        """A summary record -> an event, or None (counted): the prefix it shares with an exchange as
        the batch loop unpacked it, the rest read at ``off`` (where an exchange's head would start).
        Method, path and route come from its head like an exchange's; trace headers are not kept (a
        summary is many requests, each with its own)."""
        t = SUMMARY_TAIL.unpack_from(data, off)
        count, end_ns, lo, hi = t[0], t[1], t[2], t[3]
        buckets = t[4:]
        if not count or lo > hi or not status or head_len > SUMMARY_HEAD or sum(buckets) != count:
            self.summary_malformed += 1
            return None
        head = off + _SUMMARY_HEAD_AFTER_TAIL
        h = self._heads.parse(data[head : head + head_len])
        if h is None:
            self.summary_bad_head += 1
            return None
        info = self._xconns.get(cookie) if reason != EMIT_CLOSE else self._xconns.pop(cookie, None)
        if info is None:
            info = self._new_xconn(cookie, role, netns, saddr, daddr, sport, dport, family, tgid, comm,
                                   remember=reason != EMIT_CLOSE)  # fmt: skip
            if info is None:
                return None
        self.summaries += 1
        self.summarized_requests += count
        # Plain constructors: since a connection's only request is a record, not a summary, summaries
        # come at most about once a second per socket and key (the slot-by-slot building of the
        # exchange path is for what runs once per request).
        summary = HttpSummary(count, latency_sum, lo, hi, buckets, end_ns)
        # latency_ns 0 on a summary (kscope.v1): the sum is summary.latency_sum_ns; no trace headers
        rec = HttpSummaryRecord(h[0], h[1], h[2], status, req_bytes, resp_bytes, start, 0, "", "", summary)
        return L7Event(info, rec)

    def close_sockets(self, cookies: Iterable[int]) -> list[L7Event]:
        """The sockets are gone (L4 final records): finish and forget their parsers."""
        out: list[L7Event] = []
        for cookie in cookies:
            self._xconns.pop(cookie, None)
            for key in list(self._by_cookie.get(cookie, ())):
                conn = self._conns.pop(key, None)
                if conn is None:
                    continue
                out.extend(L7Event(conn.info, r) for r in conn.tracker.close())
                self._retire(key, conn)
        return out

    def expire(self, now_ns: int) -> list[L7Event]:
        """Unanswered requests past their timeout (DNS: timeout records); idle UDP peers forgotten."""
        out: list[L7Event] = []
        out += self.causal.expire(now_ns)
        for key, conn in list(self._conns.items()):
            if conn.tracker.pending_requests():
                out.extend(L7Event(conn.info, r) for r in conn.tracker.expire(now_ns))
            if len(key) == 3 and now_ns - conn.last_ns > IDLE_DATAGRAM_NS and not conn.tracker.pending_requests():
                del self._conns[key]
                self._retire(key, conn)
        return out

    def counters(self) -> dict[str, int]:
        totals = dict(self._retired)
        pending = 0
        for conn in self._conns.values():
            for name, value in conn.tracker.counters().items():
                totals[name] = totals.get(name, 0) + value
            pending += conn.tracker.pending_requests()
        totals["connections_evicted"] = self.connections_evicted
        totals["chunks_unusable"] = self.chunks_unusable
        totals["connections_tracked"] = len(self._conns)
        totals["requests_pending"] = pending  # held by the parsers, waiting for their response
        totals["exchange_sockets_remembered"] = len(self._xconns)
        totals["exchange_records"] = self.exchange_records
        totals["exchange_unanswered"] = self.exchange_unanswered
        totals["exchange_bad_head"] = self.exchange_bad_head
        totals["exchange_bad_role"] = self.exchange_bad_role
        totals["exchange_bad_type"] = self.exchange_bad_type
        totals["summaries"] = self.summaries
        totals["summarized_requests"] = self.summarized_requests
        totals["unpicked_records"] = self.unpicked_records
        totals["summary_malformed"] = self.summary_malformed
        totals["summary_bad_head"] = self.summary_bad_head
        totals["causal_sends_forgotten"] = self.causal_sends_forgotten
        totals.update(self.causal.counters())
        return totals

    def flush_causal(self) -> list[L7Event]:
        """The agent stops: every record it holds for a parent leaves now (unlinked, counted)."""
        return self.causal.expire(time.monotonic_ns(), final=True)
