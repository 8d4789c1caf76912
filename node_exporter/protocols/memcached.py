"""Memcached text protocol and meta commands (memcached's doc/protocol.txt).

Only the command word is kept: keys, flags, values and CAS tokens are skipped (a storage command's
data block and a retrieval reply's values are streamed past by their declared length). A retrieval
reply's VALUE items are counted: keys asked for minus values returned are the misses.

Replies pair with commands in order. ``noreply`` commands get none: each makes a record at once. Meta
commands with the ``q`` flag get a reply only when it is not the one quiet mode suppresses (``EN`` for
mg, ``HD`` for ms/md/ma, also ``NF`` for md); ``mn`` marks the end of such a batch. A quiet command
whose reply is seen to have been suppressed (the next reply is one it cannot have, or ``MN``) makes a
record without a response (a miss for mg). Limit: a quiet mg miss followed by a quiet mg hit without
opaque tokens pairs the value with the first; with ``O`` tokens on both sides they pair by token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from node_exporter.protocols.base import (
    Buffer,
    LengthReader,
    Message,
    MessageKind,
    ParseResult,
    ParseState,
    Stitched,
    fifo_pair,
)
from node_exporter.protocols.db import DbRecord

MAX_LINE: Final = 2048  # a command line: 250-byte key (protocol.txt), flags; beyond that it is not memcached
MAX_VALUE: Final = 1 << 30  # item size bound (memcached -I max is 1 GiB)

STORAGE: Final = frozenset({"set", "add", "replace", "append", "prepend", "cas"})
RETRIEVAL: Final = frozenset({"get", "gets", "gat", "gats"})
_KEYED: Final = frozenset({"delete", "incr", "decr", "touch"})
_ADMIN: Final = frozenset({"flush_all", "version", "stats", "verbosity", "cache_memlimit", "shutdown", "mn", "me"})
META: Final = frozenset({"mg", "ms", "md", "ma", "mn", "me"})
COMMANDS: Final = STORAGE | RETRIEVAL | _KEYED | _ADMIN | META | {"quit"}
# Reply keywords (and a bare number: incr/decr's new value).
_REPLIES: Final = frozenset(
    {"VALUE", "END", "STORED", "NOT_STORED", "EXISTS", "NOT_FOUND", "DELETED", "TOUCHED", "OK", "ERROR",
     "CLIENT_ERROR", "SERVER_ERROR", "VERSION", "STAT", "RESET", "VA", "HD", "EN", "NF", "NS", "EX", "MN", "ME"}
)  # fmt: skip
ERRORS: Final = frozenset({"ERROR", "CLIENT_ERROR", "SERVER_ERROR"})
OUTCOMES: Final = frozenset({"NOT_STORED", "EXISTS", "NOT_FOUND", "NS", "EX", "NF"})  # not errors, but not success
# What quiet mode (q flag) suppresses, per meta command.
QUIET_SUPPRESSED: Final = {"mg": frozenset({"EN"}), "ms": frozenset({"HD"}), "md": frozenset({"HD", "NF"}),
                           "ma": frozenset({"HD"})}  # fmt: skip
_NUMBER: Final = "NUMBER"


@dataclass(frozen=True, slots=True)
class McCommand:
    name: str  # as on the wire: "get", "set", "mg" ...
    keys: int  # keys a retrieval asks for (1 for mg)
    noreply: bool  # classic noreply, or quit: no reply will come
    quiet: bool  # meta q flag: the usual reply is suppressed
    opaque: str  # meta O flag token (client-chosen, not a key), "" if none
    data: int  # bytes of the data block that follows (storage), including its CRLF; 0 if none


@dataclass(slots=True)
class Tally:
    values: int = 0  # VALUE items a retrieval reply held


@dataclass(frozen=True, slots=True)
class McReply:
    word: str  # reply keyword ("VALUE", "END", "HD", "EN" ...) or NUMBER
    opaque: str
    data: int  # VA data block length + CRLF
    tally: Tally = field(default_factory=Tally, compare=False)


def _line(buf: Buffer, pos: int = 0) -> tuple[int, list[bytes]] | ParseState:
    eol = buf.find(b"\r\n", pos, pos + MAX_LINE)
    if eol < 0:
        return ParseState.NEEDS_MORE_DATA if len(buf) - pos < MAX_LINE else ParseState.INVALID
    return eol + 2, bytes(buf[pos:eol]).split(b" ")


def _num(raw: bytes, limit: int = MAX_VALUE) -> int | None:
    if not raw.isdigit() or len(raw) > 20:
        return None
    n = int(raw)
    return n if n <= limit else None


def _meta_flags(tokens: list[bytes]) -> tuple[bool, str]:
    quiet, opaque = False, ""
    for t in tokens:
        if t == b"q":
            quiet = True
        elif t[:1] == b"O" and len(t) <= 33:
            opaque = t[1:].decode("ascii", "replace")
    return quiet, opaque


def parse_request(buf: Buffer) -> ParseResult:
    line = _line(buf)
    if isinstance(line, ParseState):
        return ParseResult(line, 0, None)
    end, tokens = line
    word = tokens[0].decode("ascii", "replace")
    if word not in COMMANDS:
        return ParseResult(ParseState.INVALID, 0, None)
    args = tokens[1:]
    noreply = bool(args) and args[-1] == b"noreply"
    quiet, opaque, data, keys = False, "", 0, 0
    if word in STORAGE:
        need = 5 if word == "cas" else 4
        size = _num(args[3]) if len(args) >= need else None
        if size is None:
            return ParseResult(ParseState.INVALID, 0, None)
        data = size + 2
    elif word in RETRIEVAL:
        keys = len(args) - (1 if word in ("gat", "gats") else 0)
        if keys < 1:
            return ParseResult(ParseState.INVALID, 0, None)
    elif word in META and word != "mn":
        if not args:
            return ParseResult(ParseState.INVALID, 0, None)
        quiet, opaque = _meta_flags(args[1:])
        keys = 1 if word == "mg" else 0
        if word == "ms":
            size = _num(args[1]) if len(args) >= 2 else None
            if size is None:
                return ParseResult(ParseState.INVALID, 0, None)
            data = size + 2
    elif word in _KEYED and not args:
        return ParseResult(ParseState.INVALID, 0, None)
    cmd = McCommand(word, keys, noreply or word == "quit", quiet, opaque, data)
    return ParseResult(ParseState.SUCCESS, end, cmd)


def parse_response(buf: Buffer, request_hint: Any | None) -> ParseResult:
    line = _line(buf)
    if isinstance(line, ParseState):
        return ParseResult(line, 0, None)
    end, tokens = line
    word = tokens[0].decode("ascii", "replace")
    if word.isdigit() and len(word) <= 20:
        word = _NUMBER
    elif word not in _REPLIES:
        return ParseResult(ParseState.INVALID, 0, None)
    _, opaque = _meta_flags(tokens[1:])
    data = 0
    if word == "VA":
        size = _num(tokens[1]) if len(tokens) >= 2 else None
        if size is None:
            return ParseResult(ParseState.INVALID, 0, None)
        data = size + 2
    elif word == "VALUE":
        size = _num(tokens[3]) if len(tokens) >= 4 else None
        if size is None:
            return ParseResult(ParseState.INVALID, 0, None)
        data = size + 2
    reply = McReply(word, opaque, data)
    if word == "VALUE":
        reply.tally.values = 1
    return ParseResult(ParseState.SUCCESS, end, reply)


def cut_reply(buf: Buffer) -> ParseResult | None:
    """An error line the capture bound cut before its CRLF (a SERVER_ERROR or CLIENT_ERROR whose message
    runs past the capture, as a proxy's may): the reply is that line, its keyword at its start. Any other
    reply (a VALUE/VA head, whose data block needs its length; a line end already captured): None."""
    space = buf.find(b" ", 0, 16)
    if space < 0 or b"\r\n" in buf:  # only an error with a message can be long enough to be cut
        return None
    word = bytes(buf[:space]).decode("ascii", "replace")
    return ParseResult(ParseState.SUCCESS, len(buf), McReply(word, "", 0)) if word in ERRORS else None


class ItemsReader:
    """The rest of a multi-line reply: VALUE items (each a data block) or STAT lines, up to END."""

    __slots__ = ("data", "tally")

    def __init__(self, data: int, tally: Tally) -> None:
        self.data = data  # bytes left of the current data block
        self.tally = tally

    def read(self, buf: Buffer) -> tuple[ParseState, int]:
        pos = 0
        while True:
            if self.data:
                take = min(self.data, len(buf) - pos)
                self.data -= take
                pos += take
                if self.data:
                    return ParseState.NEEDS_MORE_DATA, pos
            line = _line(buf, pos)
            if line is ParseState.NEEDS_MORE_DATA:
                return ParseState.NEEDS_MORE_DATA, pos
            if isinstance(line, ParseState):
                return ParseState.INVALID, pos
            end, tokens = line
            if tokens[0] == b"END":
                return ParseState.SUCCESS, end
            if tokens[0] == b"VALUE":
                size = _num(tokens[3]) if len(tokens) >= 4 else None
                if size is None:
                    return ParseState.INVALID, pos
                self.tally.values += 1
                self.data = size + 2
            elif tokens[0] != b"STAT":
                return ParseState.INVALID, pos
            pos = end

    def skip_gap(self, nbytes: int | None) -> bool:
        if nbytes is None or nbytes > self.data:
            return False
        self.data -= nbytes
        return True

    def ends_at_close(self) -> bool:
        return False


def body_reader(frame: Any) -> LengthReader | ItemsReader | None:
    if isinstance(frame, McCommand):
        return LengthReader(frame.data) if frame.data else None
    r: McReply = frame
    if r.word in ("VALUE", "STAT"):
        return ItemsReader(r.data, r.tally)
    return LengthReader(r.data) if r.data else None


def find_frame_boundary(buf: Buffer, start: int, kind: MessageKind) -> int:
    """The next line start (after CRLF) whose first word is a command (requests) or reply keyword."""
    words = COMMANDS if kind is MessageKind.REQUEST else _REPLIES
    pos = start
    while pos < len(buf):
        if pos == 0 or buf[pos - 2 : pos] == b"\r\n":
            ends = [i for i in (buf.find(b" ", pos, pos + 16), buf.find(b"\r", pos, pos + 16)) if i >= 0]
            if not ends and len(buf) - pos < 16:
                return pos  # too short to judge: may be the start of a line still arriving
            word = bytes(buf[pos : min(ends)]).decode("ascii", "replace") if ends else ""
            if word in words or (kind is MessageKind.RESPONSE and word.isdigit()):
                return pos
        pos = _next_line(buf, pos)
    return len(buf)


def _next_line(buf: Buffer, pos: int) -> int:
    idx = buf.find(b"\r\n", pos)
    return len(buf) if idx < 0 else idx + 2


def _record(req: Message[Any], resp: Message[Any] | None) -> DbRecord:
    q: McCommand = req.frame
    hits = misses = 0
    status = error = ""
    if resp is None:
        misses = int(q.name == "mg" and q.quiet)  # the suppressed reply was EN
    else:
        r: McReply = resp.frame
        if r.word in ERRORS:
            status = error = r.word
        elif r.word in OUTCOMES:
            status = r.word
        if q.name in RETRIEVAL and not error:
            hits = r.tally.values
            misses = max(q.keys - hits, 0)
        elif q.name == "mg" and not error:
            hits = int(r.word in ("VA", "HD"))
            misses = int(r.word == "EN")
    return DbRecord(
        system="memcached",
        operation=q.name,
        request_bytes=req.size,
        response_bytes=resp.size if resp else 0,
        start_ns=req.ts_ns,
        latency_ns=resp.ts_ns - req.ts_ns if resp else 0,
        query_summary=q.name,
        status_code=status,
        error_type=error,
        returned_rows=hits,
        cache_hits=hits,
        cache_misses=misses,
    )


def _silenced(q: McCommand, r: McReply) -> bool:
    """True if a quiet command cannot be the one this reply answers (so its own reply was suppressed)."""
    if not q.quiet:
        return False
    if r.word == "MN" or r.word in QUIET_SUPPRESSED.get(q.name, ()):
        return True
    return bool(q.opaque and r.opaque and q.opaque != r.opaque)


def stitch(requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
    """In order (base.fifo_pair), plus: noreply commands are records at once, quiet ones when skipped."""
    out = Stitched()
    while requests:
        req = requests[0]
        if req.frame.noreply:
            requests.popleft()
            if req.frame.name != "quit":
                out.records.append(_record(req, None))
            continue
        if not responses:
            break
        pair = fifo_pair(requests, responses, out)
        if pair is None:
            continue
        req, resp = pair
        if _silenced(req.frame, resp.frame):
            responses.appendleft(resp)  # it answers a later command
            out.records.append(_record(req, None))
            continue
        out.records.append(_record(req, resp))
    return out


class Memcached:
    """Memcached as a registered ``Protocol``."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return "memcached"

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

    def body_reader(self, frame: Any) -> LengthReader | ItemsReader | None:
        return body_reader(frame)

    def cut_head(self, buf: Buffer, kind: MessageKind, request_hint: Any | None) -> ParseResult | None:
        return cut_reply(buf) if kind is MessageKind.RESPONSE else None

    def stitch(self, requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
        return stitch(requests, responses)

    def timeout_record(self, request: Message[Any], now_ns: int) -> Any | None:
        return None  # an unanswered command is counted (expired_requests), not reported
