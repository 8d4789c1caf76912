"""The node's conntrack table as a lookup of DNAT'ed TCP connections and UDP flows.

A client in a pod connects to a Service VIP; kube-proxy's iptables rules DNAT it to a
backend in the node's namespace. The client's socket only ever knows the VIP: the
backend that really answered is the source of the conntrack entry's reply tuple.

:func:`index_entries` is the pure core (entries in, lookup out); :func:`parse_dump` and
:func:`parse_replies` decode ctnetlink messages (pure); :class:`ConntrackTable` is the I/O around
them. A connection's translation never changes, so each client socket is asked about once: a few
new sockets per interval are looked up by tuple (one GET each, batched on one socket), many at once
by one dump; the answers are kept (bounded) until the socket's final record. The cost follows the
rate of new connections, not the size of the node's conntrack table. An answer that cannot be decoded
is not kept: the socket is asked about again next interval, a few times at most.

"Not found" is not final while the connection may not be in the table yet. conntrack adds an entry
only once its first packet has left the node (confirmation): while a client's SYNs are dropped on the
way (loss, a full backlog) or still retransmitted, a GET finds nothing, although the connection will be
DNAT'ed as soon as a SYN gets through. The agent knows no Service VIPs, so the rule is the socket's own
state: a not-found answer for a socket still connecting (its record says SYN_SENT) is not kept; the
socket is asked again each interval it is reported, up to MISSING_TRIES times (the kernel's default
tcp_syn_retries sends 7 SYNs), then kept as untranslated (counted, ``missing_given_up``). Once a socket
has connected its SYN passed the node, so its entry is confirmed: "not found" then is final (untracked).
``retries`` counts the GETs and dump look-ups of keys asked again this way.

UDP has no connection to close: a UDP flow's answer is kept for UDP_ANSWER_TTL_S, conntrack's own
timeout of an unreplied UDP entry, and then asked again (the 5-tuple may be DNAT'ed anew by then).
The agent asks about client-side UDP flows it has L7 records of (DNS), when their response arrives:
the entry is young then (30 s unreplied, 120 s assured), well before it can expire.

The dump is requested and decoded here, with ``struct``, not through pyroute2: pyroute2 spent
~375 µs of CPU per entry decoding its generic attribute objects (2,000 DNAT'ed entries: 0.75 s per
interval, measured), where the few attributes we read cost ~3 µs per entry this way.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Container, Iterable, Iterator
from functools import lru_cache
from typing import NamedTuple, TypeVar

import structlog
from cachetools import Cache, LRUCache, TTLCache

log = structlog.get_logger("kscope.nat")
_T = TypeVar("_T")

NETLINK_NETFILTER = 12
CLONE_NEWNET = 0x40000000
IPS_DST_NAT = 1 << 5  # enum ip_conntrack_status, IPS_DST_NAT_BIT = 5
DEFAULT_MAX_ENTRIES = 65536
DEFAULT_GET_LIMIT = 256  # more unknown sockets than this in one interval: one dump instead of GETs
# GETs sent before their answers are read: the kernel queues each answer on our socket as it handles the
# GET, and drops it (ENOBUFS) past the receive buffer. An answer takes ~830 bytes of it (measured, entry
# or ENOENT alike): 64 take 53 KB of the default 208 KB.
GET_WINDOW = 64
# An answer that cannot be decoded (a GET's, or a message of a dump that lacks the key) is no answer: the
# key is asked again next interval, up to this many times in all; then it is given up on (no NAT fields,
# as if untranslated) rather than asked forever.
MALFORMED_TRIES = 3
# Not-found answers of a socket still connecting before it is kept as untranslated (see above).
MISSING_TRIES = 8
UDP_ANSWER_TTL_S = 30.0  # nf_conntrack_udp_timeout: an unreplied UDP entry lives this long
NAT_PROTOS = frozenset({socket.IPPROTO_TCP, socket.IPPROTO_UDP})  # what the index holds

# Netlink and ctnetlink constants (uapi linux/netlink.h, linux/netfilter/nfnetlink*.h; the CTA_*
# values checked against this kernel's BTF enums).
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET = 1, 1
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_STATUS_MASK = 1, 2, 3, 26
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLA = struct.Struct("=HH")  # len, type
_NFGENMSG_LEN = 4
_RECV_BYTES = 1 << 20

# (proto, src ip, src port, dst ip, dst port) of the original direction, addresses as text
FlowKey = tuple[int, str, int, str, int]


class CtTuple(NamedTuple):
    proto: int
    src: str
    sport: int
    dst: str
    dport: int


class CtEntry(NamedTuple):
    orig: CtTuple  # as the client sent it (dst = the VIP)
    reply: CtTuple  # as the backend answers (src = the backend)


class DumpPart(NamedTuple):
    entries: list[CtEntry]  # of the protocols asked for
    done: bool  # NLMSG_DONE was read
    skipped: int  # messages of another protocol or another request
    malformed: int  # messages that could not be decoded: an entry of ours may be among them


class Index(NamedTuple):
    nat: dict[FlowKey, tuple[str, int]]
    dropped: int  # DNAT'ed entries left out because the index was full


def index_entries(entries: Iterable[CtEntry], max_entries: int = DEFAULT_MAX_ENTRIES) -> Index:
    """Original tuple -> (backend ip, port), only where the reply does not come from the original destination."""
    nat: dict[FlowKey, tuple[str, int]] = {}
    dropped = 0
    for orig, reply in entries:
        if (reply.src, reply.sport) == (orig.dst, orig.dport):
            continue  # no DNAT (maybe SNAT only): the client already knows who answered
        if len(nat) >= max_entries:
            dropped += 1
            continue
        nat[(orig.proto, orig.src, orig.sport, orig.dst, orig.dport)] = (reply.src, reply.sport)
    return Index(nat, dropped)


class ConntrackDumpError(OSError):
    """The kernel answered the dump with an error (errno), or the answer was not ctnetlink."""


@lru_cache(maxsize=65536)
def _addr_text(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def dump_request(seq: int, status: int = IPS_DST_NAT, status_mask: int = IPS_DST_NAT) -> bytes:
    """IPCTNL_MSG_CT_GET with NLM_F_DUMP, all address families, filtered in the kernel on the status
    bits (CTA_STATUS + CTA_STATUS_MASK, Linux 5.15+; older kernels ignore the filter and send all)."""
    attrs = b"".join(_NLA.pack(8, t) + struct.pack("!I", v) for t, v in ((CTA_STATUS, status),
                                                                         (CTA_STATUS_MASK, status_mask)))  # fmt: skip
    body = bytes(_NFGENMSG_LEN) + attrs  # nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _nla(kind: int, payload: bytes) -> bytes:
    raw = _NLA.pack(4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def get_request(seq: int, key: FlowKey) -> bytes:
    """IPCTNL_MSG_CT_GET of one entry by its original tuple: the kernel answers with the entry, or with
    NLMSG_ERROR (ENOENT when there is none)."""
    proto, src, sport, dst, dport = key
    v6 = ":" in src
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    ip = _nla(CTA_TUPLE_IP | 0x8000, _nla(CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC, socket.inet_pton(fam, src))
              + _nla(CTA_IP_V6_DST if v6 else CTA_IP_V4_DST, socket.inet_pton(fam, dst)))  # fmt: skip
    ports = _nla(CTA_TUPLE_PROTO | 0x8000, _nla(CTA_PROTO_NUM, bytes([proto]))
                 + _nla(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
                 + _nla(CTA_PROTO_DST_PORT, struct.pack("!H", dport)))  # fmt: skip
    body = struct.pack("=BBH", fam, 0, 0) + _nla(CTA_TUPLE_ORIG | 0x8000, ip + ports)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def _attrs(buf: bytes, off: int, end: int) -> dict[int, tuple[int, int]] | None:
    """One level of netlink attributes in buf[off:end] -> {type: (payload start, payload end)};
    None if an attribute runs past its nest (malformed: nothing in it is trusted)."""
    out: dict[int, tuple[int, int]] = {}
    while off + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, off)
        if alen < 4 or off + alen > end:
            return None
        out[atype & NLA_TYPE_MASK] = (off + 4, off + alen)
        off += (alen + 3) & ~3
    return out


def _tuple(buf: bytes, off: int, end: int) -> CtTuple | None:
    """A CTA_TUPLE_* nest -> CtTuple; None if it lacks addresses or ports (ICMP, malformed)."""
    top = _attrs(buf, off, end)
    if top is None or CTA_TUPLE_IP not in top or CTA_TUPLE_PROTO not in top:
        return None
    ip, ports = _attrs(buf, *top[CTA_TUPLE_IP]), _attrs(buf, *top[CTA_TUPLE_PROTO])
    if ip is None or ports is None:
        return None
    src = ip.get(CTA_IP_V4_SRC) or ip.get(CTA_IP_V6_SRC)
    dst = ip.get(CTA_IP_V4_DST) or ip.get(CTA_IP_V6_DST)
    num, sport, dport = ports.get(CTA_PROTO_NUM), ports.get(CTA_PROTO_SRC_PORT), ports.get(CTA_PROTO_DST_PORT)
    if src is None or dst is None or num is None or sport is None or dport is None:
        return None
    if src[1] - src[0] not in (4, 16) or dst[1] - dst[0] not in (4, 16) or num[1] - num[0] < 1:
        return None
    if sport[1] - sport[0] < 2 or dport[1] - dport[0] < 2:
        return None
    return CtTuple(
        buf[num[0]],
        _addr_text(buf[src[0] : src[1]]),
        int.from_bytes(buf[sport[0] : sport[0] + 2], "big"),
        _addr_text(buf[dst[0] : dst[1]]),
        int.from_bytes(buf[dport[0] : dport[0] + 2], "big"),
    )


def _entry(buf: bytes, off: int, end: int, protos: Container[int]) -> CtEntry | None:
    top = _attrs(buf, off, end)
    if top is None or CTA_TUPLE_ORIG not in top or CTA_TUPLE_REPLY not in top:
        return None
    orig, reply = _tuple(buf, *top[CTA_TUPLE_ORIG]), _tuple(buf, *top[CTA_TUPLE_REPLY])
    if orig is None or reply is None or orig.proto not in protos:
        return None
    return CtEntry(orig, reply)


def _messages(buf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, seq, body offset, end) of each whole netlink message in ``buf``; (-1, seq, 0, 0) for a
    truncated one (the seq as its header says: a GET answer is still paired with its key), after which
    nothing is read."""
    off, size = 0, len(buf)
    while off + _NLMSGHDR.size <= size:
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if mlen < _NLMSGHDR.size or off + mlen > size:
            yield -1, mseq, 0, 0
            return
        yield mtype, mseq, off + _NLMSGHDR.size, off + mlen
        off += (mlen + 3) & ~3


