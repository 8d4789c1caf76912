"""Running a TCP iterator in every network namespace, for the L4 and L7 collectors (the loader
knows nothing of namespaces).

A BPF TCP iterator (``iter/tcp``) shows the sockets of one network namespace: the one the
thread that creates the iterator (``bpf_iter_create``) is in. The agent's sweeps must see
every namespace's sockets (pods each have their own), and this kernel refuses the map
iterators that would have walked socket storage across namespaces (EPERM at load), so each
pass enters every namespace in turn: open its handle, ``setns`` this thread into it, create
the iterator there, come back; the iterators are then read from the agent's own namespace.

Each walk goes through the whole established-socket hash table, which namespaces share unless
``net.ipv4.tcp_child_ehash_entries`` is set (milliseconds per walk with the default table, whatever
the namespace holds: docs/architecture.md), so the kernel marks the namespaces the next
sweep has something to do in (``bpf_src/netns_pending.h``) and :class:`PendingNetns` narrows the listing
to them: an idle namespace costs nothing.

Namespaces are found through processes (``PROC/PID/ns/net``) and ``ip netns`` bind mounts
(``/run/netns``); see :class:`NetnsWalker` for how they are listed cheaply. A namespace that
vanishes between listing and entering is skipped (its sockets are gone with it) and counted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from node_exporter.bpf.loader import BpfObject
from node_exporter.bpf.maps import drain_hash, read_u32_array, write_u32_array
from node_exporter.errors import KscopeError

log = structlog.get_logger("kscope.netns")

CLONE_NEWNET = 0x40000000
NETNS_MOUNT_DIRS = ("/run/netns", "/var/run/netns")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(KscopeError):
    """This thread could not return to its own network namespace: nothing after is trustworthy."""


def setns_net(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _bind_mounts(mount_dirs: Iterable[str]) -> dict[int, str]:
    found: dict[int, str] = {}
    for d in mount_dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            path = f"{d}/{name}"
            try:
                found.setdefault(os.stat(path).st_ino, path)
            except OSError:
                continue
    return found


def _pid_netns(proc_root: str, pid: str) -> int:
    """The inode of the process's network namespace; 0: none (exited, a kernel thread); -1: not
    ours to read (the ptrace access check: another user's process, or one holding capabilities
    we lack, without CAP_SYS_PTRACE)."""
    try:
        return os.stat(f"{proc_root}/{pid}/ns/net").st_ino
    except PermissionError:
        return -1
    except OSError:
        return 0


@dataclass
class NetnsWalker:
    """Creates one iterator per network namespace (``only_ino``: that namespace alone).

    Every pass lists /proc and stats only the processes it has not seen (~6 us each; a
    process that changes namespace later is caught by the full pass every ``full_s``), so a
    namespace made a moment ago is walked at once without paying a full scan every pass."""

    proc_root: str = "/proc"
    full_s: float = 5.0
    only_ino: int = 0
    mount_dirs: tuple[str, ...] = NETNS_MOUNT_DIRS
    vanished: int = 0  # namespaces gone between listing and entering (counted, not an error)
    walked: int = 0  # iterators created: one per namespace per pass (a sweep's, the start-up's)
    enter_failed: int = 0  # setns refused (counted: that namespace's sockets were not walked)
    unreadable: int = 0  # processes whose namespace the last listing could not read (-1 above)
    _said_unreadable: bool = False
    _pids: dict[str, int] = field(default_factory=dict)  # pid -> its namespace's inode (0: none)
    _full_at: float = float("-inf")

    def namespaces(self) -> dict[int, str]:
        now = time.monotonic()
        full = now - self._full_at >= self.full_s
        if full:
            self._full_at = now
        try:
            pids = [p for p in os.listdir(self.proc_root) if p.isdigit()]
        except OSError:
            pids = []
        known = self._pids
        self._pids = {p: known[p] if p in known and not full else _pid_netns(self.proc_root, p) for p in pids}
        found = _bind_mounts(self.mount_dirs)
        for pid, ino in self._pids.items():
            if ino > 0:
                found.setdefault(ino, f"{self.proc_root}/{pid}/ns/net")
        denied = [pid for pid, ino in self._pids.items() if ino < 0]
        self.unreadable = len(denied)
        if denied and not self._said_unreadable:
            self._said_unreadable = True
            hint = "needs CAP_SYS_PTRACE; a namespace only such processes are in is not walked"
            path = f"{self.proc_root}/{denied[0]}/ns/net"
            log.warning("netns_unreadable", path=path, processes=len(denied), hint=hint)
        if self.only_ino:
            return {ino: p for ino, p in found.items() if ino == self.only_ino}
        return found

    def _stale(self) -> None:
        self._full_at = float("-inf")  # a pid reused, or a namespace gone: stat everything next pass

    def create_all(self, create: Callable[[], int], listing: Mapping[int, str] | None = None) -> list[int]:
        """``create()`` (an iterator fd) called once inside each namespace (of ``listing``, by
        default a fresh :meth:`namespaces`); the fds, in the caller's namespace again. The
        caller closes them."""
        fds: list[int] = []
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        own_ino = os.fstat(own).st_ino
        try:
            for ino, path in list((self.namespaces() if listing is None else listing).items()):
                if ino == own_ino:
                    fds.append(create())
                    self.walked += 1
                    continue
                try:
                    ns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    self.vanished += 1
                    self._stale()
                    continue
                try:
                    if os.fstat(ns).st_ino != ino:  # the pid was reused by a process elsewhere
                        self._stale()
                        continue
                    try:
                        setns_net(ns)
                    except OSError as exc:
                        if not self.enter_failed:
                            hint = "setns needs CAP_SYS_ADMIN; that namespace's sockets are not walked"
                            log.warning("netns_enter_failed", path=path, error=str(exc), hint=hint)
                        self.enter_failed += 1
                        continue
                    try:
                        fds.append(create())
                        self.walked += 1
                    finally:
                        try:
                            setns_net(own)
                        except OSError as exc:
                            raise NetnsError(f"cannot return to the agent's network namespace: {exc}") from exc
                finally:
                    os.close(ns)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            os.close(own)
        return fds

    def run_iter(self, link: int, listing: Mapping[int, str] | None = None) -> bytes:
        """Run an iterator that shows one namespace's objects (``iter/tcp``) once inside each
        namespace (of ``listing``, by default every one); their output, concatenated."""
        return BpfObject.read_iters(self.create_all(lambda: BpfObject.new_iter(link), listing))


class PendingNetns:
    """The namespaces the kernel marked for the next sweep of one BPF object (its
    ``NETNS_PENDING_MAPS``, bpf_src/netns_pending.h): :meth:`take` empties the marks and returns
    the part of the walker's listing they name; the marks are taken before the sweep, so one
    made while it runs stays for the next. A full map sets ``walk_all``: every namespace."""

    def __init__(self, obj: BpfObject, pending: str, walk_all: str) -> None:
        """``pending``, ``walk_all``: the names ``NETNS_PENDING_MAPS`` gave the maps in ``obj``."""
        self._fd, self._info, self._all_fd = obj.map_fd(pending), obj.map_info(pending), obj.map_fd(walk_all)
        self.sweeps_of_all = 0  # sweeps that walked every namespace because the marks did not fit
        # marked namespaces no process is in and no /run/netns mount names: not entered (their
        # quiet sockets report at close)
        self.unlisted = 0

    def take(self, walker: NetnsWalker, *, everything: bool = False) -> dict[int, str]:
        """``everything``: the listing whole (a final sweep), the marks emptied all the same."""
        if read_u32_array(self._all_fd, 0):
            write_u32_array(self._all_fd, 0, 0)  # before the drain and the sweep: a later mark stays
            everything = True
            self.sweeps_of_all += 1
        key_size, value_size, entries = self._info
        marked = {int.from_bytes(v, "little") for v in drain_hash(self._fd, key_size, value_size, entries)}
        if not marked and not everything:
            return {}
        listing = walker.namespaces()
        self.unlisted += len(marked - listing.keys())
        return listing if everything else {ino: path for ino, path in listing.items() if ino in marked}
