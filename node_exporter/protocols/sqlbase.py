"""What the PostgreSQL and MySQL parsers share: the response accumulator, statement caches and stitching.

A SQL response is many messages (a row description, rows, a completion tag, a terminator). Each
parser returns its *first* message as a ``SqlResponse`` frame (SUCCESS: its timestamp is the
response's first byte) holding a mutable ``Acc``; the messages after it update that ``Acc`` and are
IGNORED (their bodies skipped by length, never buffered); the terminator marks it done and is a
``SqlEnd`` frame, only there to make the tracker stitch again. ``stitch`` pairs a request with a
response once that response is done, in order, as HTTP/1 does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from cachetools import LRUCache

from node_exporter.protocols.base import Message, Stitched, fifo_pair
from node_exporter.protocols.db import DbRecord
from node_exporter.protocols.sql import EMPTY, SqlSummary

MAX_STATEMENTS: Final = 256  # prepared statements remembered per connection (by name or id)
MIN_PREFIX: Final = 128  # statement bytes enough to sanitize when the rest is not there (yet)
MAX_HEAD: Final = 4096  # statement bytes read at most; the rest is skipped by length

K = TypeVar("K")


class Acc:
    """One response as its messages arrive: what the record needs, never a row or a message text."""

    __slots__ = ("bytes", "cut", "done", "error_type", "operation", "rows", "status_code")

    def __init__(self) -> None:
        self.done = False
        self.rows = 0
        self.bytes = 0
        self.status_code = ""  # SQLSTATE / error number of the first error
        self.error_type = ""
        self.operation = ""  # from the response when it names one (PostgreSQL's CommandComplete tag)
        self.cut = False  # its end was lost: status and rows unknown (reported as none)

    def close_cut(self) -> None:
        """The response ended in lost bytes (seen when the client's next request came)."""
        self.done = self.cut = True
        self.rows = 0


class CutResponses:
    """A response whose end fell in lost bytes (the capture keeps each call's head: a large result's
    last calls lose their tail, terminator included). Its bytes are skipped until the client's next
    request, which a non-pipelining client sends only once it has read the whole response: then it
    is done (without status or rows) and pairs with its request, and the next response is parsed."""

    __slots__ = ("counted", "lost")

    def __init__(self) -> None:
        self.lost: Acc | None = None
        self.counted = 0

    def lose(self, acc: Acc | None) -> None:
        if acc is not None and self.lost is None:
            self.lost = acc

    def request_seen(self) -> None:
        if self.lost is not None:
            self.lost.close_cut()
            self.lost = None
            self.counted += 1


@dataclass(frozen=True, slots=True)
class SqlRequest:
    summary: SqlSummary
    wire_bytes: int  # every message of the request (a Parse/Bind/Execute/Sync batch), bodies included
    record: bool = True  # False: answered but no operation of its own (a lone Sync, a successful prepare)
    batch: int = 0  # Executes in an extended-protocol batch (db.operation.batch.size when > 1)
    command: int = 0  # the protocol's command code where the response's shape depends on it (MySQL)


@dataclass(frozen=True, slots=True)
class SqlResponse:
    acc: Acc


@dataclass(frozen=True, slots=True)
class SqlEnd:
    """The terminator of the response whose ``SqlResponse`` came earlier: nothing to pair."""


END: Final = SqlEnd()


class StatementCache(Generic[K]):
    """Prepared statements of one connection, sanitized when stored, bounded, with counted misses."""

    __slots__ = ("_cache", "evictions", "misses")

    def __init__(self, maxsize: int = MAX_STATEMENTS) -> None:
        self._cache: LRUCache[K, SqlSummary] = LRUCache(maxsize=maxsize)
        self.evictions = 0  # statements forgotten by the bound
        self.misses = 0  # executions of a statement never seen (prepared before us, or evicted)

    def put(self, key: K, summary: SqlSummary) -> None:
        if key not in self._cache and len(self._cache) >= self._cache.maxsize:
            self.evictions += 1
        self._cache[key] = summary

    def get(self, key: K) -> SqlSummary:
        summary = self._cache.get(key)
        if summary is None:
            self.misses += 1
            return EMPTY
        return summary

    def pop(self, key: K) -> None:
        self._cache.pop(key, None)

    def __len__(self) -> int:
        return len(self._cache)


def _record(system: str, req: Message[Any], resp: Message[Any], namespace: str) -> DbRecord:
    q: SqlRequest = req.frame
    acc: Acc = resp.frame.acc
    s = q.summary
    return DbRecord(
        system=system,
        operation=s.operation or acc.operation,
        request_bytes=q.wire_bytes,
        response_bytes=acc.bytes,
        start_ns=req.ts_ns,
        latency_ns=resp.ts_ns - req.ts_ns,
        collection=s.collection,
        namespace=namespace,
        query_summary=s.summary or acc.operation,
        query_text=s.text,
        status_code=acc.status_code,
        error_type=acc.error_type,
        returned_rows=acc.rows,
        batch_size=q.batch if q.batch > 1 else 0,
    )


def stitch(system: str, requests: deque[Message[Any]], responses: deque[Message[Any]], namespace: str = "") -> Stitched:
    """In-order pairing of requests with finished responses (one connection runs one statement at
    a time; pipelined ones answer in order). Guarded by timestamps and gaps as HTTP/1 is."""
    out = Stitched()
    while responses:
        resp = responses[0]
        if isinstance(resp.frame, SqlEnd):
            responses.popleft()
            continue
        if not resp.frame.acc.done:
            # its terminator was lost if a later message came after a gap: give up waiting
            if not any(m.after_gap for m in list(responses)[1:]):
                break
            resp.frame.acc.done = True
        if not requests:
            break
        pair = fifo_pair(requests, responses, out)
        if pair is None:
            continue
        req, resp = pair
        if req.frame.record or resp.frame.acc.status_code:
            out.records.append(_record(system, req, resp, namespace))
    return out
