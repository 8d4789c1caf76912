"""Decoded L7 chunks: one application-level send or receive, with the head of its bytes."""

from __future__ import annotations

import ctypes
import struct
from typing import NamedTuple

from node_exporter.bpf.abi import KscopeL7Header, L7Direction, L7Flags, L7Protocol, L7RecordType, struct_format
from node_exporter.l4.records import _comm_text, ip_text

_HDR = struct.Struct(struct_format(KscopeL7Header))  # from the mirror, as the L4 record's
HEADER_SIZE = ctypes.sizeof(KscopeL7Header)
_PROTOCOLS = {int(p): p for p in L7Protocol}
_DIRECTIONS = {int(d): d for d in L7Direction}


class Chunk(NamedTuple):  # a NamedTuple for decode speed, as L4Record
    direction: L7Direction
    protocol: L7Protocol
    flags: L7Flags
    netns_ino: int
    sock_cookie: int
    ts_ns: int
    seq: int
    local_ip: str
    remote_ip: str
    tgid: int
    pid: int
    length: int  # bytes the call moved
    local_port: int
    remote_port: int
    family: int
    role: int  # abi.Role value
    ip_proto: int
    comm: str
    data: bytes  # the captured head (<= length)
    # a client's send inside a server request of its thread: that exchange's start (l7_causal.h)
    parent_ns: int = 0


def decode_chunk(raw: bytes) -> Chunk | None:
    """None for anything that is not a well-formed L7 chunk (the caller counts it)."""
    if len(raw) < HEADER_SIZE or raw[0] != L7RecordType.KSCOPE_REC_L7:
        return None
    (_, direction, protocol, flags, netns, cookie, ts, seq, saddr, daddr, tgid, pid, length, captured,
     sport, dport, family, role, ip_proto, comm, parent_ns) = _HDR.unpack_from(raw)  # fmt: skip
    if direction not in _DIRECTIONS or protocol not in _PROTOCOLS or HEADER_SIZE + captured > len(raw):
        return None
    if captured > length:
        return None
    return Chunk(
        direction=_DIRECTIONS[direction],
        protocol=_PROTOCOLS[protocol],
        flags=L7Flags(flags & 15),
        netns_ino=netns,
        sock_cookie=cookie,
        ts_ns=ts,
        seq=seq,
        local_ip=ip_text(saddr),
        remote_ip=ip_text(daddr),
        tgid=tgid,
        pid=pid,
        length=length,
        local_port=sport,
        remote_port=dport,
        family=family,
        role=role,
        ip_proto=ip_proto,
        comm=_comm_text(comm),
        data=raw[HEADER_SIZE : HEADER_SIZE + captured],
        parent_ns=parent_ns,
    )
