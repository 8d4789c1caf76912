"""Python mirror of ``bpf_src/abi/*.h``.

Same field names as the C structs, checked against the compiled object's BTF by
``tests/node_exporter/bpf/test_abi.py`` (size, order, offsets, array lengths and
enum values; the mirrors it walks are listed in ``tests/node_exporter/bpf/mirrors.py``), so a
change on one side without the other fails the build.
ctypes objects stay in this layer: decoders unpack records with ``struct`` formats derived
from these mirrors (:func:`struct_format`), so no format is kept in step by hand.
"""

from __future__ import annotations

import ctypes
import enum
import struct

from kscope_common.latency import LATENCY_BUCKETS

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
_CODES: dict[type, str] = {u8: "B", u16: "H", u32: "I", u64: "Q"}


class RecordType(enum.IntEnum):
    KSCOPE_REC_L4 = 1


class L4Reason(enum.IntEnum):
    KSCOPE_L4_PERIODIC = 1
    KSCOPE_L4_CLOSE = 2


class Role(enum.IntEnum):
    KSCOPE_ROLE_UNKNOWN = 0
    KSCOPE_ROLE_CLIENT = 1
    KSCOPE_ROLE_SERVER = 2
    KSCOPE_ROLE_LISTENER = 3


class ConnectStatus(enum.IntEnum):
    KSCOPE_CONNECT_NONE = 0
    KSCOPE_CONNECT_OK = 1
    KSCOPE_CONNECT_REFUSED = 2
    KSCOPE_CONNECT_TIMEOUT = 3
    KSCOPE_CONNECT_RESET = 4
    KSCOPE_CONNECT_UNREACHABLE = 5
    KSCOPE_CONNECT_ABORTED = 6
    KSCOPE_CONNECT_OTHER = 7


class L4Counter(enum.IntEnum):
    KSCOPE_C_BYTES_SENT = 0
    KSCOPE_C_BYTES_RECEIVED = 1
    KSCOPE_C_SENDS = 2
    KSCOPE_C_RECVS = 3
    KSCOPE_C_RETRANSMITS = 4
    KSCOPE_C_SYN_RETRANSMITS = 5
    KSCOPE_C_RESETS_SENT = 6
    KSCOPE_C_RESETS_RECEIVED = 7
    KSCOPE_C_DROPS = 8
    KSCOPE_C_LISTEN_OVERFLOWS = 9
    KSCOPE_L4_COUNTERS = 10


class Stat(enum.IntEnum):
    KSCOPE_STAT_CLOSE_RB_FULL = 0
    KSCOPE_STAT_CLOSE_LOST = 1
    KSCOPE_STAT_STORAGE_FAILED = 2
    KSCOPE_STAT_RST_NO_SOCKET = 3
    KSCOPE_STAT_DROPS_NO_SOCKET = 4
    KSCOPE_STAT_ITER_RETRY = 5
    KSCOPE_STAT_SOCKETS_TRACKED = 6
    KSCOPE_STAT_SEED_OWNERS_FULL = 7
    KSCOPE_STAT_NETNS_PENDING_FULL = 8
    KSCOPE_STAT_REPORT_RB_FULL = 9
    KSCOPE_STATS = 10


N_COUNTERS = int(L4Counter.KSCOPE_L4_COUNTERS)


class KscopeL4Record(ctypes.Structure):
    _fields_ = [
        ("type", u8),
        ("reason", u8),
        ("role", u8),
        ("connect_status", u8),
        ("netns_ino", u32),
        ("sock_cookie", u64),
        ("cgroup_id", u64),
        ("start_ns", u64),
        ("ts_ns", u64),
        ("connect_latency_ns", u64),
        ("total", u64 * N_COUNTERS),
        ("delta", u64 * N_COUNTERS),
        ("saddr", u8 * 16),
        ("daddr", u8 * 16),
        ("tgid", u32),
        ("pid", u32),
        ("srtt_us", u32),
        ("segs_out", u32),
        ("segs_in", u32),
        ("last_drop_reason", u32),
        ("ack_backlog", u32),
        ("max_ack_backlog", u32),
        ("sk_drops", u32),
        ("rttvar_us", u32),
        ("sport", u16),
        ("dport", u16),
        ("family", u16),
        ("tcp_state", u8),
        ("connect_errno", u8),
        ("comm", u8 * 16),
    ]


class L7RecordType(enum.IntEnum):
    KSCOPE_REC_L7 = 2
    KSCOPE_REC_L7_EXCHANGE = 3
    KSCOPE_REC_L7_SUMMARY = 4


