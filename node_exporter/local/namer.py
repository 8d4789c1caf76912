"""``kscope run``'s ``Namer``: endpoints named from this host's /proc and cgroups, no Kubernetes.

The local end of a record is its process (``identity.process_attributes``). A remote end is named
after the process seen owning that address: every socket the agent reports (L4 record or L7 record,
client or server) teaches ``learn`` which process is at (address, port), and a wildcard listener
answers on every address this host's own sockets use. Anything else is external (its
address kept). Names then depend on a record's pid, comm, cgroup id and ports: ``process_keyed``
tells the resolution cache to key on them, and ``generation`` moves whenever an answer it may hold
would now differ: an address asked about and not known (``_misses``) or known as another's gets an
owner, a pid is found running another program (its start time in /proc changed: ``learn`` checks
each process of a batch once), or ``ttl_s`` passed (executables and container names are read again).
A start time is in clock ticks (10 ms): a pid taken again within the tick its predecessor started in
is not told apart.

Known limit: two network namespaces serving the same (address, port), e.g. 127.0.0.1:80 in each,
are one server here: a client socket's record does not say which namespace its peer lives in.

Every table is bounded (cachetools); what a full table forgets is counted (``counters``).
"""

from __future__ import annotations

import os
import time
from typing import Final

from cachetools import LRUCache, TTLCache

from cluster_processor.kube.model import canonical_ip
from cluster_processor.resolve import external_endpoint
from cluster_processor.resolved import Attrs, Endpoint, EndpointKind, How
from kscope.v1 import flow_pb2 as pb
from node_exporter.local import identity
from node_exporter.local.identity import Placement

_WILDCARD: Final = frozenset({"0.0.0.0", "::", ""})
_MAX_READ: Final = 64 * 1024
_MAX_STATE_FILE: Final = 4 * 1024 * 1024  # a runtime's containers.json with thousands of containers


class _CountingLRU(LRUCache[object, object]):
    """An LRU cache that counts what it forgets for room."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize)
        self.evicted = 0

    def popitem(self) -> tuple[object, object]:
        self.evicted += 1
        return super().popitem()


class _Misses(LRUCache[tuple[str, int], bool]):
    """Addresses asked about and not known. Forgetting one forgets that an answer may go stale: the
    namer's generation moves (the resolution cache drops its answers)."""

    def __init__(self, maxsize: int, namer: LocalNamer) -> None:
        super().__init__(maxsize=maxsize)
        self.namer = namer

    def popitem(self) -> tuple[tuple[str, int], bool]:
        self.namer.generation += 1
        return super().popitem()


