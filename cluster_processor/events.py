"""One node's event logs over one interval, aggregated. Pure: no I/O, time passed in.

A log record per occurrence grows with the traffic it describes (a resolver's SERVFAIL retried
under a search path made thousands of records a minute from a few requests a second). So each
interval keeps one record per (edge, side, event name, body, attributes) (the aggregator makes
the edge workload-level and puts in the body and attributes only what tells occurrences apart: a
DNS name and code, an HTTP route and status, a TCP state, a connect error) with the number of
occurrences, the first and the last time, and counters summed over them. At most ``max_records``
records per interval; an occurrence that would need one more is dropped, and counted
(``logs_overflowed``, in the counters the aggregator hands over; ``log_events`` counts the rest).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass

from cluster_processor.otlp.model import Attrs, AttrValue, Edge, LogEvent, Severity, Side, attrs

# What tells one record from another: (edge, side, event name, body, attributes)
_Key = tuple[Edge, Side, str, str, Attrs]


@dataclass(slots=True)
class _Record:
    first: LogEvent  # the first occurrence: its time and trace context are the record's
    count: int
    last_unix_nano: int
    sums: dict[str, int] | None  # counters summed over the occurrences (a reset's segments)


class EventLog:
    __slots__ = ("_counters", "_max", "_records")

    def __init__(self, max_records: int, counters: MutableMapping[str, int]) -> None:
        self._max = max_records
        self._counters = counters  # the aggregator's: logs_overflowed and log_events are added to them
        self._records: dict[_Key, _Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def add(
        self,
        edge: Edge,
        side: Side,
        t: int,
        name: str,
        severity: Severity,
        body: str,
        extra: Iterable[tuple[str, AttrValue]],
        trace: tuple[bytes, bytes] = (b"", b""),
        n: int = 1,
        sums: Iterable[tuple[str, int]] = (),
    ) -> bool:
        """``n`` occurrences of one event at ``t``: added to the record with the same key, else the
        first of a new record while there is room. Returns False when there was none (dropped)."""
        a = attrs(extra)
        key: _Key = (edge, side, name, body, a)
        rec = self._records.get(key)
        if rec is None:
            if len(self._records) >= self._max:
                self._counters["logs_overflowed"] += n
                return False
            rec = self._records[key] = _Record(LogEvent(edge, side, t, name, severity, body, a, *trace), 0, t, None)
        rec.count += n
        self._counters["log_events"] += n
        if t < rec.first.time_unix_nano:  # one node's batches may arrive out of order
            rec.first = LogEvent(edge, side, t, name, severity, body, a, *trace)
        if t > rec.last_unix_nano:
            rec.last_unix_nano = t
        for k, v in sums:
            if rec.sums is None:
                rec.sums = {}
            rec.sums[k] = rec.sums.get(k, 0) + v
        return True

    def records(self, observed_unix_nano: int) -> list[LogEvent]:
        """The interval's records in the order they were first met, observed (reported) at
        ``observed_unix_nano``."""
        out = []
        for rec in self._records.values():
            e = rec.first
            a = e.attributes if rec.sums is None else attrs([*e.attributes, *rec.sums.items()])
            out.append(LogEvent(e.edge, e.side, e.time_unix_nano, e.name, e.severity, e.body, a, e.trace_id,
                                e.span_id, rec.count, rec.last_unix_nano, observed_unix_nano))  # fmt: skip
        return out
