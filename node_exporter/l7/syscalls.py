"""L7 capture on kernels without the socket tracepoints: the syscall-exit fallback.

``l7.bpf.o`` needs ``sock_send_length``/``sock_recv_length`` (Linux 6.3). On older
kernels ``l7_syscalls.bpf.o`` takes the same chunks at the exit of read/write/readv/
writev/sendto/recvfrom/sendmsg/recvmsg/sendmmsg/recvmmsg/sendfile, finding the socket by
walking the task's fd table (see the object's header comment for what each part needs).
It writes the same records to a ring of the same name, so :class:`SyscallL7Collector`
returns the same :class:`Chunk` objects as :class:`L7Collector` and the pipeline cannot
tell them apart. What it lacks: TLS plaintext (no uprobes here) and the in-kernel HTTP/1
pairing of l7.bpf.o (exchange records): every captured call comes as a chunk and the
pipeline pairs in user space, as l7.bpf.o does with ``exchanges=False``.

Choose with :func:`kernel_has_socket_tracepoints`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from node_exporter.bpf.abi import L7Stat
from node_exporter.bpf.btf import KIND_TYPEDEF, Btf
from node_exporter.bpf.maps import read_percpu_u64_array
from node_exporter.l4.collector import default_bpf_dir
from node_exporter.l7.chunks import Chunk
from node_exporter.l7.exchanges import ExchangeBatch
from node_exporter.l7.probe import L7Probe, clamp_capture_bytes, own_process_knobs

OBJECT_NAME = "l7_syscalls.bpf.o"
SOCKET_TRACEPOINTS = ("sock_send_length", "sock_recv_length")
# The default object has one program; the per-syscall variant (bench only) has one per syscall.
_PER_SYSCALL = ("read", "write", "readv", "writev", "sendto", "recvfrom", "sendmsg", "recvmsg",
                "sendmmsg", "recvmmsg", "sendfile64")  # fmt: skip
CAPABILITIES = {
    "l7_sys_exit": "l7.capture",
    **{f"l7_exit_{name}": "l7.capture" for name in _PER_SYSCALL},
    "l7_sys_cookie": "l7.cookie",  # optional (5.12): without it TCP chunks carry stand-in cookies
}
TLS_DISABLED = "syscall fallback: no OpenSSL uprobes (TLS plaintext needs l7.bpf.o)"
EXCHANGES_DISABLED = "syscall fallback: chunks only, HTTP/1 paired in user space"


class L7SysStat(enum.IntEnum):
    """enum kscope_l7_sys_stat of bpf_src/l7_syscalls.bpf.c (checked against its BTF)."""

    KSCOPE_L7_SYS_STAT_SOCKETS_TRACKED = 0
    KSCOPE_L7_SYS_STAT_NO_COOKIE = 1
    KSCOPE_L7_SYS_STAT_MMSG_SKIPPED = 2
    KSCOPE_L7_SYS_STATS = 3


def kernel_has_socket_tracepoints(find_typedef: Callable[[str], bool] | None = None) -> bool:
    """True when the running kernel has both socket tracepoints l7.bpf.o attaches to.

    The same test the loader makes before attaching a ``tp_btf`` program
    (``btf_trace_<name>`` typedef in the kernel BTF). ``find_typedef`` replaces the BTF
    lookup (tests). A kernel without BTF at all has neither, and no CO-RE either.
    """
    if find_typedef is None:
        try:
            with Btf.vmlinux() as vmlinux:
                return all(vmlinux.find(f"btf_trace_{tp}", KIND_TYPEDEF) >= 0 for tp in SOCKET_TRACEPOINTS)
        except OSError:
            return False
    return all(find_typedef(f"btf_trace_{tp}") for tp in SOCKET_TRACEPOINTS)


def l7_stat_names(entries: int) -> list[str]:
    """Names of the first ``entries`` slots of ``l7_stats`` (the map's size comes from the
    object: an object built against an older abi/l7.h has fewer slots than the mirror)."""
    names = [s.name.removeprefix("KSCOPE_L7_STAT_").lower() for s in L7Stat if s != L7Stat.KSCOPE_L7_STATS]
    return names[:entries]


def sys_stat_names() -> list[str]:
    return [s.name.removeprefix("KSCOPE_L7_SYS_STAT_").lower() for s in L7SysStat if s != L7SysStat.KSCOPE_L7_SYS_STATS]


def merge_stats(shared: Sequence[int], own: Sequence[int], socket_entries: int) -> dict[str, int]:
    """One dict of counters: l7.bpf.o's names for the shared slots, then the fallback's own.

    ``sockets_evicted_min``: LRU evictions are invisible to the kernel, but with no deletes
    at most ``socket_entries`` of the inserted entries can still be there, so at least the
    rest was evicted (the LRU may evict earlier than that: a lower bound).
    """
    out = dict(zip(l7_stat_names(len(shared)), shared, strict=True))
    out.update(zip(sys_stat_names(), own, strict=True))
    out["sockets_evicted_min"] = max(0, out["sockets_tracked"] - socket_entries)
    return out


class SyscallL7Collector(L7Probe):
    """Drop-in for :class:`~node_exporter.l7.collector.L7Collector` built on syscall exits.

    ``socket_entries`` bounds the per-socket state (LRU). ``tls``/``tls_rescan_s``/``proc_root``
    and ``exchanges``/``idle_s``/``sweep_s`` are accepted for the same signature; asking for
    TLS or exchanges puts ``l7.tls``/``l7.exchanges`` in ``report.disabled`` with the reason.
    """

    def __init__(
        self,
        object_path: str | os.PathLike[str] | None = None,
        *,
        netns_ino: int = 0,
        capture_bytes: int = 1024,
        ring_bytes: int | None = None,
        socket_entries: int | None = None,
        tls: bool = False,
        tls_rescan_s: float = 5.0,
        proc_root: str = "/proc",
        exchanges: bool = False,
        idle_s: float = 0.5,
        sweep_s: float = 0.1,
        skip_own: bool = False,
    ) -> None:
        del tls_rescan_s, proc_root, idle_s, sweep_s  # no uprobes to rescan, no kernel sweep
        path = Path(object_path) if object_path else default_bpf_dir() / OBJECT_NAME
        sizes: dict[str, int] = {}
        if ring_bytes:
            sizes["l7_ring"] = ring_bytes
        if socket_entries:
            sizes["l7_sys_socks"] = socket_entries
        knobs = {"capture_bytes": clamp_capture_bytes(capture_bytes), "filter_netns_ino": netns_ino}
        if skip_own:
            knobs |= own_process_knobs()
        super().__init__(path, CAPABILITIES, knobs, sizes)
        if tls:
            self.obj.report.disabled["l7.tls"] = TLS_DISABLED
        if exchanges:
            self.obj.report.disabled["l7.exchanges"] = EXCHANGES_DISABLED
        self.tls = None  # the attribute L7Collector has: no TlsAttacher here

    def _open(self) -> None:
        self._stats_entries = self.obj.map_info("l7_stats")[2]
        self._sys_stats_fd = self.obj.map_fd("l7_sys_stats")
        self.socket_entries = self.obj.map_info("l7_sys_socks")[2]

    def poll(self, urgent: bool = False) -> list[Chunk | ExchangeBatch]:
        """Chunks in ring order (never an ExchangeBatch: the type is L7Collector's)."""
        return [*self._chunks()]

    def sweep(self) -> None:
        """Nothing to sweep: no exchange is held in the kernel."""

    def kernel_stats(self) -> dict[str, int]:
        shared = read_percpu_u64_array(self._stats_fd, self._stats_entries)
        own = read_percpu_u64_array(self._sys_stats_fd, int(L7SysStat.KSCOPE_L7_SYS_STATS))
        return merge_stats(shared, own, self.socket_entries)
