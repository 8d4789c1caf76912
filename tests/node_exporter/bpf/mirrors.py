"""The mirrors of node_exporter/bpf/abi.py the ABI tests walk, with the object whose BTF holds each C type.

A new mirror in abi.py gets its line here, or no test compares it with the kernel side.
"""

from __future__ import annotations

import ctypes
import enum

from node_exporter.bpf.abi import (
    ConnectStatus,
    HttpMethod,
    KscopeL4Record,
    KscopeL7Exchange,
    KscopeL7Header,
    KscopeL7Summary,
    L4Counter,
    L4Reason,
    L7Direction,
    L7Emit,
    L7ExchangeFlags,
    L7Flags,
    L7Protocol,
    L7RecordType,
    L7Stat,
    RecordType,
    Role,
    Stat,
)

# C struct name -> (object file, mirror); C enum name -> (object file, mirror).
STRUCTS: dict[str, tuple[str, type[ctypes.Structure]]] = {
    "kscope_l4_record": ("l4.bpf.o", KscopeL4Record),
    "kscope_l7_header": ("l7.bpf.o", KscopeL7Header),
    "kscope_l7_exchange": ("l7.bpf.o", KscopeL7Exchange),
    "kscope_l7_summary": ("l7.bpf.o", KscopeL7Summary),
}
ENUMS: dict[str, tuple[str, type[enum.IntEnum] | type[enum.IntFlag]]] = {
    "kscope_record_type": ("l4.bpf.o", RecordType),
    "kscope_l4_reason": ("l4.bpf.o", L4Reason),
    "kscope_l4_role": ("l4.bpf.o", Role),
    "kscope_connect_status": ("l4.bpf.o", ConnectStatus),
    "kscope_l4_counter": ("l4.bpf.o", L4Counter),
    "kscope_stat": ("l4.bpf.o", Stat),
    "kscope_l7_record_type": ("l7.bpf.o", L7RecordType),
    "kscope_l7_protocol": ("l7.bpf.o", L7Protocol),
    "kscope_l7_direction": ("l7.bpf.o", L7Direction),
    "kscope_l7_flags": ("l7.bpf.o", L7Flags),
    "kscope_l7_stat": ("l7.bpf.o", L7Stat),
    "kscope_http_method": ("l7.bpf.o", HttpMethod),
    "kscope_l7_emit": ("l7.bpf.o", L7Emit),
    "kscope_l7_exchange_flags": ("l7.bpf.o", L7ExchangeFlags),
}