def _errno(buf: bytes, body: int, end: int) -> int:
    return -struct.unpack_from("=i", buf, body)[0] if end - body >= 4 else 0


def _ct_entry(buf: bytes, mtype: int, body: int, end: int, protos: Container[int]) -> CtEntry | None:
    if mtype >> 8 != NFNL_SUBSYS_CTNETLINK or end - body < _NFGENMSG_LEN:
        return None
    return _entry(buf, body + _NFGENMSG_LEN, end, protos)


def _other_proto(buf: bytes, mtype: int, body: int, end: int, protos: Container[int]) -> bool:
    """Whether a ctnetlink message that did not decode as an entry of ``protos`` is readably one of another
    protocol (ICMP without ports, SCTP: not ours), rather than malformed. Read only after a failed decode."""
    if mtype >> 8 != NFNL_SUBSYS_CTNETLINK or end - body < _NFGENMSG_LEN:
        return False
    top = _attrs(buf, body + _NFGENMSG_LEN, end)
    orig = _attrs(buf, *top[CTA_TUPLE_ORIG]) if top is not None and CTA_TUPLE_ORIG in top else None
    ports = _attrs(buf, *orig[CTA_TUPLE_PROTO]) if orig is not None and CTA_TUPLE_PROTO in orig else None
    num = ports.get(CTA_PROTO_NUM) if ports is not None else None
    return num is not None and num[1] > num[0] and buf[num[0]] not in protos


