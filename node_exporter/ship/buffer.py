"""The shipper's in-memory buffer: a bounded queue that drops the oldest batch when full, and the split
of an over-large batch into parts the processor accepts. Pure of I/O."""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import take

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    """Thread-safe FIFO of at most ``maxlen`` items. A put into a full queue evicts the oldest item and
    returns it, so the caller can count it: under a long outage the freshest data is what is worth
    keeping, and the agent's loop must never block on the network."""

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self._items: deque[T] = deque()
        self._maxlen = maxlen
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T) -> T | None:
        with self._cond:
            evicted = self._items.popleft() if len(self._items) >= self._maxlen else None
            self._items.append(item)
            self._cond.notify()
            return evicted

    def get(self) -> T | None:
        """The oldest item, waiting for one; None once the queue is closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """Wake every waiting ``get``; items already queued can still be taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[T]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items


def record_count(batch: pb.FlowBatch) -> int:
    return len(batch.l4) + int(batch.l4_columns.count) + len(batch.l7)


def split_batch(batch: pb.FlowBatch, max_records: int) -> list[pb.FlowBatch]:
    """``batch`` itself if it holds at most ``max_records`` records, else parts that each do, with the
    same envelope. The processor refuses a batch over its limit outright (and a retry cannot help), so
    a busy node splits rather than loses the interval. Stats ride in the first part only; columnar L4
    records are cut into column slices, each with the string table of its own records."""
    if record_count(batch) <= max_records:
        return [batch]
    parts: list[pb.FlowBatch] = []
    l4 = list(batch.l4)
    l7 = list(batch.l7)
    n_columns = batch.l4_columns.count
    i4 = ic = i7 = 0
    while i4 < len(l4) or ic < n_columns or i7 < len(l7):
        part = pb.FlowBatch(
            schema_version=batch.schema_version, node_name=batch.node_name, time_unix_nano=batch.time_unix_nano
        )
        if not parts and batch.HasField("stats"):
            part.stats.CopyFrom(batch.stats)
        take4 = min(max_records, len(l4) - i4)
        part.l4.extend(l4[i4 : i4 + take4])
        i4 += take4
        take_columns = min(max_records - take4, n_columns - ic)
        if take_columns:
            part.l4_columns.CopyFrom(take(batch.l4_columns, range(ic, ic + take_columns)))
            ic += take_columns
        take7 = min(max_records - take4 - take_columns, len(l7) - i7)
        part.l7.extend(l7[i7 : i7 + take7])
        i7 += take7
        parts.append(part)
    return parts
