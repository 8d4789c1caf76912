"""HTTP/1 exchange records: one request and its response, paired in the kernel.

The kernel sends one fixed-size record per exchange and side (bpf_src/abi/l7.h
``kscope_l7_exchange``) carrying sizes, status, timestamps and the first bytes of the
request head. Under load, exchanges its sampler does not pick are summed per socket, method,
route and status and arrive as ``kscope_l7_summary`` records on the same ring: same size, same
fields up to ``comm`` (so ``SLOT`` reads both), then a count, latency min/max and buckets, and
the first summed request's head. Here only that head is parsed, and only for what we keep: method, path
(query and fragment cut off), its route, a valid ``traceparent`` and ``X-Request-ID``.
No other header value and no body byte leaves :func:`parse_head`.

Cost matters more than elegance here: this runs once per request and side at
whatever rate the node serves. Records are unpacked with one precompiled ``struct``
call each (a batch is a list of ring-buffer records; numpy is not a dependency, and
unpack_from of a 504-byte record is a fraction of a microsecond), the path -> (path, route)
result is cached (bounded), and the header search is two ``bytes.find`` calls on a
lower-cased copy.
"""

from __future__ import annotations

import ctypes
import re
import struct
from collections.abc import Iterator
from typing import Any, Final

from node_exporter.bpf.abi import (
    L7_HEAD,
    L7_SUMMARY_HEAD,
    KscopeL7Exchange,
    KscopeL7Summary,
    L7RecordType,
    struct_format,
)
from node_exporter.protocols.http_fields import request_id, route_template, target_path, valid_traceparent

# struct kscope_l7_exchange up to its head; the head is sliced from the record (head_len bytes).
# Formats here are derived from the ctypes mirrors (checked against BTF by the ABI test).
EXCHANGE = struct.Struct(struct_format(KscopeL7Exchange, stop="head"))
HEAD_OFFSET: Final = KscopeL7Exchange.head.offset
EXCHANGE_SIZE: Final = ctypes.sizeof(KscopeL7Exchange)
EXCHANGE_TYPE: Final = int(L7RecordType.KSCOPE_REC_L7_EXCHANGE)
_RING_HDR = struct.Struct("<II")
# One ring slot: the ring's length word (+ page offset), the record; its head is skipped
# here and sliced to head_len by the caller (one head-sized copy less per record).
# After the head: the TCP sequence numbers (a summary's padding, unused there).
EXCHANGE_TAIL = struct.Struct(struct_format(KscopeL7Exchange, first="tcp_req_seq"))
SLOT = struct.Struct("<I4x" + EXCHANGE.format[1:] + f"{L7_HEAD}x" + EXCHANGE_TAIL.format[1:])
SLOT_RECORD: Final = _RING_HDR.size  # the record's offset in a slot
SLOT_HEAD: Final = SLOT_RECORD + HEAD_OFFSET  # the head's offset in a slot
DISCARD_BIT: Final = 1 << 30

# struct kscope_l7_summary after the prefix it shares with an exchange (SLOT reads that): count,
# end_ns, latency min/max, the buckets; then its head (head_len bytes). Offsets from the mirror.
SUMMARY_TYPE: Final = int(L7RecordType.KSCOPE_REC_L7_SUMMARY)
SUMMARY_TAIL = struct.Struct(struct_format(KscopeL7Summary, first="count", stop="head"))
SUMMARY_TAIL_OFFSET: Final = KscopeL7Summary.count.offset
SUMMARY_HEAD_OFFSET: Final = KscopeL7Summary.head.offset
SUMMARY_HEAD: Final = L7_SUMMARY_HEAD
# SLOT reads a summary's prefix as an exchange's and the tail starts where an exchange's head would
if struct_format(KscopeL7Summary, stop="count") != EXCHANGE.format or SUMMARY_TAIL_OFFSET != HEAD_OFFSET:
    raise ImportError("kscope_l7_summary no longer shares kscope_l7_exchange's prefix")  # pragma: no cover

METHODS: Final = {m: m.decode("ascii") for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT",
                                                   b"OPTIONS", b"TRACE", b"PATCH")}  # fmt: skip
_VERSIONS: Final = frozenset({b"HTTP/1.1", b"HTTP/1.0"})
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")
# A whole request line in one C call: method, the target up to its query or fragment, the rest
# of the target (never kept), version. Lines it does not match take the slow path.
_LINE = re.compile(rb"(" + b"|".join(METHODS) + rb") ([^\x00-\x20\x7f?#]+)[^\x00-\x20\x7f]* HTTP/1\.[01]\r?\n")
_WANTED = re.compile(rb"\n(?:traceparent|x-request-id):", re.IGNORECASE)
MAX_PATH_CACHE: Final = 4096  # distinct paths remembered; the cache is emptied when full


# What a head yields: (method, path, route, traceparent, request_id). A plain tuple, not a
# NamedTuple: building one costs a Python-level __new__ per request, and heads without trace
# headers are served from the cache as the very same tuple.
Head = tuple[str, str, str, str, str]