def parse_dump(buf: bytes, seq: int, protos: Container[int] = NAT_PROTOS) -> DumpPart:
    """One recv()'s worth of dump answer -> its entries of ``protos``, whether the dump is done, and the
    messages skipped (not ours) or malformed. Raises ConntrackDumpError on NLMSG_ERROR."""
    entries: list[CtEntry] = []
    skipped = malformed = 0
    for mtype, mseq, body, end in _messages(buf):
        if mtype < 0:
            return DumpPart(entries, False, skipped, malformed + 1)  # truncated: nothing after it is trusted
        if mtype == NLMSG_DONE:
            return DumpPart(entries, True, skipped, malformed)
        if mtype == NLMSG_ERROR:
            if err := _errno(buf, body, end):
                raise ConntrackDumpError(err, os.strerror(err))
            continue
        e = _ct_entry(buf, mtype, body, end, protos) if mseq == seq else None
        if e is not None:
            entries.append(e)
        elif mseq != seq or _other_proto(buf, mtype, body, end, protos):
            skipped += 1
        else:
            malformed += 1
    return DumpPart(entries, False, skipped, malformed)


def parse_replies(buf: bytes, protos: Container[int] = NAT_PROTOS) -> list[tuple[int, CtEntry | int | None]]:
    """Answers to GET requests -> (seq, entry | errno | None) per message: the entry, the kernel's
    errno (> 0; ENOENT: no such entry), or None for a message that is malformed (truncated too) or
    another protocol."""
    out: list[tuple[int, CtEntry | int | None]] = []
    for mtype, mseq, body, end in _messages(buf):
        if mtype < 0:
            out.append((mseq, None))  # else its key waits for an answer until the timeout fails the round
            break
        if mtype == NLMSG_ERROR:
            # errno 0 (an ack: we ask for none) or too short to hold one is no answer either
            err = _errno(buf, body, end)
            out.append((mseq, err if err > 0 else None))
        elif mtype != NLMSG_DONE:
            out.append((mseq, _ct_entry(buf, mtype, body, end, protos)))
    return out


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _recv(sock: socket.socket) -> bytes:
    buf = sock.recv(_RECV_BYTES)
    if not buf:  # netlink never sends an empty datagram; a closed peer would make the read loops spin
        raise ConntrackDumpError(errno.EPIPE, "conntrack socket closed")
    return buf