class L7Protocol(enum.IntEnum):
    KSCOPE_PROTO_UNKNOWN = 0
    KSCOPE_PROTO_HTTP1 = 1
    KSCOPE_PROTO_DNS = 2
    KSCOPE_PROTO_REDIS = 3
    KSCOPE_PROTO_MEMCACHED = 4
    KSCOPE_PROTO_POSTGRESQL = 5
    KSCOPE_PROTO_MYSQL = 6
    KSCOPE_PROTO_HTTP2 = 7
    KSCOPE_PROTO_IGNORED = 255


class L7Direction(enum.IntEnum):
    KSCOPE_DIR_EGRESS = 1
    KSCOPE_DIR_INGRESS = 2


class L7Flags(enum.IntFlag):
    KSCOPE_L7_TLS = 1
    KSCOPE_L7_TRUNCATED = 2
    KSCOPE_L7_NO_BUFFER = 4
    KSCOPE_L7_H2_FRAMES = 8


class L7Stat(enum.IntEnum):
    KSCOPE_L7_STAT_RB_FULL = 0
    KSCOPE_L7_STAT_IGNORED = 1
    KSCOPE_L7_STAT_CAPTURED = 2
    KSCOPE_L7_STAT_READ_FAILED = 3
    KSCOPE_L7_STAT_NO_BUFFER = 4
    KSCOPE_L7_STAT_TLS_NO_SOCKET = 5
    KSCOPE_L7_STAT_STORAGE_FAILED = 6
    KSCOPE_L7_STAT_EXCHANGES = 7
    KSCOPE_L7_STAT_FALLBACK = 8
    KSCOPE_L7_STAT_ORPHAN_RESPONSES = 9
    KSCOPE_L7_STAT_LATE_CALLS = 10
    KSCOPE_L7_STAT_EXCHANGE_RB_FULL = 11
    KSCOPE_L7_STAT_TLS_CALL_LOST = 12
    KSCOPE_L7_STAT_SUMMARIZED = 13
    KSCOPE_L7_STAT_SUMMARIES = 14
    KSCOPE_L7_STAT_SUMMARY_RB_FULL = 15
    KSCOPE_L7_STAT_SUMMARY_LOST = 16
    KSCOPE_L7_STAT_SLOTS_FULL = 17
    KSCOPE_L7_STAT_STOP_PENDING = 18
    KSCOPE_L7_STAT_NETNS_PENDING_FULL = 19
    KSCOPE_L7_STAT_MMSG_UNKNOWN = 20
    KSCOPE_L7_STAT_OWN = 21
    KSCOPE_L7_STAT_H2_LOST = 22
    KSCOPE_L7_STAT_UNSUMMABLE = 23
    KSCOPE_L7_STAT_CAUSAL_PARENTS = 24
    KSCOPE_L7_STAT_CAUSAL_REFUSED = 25
    KSCOPE_L7_STAT_CAUSAL_CONFIRMED = 26
    KSCOPE_L7_STAT_CAUSAL_UNCONFIRMED = 27
    KSCOPE_L7_STAT_CAUSAL_FORCED = 28
    KSCOPE_L7_STAT_CAUSAL_THREAD_FLAGGED = 29
    KSCOPE_L7_STAT_CAUSAL_PROC_FLAGGED = 30
    KSCOPE_L7_STAT_CAUSAL_MAP_FULL = 31
    KSCOPE_L7_STAT_CAUSAL_ABANDONED = 32
    KSCOPE_L7_STAT_PICK_OVER_BUDGET = 33
    KSCOPE_L7_STAT_CAUSAL_CHUNKS = 34
    KSCOPE_L7_STAT_OFFERED = 35
    KSCOPE_L7_STATS = 36


L7_MAX_CAPTURE = 4096


class KscopeL7Header(ctypes.Structure):
    """Followed by ``captured`` payload bytes."""

    _fields_ = [
        ("type", u8),
        ("direction", u8),
        ("protocol", u8),
        ("flags", u8),
        ("netns_ino", u32),
        ("sock_cookie", u64),
        ("ts_ns", u64),
        ("seq", u64),
        ("saddr", u8 * 16),
        ("daddr", u8 * 16),
        ("tgid", u32),
        ("pid", u32),
        ("len", u32),
        ("captured", u32),
        ("sport", u16),
        ("dport", u16),
        ("family", u16),
        ("role", u8),
        ("ip_proto", u8),
        ("comm", u8 * 16),
        ("parent_ns", u64),
    ]


L7_HEAD = 368  # KSCOPE_L7_HEAD: request head bytes carried by an exchange record


class HttpMethod(enum.IntEnum):
    KSCOPE_HTTP_GET = 1
    KSCOPE_HTTP_HEAD = 2
    KSCOPE_HTTP_POST = 3
    KSCOPE_HTTP_PUT = 4
    KSCOPE_HTTP_DELETE = 5
    KSCOPE_HTTP_PATCH = 6
    KSCOPE_HTTP_OPTIONS = 7
    KSCOPE_HTTP_CONNECT = 8
    KSCOPE_HTTP_TRACE = 9


