"""Database and cache operations past the node's record budget, summed per socket and operation.

HTTP/1 requests past the budget (``--l7-record-rate`` per CPU) are summed in the kernel. Database and
cache protocols are paired here, in user space, one record per operation: at a cache's rates (10^5
operations a second) converting, shipping and aggregating each one cost more than parsing it did
(bench/RESULTS.md), and the processor's load grew with the databases' traffic, unbounded. So past the
same budget, node-wide, the operations of one socket with the same system, operation, collection,
namespace, query summary, status and error are folded into one summary record per interval: count,
latency histogram (the kernel's buckets), min, max and sum exact, bytes summed, the first operation's
start and query text. What a summary stands for gets no span, as for a kernel summary; metrics and the
service graph count every operation.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import replace
from typing import Final

from kscope_common.latency import LATENCY_BOUNDS_NS
from node_exporter.l7.pipeline import L7Event
from node_exporter.protocols.db import DbRecord
from node_exporter.protocols.http1 import HttpSummary

# Summaries one interval may hold (sockets x operations x statuses); past it an operation leaves as its
# own record, counted (``db_summaries_full``): nothing is lost, the output is only less compact.
MAX_SUMMARIES: Final = 4096

_Key = tuple[int, int, object, str, str, str, str, str, str, str]


class _Sum:
    """What one summary has folded so far (its first event is kept for its connection and texts)."""

    __slots__ = ("batch", "buckets", "count", "end", "first", "hi", "hits", "lo", "misses", "req_bytes",
                 "resp_bytes", "rows", "total")  # fmt: skip

    def __init__(self, ev: L7Event) -> None:
        self.first = ev
        self.count = 0
        self.total = 0
        self.lo = 0
        self.hi = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self.end = 0
        self.req_bytes = 0
        self.resp_bytes = 0
        self.rows = 0
        self.hits = 0
        self.misses = 0
        self.batch = 0

    def add(self, r: DbRecord) -> None:
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
        self.rows += r.returned_rows
        self.hits += r.cache_hits
        self.misses += r.cache_misses
        self.batch += r.batch_size

    def event(self) -> L7Event:
        first = self.first.record
        assert isinstance(first, DbRecord)
        summary = HttpSummary(self.count, self.total, self.lo, self.hi, tuple(self.buckets), self.end)
        rec = replace(first, request_bytes=self.req_bytes, response_bytes=self.resp_bytes, latency_ns=0,
                      returned_rows=self.rows, cache_hits=self.hits, cache_misses=self.misses, batch_size=self.batch,
                      parent=None, summary=summary)  # fmt: skip
        return L7Event(self.first.conn, rec)


class DbSummer:
    """Passes database operations as records while the node's budget lasts, sums the rest per interval."""

    def __init__(self, budget_per_s: float, max_summaries: int = MAX_SUMMARIES) -> None:
        """``budget_per_s``: operation records per second, node-wide (--l7-record-rate x CPUs; 0: every
        operation a record, nothing summed)."""
        self.budget_per_s = budget_per_s
        self.max_summaries = max_summaries
        self._tokens = budget_per_s  # a second's worth to start with, at most a second's worth kept
        self._at: float | None = None
        self._sums: dict[_Key, _Sum] = {}
        self.summed = 0  # operations folded into summaries
        self.summaries = 0  # summary records made
        self.full = 0  # operations that left as records because the interval's summaries were at their bound

    def fold(self, events: list[L7Event], now: float) -> list[L7Event]:
        """``events`` with the database operations past the budget folded, then this interval's summaries.
        ``now``: seconds on a monotonic clock (the budget refills with it)."""
        rate = self.budget_per_s
        if rate <= 0:
            return events
        if self._at is not None:
            self._tokens = min(rate, self._tokens + (now - self._at) * rate)
        self._at = now
        tokens, sums = self._tokens, self._sums
        out: list[L7Event] = []
        for ev in events:
            r = ev.record
            if type(r) is not DbRecord:
                out.append(ev)
                continue
            if tokens >= 1:
                tokens -= 1
                out.append(ev)
                continue
            c = ev.conn
            key = (c.netns_ino, c.sock_cookie, c.side, r.system, r.operation, r.collection, r.namespace,
                   r.query_summary, r.status_code, r.error_type)  # fmt: skip
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
        if sums:
            out += [s.event() for s in sums.values()]
            self.summaries += len(sums)
            sums.clear()
        return out

    def counters(self) -> dict[str, int]:
        return {"db_summed": self.summed, "db_summaries": self.summaries, "db_summaries_full": self.full}
