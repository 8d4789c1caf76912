"""The syscall fallback's pure parts, and its object's contract with the Python side (no root).

Opening an object and reading its BTF are unprivileged, so the checks that the fallback
emits the same header, enums and map names as l7.bpf.o run everywhere.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_exporter.bpf import libbpf as lb
from node_exporter.bpf.abi import KscopeL7Header, L7Stat
from node_exporter.bpf.btf import KIND_STRUCT, Btf
from node_exporter.l7 import syscalls
from node_exporter.l7.probe import clamp_capture_bytes
from node_exporter.l7.syscalls import (
    CAPABILITIES,
    L7SysStat,
    kernel_has_socket_tracepoints,
    l7_stat_names,
    merge_stats,
    sys_stat_names,
)

# ---- choosing the probe ---------------------------------------------------------------------


def test_socket_tracepoints_need_both() -> None:
    both = {"btf_trace_sock_send_length", "btf_trace_sock_recv_length"}
    assert kernel_has_socket_tracepoints(both.__contains__) is True
    assert kernel_has_socket_tracepoints({"btf_trace_sock_send_length"}.__contains__) is False
    assert kernel_has_socket_tracepoints(set().__contains__) is False


def test_socket_tracepoints_of_this_kernel() -> None:
    """Whatever the answer, it is the kernel BTF's (and no BTF at all means False, not a crash)."""
    path = Path("/sys/kernel/btf/vmlinux")
    if not path.exists():
        assert kernel_has_socket_tracepoints() is False
        return
    with Btf.vmlinux() as vmlinux:
        expected = all(vmlinux.find(f"btf_trace_{tp}", 8) >= 0 for tp in syscalls.SOCKET_TRACEPOINTS)
    assert kernel_has_socket_tracepoints() is expected


# ---- counters --------------------------------------------------------------------------------


def test_stat_names_follow_the_object_size() -> None:
    names = l7_stat_names(7)
    assert names == ["rb_full", "ignored", "captured", "read_failed", "no_buffer", "tls_no_socket", "storage_failed"]
    assert l7_stat_names(3) == names[:3]
    assert len(l7_stat_names(1000)) == int(L7Stat.KSCOPE_L7_STATS)


def test_merge_stats_names_and_eviction_bound() -> None:
    shared = list(range(7))
    stats = merge_stats(shared, [100, 2, 5], socket_entries=16)
    assert stats["rb_full"] == 0 and stats["storage_failed"] == 6
    assert (stats["sockets_tracked"], stats["no_cookie"], stats["mmsg_skipped"]) == (100, 2, 5)
    assert stats["sockets_evicted_min"] == 84
    assert merge_stats(shared, [10, 0, 0], socket_entries=16)["sockets_evicted_min"] == 0
    assert sys_stat_names() == ["sockets_tracked", "no_cookie", "mmsg_skipped"]


def test_merge_stats_rejects_a_size_mismatch() -> None:
    with pytest.raises(ValueError):
        merge_stats(list(range(7)), [1, 2], socket_entries=16)


def test_capture_bytes_clamped_like_the_kernel() -> None:
    assert [clamp_capture_bytes(n) for n in (-5, 0, 1, 1024, 4096, 4097, 1 << 20)] == [1, 1, 1, 1024, 4096, 4096, 4096]


# ---- the compiled object ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def obj_path(bpf_dir: Path) -> Path:
    path = bpf_dir / syscalls.OBJECT_NAME
    if not path.exists():
        pytest.fail(f"{path} not built: run make setup")
    return path


@pytest.fixture(scope="module")
def btf(obj_path: Path) -> Iterator[Btf]:
    with Btf(lb.check_ptr(lb.lib().btf__parse(str(obj_path).encode(), None), "object BTF"), owned=True) as b:
        yield b


def test_same_chunk_header_as_l7(btf: Btf) -> None:
    """The header the fallback writes is the one decode_chunk reads (layout from its BTF)."""
    members = btf.members("kscope_l7_header")
    assert btf.size_of(btf.find("kscope_l7_header", KIND_STRUCT)) == ctypes.sizeof(KscopeL7Header)
    assert [(m.name, m.offset_bytes, m.size_bytes) for m in members] == [
        (f[0], getattr(KscopeL7Header, f[0]).offset, getattr(KscopeL7Header, f[0]).size)
        for f in KscopeL7Header._fields_
    ]


def test_enums_match_btf(btf: Btf) -> None:
    assert btf.enum_values("kscope_l7_sys_stat") == {e.name: int(e.value) for e in L7SysStat}
    shared = btf.enum_values("kscope_l7_stat")
    # the indices the fallback shares with l7.bpf.o mean the same thing
    assert {k: v for k, v in shared.items() if k != "KSCOPE_L7_STATS"} == {
        e.name: int(e.value) for e in L7Stat if e != L7Stat.KSCOPE_L7_STATS and e.name in shared
    }


def test_every_program_has_a_capability_and_the_maps_exist(obj_path: Path) -> None:
    lib = lb.lib()
    obj = lb.check_ptr(lib.bpf_object__open_file(str(obj_path).encode(), None), "open object")
    try:
        names, maps = [], set()
        prog = lib.bpf_object__next_program(obj, None)
        while prog:
            names.append(lib.bpf_program__name(prog).decode())
            prog = lib.bpf_object__next_program(obj, prog)
        m = lib.bpf_object__next_map(obj, None)
        while m:
            maps.add(lib.bpf_map__name(m).decode())
            m = lib.bpf_object__next_map(obj, m)
    finally:
        lib.bpf_object__close(obj)
    assert names and all(n in CAPABILITIES for n in names), names
    assert CAPABILITIES["l7_sys_exit"] == "l7.capture" and CAPABILITIES["l7_sys_cookie"] == "l7.cookie"
    # the names the loader and the agent use for l7.bpf.o, plus the resizable socket table
    assert {"l7_ring", "l7_stats", "l7_sys_stats", "l7_sys_socks"} <= maps