class L7Emit(enum.IntEnum):
    KSCOPE_EMIT_NEXT = 1
    KSCOPE_EMIT_CLOSE = 2
    KSCOPE_EMIT_SWEEP = 3
    KSCOPE_EMIT_UPGRADE = 4
    KSCOPE_EMIT_FALLBACK = 5
    KSCOPE_EMIT_EVICT = 6


class L7ExchangeFlags(enum.IntFlag):
    KSCOPE_X_HEAD_TRUNCATED = 1
    KSCOPE_X_NO_BUFFER = 2
    KSCOPE_X_TCP_SEQ = 4
    KSCOPE_X_PARENT = 8
    KSCOPE_X_PARENT_OK = 16


class KscopeL7Exchange(ctypes.Structure):
    """One HTTP/1 request/response exchange as one side saw it (fixed size)."""

    _fields_ = [
        ("type", u8),
        ("role", u8),
        ("method", u8),
        ("reason", u8),
        ("netns_ino", u32),
        ("sock_cookie", u64),
        ("start_ns", u64),
        ("latency_ns", u64),
        ("request_bytes", u64),
        ("response_bytes", u64),
        ("saddr", u8 * 16),
        ("daddr", u8 * 16),
        ("tgid", u32),
        ("pid", u32),
        ("sport", u16),
        ("dport", u16),
        ("family", u16),
        ("status", u16),
        ("head_len", u16),
        ("flags", u8),
        ("_pad", u8 * 5),
        ("comm", u8 * 16),
        ("head", u8 * L7_HEAD),
        ("tcp_req_seq", u32),
        ("tcp_resp_seq", u32),
        ("parent_start_ns", u64),
    ]


# KSCOPE_L7_LATENCY_BOUNDS_NS (kscope_common/latency.py): bucket i counts BOUND[i-1] < latency <= BOUND[i]
L7_LATENCY_BUCKETS = LATENCY_BUCKETS
L7_SUMMARY_HEAD = 128  # KSCOPE_L7_SUMMARY_HEAD


class KscopeL7Summary(ctypes.Structure):
    """HTTP/1 exchanges of one socket with the same method, route and status, summed (same size
    as, and the same fields up to ``comm`` as, :class:`KscopeL7Exchange`)."""

    _fields_ = [
        *KscopeL7Exchange._fields_[: [f[0] for f in KscopeL7Exchange._fields_].index("head")],
        ("count", u32),
        ("_pad2", u32),
        ("end_ns", u64),
        ("latency_min_ns", u64),
        ("latency_max_ns", u64),
        ("buckets", u32 * L7_LATENCY_BUCKETS),
        ("head", u8 * L7_SUMMARY_HEAD),
        ("_pad3", u8 * (L7_HEAD - L7_SUMMARY_HEAD - 4 * L7_LATENCY_BUCKETS - 32)),
        ("_pad4", u8 * 16),
    ]


def struct_format(mirror: type[ctypes.Structure], first: str | None = None, stop: str | None = None) -> str:
    """The little-endian ``struct`` format of ``mirror``'s fields from ``first`` up to, not
    including, ``stop`` (default: all of them): one item per field in field order, byte arrays
    as one ``bytes`` item, other arrays as one item per element, ``_pad*`` fields and holes
    skipped. Offsets and sizes are the mirror's own, which the ABI test checks against BTF."""
    fields = [(f[0], f[1]) for f in mirror._fields_]
    names = [name for name, _ in fields]
    lo = names.index(first) if first else 0
    hi = names.index(stop) if stop else len(fields)
    pos = start = getattr(mirror, fields[lo][0]).offset
    out = []
    for name, ctype in fields[lo:hi]:
        member = getattr(mirror, name)
        if member.offset > pos:
            out.append(f"{member.offset - pos}x")
        elem: type | None = getattr(ctype, "_type_", None) if issubclass(ctype, ctypes.Array) else None
        if name.startswith("_pad"):
            out.append(f"{member.size}x")
        elif elem is None:
            out.append(_CODES[ctype])
        else:
            out.append(f"{member.size}s" if elem is u8 else f"{member.size // ctypes.sizeof(elem)}{_CODES[elem]}")
        pos = member.offset + member.size
    end = getattr(mirror, stop).offset if stop else ctypes.sizeof(mirror)
    if end > pos:
        out.append(f"{end - pos}x")  # trailing padding: the format spans [first, stop) exactly
    fmt = "<" + "".join(out)
    if struct.calcsize(fmt) != end - start:  # pragma: no cover - a field type with no code above
        raise TypeError(f"{mirror.__name__}: format {fmt} is not {end - start} bytes")
    return fmt
