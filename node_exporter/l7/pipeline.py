"""Kernel chunks -> per-connection parsers -> request/response records with their context.

One ConnectionTracker per connection (TCP: socket and whether it is TLS plaintext;
unconnected UDP: socket and peer), bounded by an LRU: an evicted connection's state is
dropped and counted. Python sees one batch per interval and never blocks the kernel.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace

from node_exporter.bpf.abi import L7Direction, L7Flags, L7Protocol
from node_exporter.bpf.abi import Role as KRole
from node_exporter.l7.chunks import Chunk
from node_exporter.protocols import PROTOCOLS, ConnectionTracker, Direction, DnsRecord, HttpRecord, Role, TrackerLimits
from node_exporter.protocols.tracker import COUNTERS

IPPROTO_UDP = 17
_ROLE = {int(KRole.KSCOPE_ROLE_CLIENT): Role.CLIENT, int(KRole.KSCOPE_ROLE_SERVER): Role.SERVER}
_DIRECTION = {L7Direction.KSCOPE_DIR_EGRESS: Direction.EGRESS, L7Direction.KSCOPE_DIR_INGRESS: Direction.INGRESS}
IDLE_DATAGRAM_NS = 60 * 1_000_000_000  # forget an idle UDP peer's parser after this (its timeouts first)


@dataclass(frozen=True, slots=True)
class ConnInfo:
    sock_cookie: int
    netns_ino: int
    side: Role  # which end observed the request
    protocol: str  # "http1", "dns"
    tls: bool
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    family: int
    tgid: int
    comm: str


@dataclass(frozen=True, slots=True)
class L7Event:
    conn: ConnInfo
    record: HttpRecord | DnsRecord


class _Conn:
    __slots__ = ("info", "last_ns", "tracker")

    def __init__(self, info: ConnInfo, tracker: ConnectionTracker) -> None:
        self.info = info
        self.tracker = tracker
        self.last_ns = 0


def _protocol_name(chunk: Chunk) -> str | None:
    if chunk.protocol == L7Protocol.KSCOPE_PROTO_HTTP1:
        return "http1"
    if chunk.protocol == L7Protocol.KSCOPE_PROTO_DNS:
        return "dns" if chunk.ip_proto == IPPROTO_UDP else "dns_tcp"
    return None


class L7Pipeline:
    def __init__(self, max_connections: int = 16384, limits: TrackerLimits | None = None) -> None:
        self.max_connections = max_connections
        self.limits = limits or TrackerLimits()
        self._conns: OrderedDict[tuple[object, ...], _Conn] = OrderedDict()
        self._by_cookie: dict[int, set[tuple[object, ...]]] = {}
        self._retired = dict.fromkeys(COUNTERS, 0)  # counters of trackers already gone
        self.connections_evicted = 0
        self.chunks_unusable = 0  # no role or unknown protocol (counted, not parsed)
        # heads captured in part (capture bound, vector calls): the parsers count these as gaps too
        self.truncated_chunks = 0

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
            sock_cookie=c.sock_cookie, netns_ino=c.netns_ino, side=role, protocol="dns" if name == "dns_tcp" else name,
            tls=bool(c.flags & L7Flags.KSCOPE_L7_TLS), local_ip=c.local_ip, local_port=c.local_port,
            remote_ip=c.remote_ip, remote_port=c.remote_port, family=c.family, tgid=c.tgid, comm=c.comm,
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
        for name, value in conn.tracker.counters().items():
            self._retired[name] += value
        keys = self._by_cookie.get(conn.info.sock_cookie)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_cookie[conn.info.sock_cookie]

    def feed(self, chunks: Iterable[Chunk]) -> list[L7Event]:
        out: list[L7Event] = []
        for c in chunks:
            conn = self._conn_for(c)
            if conn is None:
                self.chunks_unusable += 1
                continue
            conn.last_ns = c.ts_ns
            direction = _DIRECTION[c.direction]
            if c.ip_proto == IPPROTO_UDP:
                records = conn.tracker.feed(direction, c.data, c.ts_ns)
            else:
                records = conn.tracker.feed(direction, c.data, c.ts_ns, c.seq)
                if c.length > len(c.data):
                    # Only the head was captured (bound, or a vector call's first buffer): say at
                    # once where the stream really is, so a body of known length completes now
                    # instead of when (if ever) the next chunk arrives.
                    records += conn.tracker.feed(direction, b"", c.ts_ns, c.seq + c.length)
            info = conn.info
            if records and c.ip_proto == IPPROTO_UDP and c.direction == L7Direction.KSCOPE_DIR_EGRESS:
                info = replace(info, remote_ip=c.remote_ip, remote_port=c.remote_port)
            self.truncated_chunks += c.length > len(c.data)
            out.extend(L7Event(info, r) for r in records)
        return out

    def close_sockets(self, cookies: Iterable[int]) -> list[L7Event]:
        """The sockets are gone (L4 final records): finish and forget their parsers."""
        out: list[L7Event] = []
        for cookie in cookies:
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
        for key, conn in list(self._conns.items()):
            if conn.tracker.pending_requests():
                out.extend(L7Event(conn.info, r) for r in conn.tracker.expire(now_ns))
            if len(key) == 3 and now_ns - conn.last_ns > IDLE_DATAGRAM_NS and not conn.tracker.pending_requests():
                del self._conns[key]
                self._retire(key, conn)
        return out

    def counters(self) -> dict[str, int]:
        totals = dict(self._retired)
        for conn in self._conns.values():
            for name, value in conn.tracker.counters().items():
                totals[name] += value
        totals["connections_evicted"] = self.connections_evicted
        totals["chunks_unusable"] = self.chunks_unusable
        totals["truncated_chunks"] = self.truncated_chunks
        totals["connections_tracked"] = len(self._conns)
        return totals
