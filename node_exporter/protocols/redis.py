"""Redis RESP2 and RESP3 (https://redis.io/docs/latest/develop/reference/protocol-spec/).

A request is an array of bulk strings whose first element names the command (or an inline
command line); only that name is kept: every argument (keys, values, AUTH passwords) is skipped
by the body reader and never stored. A reply's head is its first line; the rest (bulk payloads,
aggregate elements) is skipped by the same streaming reader, which counts the nils and errors
among a top-level array's elements (MGET hits and misses).

Replies pair with commands in order (pipelining: N commands in one send, N replies). Pub/sub
traffic is not request/response: SUBSCRIBE-family commands and their confirmations, published
messages (RESP2 arrays ``message``/``pmessage``/``smessage``, RESP3 ``>`` pushes) are counted as
ignored messages and make no record. MULTI, each queued command (reply ``+QUEUED``) and EXEC are
records of their own, as on the wire; EXEC carries db.operation.batch.size.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from node_exporter.protocols.base import (
    Buffer,
    Message,
    MessageKind,
    ParseResult,
    ParseState,
    Stitched,
    fifo_pair,
)
from node_exporter.protocols.db import DbRecord

MAX_LINE: Final = 4096  # bytes of a type line (+simple, -error, :int, $len ...) before we call it garbage
MAX_NAME: Final = 64  # bytes of a command name (the longest real ones are ~30)
MAX_ELEMENTS: Final = 1 << 24  # elements of one aggregate, bulk bytes are bounded by proto-max-bulk-len
MAX_BULK: Final = 512 * 1024 * 1024  # redis.conf proto-max-bulk-len default
MAX_DEPTH: Final = 32  # nesting of aggregates the reader follows

# RESP type bytes: RESP2 + - : $ *, RESP3 _ # , ( ! = % ~ > |
_LINE_TYPES: Final = frozenset(b"+-:_#,(")
_BULK_TYPES: Final = frozenset(b"$!=")
_AGG_TYPES: Final = frozenset(b"*~>")
_PAIR_TYPES: Final = frozenset(b"%|")
TYPES: Final = _LINE_TYPES | _BULK_TYPES | _AGG_TYPES | _PAIR_TYPES
_NIL: Final = object()

SUBSCRIBE_COMMANDS: Final = frozenset(
    {"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"}
)
# What a client may send while subscribed (RESP2): a push-shaped reply then is a push, not its answer.
_SUBSCRIBED_OK: Final = SUBSCRIBE_COMMANDS | {"PING", "RESET", "QUIT"}
# RESP2 pub/sub arrays: (element count, first element) of a push.
_PUSH_HEADS: Final = tuple(
    b"*%d\r\n$%d\r\n%s\r\n" % (n, len(kind), kind)
    for n, kind in (
        (3, b"message"), (4, b"pmessage"), (3, b"smessage"), (3, b"subscribe"), (3, b"psubscribe"),
        (3, b"ssubscribe"), (3, b"unsubscribe"), (3, b"punsubscribe"), (3, b"sunsubscribe"),
    )
)  # fmt: skip
# Commands whose nil reply is a cache miss and whose value is a hit (arrays: per element).
CACHE_READS: Final = frozenset({"GET", "GETEX", "GETDEL", "HGET", "MGET", "HMGET", "JSON.GET"})
_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_.|-]*")
_ERROR_PREFIX = re.compile(rb"[A-Z][A-Z0-9_]*")
_REQUEST_START = re.compile(rb"\*[1-9][0-9]{0,7}\r\n\$")


@dataclass(slots=True)
class Tally:
    """What the body reader saw among a top-level aggregate's elements (filled while streaming)."""

    nils: int = 0


@dataclass(frozen=True, slots=True)
class RedisCommand:
    name: str  # upper case, e.g. "GET"
    args: int  # arguments after the name (skipped, never stored)


