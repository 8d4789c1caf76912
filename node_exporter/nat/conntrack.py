"""The node's conntrack table as a lookup of DNAT'ed TCP connections and UDP flows.

A client in a pod connects to a Service VIP; kube-proxy's iptables rules DNAT it to a
backend in the node's namespace. The client's socket only ever knows the VIP: the
backend that really answered is the source of the conntrack entry's reply tuple.

:class:`ConntrackTable` asks the node's conntrack (node_exporter/nat/ctnetlink.py speaks the wire
format). A connection's translation never changes, so each client socket is asked about once: a few
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
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Container, Iterable
from typing import TypeVar

import structlog
from cachetools import Cache, LRUCache, TTLCache

from node_exporter.nat.ctnetlink import (
    DEFAULT_MAX_ENTRIES,
    ConntrackDumpError,
    CtEntry,
    dump_request,
    get_request,
    index_entries,
    parse_dump,
    parse_replies,
)
from node_exporter.nat.ctnetlink import FlowKey as FlowKey  # the agent's key type

log = structlog.get_logger("kscope.nat")
_T = TypeVar("_T")

NETLINK_NETFILTER = 12
CLONE_NEWNET = 0x40000000
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
_RECV_BYTES = 1 << 20


def _encodable(key: FlowKey) -> bool:
    try:
        get_request(0, key)
    except (OSError, ValueError, TypeError, struct.error):
        return False
    return True


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
        self.bad_keys = 0  # tuples that cannot be asked about (kept as untranslated, never sent)
        self.available: bool | None = None  # None until the first request
        self.timeout_s = 5.0  # a request that stalls this long fails this interval, not the agent
        self._seq = 0

    # --- the agent's side -----------------------------------------------------------------------------

    def resolve(self, keys: Iterable[FlowKey], connecting: Container[FlowKey] = frozenset()) -> None:
        """Learn the answer for every key not known yet (call once per interval, before lookups).
        ``connecting``: keys of sockets still connecting, whose "not found" is not final yet."""
        unknown = [k for k in dict.fromkeys(keys) if k not in self._cache(k)]
        bad = {k for k in unknown if not _encodable(k)}
        if bad:  # an address that is none, or two families in one tuple: no entry can match it
            self.bad_keys += len(bad)
            self._remember((k, None) for k in bad)
            unknown = [k for k in unknown if k not in bad]
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
            "bad_keys": self.bad_keys,
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
