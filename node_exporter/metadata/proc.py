"""PID -> process name and container identity, read from procfs and cached.

Kernel events carry a PID and a 16-byte comm, nothing about containers; this is the edge where
that PID meets ``/proc/<pid>/cgroup``. Reads are cached because one busy process produces
thousands of events per second, and the cache is bounded in size and age because PIDs are reused:
an entry must not outlive its process by much. The parsing itself lives in ``cgroup.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from node_exporter.metadata.cgroup import HOST, ContainerIdentity, parse_cgroup_file

# /proc/PID/cgroup is a few hundred bytes even on hybrid hosts; the cap bounds a pathological one.
_MAX_CGROUP_BYTES = 64 * 1024
# TASK_COMM_LEN is 16 including the NUL; a little slack costs nothing.
_MAX_COMM_BYTES = 64


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    comm: str
    identity: ContainerIdentity


class ProcessIndex:
    """Cached ``lookup(pid)``; never raises for a process that is gone or unreadable.

    Self-metrics: ``hits`` (answered from the cache), ``reads`` (answered from procfs),
    ``misses`` (process gone or unreadable; answered with the caller's hint and a host identity)
    and ``len(index)`` (live cache entries). Not thread-safe: one index per event loop.
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        maxsize: int = 16384,
        ttl: float = 30.0,
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxsize < 1:
            # TTLCache would accept it and then raise on the first insert, deep in the event loop.
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self._proc_root = proc_root
        self._cache: TTLCache[int, ProcessInfo] = TTLCache(maxsize=maxsize, ttl=ttl, timer=timer)
        self.hits = 0
        self.misses = 0
        self.reads = 0

    def __len__(self) -> int:
        # TTLCache only drops expired entries when touched; expire first so the gauge is honest.
        self._cache.expire()
        return len(self._cache)

    def lookup(self, pid: int, comm_hint: str = "") -> ProcessInfo:
        if pid <= 0:
            # PID 0 is the idle task (softirq context): no procfs entry, never a container.
            return ProcessInfo(pid, comm_hint, HOST)
        cached = self._cache.get(pid)
        if cached is not None:
            self.hits += 1
            return cached
        cgroup_text = self._read(pid, "cgroup", _MAX_CGROUP_BYTES)
        if cgroup_text is None:
            # Not cached: the PID may be reused at any moment, and an empty answer pinned to it
            # would hide the new process for a whole TTL. A failed open is cheap enough to repeat.
            self.misses += 1
            return ProcessInfo(pid, comm_hint, HOST)
        comm = (self._read(pid, "comm", _MAX_COMM_BYTES) or "").rstrip("\n")
        # The process can exit between the two reads; its identity is still good.
        info = ProcessInfo(pid, comm or comm_hint, parse_cgroup_file(cgroup_text))
        self._cache[pid] = info
        self.reads += 1
        return info

    def forget(self, pid: int) -> None:
        """Drop a PID, e.g. on a process-exit event, so its reuse is seen at once."""
        self._cache.pop(pid, None)

    def _read(self, pid: int, name: str, limit: int) -> str | None:
        try:
            with open(os.path.join(self._proc_root, str(pid), name), "rb") as file:
                data = file.read(limit)
        except OSError:
            # ENOENT/ESRCH (exited), EACCES (hidepid, LSMs), EISDIR and friends: all mean
            # "cannot know", which the caller answers with its hint.
            return None
        return data.decode("utf-8", errors="replace")