@dataclass(frozen=True, slots=True)
class RedisReply:
    type: int  # the RESP type byte, e.g. ord("+")
    error: str  # the error prefix ("ERR", "WRONGTYPE") of -error / !blob error, else ""
    null: bool  # RESP2 $-1 / *-1, RESP3 _
    count: int  # elements of an aggregate (pairs count twice), 0 otherwise
    length: int  # payload bytes of a bulk string / blob error / verbatim string, 0 otherwise
    tally: Tally = field(default_factory=Tally, compare=False)


class RespReader:
    """Streams over the rest of a RESP value: ``pending`` elements to go, maybe a bulk payload first."""

    __slots__ = ("bulk", "stack", "tally")

    def __init__(self, pending: int, bulk: int = 0, tally: Tally | None = None) -> None:
        self.stack = [pending] if pending > 0 else []
        self.bulk = bulk  # payload bytes (and CRLF) left of the current bulk string
        self.tally = tally

    def read(self, buf: Buffer) -> tuple[ParseState, int]:
        pos, end, stack = 0, len(buf), self.stack
        while True:
            if self.bulk:
                take = min(self.bulk, end - pos)
                self.bulk -= take
                pos += take
                if self.bulk:
                    return ParseState.NEEDS_MORE_DATA, pos
            if not stack:
                return ParseState.SUCCESS, pos
            el = _element(buf, pos)
            if el is None:
                return ParseState.NEEDS_MORE_DATA, pos
            if el[0] < 0:
                return ParseState.INVALID, pos
            after, kind, n = el
            if kind != ord("|"):  # an attribute is metadata before the element it annotates
                stack[-1] -= 1
            if self.tally is not None and len(stack) == 1 and (n < 0 or kind == ord("_")):
                self.tally.nils += 1
            pos = after
            if kind in _BULK_TYPES and n >= 0:
                self.bulk = n + 2
            elif n > 0 and (kind in _AGG_TYPES or kind in _PAIR_TYPES):
                if len(stack) >= MAX_DEPTH:
                    return ParseState.INVALID, pos
                stack.append(n * 2 if kind in _PAIR_TYPES else n)
            while stack and stack[-1] == 0:
                stack.pop()

    def skip_gap(self, nbytes: int | None) -> bool:
        # Lost payload bytes cost nothing if they all fall inside the current bulk string.
        if nbytes is None or nbytes > self.bulk:
            return False
        self.bulk -= nbytes
        return True

    def ends_at_close(self) -> bool:
        return False


def _line(buf: Buffer, pos: int) -> int | None:
    """Offset of the CRLF ending the line at ``pos``; None if not there yet; -1 if too long."""
    idx = buf.find(b"\r\n", pos, pos + MAX_LINE)
    if idx >= 0:
        return idx
    return None if len(buf) - pos < MAX_LINE else -1


def _int(buf: Buffer, start: int, end: int) -> int | None:
    raw = bytes(buf[start:end])
    if not raw or len(raw) > 12 or not (raw.isdigit() or (raw[:1] == b"-" and raw[1:].isdigit())):
        return None
    return int(raw)


def _element(buf: Buffer, pos: int) -> tuple[int, int, int] | None:
    """One type line at ``pos``: (offset after it, type byte, length/count; -1 for null), or
    None if incomplete, or (-1, 0, 0) if not RESP."""
    if pos >= len(buf):
        return None
    kind = buf[pos]
    if kind not in TYPES:
        return -1, 0, 0
    eol = _line(buf, pos + 1)
    if eol is None:
        return None
    if eol < 0:
        return -1, 0, 0
    if kind in _LINE_TYPES:
        return eol + 2, kind, 0
    n = _int(buf, pos + 1, eol)
    limit = MAX_BULK if kind in _BULK_TYPES else MAX_ELEMENTS
    if n is None or n < -1 or n > limit:
        return -1, 0, 0
    return eol + 2, kind, n