def netlink_socket(netns: str | None) -> socket.socket:
    """A bound NETLINK_NETFILTER socket in ``netns``: what :class:`ConntrackTable` talks to."""
    sock = open_netlink_in(netns)
    sock.bind((0, 0))
    return sock


def open_netlink_in(netns: str | None) -> socket.socket:
    """A NETLINK_NETFILTER socket that belongs to ``netns`` (a path), or to our own namespace.

    A netlink socket belongs to the namespace it was opened in, so it is opened by a
    short-lived thread that joins the namespace first: the rest of the agent never moves,
    and no process is forked (the agent holds BPF links and gRPC threads).
    """
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_NETFILTER)
    box: list[socket.socket | BaseException] = []

    def opener() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _libc_setns(fd)
            finally:
                os.close(fd)
            box.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_NETFILTER))
        except BaseException as exc:  # handed to the caller
            box.append(exc)
        # The thread ends here, inside the other namespace: nothing else runs on it.

    t = threading.Thread(target=opener, name="kscope-ct-netns", daemon=True)
    t.start()
    t.join()
    if not box:  # pragma: no cover - the thread always reports
        raise OSError("conntrack socket thread failed")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class ConntrackTable:
    """What conntrack says about the node's client connections and UDP flows: for each, the backend
    that really answered when it was DNAT'ed (a Service VIP), else None.

    Unavailable conntrack (namespace missing, no privilege, no nf_conntrack netlink) is a
    degraded mode, not a crash: an ``errors`` count, one log line, and no answers.
    """

    def __init__(
        self,
        netns: str | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        get_limit: int = DEFAULT_GET_LIMIT,
        open_socket: Callable[[str | None], socket.socket] = netlink_socket,  # the kernel's side, a seam for tests
        clock: Callable[[], float] = time.monotonic,  # ages UDP answers
    ) -> None:
        self.netns = netns
        self._open_socket = open_socket
        self.max_entries = max_entries
        self.get_limit = get_limit
        self.nat: dict[FlowKey, tuple[str, int]] = {}  # the last dump's index (refresh())
        self._complete = True  # the last dump had no malformed message: a key it lacks is not DNAT'ed
        self._answers: LRUCache[FlowKey, tuple[str, int] | None] = LRUCache(maxsize=max_entries)  # TCP, until close
        self._udp: TTLCache[FlowKey, tuple[str, int] | None] = TTLCache(max_entries, UDP_ANSWER_TTL_S, timer=clock)
        # malformed answers so far of keys not answered yet (bounded like the answers: one per live socket)
        self._tries: LRUCache[FlowKey, int] = LRUCache(maxsize=max_entries)
        # not-found answers so far of sockets still connecting (bounded the same way)
        self._missing: LRUCache[FlowKey, int] = LRUCache(maxsize=max_entries)
        self.gets = 0  # tuples asked about one by one
        self.gets_missing = 0  # ... that conntrack did not have (untracked, or gone already)
        self.dumps = 0
        self.entries = 0  # entries the dumps returned (kernel-filtered to DNAT'ed ones where supported)
        self.dnat_entries = 0  # in the index after the last dump
        self.dropped = 0  # DNAT'ed entries left out because the index was full, all dumps
        self.evicted = 0  # answers forgotten for the bound before their socket closed
        self.errors = 0
        self.skipped = 0  # dump messages of another protocol or request, GET answers not ours
        # GET answers and dump messages that could not be decoded: the keys they may be about are not
        # answered (asked again next interval) ...
        self.malformed = 0
        self.malformed_given_up = 0  # ... unless MALFORMED_TRIES times: then kept as unknown (no NAT fields)
        self.missing_pending = 0  # not-found answers not kept: the socket was still connecting ...
        self.missing_given_up = 0  # ... unless MISSING_TRIES times: then kept as untranslated
        self.missing_evicted = 0  # sockets' not-found counts forgotten for the bound (they start over)
        self.retries = 0  # keys asked again after a not-found answer that was not kept
        self.available: bool | None = None  # None until the first request
        self.timeout_s = 5.0  # a request that stalls this long fails this interval, not the agent
        self._seq = 0

    # --- the agent's side -----------------------------------------------------------------------------

    def resolve(self, keys: Iterable[FlowKey], connecting: Container[FlowKey] = frozenset()) -> None:
        """Learn the answer for every key not known yet (call once per interval, before lookups).
        ``connecting``: keys of sockets still connecting, whose "not found" is not final yet."""
        unknown = [k for k in dict.fromkeys(keys) if k not in self._cache(k)]
        if not unknown:
            return
        self.retries += sum(k in self._missing for k in unknown)
        if len(unknown) > self.get_limit:
            if self.refresh():
                dumped: list[tuple[FlowKey, tuple[str, int] | None]] = []
                for k in unknown:
                    answer = self.nat.get(k)
                    # after a dump with malformed messages, a key it lacks may be one of them: no answer
                    if answer is None and not self._complete and not self._no_answer(k):
                        continue
                    dumped.append((k, answer))
                # the dump holds DNAT'ed entries only: a key it lacks is untranslated, or not confirmed yet
                self._settle(dumped, {k for k, answer in dumped if answer is None}, connecting)
            self.nat = {}  # the answers are kept; the whole index is not
            return
        got = self._guard(self._get, unknown)
        if got is not None:
            answers, missing = got
            self._settle(answers.items(), missing, connecting)

    def lookup(self, key: FlowKey) -> tuple[str, int] | None:
        return self._cache(key).get(key)

    def forget(self, key: FlowKey) -> None:
        """The socket is gone: its tuple may come back as another connection."""
        self._cache(key).pop(key, None)
        self._tries.pop(key, None)
        self._missing.pop(key, None)

    def refresh(self) -> bool:
        """Replace :attr:`nat` with the table's DNAT'ed entries as they are now (one dump). False if
        conntrack is unavailable (then :attr:`nat` is empty)."""
        dumped = self._guard(self._dump)
        if dumped is None:
            self.nat = {}
            return False
        entries, malformed = dumped
        self.malformed += malformed
        self._complete = malformed == 0
        self.dumps += 1
        self.entries += len(entries)
        idx = index_entries(entries, self.max_entries)
        self.nat = idx.nat
        self.dnat_entries = len(idx.nat)
        self.dropped += idx.dropped
        return True

    def counters(self) -> dict[str, int]:
        return {
            "gets": self.gets,
            "gets_missing": self.gets_missing,
            "dumps": self.dumps,
            "entries": self.entries,
            "dnat_entries": self.dnat_entries,
            "dropped": self.dropped,
            "evicted": self.evicted,
            "answers": len(self._answers) + len(self._udp),
            "errors": self.errors,
            "skipped": self.skipped,
            "malformed": self.malformed,
            "malformed_given_up": self.malformed_given_up,
            "missing_pending": self.missing_pending,
            "missing_given_up": self.missing_given_up,
            "missing_evicted": self.missing_evicted,
            "retries": self.retries,
        }

    def close(self) -> None:
        self.nat = {}
        self._answers.clear()
        self._udp.clear()
        self._tries.clear()
        self._missing.clear()

    # --- I/O ------------------------------------------------------------------------------------------

    def _cache(self, key: FlowKey) -> Cache[FlowKey, tuple[str, int] | None]:
        return self._udp if key[0] == socket.IPPROTO_UDP else self._answers

    def _settle(
        self,
        answers: Iterable[tuple[FlowKey, tuple[str, int] | None]],
        missing: Container[FlowKey],
        connecting: Container[FlowKey],
    ) -> None:
        """Keep the answers, but not "not found" of a socket still connecting (see the module doc)."""
        self._remember((k, a) for k, a in answers if k not in missing or k not in connecting or self._missing_final(k))

    def _missing_final(self, key: FlowKey) -> bool:
        tries = self._missing.pop(key, 0) + 1
        if tries < MISSING_TRIES:
            if tries == 1 and len(self._missing) >= self._missing.maxsize:
                self.missing_evicted += 1
            self._missing[key] = tries
            self.missing_pending += 1
            return False
        self.missing_given_up += 1
        return True

    def _remember(self, answers: Iterable[tuple[FlowKey, tuple[str, int] | None]]) -> None:
        self._udp.expire()  # an expired answer is not an eviction
        for key, answer in answers:
            cache = self._cache(key)
            if key not in cache and len(cache) >= cache.maxsize:
                self.evicted += 1
            cache[key] = answer
            self._tries.pop(key, None)
            self._missing.pop(key, None)

    def _guard(self, fn: Callable[..., _T], *args: object) -> _T | None:
        """Run one netlink exchange; any failure is the degraded mode (None), logged once per outage."""
        try:
            result = fn(*args)
        except Exception as exc:  # netlink, namespace and privilege errors all mean "unavailable"
            self.errors += 1
            if self.available is not False:
                log.warning("conntrack_unavailable", netns=self.netns or "self", error=str(exc) or type(exc).__name__)
            self.available = False
            return None
        if self.available is False:
            log.info("conntrack_available", netns=self.netns or "self")
        self.available = True
        return result

    def _socket(self) -> socket.socket:
        # A fresh socket per exchange: a namespace re-created since the last interval is found.
        sock = self._open_socket(self.netns)
        sock.settimeout(self.timeout_s)
        return sock

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _dump(self) -> tuple[list[CtEntry], int]:
        """The entries, and how many messages were malformed."""
        with self._socket() as sock:
            seq = self._next_seq()
            sock.send(dump_request(seq))
            entries: list[CtEntry] = []
            malformed = 0
            while True:
                part = parse_dump(_recv(sock), seq)
                entries += part.entries
                self.skipped += part.skipped
                malformed += part.malformed
                if part.done:
                    return entries, malformed

    def _get(self, keys: list[FlowKey]) -> tuple[dict[FlowKey, tuple[str, int] | None], set[FlowKey]]:
        """One GET per key, sent in windows of GET_WINDOW; each answer is paired with its key by its sequence
        number. A key whose answer was malformed is left out (asked again), unless it is given up on.
        Also returns the keys conntrack did not have (ENOENT)."""
        out: dict[FlowKey, tuple[str, int] | None] = {}
        missing: set[FlowKey] = set()
        with self._socket() as sock:
            for start in range(0, len(keys), GET_WINDOW):
                window = {self._next_seq(): k for k in keys[start : start + GET_WINDOW]}
                for seq, key in window.items():
                    sock.send(get_request(seq, key))
                while window:
                    for seq, reply in parse_replies(_recv(sock)):
                        if seq not in window:
                            self.skipped += 1
                            continue
                        key = window.pop(seq)
                        self.gets += 1
                        if isinstance(reply, CtEntry):
                            out[key] = index_entries([reply], 1).nat.get(key)
                        elif reply is None:  # no answer: asked again next interval, unless given up on
                            self.malformed += 1
                            if self._no_answer(key):
                                out[key] = None
                        elif reply == errno.ENOENT:
                            self.gets_missing += 1
                            out[key] = None
                            missing.add(key)
                        else:  # EPERM, ...: not about this key, about us
                            raise ConntrackDumpError(reply, os.strerror(reply))
        return out, missing

    def _no_answer(self, key: FlowKey) -> bool:
        """One more malformed answer that may be about ``key``; True once it has had MALFORMED_TRIES of them
        (given up on: the caller keeps it as unknown)."""
        tries = self._tries.pop(key, 0) + 1
        if tries < MALFORMED_TRIES:
            self._tries[key] = tries
            return False
        self.malformed_given_up += 1
        return True