class ExchangeBatch:
    """The exchange records of one drain of the exchange ring: ``n`` slots of ring header (8
    bytes: length with the BUSY/DISCARD bits, page offset) + record, back to back."""

    __slots__ = ("data", "n")

    def __init__(self, data: bytes, n: int) -> None:
        self.data = data
        self.n = n

    def __len__(self) -> int:
        return self.n

    @classmethod
    def of(cls, records: list[bytes]) -> ExchangeBatch:
        """A batch as the ring would hold these records (tests, tools)."""
        slots = [_RING_HDR.pack(len(r), 0) + r for r in records]
        return cls(b"".join(slots), len(slots))

    def slots(self) -> Iterator[tuple[Any, ...]]:
        """(ring length word, record fields...) per slot, unpacked in one C loop; slot i's head
        starts at ``i * SLOT.size + SLOT_HEAD``."""
        return SLOT.iter_unpack(self.data)


class HeadParser:
    """Request heads -> :class:`Head`; never raises, returns None for anything unusable.

    One instance per pipeline: its path cache is bounded state, not a module global.
    """

    __slots__ = ("_heads", "_paths")

    def __init__(self) -> None:
        self._paths: dict[bytes, tuple[str, str]] = {}
        # path (no query) -> method -> the Head of a request without trace headers
        self._heads: dict[bytes, dict[bytes, Head]] = {}

    def parse(self, head: bytes) -> Head | None:
        m = _LINE.match(head)
        if m is None or m[1] == b"CONNECT":
            return self._parse_slow(head)
        eol = m.end() - 1
        end = head.find(b"\r\n\r\n", eol - 1)
        # header lines up to and including the last one's line end (the body is not searched);
        # a line the capture cut has no line end and yields nothing (a cut id is a wrong id)
        end = end + 2 if end >= 0 else len(head)
        if _WANTED.search(head, eol, end) is None:
            by_method = self._heads.get(m[2])
            if by_method is not None:
                cached = by_method.get(m[1])
                if cached is not None:
                    return cached
            names = self._path(m[2])
            if names is None:
                return None
            h = (METHODS[m[1]], names[0], names[1], "", "")
            if len(self._heads) >= MAX_PATH_CACHE:
                self._heads.clear()
            self._heads.setdefault(m[2], {})[m[1]] = h
            return h
        names = self._path(m[2])
        if names is None:
            return None
        fields = head[eol:end]
        lower = fields.lower()  # same offsets: a value is sliced from the original bytes
        traceparent = valid_traceparent(_value(fields, lower, b"\ntraceparent:"))
        rid = request_id(_value(fields, lower, b"\nx-request-id:"))
        return (METHODS[m[1]], names[0], names[1], traceparent, rid)

    def _parse_slow(self, head: bytes) -> Head | None:
        """CONNECT, bare-LF heads, a request line the capture cut, and what is not a request."""
        end = head.find(b"\r\n\r\n")
        if end < 0:
            end = len(head)  # the head is longer than what was captured: use what there is
        eol = head.find(b"\n", 0, end + 2)
        line = head[:eol] if eol >= 0 else head[:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        parts = line.split(b" ")
        if len(parts) == 3:
            method, target, version = parts
            if version not in _VERSIONS:
                return None
        elif len(parts) == 2 and eol < 0:
            method, target = parts  # a request line cut by the capture bound: the path is a prefix
        else:
            return None
        if method not in METHODS or not target or _TARGET_BAD.search(target):
            return None
        if method == b"CONNECT":
            path = target_path(method, target)
            names = None if path is None else (path, route_template(path))
        else:
            names = self._path(_before_query(target))
        if names is None:
            return None
        traceparent = rid = ""
        if eol >= 0:
            fields = head[eol : end + 2] if end < len(head) else head[eol:]
            lower = fields.lower()
            traceparent = valid_traceparent(_value(fields, lower, b"\ntraceparent:"))
            rid = request_id(_value(fields, lower, b"\nx-request-id:"))
        return (METHODS[method], names[0], names[1], traceparent, rid)

    def _path(self, key: bytes) -> tuple[str, str] | None:
        """(path, route) of a target without its query; cached, so the query never reaches the cache."""
        names = self._paths.get(key)
        if names is None:
            path = target_path(b"GET", key)
            if path is None:
                return None  # not cached: invalid targets must not evict good paths
            names = (path, route_template(path))
            if len(self._paths) >= MAX_PATH_CACHE:
                self._paths.clear()
            self._paths[key] = names
        return names


def _before_query(target: bytes) -> bytes:
    cut = len(target)
    for sep in (b"?", b"#"):
        i = target.find(sep, 0, cut)
        if i >= 0:
            cut = i
    return target[:cut]


def _value(fields: bytes, lower: bytes, name: bytes) -> bytes:
    """The value of the first header ``name`` (lower-case, searched in ``lower``), or b"" if absent or cut."""
    i = lower.find(name)
    if i < 0:
        return b""
    start = i + len(name)
    eol = fields.find(b"\n", start)
    return b"" if eol < 0 else fields[start:eol].strip(b" \t\r")
