"""Python mirror of ``bpf_src/abi/*.h``.

Same field names as the C structs, checked against the compiled object's BTF by
``tests/node_exporter/bpf/test_abi.py`` (size, order, offsets, array lengths and
enum values), so a change on one side without the other fails the build.
ctypes objects stay in this layer: decoders turn them into frozen dataclasses.
"""

from __future__ import annotations

import ctypes
import enum

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


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
    KSCOPE_STATS = 7


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


# C struct name -> mirror; C enum name -> mirror (what the ABI test walks).
STRUCTS: dict[str, type[ctypes.Structure]] = {"kscope_l4_record": KscopeL4Record}
ENUMS: dict[str, type[enum.IntEnum]] = {
    "kscope_record_type": RecordType,
    "kscope_l4_reason": L4Reason,
    "kscope_l4_role": Role,
    "kscope_connect_status": ConnectStatus,
    "kscope_l4_counter": L4Counter,
    "kscope_stat": Stat,
}
