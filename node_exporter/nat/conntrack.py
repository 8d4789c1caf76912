"""The node's conntrack table, dumped once per agent interval, as a lookup of DNAT'ed TCP connections.

A client in a pod connects to a Service VIP; kube-proxy's iptables rules DNAT it to a
backend in the node's namespace. The client's socket only ever knows the VIP: the
backend that really answered is the source of the conntrack entry's reply tuple.

:func:`index_entries` is the pure core (entries in, lookup out); :class:`ConntrackTable`
is the I/O around it: one netlink dump per interval, never one request per flow.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

import structlog

log = structlog.get_logger("kscope.nat")

NETLINK_NETFILTER = 12
CLONE_NEWNET = 0x40000000
IPS_DST_NAT = 1 << 5  # enum ip_conntrack_status, IPS_DST_NAT_BIT = 5
DEFAULT_MAX_ENTRIES = 65536

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


def _ct_tuple(attr: Any) -> CtTuple | None:
    """pyroute2's CTA_TUPLE_* attribute -> CtTuple; None if it is not a port-carrying tuple."""
    if attr is None:
        return None
    ip, proto = attr.get_attr("CTA_TUPLE_IP"), attr.get_attr("CTA_TUPLE_PROTO")
    if ip is None or proto is None:
        return None
    src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    sport, dport = proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT")
    if src is None or dst is None or sport is None or dport is None:
        return None
    return CtTuple(proto.get_attr("CTA_PROTO_NUM"), src, sport, dst, dport)


def _entries(msgs: Iterable[Any], proto: int) -> Iterable[CtEntry]:
    for msg in msgs:
        orig, reply = _ct_tuple(msg.get_attr("CTA_TUPLE_ORIG")), _ct_tuple(msg.get_attr("CTA_TUPLE_REPLY"))
        if orig is not None and reply is not None and orig.proto == proto:
            yield CtEntry(orig, reply)


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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
    """The node's DNAT'ed TCP connections, refreshed in one batch per interval.

    Unavailable conntrack (namespace missing, no privilege, no nf_conntrack netlink) is a
    degraded mode, not a crash: an ``errors`` count, one log line, and an empty lookup.
    """

    def __init__(self, netns: str | None = None, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.netns = netns
        self.max_entries = max_entries
        self.nat: dict[FlowKey, tuple[str, int]] = {}
        self.dumps = 0
        self.entries = 0  # entries the dumps returned (kernel-filtered to DNAT'ed ones where supported)
        self.dnat_entries = 0  # in the index after the last dump
        self.dropped = 0  # DNAT'ed entries left out because the index was full, all dumps
        self.errors = 0
        self.available: bool | None = None  # None until the first refresh

    def _open(self) -> Any:
        from pyroute2 import NFCTSocket

        raw = open_netlink_in(self.netns)
        try:
            return NFCTSocket(nfgen_family=socket.AF_UNSPEC, use_socket=raw)
        except BaseException:
            raw.close()
            raise

    def _dump(self) -> list[Any]:
        # A fresh socket per dump: pyroute2's synchronous calls tear their transport down
        # after each request, and a namespace re-created since the last interval is found.
        sock = self._open()
        try:
            # Kernel-side filter on the DST_NAT status bit (5.15+): only translated entries cross.
            return list(sock.dump(status=IPS_DST_NAT, status_mask=IPS_DST_NAT))
        finally:
            with contextlib.suppress(Exception):
                sock.close()

    def refresh(self) -> None:
        """Replace the lookup with the table as it is now; on failure the lookup is empty."""
        try:
            msgs = self._dump()
        except Exception as exc:  # netlink, namespace and privilege errors all mean "unavailable"
            self.errors += 1
            self.nat = {}
            if self.available is not False:
                log.warning("conntrack_unavailable", netns=self.netns or "self", error=str(exc) or type(exc).__name__)
            self.available = False
            return
        if self.available is False:
            log.info("conntrack_available", netns=self.netns or "self")
        self.available = True
        self.dumps += 1
        self.entries += len(msgs)
        idx = index_entries(_entries(msgs, socket.IPPROTO_TCP), self.max_entries)
        self.nat = idx.nat
        self.dnat_entries = len(idx.nat)
        self.dropped += idx.dropped

    def lookup(self, key: FlowKey) -> tuple[str, int] | None:
        return self.nat.get(key)

    def counters(self) -> dict[str, int]:
        return {
            "dumps": self.dumps,
            "entries": self.entries,
            "dnat_entries": self.dnat_entries,
            "dropped": self.dropped,
            "errors": self.errors,
        }

    def close(self) -> None:
        self.nat = {}