class LocalNamer:
    process_keyed: Final = True  # names read pid, comm, cgroup id and ports (resolve.Namer)

    def __init__(
        self,
        proc_root: str = "/proc",
        host_root: str = "/",
        *,
        max_processes: int = 4096,
        max_servers: int = 16_384,
        ttl_s: float = 30.0,
    ) -> None:
        self._proc = proc_root
        self._root = host_root
        self.generation = 0
        self._ttl_s = ttl_s
        self._refreshed = time.monotonic()
        # (pid, comm, cgroup id) -> (identity, the process's start time or None when unread): pids are
        # reused, so entries age out, and learn() checks the start time
        self._procs: TTLCache[tuple[int, str, int], tuple[Attrs, int | None]] = TTLCache(
            maxsize=max_processes, ttl=ttl_s
        )
        self._misses = _Misses(max_servers, self)
        self.reused = 0  # pids found running another program than the one named
        # What a process that exited before it was read still gets: its cgroup's placement, and the
        # executable last read for its name there (so runs of a short-lived program stay one endpoint).
        self._placements = _CountingLRU(max_processes)
        self._exes = _CountingLRU(max_processes)
        self._servers = _CountingLRU(max_servers)  # (address, port) -> attributes of whose socket it is
        self._wildcards = _CountingLRU(max_servers)  # port -> attributes of a 0.0.0.0 / :: listener
        self._local_ips = _CountingLRU(max_servers)  # addresses this host's sockets use
        self._container_names: TTLCache[str, str] = TTLCache(maxsize=max_processes, ttl=ttl_s)
        self.unreadable = 0  # processes gone (or hidden) before their cgroup could be read (once per ttl_s)

    def counters(self) -> dict[str, int]:
        return {
            "processes_unreadable": self.unreadable,
            "servers_evicted": self._servers.evicted + self._wildcards.evicted,
            "placements_evicted": self._placements.evicted + self._exes.evicted,
            "local_addresses_evicted": self._local_ips.evicted,
            "pids_reused": self.reused,
        }

    # ---- Namer --------------------------------------------------------------------------------

    def local(self, node_name: str, process: pb.ProcessIdentity, local_ip: str, local_port: int = 0) -> Endpoint:
        ip = canonical_ip(local_ip)
        if process.pid == 0 and not process.comm:
            # No process touched the socket (a connection the kernel finished, or retransmitted, on its
            # own): the owner of its address, when a socket or listener there taught it.
            owner = self._owner(ip, local_port)
            if owner is not None:
                return Endpoint(EndpointKind.PROCESS, How.HOST_PROCESS, owner, ip, local_port)
        a = self.attributes(process.pid, process.comm, process.cgroup_id)
        return Endpoint(EndpointKind.PROCESS, How.HOST_PROCESS, a, ip, local_port)

    def _owner(self, ip: str, port: int) -> Attrs | None:
        found = self._servers.get((ip, port))
        if found is None and ip in self._local_ips:
            found = self._wildcards.get(port)
        if found is None:
            self._misses[(ip, port)] = True
        return found  # type: ignore[return-value]

    def remote(
        self, remote_ip: str, remote_port: int = 0, nat_remote_ip: str = "", nat_remote_port: int = 0
    ) -> Endpoint:
        for ip, port in ((nat_remote_ip, nat_remote_port or remote_port), (remote_ip, remote_port)):
            if not ip:
                continue
            ip = canonical_ip(ip)
            found = self._owner(ip, port)
            if found is not None:
                return Endpoint(EndpointKind.PROCESS, How.HOST_PROCESS, found, ip, port)
        return external_endpoint(canonical_ip(remote_ip), remote_port)

    # ---- learning servers ---------------------------------------------------------------------

    def learn(self, batch: pb.FlowBatch) -> None:
        """Who owns which address, from one batch (every socket: a server's clients are named by
        their own sockets' records): call before the aggregator resolves it."""
        now = time.monotonic()
        if now - self._refreshed > self._ttl_s:
            self._refreshed = now
            self.generation += 1  # what was read of processes and containers is read again
        who: dict[tuple[int, str, int], Attrs] = {}  # this batch's processes, each checked once

        def attributes(key: tuple[int, str, int]) -> Attrs:
            found = who.get(key)
            if found is None:
                found = who[key] = self._checked(*key)
            return found

        cols = batch.l4_columns
        if cols.count:
            strings = cols.strings
            n = cols.count
            zeros = [0] * n
            ips = [strings[i] for i in cols.local_ip] if cols.local_ip else [""] * n
            comms = [strings[i] for i in cols.process_comm] if cols.process_comm else [""] * n
            for ip, port, pid, comm, cgroup in zip(ips, cols.local_port or zeros, cols.process_pid or zeros, comms,
                                                   cols.process_cgroup_id or zeros, strict=True):  # fmt: skip
                if pid or comm:  # a socket no process touched teaches nothing
                    self._serves(ip, port, attributes((pid, comm, cgroup)))
        for q in batch.l7:
            p = q.process
            if p.pid or p.comm:
                self._serves(q.local_ip, q.local_port, attributes((p.pid, p.comm, p.cgroup_id)))

    def _serves(self, ip: str, port: int, who: Attrs) -> None:
        ip = canonical_ip(ip)
        wildcard = ip in _WILDCARD
        if not wildcard and ip not in self._local_ips:
            self._local_ips[ip] = True
            self.generation += 1  # a wildcard listener now answers on this address too
        table, key = (self._wildcards, port) if wildcard else (self._servers, (ip, port))
        before = table.get(key)
        if before != who:
            table[key] = who
            # Answers given before may name this address differently now: a listener on every address,
            # an owner that changed, or an address asked about while unknown.
            if wildcard or before is not None or self._misses.pop((ip, port), False):
                self.generation += 1

    def _checked(self, pid: int, comm: str, cgroup_id: int) -> Attrs:
        """``attributes``, after checking that the pid still runs the process named (its start time)."""
        found = self._procs.get((pid, comm, cgroup_id))
        if found is not None and found[1] is not None and pid > 0:
            started = self._start_time(pid)
            if started is not None and started != found[1]:
                self.reused += 1
                del self._procs[(pid, comm, cgroup_id)]
                self.generation += 1  # answers naming the earlier process are stale
        return self.attributes(pid, comm, cgroup_id)

    def _start_time(self, pid: int) -> int | None:
        """Field 22 of /proc/PID/stat (clock ticks since boot): a pid and this name one process."""
        text = self._read(f"{pid}/stat")
        if text is None:
            return None
        fields = text.rpartition(")")[2].split()
        return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None

    # ---- processes ----------------------------------------------------------------------------

    def attributes(self, pid: int, comm: str, cgroup_id: int) -> Attrs:
        key = (pid, comm, cgroup_id)
        found = self._procs.get(key)
        if found is not None:
            return found[0]
        where: Placement | None = None
        exe = ""
        started = self._start_time(pid) if pid > 0 else None  # before the rest: a pid reused since shows
        text = self._read(f"{pid}/cgroup") if pid > 0 else None
        if text is not None:
            where = identity.placement(text)
            exe = self._readlink(f"{pid}/exe")
            if cgroup_id:
                self._placements[cgroup_id] = where
        else:
            self.unreadable += 1
            where = self._placements.get(cgroup_id) if cgroup_id else None  # type: ignore[assignment]
        where = where or Placement()
        if exe:
            self._exes[(cgroup_id, comm)] = exe
        else:
            exe = self._exes.get((cgroup_id, comm), "")  # type: ignore[assignment]
        name = self._container_name(where) if where.container_id else ""
        attributes = identity.process_attributes(comm, exe, where, name)
        # Kept either way: a process that has exited stays unreadable, and asking /proc again for every
        # record of its sockets was most of the local pipeline's cost with short-lived clients.
        self._procs[key] = (attributes, started if text is not None else None)
        return attributes

    def _container_name(self, where: Placement) -> str:
        name = self._container_names.get(where.container_id)
        if name is None:
            name = self._lookup_container_name(where)
            self._container_names[where.container_id] = name
        return name

    def _lookup_container_name(self, where: Placement) -> str:
        """The runtime's own state files (no API call): podman's containers/storage index, Docker's
        per-container config. Other runtimes (containerd, cri-o) are named by short id."""
        cid = where.container_id
        if where.runtime in ("podman", ""):
            for store in ("var/lib/containers/storage", "run/containers/storage"):
                text = self._read_host(os.path.join(store, "overlay-containers", "containers.json"))
                if text is not None and (name := identity.podman_names(text).get(cid)):
                    return name
        if where.runtime in ("docker", ""):
            text = self._read_host(os.path.join("var/lib/docker/containers", cid, "config.v2.json"))
            if text is not None:
                return identity.docker_name(text)
        return ""

    def _read(self, rel: str) -> str | None:
        return _read(os.path.join(self._proc, rel), _MAX_READ)

    def _read_host(self, rel: str) -> str | None:
        return _read(os.path.join(self._root, rel), _MAX_STATE_FILE)

    def _readlink(self, rel: str) -> str:
        try:
            return os.readlink(os.path.join(self._proc, rel)).removesuffix(" (deleted)")
        except OSError:
            return ""


def _read(path: str, limit: int) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None
