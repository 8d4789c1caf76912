"""The L7 probe: load, attach the OpenSSL uprobes, drain payload heads on the agent's timer."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from node_exporter.bpf.abi import L7Stat
from node_exporter.bpf.maps import read_percpu_u64_array, write_u32_array
from node_exporter.l4.collector import default_bpf_dir
from node_exporter.l7.chunks import Chunk
from node_exporter.l7.exchanges import EXCHANGE_SIZE, ExchangeBatch
from node_exporter.l7.pick import link_pick
from node_exporter.l7.probe import L7Probe, L7Stats, clamp_capture_bytes, own_process_knobs
from node_exporter.l7.tls import MULTI_ENTRY_PROGRAM, MULTI_EXIT_PROGRAM, TlsAttacher
from node_exporter.l7.xring import FixedRingReader
from node_exporter.netns import NetnsWalker, PendingNetns

OBJECT_NAME = "l7.bpf.o"
FULL_TLS_SCAN_S = 60.0  # between scans of every process's maps; new processes are read every tls_rescan_s
SWEEP_S = 0.25  # between runs of the kernel sweep that sends idle keep-alive exchanges
# ... at most, while client calls wait for their parent's record (see poll's ``urgent``)
URGENT_SWEEP_S = 0.25
# io_uring loops' refusal: its own capability, since a kernel without io_uring lacks the hook (and the loops)
CAUSAL_URING = "l7.causal.uring"
URING_MISSING = "kernel has no tracepoint syscalls/sys_exit_io_uring_enter"  # loader.hook_missing's words
CAPABILITIES = {
    "l7_send": "l7.capture",
    "l7_recv": "l7.capture",
    "l7_destroy": "l7.capture",
    "sweep": "l7.capture",
    "l7_sendmmsg_enter": "l7.mmsg",
    "l7_recvmmsg_enter": "l7.mmsg",
    "ssl_write_enter": "l7.tls",
    "ssl_read_enter": "l7.tls",
    "ssl_write_ex_enter": "l7.tls",
    "ssl_read_ex_enter": "l7.tls",
    "ssl_exit": "l7.tls",
    "ssl_enter": "l7.tls",
    "ssl_exit_multi": "l7.tls",
    # in-process causality (bpf_src/l7_causal.h): without these, no parent is ever linked
    "causal_epoll_wait": "l7.causal",
    "causal_epoll_pwait": "l7.causal",
    "causal_epoll_pwait2": "l7.causal",
    "causal_exit": "l7.causal",
    "causal_io_uring_enter": CAUSAL_URING,
}

__all__ = ["L7Collector", "L7Stats"]


def _env_full_capture() -> bool:
    return os.environ.get("KSCOPE_L7_H2_FULL_CAPTURE", "") not in ("", "0")


class L7Collector(L7Probe):
    def __init__(
        self,
        object_path: str | os.PathLike[str] | None = None,
        *,
        netns_ino: int = 0,
        capture_bytes: int = 1024,
        ring_bytes: int | None = None,
        tls: bool = True,
        tls_rescan_s: float = 5.0,
        proc_root: str = "/proc",
        exchanges: bool = True,
        idle_s: float = 0.5,
        sweep_s: float = SWEEP_S,
        record_rate: int = 0,
        trace_ratio: float | None = 1.0,
        summary_s: float = 1.0,
        summary_raw_paths: bool = False,
        netns: NetnsWalker | None = None,
        netns_pending_entries: int | None = None,
        mmsg_threads: int | None = None,
        skip_own: bool = False,
        h2_compact: bool | None = None,
        causal: bool = True,
        causal_threads: int | None = None,
        causal_flagged: int | None = None,
    ) -> None:
        """``exchanges``: pair plain-text HTTP/1 in the kernel (one record per exchange) instead of
        sending every call's head; ``idle_s``: how long an answered exchange waits for more
        response bytes before the sweep (run every ``sweep_s``) sends it. ``record_rate``:
        exchange records per second per CPU (the kernel's sampler); past it, exchanges are summed
        per socket, method, route template and status (``summary_raw_paths``: the raw path, only to
        measure what routes buy) and sent as summaries ``summary_s`` after their first exchange
        (0: every exchange is a record, no summaries). ``trace_ratio``: the share of exchanges that
        may be records at all, picked by their TCP sequence numbers so both ends pick alike (1: all;
        None: the agent sets it as it goes, :meth:`set_link_pick`).
        ``netns_pending_entries``: how many
        namespaces the kernel can mark for the sweep before it asks for a walk of all (a test
        shrinks it to push past it). ``mmsg_threads``: threads inside a sendmmsg/recvmmsg at once
        whose place in the vector the kernel keeps (past it, messages are counted, mmsg_unknown).
        ``skip_own``: leave this process's own sockets unparsed (the agent's shipping and exports;
        tests that drive traffic from their own process keep the default).
        ``h2_compact``: walk HTTP/2 frames in the kernel and send them without DATA payloads
        (bpf_src/l7_h2.h); False sends each call's first 4 KiB as before. None: True unless the
        environment sets KSCOPE_L7_H2_FULL_CAPTURE=1 (the bench measures both ways).
        ``causal``: per-thread server-request contexts and tentative parents of client calls
        (bpf_src/l7_causal.h); False: none. ``causal_threads``/``causal_flagged``: the sizes of its
        context and flag tables (tests shrink them to push past them)."""
        if record_rate < 0:
            raise ValueError(f"record_rate must be >= 0, got {record_rate}")
        if trace_ratio is not None and not 0 < trace_ratio <= 1:
            raise ValueError(f"trace_ratio must be in (0, 1], got {trace_ratio}")
        path = Path(object_path) if object_path else default_bpf_dir() / OBJECT_NAME
        super().__init__(
            path,
            CAPABILITIES,
            {
                "capture_bytes": clamp_capture_bytes(capture_bytes),
                "filter_netns_ino": netns_ino,
                **(own_process_knobs() if skip_own else {}),
                "exchanges": int(exchanges),
                "idle_ns": int(idle_s * 1e9),
                "record_cost_ns": 1_000_000_000 // record_rate if record_rate else 0,
                "link_pick": link_pick(trace_ratio) if trace_ratio is not None else 0,
                "pick_auto": int(trace_ratio is None),
                "summary_ns": int(summary_s * 1e9),
                "h2_compact": int(h2_compact if h2_compact is not None else not _env_full_capture()),
                "summary_raw_paths": int(summary_raw_paths),
                "causal": int(causal),
            },
            {
                **({"l7_ring": ring_bytes, "l7_xring": ring_bytes} if ring_bytes else {}),
                **({"l7_netns_pending": netns_pending_entries} if netns_pending_entries else {}),
                **({"mmsg_pos": mmsg_threads} if mmsg_threads else {}),
                **({"causal_ctx": causal_threads} if causal_threads else {}),
                **({"causal_threads": causal_flagged, "causal_procs": causal_flagged} if causal_flagged else {}),
            },
            off={} if causal else {c: "turned off (--no-l7-causal)" for c in ("l7.causal", CAUSAL_URING)},
        )
        # the sweep is a TCP iterator: one per network namespace marked for it (share the L4
        # collector's walker)
        self.netns = netns or NetnsWalker(proc_root=proc_root, only_ino=netns_ino)
        self.tls: TlsAttacher | None = None
        if tls and "l7.tls" in self.obj.report.enabled:
            multi = self._attach_uprobe_multi if self.obj.uprobe_multi else None
            self.tls = TlsAttacher(self._attach_uprobe, multi, proc_root=proc_root)
            self.tls.scan()
        self._tls_rescan_s = tls_rescan_s
        self._last_scan = self._last_full_scan = self._last_sweep = time.monotonic()
        self._sweep_s = sweep_s
        self._stopped = False  # stop_capture: no more uprobes attached by the rescans

    def _open(self) -> None:
        _, _, xsize = self.obj.map_info("l7_xring")
        self._xring = FixedRingReader(self.obj.map_fd("l7_xring"), xsize, EXCHANGE_SIZE)
        self._sweep_link = self.obj.attach_iter("sweep")
        self._sweep_ctl = self.obj.map_fd("l7_sweep_ctl")
        self.pending = PendingNetns(self.obj, "l7_netns_pending", "l7_netns_walk_all")

    def _attach_uprobe(self, program: str, binary: str, symbol: str, retprobe: bool) -> object:
        return self.obj.attach_uprobe(program, binary, symbol, retprobe=retprobe)

    def _attach_uprobe_multi(self, binary: str, offsets: Sequence[int], cookies: Sequence[int]) -> object:
        entry = self.obj.attach_uprobe_multi(MULTI_ENTRY_PROGRAM, binary, list(offsets), list(cookies))
        try:
            return entry, self.obj.attach_uprobe_multi(
                MULTI_EXIT_PROGRAM, binary, list(offsets), list(cookies), retprobe=True
            )
        except BaseException:
            self.obj.detach(entry)
            raise

    def poll(self, urgent: bool = False) -> list[Chunk | ExchangeBatch]:
        """Chunks in ring order, then at most one batch of exchange records (from their own
        ring; order between the two does not matter: a socket's records are either exchanges
        or chunks, and its one switch from exchanges to chunks is a clean message boundary).
        ``urgent``: records wait for an exchange the sweep may hold (the last one of an idle
        keep-alive connection: a client call's parent), so sweep every URGENT_SWEEP_S at least."""
        now = time.monotonic()
        if self.tls is not None and not self._stopped and now - self._last_scan >= self._tls_rescan_s:
            full = now - self._last_full_scan >= FULL_TLS_SCAN_S
            self._last_scan = now
            if full:
                self._last_full_scan = now
            self.tls.scan(full=full)
        if now - self._last_sweep >= (min(self._sweep_s, URGENT_SWEEP_S) if urgent else self._sweep_s):
            self.sweep()
        out: list[Chunk | ExchangeBatch] = [*self._chunks()]
        data, n = self._xring.drain()
        if n:
            self.stats.exchanges += n
            out.append(ExchangeBatch(data, n))
        return out

    def sweep(self, *, final: bool = False) -> None:
        """Run the kernel sweep now: idle answered exchanges and due summaries go to the ring
        (read by poll). ``final`` (after stop_capture): every answered exchange and every
        summary, idle or due or not."""
        self._last_sweep = time.monotonic()
        if final:
            write_u32_array(self._sweep_ctl, 0, 1)
        try:
            # the namespaces where a socket has an exchange or a summary in flight; the final
            # sweep goes everywhere (it also counts the requests left waiting)
            listing = self.pending.take(self.netns, everything=final)
            self.netns.run_iter(self._sweep_link, listing)
        finally:
            if final:
                write_u32_array(self._sweep_ctl, 0, 0)
        self.stats.sweeps += 1

    def set_link_pick(self, pick: int) -> None:
        """``--l7-trace-ratio auto``: the share of 2^32 exchanges are picked below (0: all); opened with
        ``trace_ratio=None`` only (otherwise the kernel reads its fixed knob)."""
        write_u32_array(self.obj.map_fd("l7_pick"), 0, pick)

    def causal_ready(self) -> bool:
        """Every hook that refuses event loops is attached (or, for io_uring's, the kernel has none)."""
        enabled, disabled = self.obj.report.enabled, self.obj.report.disabled
        uring = CAUSAL_URING in enabled or disabled.get(CAUSAL_URING, "").endswith(URING_MISSING)
        return "l7.causal" in enabled and uring

    def stop_capture(self) -> None:
        self._stopped = True
        super().stop_capture()

    def final_sweep(self) -> None:
        """The last sweep: every answered exchange and every summary goes to the ring; requests
        still waiting for their response are counted (``stop_pending``), not sent."""
        self.sweep(final=True)

    def kernel_stats(self) -> dict[str, int]:
        values = read_percpu_u64_array(self._stats_fd, int(L7Stat.KSCOPE_L7_STATS))
        names = [s.name.removeprefix("KSCOPE_L7_STAT_").lower() for s in L7Stat if s != L7Stat.KSCOPE_L7_STATS]
        return dict(zip(names, values, strict=False))

    def close(self) -> None:
        xring = getattr(self, "_xring", None)
        if xring is not None:
            xring.close()
        super().close()
