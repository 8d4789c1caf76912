"""Requests paired in user space past the node's record budget, summed per socket, operation and status.

Plain-text HTTP/1 requests past the budget (``--l7-record-rate`` per CPU) are summed in the kernel. What
the agent pairs from chunks itself — database and cache operations, HTTP/2 and gRPC, HTTP over TLS, and
on the syscall fallback (no kernel pairing) plain-text HTTP/1 as well — was
one record per request at any rate: at a cache's or a gRPC service's rates (10^5 a second) converting,
shipping and aggregating each one cost more than parsing it did (bench/RESULTS.md), and the processor's
load grew with that traffic, unbounded. So past the same budget, node-wide, such requests of one socket
with the same key are folded into one summary record per interval — HTTP: method, route, status (and
a gRPC call's service, method and grpc-status); databases: system, operation, collection, namespace,
query summary, status and error — with the kernel's summary shape: count, latency histogram (the same
buckets), min, max and sum exact, bytes summed, the first request's start, path or query text. What a
summary stands for gets no span, as for a kernel summary; metrics and the service graph count every
request. As in the kernel, an HTTP 5xx or a request with no response always stays a record.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import replace
from typing import Final

from kscope_common.latency import LATENCY_BOUNDS_NS
from node_exporter.l7.pipeline import L7Event
from node_exporter.protocols.db import DbRecord
from node_exporter.protocols.http1 import HttpChildRecord, HttpRecord, HttpSummary, HttpSummaryRecord
from node_exporter.protocols.http2_session import Http2ChildRecord, Http2Record, Http2SummaryRecord

# Summaries one interval may hold (sockets x keys); past it a request leaves as its own record, counted
# (``agent_summaries_full``): nothing is lost, the output is only less compact.
MAX_SUMMARIES: Final = 4096

_H1 = (HttpRecord, HttpChildRecord)  # paired from chunks: HTTP over TLS (tcp_seqs None)
_H2 = (Http2Record, Http2ChildRecord)


class _Sum:
    """What one summary has folded so far (its first event is kept for its connection and texts)."""

    __slots__ = ("batch", "buckets", "count", "end", "first", "hi", "hits", "lo", "misses", "req_bytes",
                 "resp_bytes", "rows", "total")  # fmt: skip

    def __init__(self, ev: L7Event) -> None:
        self.first = ev
        self.count = self.total = self.lo = self.hi = self.end = 0
        self.req_bytes = self.resp_bytes = self.rows = self.hits = self.misses = self.batch = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)

    def add(self, r: DbRecord | HttpRecord) -> None:
        latency = max(0, r.latency_ns)
        if self.count == 0 or latency < self.lo:
            self.lo = latency
        if latency > self.hi:
            self.hi = latency
        self.count += 1
        self.total += latency
        self.buckets[bisect_left(LATENCY_BOUNDS_NS, latency)] += 1
        self.end = max(self.end, r.start_ns)
        self.req_bytes += r.request_bytes
        self.resp_bytes += r.response_bytes
        if type(r) is DbRecord:
            self.rows += r.returned_rows
            self.hits += r.cache_hits
            self.misses += r.cache_misses
            self.batch += r.batch_size

    def event(self) -> L7Event:
        first = self.first.record
        summary = HttpSummary(self.count, self.total, self.lo, self.hi, tuple(self.buckets), self.end)
        rec: DbRecord | HttpRecord
        if isinstance(first, DbRecord):
            rec = replace(first, request_bytes=self.req_bytes, response_bytes=self.resp_bytes, latency_ns=0,
                          returned_rows=self.rows, cache_hits=self.hits, cache_misses=self.misses,
                          batch_size=self.batch, parent=None, summary=summary)  # fmt: skip
        else:
            assert isinstance(first, HttpRecord)
            head = (first.method, first.path, first.route, first.status, self.req_bytes, self.resp_bytes,
                    first.start_ns, 0, "", "")  # fmt: skip
            if isinstance(first, Http2Record):  # no trace headers, no parent: no span
                rec = Http2SummaryRecord(*head, first.rpc_system, first.rpc_service, first.rpc_method,
                                         first.grpc_status, summary=summary)  # fmt: skip
            else:
                rec = HttpSummaryRecord(*head, summary)
        return L7Event(self.first.conn, rec)


class AgentSummer:
    """Passes requests paired in user space as records while the node's budget lasts, sums the rest per
    interval (the exchange path's records, already within the kernel's budget, pass untouched)."""

    def __init__(self, budget_per_s: float, max_summaries: int = MAX_SUMMARIES, plain_http1: bool = False) -> None:
        """``budget_per_s``: records per second, node-wide (--l7-record-rate x CPUs; 0: every request a
        record, nothing summed). ``plain_http1``: HTTP/1 in the clear is paired here too (the syscall
        fallback: no kernel pairing, so no kernel summaries)."""
        self.budget_per_s = budget_per_s
        self.plain_http1 = plain_http1
        self.max_summaries = max_summaries
        self._tokens = budget_per_s  # a second's worth to start with, at most a second's worth kept
        self._at: float | None = None
        self._sums: dict[tuple[object, ...], _Sum] = {}
        self.summed = 0  # requests folded into summaries
        self.summaries = 0  # summary records made
        self.full = 0  # requests that left as records because the interval's summaries were at their bound

    def fold(self, events: list[L7Event], now: float) -> list[L7Event]:
        """``events`` with the user-space-paired requests past the budget folded, then the summaries."""
        return self.offer(events, now) + self.flush()

    def offer(self, events: list[L7Event], now: float) -> list[L7Event]:
        """``events`` less the user-space-paired requests past the budget, which are folded into the
        interval's summaries (``flush``). ``now``: seconds on a monotonic clock (the budget refills
        with it). Called as events are parsed, so what is summed never waits as an event."""
        rate = self.budget_per_s
        if rate <= 0:
            return events
        if self._at is not None:
            self._tokens = min(rate, self._tokens + (now - self._at) * rate)
        self._at = now
        tokens, sums = self._tokens, self._sums
        out: list[L7Event] = []
        for ev in events:
            r, c = ev.record, ev.conn
            t = type(r)
            key: tuple[object, ...]
            if t is DbRecord:
                assert isinstance(r, DbRecord)
                key = (c.netns_ino, c.sock_cookie, c.side, r.system, r.operation, r.collection, r.namespace,
                       r.query_summary, r.status_code, r.error_type)  # fmt: skip
            elif t in _H2 or (t in _H1 and (c.tls or self.plain_http1)):  # else the kernel's to sum
                assert isinstance(r, HttpRecord)
                if r.status >= 500 or r.status == 0:  # as in the kernel: errors and no response stay records
                    out.append(ev)
                    continue
                rpc = (r.rpc_service, r.rpc_method, r.grpc_status) if isinstance(r, Http2Record) else ()
                key = (c.netns_ino, c.sock_cookie, c.side, c.protocol, r.method, r.route, r.status, *rpc)
            else:
                out.append(ev)
                continue
            if tokens >= 1:
                tokens -= 1
                out.append(ev)
                continue
            s = sums.get(key)
            if s is None:
                if len(sums) >= self.max_summaries:
                    self.full += 1
                    out.append(ev)
                    continue
                s = sums[key] = _Sum(ev)
            s.add(r)
            self.summed += 1
        self._tokens = tokens
        return out

    def flush(self) -> list[L7Event]:
        """The interval's summaries, one event each; the table starts empty again."""
        sums = self._sums
        if not sums:
            return []
        out = [s.event() for s in sums.values()]
        self.summaries += len(sums)
        sums.clear()
        return out

    def counters(self) -> dict[str, int]:
        return {"agent_summed": self.summed, "agent_summaries": self.summaries, "agent_summaries_full": self.full}