def parse_request(buf: Buffer) -> ParseResult:
    if not buf:
        return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
    if buf[0] != ord("*"):
        return _parse_inline(buf)
    head = _element(buf, 0)
    if head is None:
        return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
    after, _, count = head
    if after < 0 or count < 1:
        return ParseResult(ParseState.INVALID, 0, None)
    name_el = _element(buf, after)
    if name_el is None:
        return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
    start, kind, length = name_el
    if start < 0 or kind != ord("$") or not 1 <= length <= MAX_NAME:
        return ParseResult(ParseState.INVALID, 0, None)
    if len(buf) < start + length + 2:
        return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
    raw = bytes(buf[start : start + length])
    if not _NAME.fullmatch(raw) or buf[start + length : start + length + 2] != b"\r\n":
        return ParseResult(ParseState.INVALID, 0, None)
    cmd = RedisCommand(raw.decode("ascii").upper(), count - 1)
    state = ParseState.IGNORED if cmd.name in SUBSCRIBE_COMMANDS else ParseState.SUCCESS
    return ParseResult(state, start + length + 2, cmd)


def _parse_inline(buf: Buffer) -> ParseResult:
    """Inline commands (``PING\\r\\n`` typed into telnet/nc): one line of space-separated words."""
    eol = buf.find(b"\n", 0, MAX_LINE)
    if eol < 0:
        return ParseResult(ParseState.NEEDS_MORE_DATA if len(buf) < MAX_LINE else ParseState.INVALID, 0, None)
    words = bytes(buf[:eol]).rstrip(b"\r").split()
    if not words or not _NAME.fullmatch(words[0]) or len(words[0]) > MAX_NAME:
        return ParseResult(ParseState.INVALID, 0, None)
    cmd = RedisCommand(words[0].decode("ascii").upper(), len(words) - 1)
    state = ParseState.IGNORED if cmd.name in SUBSCRIBE_COMMANDS else ParseState.SUCCESS
    return ParseResult(state, eol + 1, cmd)


def parse_response(buf: Buffer, request_hint: Any | None) -> ParseResult:
    head = _element(buf, 0)
    if head is None:
        return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
    after, kind, n = head
    if after < 0:
        return ParseResult(ParseState.INVALID, 0, None)
    error = ""
    if kind == ord("-"):
        error = _error_prefix(buf, after - 2)
    elif kind == ord("!"):
        error = "ERR"  # a blob error's text is its payload, which we skip
    count = n * 2 if kind in _PAIR_TYPES and n > 0 else max(n, 0) if kind in _AGG_TYPES else 0
    length = n if kind in _BULK_TYPES and n > 0 else 0
    reply = RedisReply(kind, error, n < 0 or kind == ord("_"), count, length)
    state = ParseState.SUCCESS
    if kind == ord(">") or kind == ord("|"):
        # RESP3 push (pub/sub, invalidation) or an attribute before the reply: neither answers a request.
        state = ParseState.IGNORED
    elif kind == ord("*") and n in (3, 4):
        push = _push_shaped(buf)
        if push is None:
            return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
        if push and (request_hint is None or request_hint.name in _SUBSCRIBED_OK):
            state = ParseState.IGNORED
    return ParseResult(state, after, reply)


def _error_prefix(buf: Buffer, eol: int) -> str:
    match = _ERROR_PREFIX.match(bytes(buf[1 : min(eol, 1 + MAX_NAME)]))
    return match.group().decode("ascii") if match else "ERR"


def cut_reply(buf: Buffer) -> ParseResult | None:
    """A reply line the capture bound cut before its CRLF (-DENIED from a protected-mode server is
    ~1 KiB, past the default 512-byte capture): the reply is that line, and its type and error
    prefix are at its start. Anything else (a bulk or aggregate head, whose rest needs its lengths,
    or a line end already captured): None."""
    if not buf or buf[0] not in _LINE_TYPES or b"\r\n" in buf:
        return None
    kind = buf[0]
    error = _error_prefix(buf, len(buf)) if kind == ord("-") else ""
    return ParseResult(ParseState.SUCCESS, len(buf), RedisReply(kind, error, kind == ord("_"), 0, 0))


