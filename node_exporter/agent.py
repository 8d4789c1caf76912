"""The node agent's main loop: poll the probes on a timer, enrich, write, repeat.

Python handles one batch per interval, never one event per call: the kernel keeps
the counters, and every interval brings at most one record per socket.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from kscope.v1 import flow_pb2 as pb
from node_exporter.bpf import preflight
from node_exporter.bpf.abi import Role
from node_exporter.bpf.btf import Btf
from node_exporter.errors import HookUnavailableError, KscopeError
from node_exporter.l4.collector import OBJECT_NAME, L4Collector, default_bpf_dir
from node_exporter.l4.records import L4Record
from node_exporter.l7.agentsum import AgentSummer
from node_exporter.l7.causal import GoPrograms
from node_exporter.l7.collector import OBJECT_NAME as L7_OBJECT
from node_exporter.l7.collector import L7Collector
from node_exporter.l7.pick import AutoPick, link_pick
from node_exporter.l7.pipeline import ConnInfo, L7Event, L7Pipeline
from node_exporter.l7.syscalls import OBJECT_NAME as L7_SYSCALLS_OBJECT
from node_exporter.l7.syscalls import SyscallL7Collector, kernel_has_socket_tracepoints
from node_exporter.metadata.proc import ProcessIndex
from node_exporter.nat.conntrack import ConntrackTable, FlowKey
from node_exporter.netns import NetnsWalker
from node_exporter.output.convert import MonotonicClock, l4_columns, l4_flow, l7_request
from node_exporter.output.jsonl import JsonlWriter
from node_exporter.protocols import Role as L7Role
from node_exporter.selfmetrics import SelfMetrics
from node_exporter.ship import ClientTls, FlowShipper, ShipConfig

if TYPE_CHECKING:
    from node_exporter.local.pipeline import LocalPipeline

log = structlog.get_logger("kscope.agent")
L7_DRAIN_S = 0.02
TCP_SYN_SENT = 2  # include/net/tcp_states.h: a client socket still connecting
IPPROTO_TCP, IPPROTO_UDP = 6, 17
Nat = tuple[str, int] | None  # the (ip, port) that really answered a DNAT'ed remote


@dataclass(frozen=True, slots=True)
class AgentOptions:
    interval_s: float = 1.0
    # how often the sweeps look at sockets that went quiet (busy ones report every interval
    # themselves): each namespace a sweep walks is a pass over the whole TCP hash table (netns.py)
    sweep_s: float = 5.0
    duration_s: float | None = None
    jsonl: str | None = None
    netns_inode: int = 0
    bpf_dir: Path | None = None
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    l7: bool = False
    capture_bytes: int = 512
    # "auto": the socket tracepoints (Linux 6.3+) where the kernel has them, else the syscall-exit
    # fallback; "sockets" / "syscalls" force one (tests, or a kernel whose tracepoints misbehave).
    l7_probe: str = "auto"
    # HTTP/1 exchange records per second per CPU; past it the kernel sums exchanges (0: no sums)
    l7_record_rate: int = 1000
    # share of exchanges that may be records, picked alike at both ends by their TCP sequence numbers;
    # None ("auto"): a power of two the agent lowers as the node passes its record rate (l7/pick.py)
    l7_trace_ratio: float | None = None
    l7_summary_raw_paths: bool = False  # sum by raw path, not route: only to measure the difference
    # link client calls to the server request their thread was serving (docs/traces.md)
    l7_causal: bool = True
    processor: str | None = None  # host:port of the cluster processor's ingest
    node_name: str = ""
    proc_root: str = "/proc"
    tls: ClientTls | None = None
    nat: bool = False  # resolve DNAT'ed remotes (Service VIPs) of client sockets through conntrack
    conntrack_netns: str | None = None  # e.g. /proc/1/ns/net or /run/netns/NAME; None: the agent's own
    nat_max_entries: int = 65536  # DNAT'ed connections kept per dump; the rest are counted as dropped
    # L7 events parsed and waiting for the interval's step, at most (plus one drain's worth): an agent
    # starved of CPU would otherwise drain ring after ring into memory between two steps (bench/memory.py:
    # ~570 MB RSS under churn). Past it the rings are left to fill; what the kernel cannot add to a full
    # ring it counts (l7_kernel_*_rb_full); drains put off are counted (l7_drains_deferred).
    max_pending_l7_events: int = 20_000


def kernel_drop_reasons() -> dict[int, str]:
    """enum skb_drop_reason of the running kernel, number -> short name."""
    try:
        with Btf.vmlinux() as btf:
            values = btf.enum_values("skb_drop_reason")
    except (OSError, KeyError):
        return {}
    return {v: k.removeprefix("SKB_DROP_REASON_") for k, v in values.items()}


def open_l7(bpf_dir: Path, opts: AgentOptions, netns: NetnsWalker | None = None) -> L7Collector | SyscallL7Collector:
    """The L7 capture this kernel allows: the socket tracepoints (in-kernel HTTP pairing, TLS), else
    the syscall-exit fallback (chunks only, no TLS; see node_exporter/l7/syscalls.py)."""
    probe = opts.l7_probe
    reason = "forced by --l7-probe syscalls"
    if probe == "sockets" or (probe == "auto" and kernel_has_socket_tracepoints()):
        try:
            return L7Collector(
                bpf_dir / L7_OBJECT, netns_ino=opts.netns_inode, capture_bytes=opts.capture_bytes,
                proc_root=opts.proc_root, record_rate=opts.l7_record_rate, trace_ratio=opts.l7_trace_ratio,
                netns=netns,
                summary_raw_paths=opts.l7_summary_raw_paths, causal=opts.l7_causal,
                # like L4's: the sweep walks each namespace with exchanges in flight, a pass over the
                # whole TCP hash table (netns.py); busy sockets need none (see bpf_src/l7_summary.h)
                sweep_s=opts.sweep_s, skip_own=True,
            )  # fmt: skip
        except HookUnavailableError as exc:
            if probe == "sockets":
                raise
            reason = str(exc)
    elif probe == "auto":
        reason = "kernel has no sock_send_length/sock_recv_length tracepoints (Linux < 6.3)"
    log.warning("l7_syscall_fallback", reason=reason)
    # tls/exchanges asked for so that their absence shows as disabled capabilities, with the reason
    return SyscallL7Collector(
        bpf_dir / L7_SYSCALLS_OBJECT, netns_ino=opts.netns_inode, capture_bytes=opts.capture_bytes,
        tls=True, exchanges=True, skip_own=True,
    )  # fmt: skip


class Agent:
    def __init__(
        self,
        opts: AgentOptions,
        local: LocalPipeline | None = None,
        on_interval: Callable[[Agent], None] | None = None,
    ) -> None:
        """``local``: ``kscope run``'s in-process aggregation, handed every batch as a processor would be;
        ``on_interval``: called after each interval's step (the live map)."""
        self.opts = opts
        self.local = local
        self.on_interval = on_interval
        self.interval_hook_errors = 0
        self.stop = threading.Event()
        self.metrics = SelfMetrics()
        self.clock = MonotonicClock()
        self.procs = ProcessIndex(proc_root=opts.proc_root)
        self.records_written = 0
        self.write_failed = 0
        self.requests_seen = 0  # L7 requests reported, a summary counting its requests
        self._summaries_counted = (0, 0)  # the pipeline's (summaries, summarized_requests) at the last step
        self._pending_events: list[L7Event] = []
        self.l7_drains_deferred = 0
        preflight.check()
        bpf_dir = opts.bpf_dir or default_bpf_dir()
        self.collector = L4Collector(
            bpf_dir / OBJECT_NAME, netns_ino=opts.netns_inode, proc_root=opts.proc_root,
            report_s=opts.interval_s, sweep_s=opts.sweep_s,
        )  # fmt: skip
        self.l7: L7Collector | SyscallL7Collector | None = None
        self.pipeline = L7Pipeline(
            causal=False,
            causal_refused=GoPrograms(opts.proc_root),
            causal_hold_ns=int(opts.interval_s * 1e9),
            link_pick=link_pick(opts.l7_trace_ratio) if opts.l7_trace_ratio is not None else 0,
        )
        # --l7-trace-ratio auto: the node's share follows its load, set each interval (step)
        self.auto_pick = AutoPick(opts.l7_record_rate * (os.cpu_count() or 1)) if opts.l7_trace_ratio is None else None
        # what user space pairs (databases, HTTP/2, TLS) past the same budget, node-wide, summed here
        self.summer = AgentSummer(opts.l7_record_rate * (os.cpu_count() or 1))
        self._summed_counted = 0  # the summer's ``summed`` at the last step
        self._offered_seen = 0  # the kernel's exchanges decided on, at the last step
        self._offered_at = time.monotonic()
        self.pipeline.causal.rid_enabled = opts.l7_causal
        enabled, disabled = set(self.collector.report.enabled), dict(self.collector.report.disabled)
        if opts.l7:
            try:
                self.l7 = open_l7(bpf_dir, opts, self.collector.netns)
                enabled |= self.l7.report.enabled
                disabled.update(self.l7.report.disabled)
                # without the event-loop refusal hooks every tentative parent is dropped (counted)
                self.pipeline.causal.enabled = (
                    opts.l7_causal and isinstance(self.l7, L7Collector) and self.l7.causal_ready()
                )
            except KscopeError as exc:
                # L7 is a capability like any other: without it the agent still does L4.
                log.warning("capability_disabled", capability="l7.capture", reason=str(exc))
                disabled["l7.capture"] = str(exc)
        self.metrics.set_capabilities(enabled, disabled)
        self.capabilities = (sorted(enabled), disabled)
        self.drop_reasons = kernel_drop_reasons()
        self.writer = JsonlWriter(opts.jsonl) if opts.jsonl else None
        self.conntrack = ConntrackTable(opts.conntrack_netns, opts.nat_max_entries) if opts.nat else None
        self.shipper: FlowShipper | None = None
        if opts.processor:
            self.shipper = FlowShipper(ShipConfig(target=opts.processor, tls=opts.tls)).start()
        # folded as they are parsed, so what is summed never waits as an event (max_pending_l7_events)
        self._summing = self.writer is not None or self.shipper is not None or self.local is not None
        self.summer.plain_http1 = isinstance(self.l7, SyscallL7Collector)  # no kernel pairing: all is ours

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())

    def drain_l7(self, force: bool = False) -> None:
        """Parse what the L7 ring holds now; the records wait for the interval's write. Put off while
        ``max_pending_l7_events`` wait, unless ``force`` (the last drain, after capture stopped)."""
        if self.l7 is None:
            return
        if not force and len(self._pending_events) >= self.opts.max_pending_l7_events:
            self.l7_drains_deferred += 1
            return
        # client calls waiting for their parent's record: it may be an idle keep-alive connection's
        # last exchange, which only the sweep sends (its interval is long: a pass over the TCP table)
        self._pending_events += self._offer(self.pipeline.feed(self.l7.poll(urgent=self.pipeline.causal.waiting() > 0)))

    def _offer(self, events: list[L7Event]) -> list[L7Event]:
        """``events`` less what the summer folds (only where records leave: alone, the agent makes none)."""
        return self.summer.offer(events, time.monotonic()) if self._summing else events

    def step(self) -> tuple[list[L4Record], list[L7Event]]:
        """One interval's work: poll, parse, enrich, write, update self-metrics."""
        records = self.collector.poll()
        events: list[L7Event] = []
        if self.l7 is not None:
            # L7 after L4: every chunk a socket sent before its final record is already in the ring.
            self.drain_l7()
            events, self._pending_events = self._pending_events, []
            events += self._offer(self.pipeline.close_sockets(r.sock_cookie for r in records if r.is_close))
            events += self._offer(self.pipeline.expire(time.monotonic_ns()))
            self._auto_pick()
        summed, self._summed_counted = self.summer.summed - self._summed_counted, self.summer.summed
        seen = len(events) + summed  # before the summaries join them: each request once
        events += self.summer.flush()
        if (self.writer is not None or self.shipper is not None or self.local is not None) and (records or events):
            l7_nats: Iterable[Nat] = repeat(None)
            if self.conntrack is not None:
                l7_nats = self._resolve_nat(self.conntrack, records, events)
            procs = [self.procs.lookup(r.tgid, r.comm) for r in records]
            nats = [self._nat(r) for r in records]  # once per record: a close forgets its answer
            requests = [
                l7_request(e, self.procs.lookup(e.conn.tgid, e.conn.comm), self.clock, nat)
                for e, nat in zip(events, l7_nats, strict=False)  # l7_nats: one per event, or repeat(None)
            ]
            if self.writer is not None:
                flows = [
                    l4_flow(r, p, self.clock, self.drop_reasons, nat)
                    for r, p, nat in zip(records, procs, nats, strict=True)
                ]
                self._write(flows, requests)
            if self.shipper is not None or self.local is not None:
                self._update_metrics()  # the batch carries the counters up to now
                batch = pb.FlowBatch(
                    schema_version=2,  # L4 records as columns: the processor reads arrays, not messages
                    node_name=self.opts.node_name,
                    time_unix_nano=time.time_ns(),
                    l7=requests,
                    stats=self.metrics.to_proto(time.time_ns()),
                )
                if records:
                    batch.l4_columns.CopyFrom(l4_columns(records, procs, self.clock, self.drop_reasons, nats))
                if self.shipper is not None:
                    self.shipper.submit(batch)
                if self.local is not None:
                    self.local.submit(batch)
        self.requests_seen += seen + self._summarized_since_last_step()
        self._update_metrics()
        return records, events

    def _auto_pick(self) -> None:
        """--l7-trace-ratio auto: the share of this node's requests that may be records, from the
        exchanges the kernel's sampler decided on since the last step (its ``offered``)."""
        if self.auto_pick is None or not isinstance(self.l7, L7Collector):
            return
        offered = self.l7.kernel_stats().get("offered", 0)
        now = time.monotonic()
        pick = self.auto_pick.update(offered - self._offered_seen, now - self._offered_at)
        self._offered_seen, self._offered_at = offered, now
        if pick != self.pipeline.link_pick:
            self.l7.set_link_pick(pick)
            self.pipeline.link_pick = pick
            log.info("l7_trace_share", share=f"1/{2**self.auto_pick.shift}")

    def _summarized_since_last_step(self) -> int:
        """Requests this step's summary events stand for beyond the one event each. From the pipeline's
        counters, not a pass over the events: every summary it decoded since the last step is in this
        step's events (summaries come only from the exchange ring, which each step drains)."""
        now = (self.pipeline.summaries, self.pipeline.summarized_requests)
        (summaries, requests), self._summaries_counted = self._summaries_counted, now
        return (now[1] - requests) - (now[0] - summaries)

    def _resolve_nat(self, conntrack: ConntrackTable, records: list[L4Record], events: list[L7Event]) -> list[Nat]:
        """Ask conntrack about client sockets and client-side UDP flows it has no answer for yet (a socket
        still connecting may not be in the table yet: node_exporter/nat/conntrack.py); returns each
        event's NAT answer: a UDP flow's own (TCP records get theirs from their socket's L4 record, which
        the processor joins)."""
        clients = [r for r in records if r.role == Role.KSCOPE_ROLE_CLIENT]
        connecting = {self._nat_key(r) for r in clients if r.tcp_state == TCP_SYN_SENT}
        udp_keys = [self._udp_key(e.conn) if e.conn.ip_proto == IPPROTO_UDP else None for e in events]
        conntrack.resolve([*map(self._nat_key, clients), *(k for k in udp_keys if k is not None)], connecting)
        return [conntrack.lookup(k) if k is not None else None for k in udp_keys]

    @staticmethod
    def _nat_key(r: L4Record) -> FlowKey:
        return (IPPROTO_TCP, r.local_ip, r.local_port, r.remote_ip, r.remote_port)

    @staticmethod
    def _udp_key(c: ConnInfo) -> FlowKey | None:
        """The conntrack key of a client-side UDP flow (DNS to a VIP). A socket that never connected may have
        no local address here: its key finds nothing (``nat_gets_missing``), or cannot be asked (``nat_bad_keys``)."""
        if c.side is not L7Role.CLIENT:
            return None
        return (IPPROTO_UDP, c.local_ip, c.local_port, c.remote_ip, c.remote_port)

    def _nat(self, r: L4Record) -> tuple[str, int] | None:
        if self.conntrack is None or r.role != Role.KSCOPE_ROLE_CLIENT:
            return None
        answer = self.conntrack.lookup(self._nat_key(r))
        if r.is_close:
            self.conntrack.forget(self._nat_key(r))  # the tuple may come back as another connection
        return answer

    def _write(self, flows: list[pb.L4Flow], requests: list[pb.L7Request]) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write_flows(flows)
            self.writer.write_requests(requests)
            self.records_written += len(flows) + len(requests)
        except OSError as exc:
            self.write_failed += len(flows) + len(requests)
            log.error("jsonl_write_failed", error=str(exc), records=len(flows) + len(requests))

    def _update_metrics(self) -> None:
        s = self.collector.stats
        values = {f"kernel_{k}": v for k, v in self.collector.kernel_stats().items()}
        l7_pending = getattr(self.l7, "pending", None)  # the sweep's marks (the syscall fallback has no sweep)
        values.update(
            periodic_records=s.periodic_records,
            close_records=s.close_records,
            close_records_via_overflow_map=s.overflow_records,
            decode_bad_length=s.decode_bad_length,
            decode_bad_type=s.decode_bad_type,
            records_written=self.records_written,
            records_write_failed=self.write_failed,
            interval_hook_errors=self.interval_hook_errors,
            process_lookups_hit=self.procs.hits,
            process_lookups_missed=self.procs.misses,
            l7_requests=self.requests_seen,
            netns_vanished=self.collector.netns.vanished,
            netns_enter_failed=self.collector.netns.enter_failed,
            netns_unreadable=self.collector.netns.unreadable,  # processes, at the last listing
            netns_walked=self.collector.netns.walked,  # one per namespace per pass, L4's and L7's
            netns_sweeps_of_all=self.collector.pending.sweeps_of_all + (l7_pending.sweeps_of_all if l7_pending else 0),
            netns_marked_unlisted=self.collector.pending.unlisted + (l7_pending.unlisted if l7_pending else 0),
        )
        if self.conntrack is not None:
            values.update({f"nat_{k}": v for k, v in self.conntrack.counters().items()})
        if self.shipper is not None:
            values.update({f"ship_{k}": v for k, v in self.shipper.counters().items()})
        if self.local is not None:
            values.update({f"local_{k}": v for k, v in self.local.counters().items()})
        if self.l7 is not None:
            values.update({f"l7_kernel_{k}": v for k, v in self.l7.kernel_stats().items()})
            values.update({f"l7_{k}": v for k, v in self.pipeline.counters().items()})
            values.update({f"l7_{k}": v for k, v in self.summer.counters().items()})
            values["l7_decode_errors"] = self.l7.stats.decode_errors
            values["l7_drains_deferred"] = self.l7_drains_deferred
            if self.auto_pick is not None:  # --l7-trace-ratio auto: the share is 1 / 2^this
                values["l7_trace_share_shift"] = self.auto_pick.shift
            if self.l7.tls is not None:
                values["l7_tls_libraries_attached"] = len(self.l7.tls.attached)
                values["l7_tls_libraries_failed"] = len(self.l7.tls.failed)
        self.metrics.update(values)

    def run(self) -> None:
        try:  # from here on the probes are detached however run() ends
            if self.opts.metrics_port is not None:
                self.metrics.serve(self.opts.metrics_port, self.opts.metrics_addr)
            deadline = time.monotonic() + self.opts.duration_s if self.opts.duration_s else None
            log.info(
                "agent_started",
                capabilities=self.capabilities[0],
                disabled=self.capabilities[1],
                interval_s=self.opts.interval_s,
            )
            # Until a last interval has run: a stop (or the deadline) that comes while an interval
            # is being reported still gets its final one (capture stopped, kernel flushed, drained).
            last = False
            while not last:
                end = time.monotonic() + self.opts.interval_s
                if deadline is not None:
                    end = min(end, deadline)
                # The L7 ring fills in a fraction of a second under load: drain it on a short
                # timer (still batches, never a wakeup per record); L4 stays per interval.
                while not self.stop.is_set() and (left := end - time.monotonic()) > 0:
                    self.stop.wait(min(left, L7_DRAIN_S if self.l7 is not None else left))
                    self.drain_l7()
                last = self.stop.is_set() or (deadline is not None and time.monotonic() >= deadline)
                if last:
                    self._stop_capture()
                self.step()
                if self.on_interval is not None:
                    try:
                        self.on_interval(self)
                    except Exception:  # a bug in what shows the interval must not stop the probes: counted
                        self.interval_hook_errors += 1
                        log.exception("interval_hook_failed", errors=self.interval_hook_errors)
        finally:
            self.close()

    def _stop_capture(self) -> None:
        """Before the last interval: detach the probes, then make the kernel send what it still holds
        (answered exchanges, summaries) and drain it. Nothing is captured after this, so the last
        step reports everything seen; requests still waiting for a response are counted
        (l7_kernel_stop_pending, l7_requests_pending), not sent as unanswered."""
        self.collector.stop_capture()
        if self.l7 is not None:
            self.l7.stop_capture()
            self.l7.final_sweep()
            self.drain_l7(force=True)
            self._pending_events += self._offer(self.pipeline.flush_causal())

    def close(self) -> None:
        if self.shipper is not None:
            # the last interval's batch: give it a moment to leave, count it if it cannot
            self.shipper.close(timeout_s=5.0)
            self._update_metrics()
        if self.writer is not None:
            self.writer.write_stats(self.metrics.to_proto(time.time_ns()))
            self.writer.close()
            self.writer = None
        if self.local is not None:
            self.local.close(timeout_s=5.0)  # with --otlp: the last interval leaves
        self.collector.close()
        if self.conntrack is not None:
            self.conntrack.close()
        if self.l7 is not None:
            self.l7.close()
        log.info("agent_stopped", **self.metrics.values)
