"""The L4 probe as one object: load, collect a batch per interval, report its own drops."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from node_exporter.bpf.abi import Stat
from node_exporter.bpf.loader import BpfObject, LoadReport
from node_exporter.bpf.maps import drain_hash, read_percpu_u64_array
from node_exporter.bpf.ringbuf import RingReader
from node_exporter.errors import HookUnavailableError
from node_exporter.l4.records import DecodeStats, L4Record, decode_batch, decode_many
from node_exporter.netns import NetnsWalker, PendingNetns

log = structlog.get_logger("kscope.l4")

OBJECT_NAME = "l4.bpf.o"

# program -> capability; "l4.core" is required, the rest degrade one by one.
CAPABILITIES: Mapping[str, str] = {
    "on_set_state": "l4.core",
    "sweep": "l4.core",
    "on_destroy_sock": "l4.core",
    "on_send_length": "l4.bytes",
    "on_recv_length": "l4.bytes",
    "on_retransmit": "l4.retransmits",
    "on_send_reset": "l4.resets",
    "on_receive_reset": "l4.resets",
    "on_kfree_skb": "l4.drops",
    # sockets older than the agent, found once at start (bpf_sock_from_file: Linux 5.11)
    "seed": "l4.seed",
    "seed_owner": "l4.seed",
}


def default_bpf_dir() -> Path:
    """KSCOPE_BPF_DIR, else ``build/bpf`` of the source tree this package runs from."""
    env = os.environ.get("KSCOPE_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "bpf"


@dataclass
class L4Stats:
    """Self-metrics of the L4 pipeline; every drop has a name here."""

    kernel: dict[str, int] = field(default_factory=dict)
    periodic_records: int = 0
    close_records: int = 0
    overflow_records: int = 0
    swept_records: int = 0  # periodic records from the sweep (the others: busy sockets' own)
    decode_bad_length: int = 0
    decode_bad_type: int = 0
    polls: int = 0


class L4Collector:
    def __init__(
        self,
        object_path: str | os.PathLike[str] | None = None,
        *,
        netns_ino: int = 0,
        close_ring_bytes: int | None = None,
        close_overflow_entries: int | None = None,
        seed: bool = True,
        seed_owner_entries: int | None = None,
        netns_pending_entries: int | None = None,
        proc_root: str = "/proc",
        report_s: float = 0.0,
        sweep_s: float = 0.0,
    ) -> None:
        """``proc_root``: where the host's processes are (their network namespaces are walked);
        ``seed_owner_entries``: how many old sockets' owners the start-up walk keeps (a test
        shrinks it to push past it); ``netns_pending_entries``: how many namespaces the kernel can
        mark for the sweep before it asks the sweep to walk all (the same).

        ``report_s``: a socket's own send/recv reports it when this long has passed since its last
        report (0: never, the sweep reports everything); ``sweep_s``: the sweep runs at most this
        often (0: every poll). With both, busy sockets are reported every ``report_s`` without a
        sweep, and those that went quiet within ``sweep_s``: each namespace a sweep walks costs a
        pass over the whole TCP hash table (netns.py)."""
        path = Path(object_path) if object_path else default_bpf_dir() / OBJECT_NAME
        sizes = {}
        if close_ring_bytes:
            sizes["close_ring"] = close_ring_bytes
        if close_overflow_entries:
            sizes["close_overflow"] = close_overflow_entries
        if seed_owner_entries:
            sizes["seed_owners"] = seed_owner_entries
        if netns_pending_entries:
            sizes["netns_pending"] = netns_pending_entries
        self.obj = BpfObject(
            path,
            capabilities=CAPABILITIES,
            required=frozenset({"l4.core"}),
            knobs={"filter_netns_ino": netns_ino, "report_ns": int(report_s * 1e9)},
            map_sizes=sizes,
        )
        # the TCP iterators show one network namespace each: the sweep walks those its sockets
        # marked (netns.py)
        self.netns = NetnsWalker(proc_root=proc_root, only_ino=netns_ino)
        self._sweep_s = sweep_s
        self._swept_at = float("-inf")
        self._sweep_next = False  # stop_capture: the next poll sweeps whatever sweep_s says
        try:
            self._iter_link = self.obj.attach_iter("sweep")
            _, _, ring_size = self.obj.map_info("close_ring")
            self._ring = RingReader(self.obj.map_fd("close_ring"), ring_size)
            self._overflow_fd = self.obj.map_fd("close_overflow")
            self._overflow_info = self.obj.map_info("close_overflow")
            self._stats_fd = self.obj.map_fd("kscope_stats")
            self.pending = PendingNetns(self.obj, "netns_pending", "netns_walk_all")
            if seed and "l4.seed" in self.obj.report.enabled:
                self._seed()
        except BaseException:
            self.obj.close()
            raise
        self._decode = DecodeStats()
        self.stats = L4Stats()

    def _seed(self) -> None:
        """Give every existing TCP socket its storage (role, tuple, owner) once, so sockets older than
        the agent (listeners above all: no send/recv ever names them) are reported from the first
        interval. Their counts start now."""
        links = []
        try:
            for prog in ("seed_owner", "seed"):
                links.append(self.obj.attach_iter(prog))
        except HookUnavailableError as exc:
            for link in links:
                self.obj.detach(link)
            self.obj.report.enabled.discard("l4.seed")
            self.obj.report.disabled["l4.seed"] = str(exc)
            log.warning("capability_disabled", capability="l4.seed", reason=str(exc))
            return
        try:
            BpfObject.run_iter(links[0])  # every task's files: who holds each socket
            self.netns.run_iter(links[1])  # every namespace's TCP sockets
        finally:
            for link in links:
                self.obj.detach(link)
            self._forget_owners()

    def _forget_owners(self) -> None:
        """The owners' map is needed only by the seed: emptied (the object keeps its memory)."""
        key_size, value_size, entries = self.obj.map_info("seed_owners")
        drain_hash(self.obj.map_fd("seed_owners"), key_size, value_size, entries)

    @property
    def report(self) -> LoadReport:
        return self.obj.report

    def poll(self) -> list[L4Record]:
        """Everything since the last poll: the ring's records (final ones, and the periodic ones
        busy sockets made themselves) first, then the sweep's periodic ones if a sweep is due.

        The ring is drained before the iterator runs, so a socket that closed in between is
        never reported twice for the same counts (its deltas were taken by whichever record was
        made first).
        """
        ring = decode_many(self._ring.drain(), self._decode)
        key_size, value_size, entries = self._overflow_info
        overflow = decode_many(drain_hash(self._overflow_fd, key_size, value_size, entries), self._decode)
        swept: list[L4Record] = []
        now = time.monotonic()
        if self._sweep_next or now - self._swept_at >= self._sweep_s:
            self._sweep_next = False
            self._swept_at = now
            listing = self.pending.take(self.netns)
            swept = decode_batch(self.netns.run_iter(self._iter_link, listing), self._decode)
        ring_closes = sum(r.is_close for r in ring)  # the overflow map holds final records only
        self.stats.polls += 1
        self.stats.close_records += ring_closes + len(overflow)
        self.stats.overflow_records += len(overflow)
        self.stats.periodic_records += len(ring) - ring_closes + len(swept)
        self.stats.swept_records += len(swept)
        self.stats.decode_bad_length = self._decode.bad_length
        self.stats.decode_bad_type = self._decode.bad_type
        return ring + overflow + swept

    def stop_capture(self) -> None:
        """No more events from the kernel (see BpfObject.stop_capture); the next poll still
        reports what the sockets' storage and the rings hold (it sweeps, whatever ``sweep_s``)."""
        self.obj.stop_capture()
        self._sweep_next = True

    def kernel_stats(self) -> dict[str, int]:
        values = read_percpu_u64_array(self._stats_fd, int(Stat.KSCOPE_STATS))
        names = [s.name.removeprefix("KSCOPE_STAT_").lower() for s in Stat if s != Stat.KSCOPE_STATS]
        self.stats.kernel = dict(zip(names, values, strict=False))
        return self.stats.kernel

    def close(self) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()
        self.obj.close()

    def __enter__(self) -> L4Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