def _push_shaped(buf: Buffer) -> bool | None:
    """True if buf starts like a RESP2 pub/sub array; None if too short to tell."""
    for prefix in _PUSH_HEADS:
        have = min(len(buf), len(prefix))
        if buf[:have] == prefix[:have]:
            if have < len(prefix):
                return None
            return True
    return False


def body_reader(frame: Any) -> RespReader | None:
    if isinstance(frame, RedisCommand):
        return RespReader(frame.args) if frame.args else None
    r: RedisReply = frame
    if r.null:
        return None
    if r.type in _BULK_TYPES:
        return RespReader(0, bulk=r.length + 2)
    if r.count:
        return RespReader(r.count, tally=r.tally)
    return None


def find_frame_boundary(buf: Buffer, start: int, kind: MessageKind) -> int:
    """Requests: the next ``*<n>\\r\\n$``; replies: the next line starting with a RESP type byte."""
    if kind is MessageKind.REQUEST:
        m = _REQUEST_START.search(buf, start)
        if m:
            return m.start()
        star = buf.rfind(b"*", max(start, len(buf) - 12))
        return star if star >= 0 else len(buf)
    if start == 0 and buf and buf[0] in TYPES:
        return 0
    pos = max(start - 2, 0)
    while True:
        idx = buf.find(b"\r\n", pos)
        if idx < 0:
            return len(buf)
        if idx + 2 >= len(buf) or buf[idx + 2] in TYPES:
            return idx + 2
        pos = idx + 1


def _record(req: Message[Any], resp: Message[Any] | None) -> DbRecord:
    q: RedisCommand = req.frame
    hits = misses = rows = batch = 0
    status = ""
    if resp is not None:
        r: RedisReply = resp.frame
        status = r.error
        if q.name in CACHE_READS and not status:
            if r.type in _AGG_TYPES:
                misses = r.tally.nils
                hits = r.count - misses
            else:
                misses = int(r.null)
                hits = 1 - misses
        if q.name == "EXEC" and r.type == ord("*"):
            batch = r.count
        rows = hits if q.name in CACHE_READS else 0
    return DbRecord(
        system="redis",
        operation=q.name,
        request_bytes=req.size,
        response_bytes=resp.size if resp else 0,
        start_ns=req.ts_ns,
        latency_ns=resp.ts_ns - req.ts_ns if resp else 0,
        query_summary=q.name,
        status_code=status,
        error_type=status,
        returned_rows=rows,
        cache_hits=hits,
        cache_misses=misses,
        batch_size=batch,
    )


def stitch(requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
    """FIFO pairing guarded by timestamps, as HTTP/1 pipelining (base.fifo_pair)."""
    out = Stitched()
    while requests and responses:
        pair = fifo_pair(requests, responses, out)
        if pair is None:
            continue
        out.records.append(_record(*pair))
    return out


class Redis:
    """Redis as a registered ``Protocol``."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return "redis"

    @property
    def datagram(self) -> bool:
        return False

    @property
    def default_timeout_ns(self) -> int:
        return 30 * 10**9

    def find_frame_boundary(self, buf: Buffer, start: int, kind: MessageKind) -> int:
        return find_frame_boundary(buf, start, kind)

    def parse_request(self, buf: Buffer) -> ParseResult:
        return parse_request(buf)

    def parse_response(self, buf: Buffer, request_hint: Any | None) -> ParseResult:
        return parse_response(buf, request_hint)

    def body_reader(self, frame: Any) -> RespReader | None:
        return body_reader(frame)

    def cut_head(self, buf: Buffer, kind: MessageKind, request_hint: Any | None) -> ParseResult | None:
        return cut_reply(buf) if kind is MessageKind.RESPONSE else None

    def stitch(self, requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
        return stitch(requests, responses)

    def timeout_record(self, request: Message[Any], now_ns: int) -> Any | None:
        return None  # an unanswered command is counted (expired_requests), not reported
