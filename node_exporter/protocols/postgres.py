"""PostgreSQL frontend/backend protocol 3.0 (PostgreSQL docs, "Frontend/Backend Protocol").

Every message after startup is a type byte and a big-endian int32 length that counts itself; the
startup messages (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) have no type byte.
One record per operation: a simple Query, or an extended-protocol batch up to its Sync (Parse,
Bind, Describe, Execute ... Sync), named by the statement text of the Parse in it or, for a
prepared statement, of the Parse that named it earlier on the connection (remembered sanitized,
bounded). The response runs to ReadyForQuery: its CommandComplete tag, the SQLSTATE of an
ErrorResponse (never its message: it may quote values), and the rows (DataRow / COPY) counted.
A COPY is one operation: the Query, the client's CopyData and the server's answer to CopyDone.
After an SSLRequest answered ``S`` the socket carries TLS (its plaintext comes from the OpenSSL
probes as another connection); ``N`` means cleartext goes on.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from node_exporter.protocols.base import (
    NO_BODY,
    BodyKind,
    BodyReader,
    Buffer,
    Framing,
    Message,
    MessageKind,
    ParseResult,
    ParseState,
    Stitched,
    generic_reader,
)
from node_exporter.protocols.sql import EMPTY, SqlSummary, sanitize
from node_exporter.protocols.sqlbase import (
    END,
    MAX_HEAD,
    MIN_PREFIX,
    Acc,
    CutResponses,
    SqlRequest,
    SqlResponse,
    StatementCache,
    stitch,
)

SYSTEM: Final = "postgresql"
PROTOCOL_3_0: Final = 196608  # StartupMessage version 3.0 (3 << 16)
SSL_REQUEST: Final = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST: Final = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST: Final = 80877102  # 1234 << 16 | 5678
MAX_NAMESPACE: Final = 63  # NAMEDATALEN - 1: the longest database name the server accepts
MAX_MESSAGE: Final = 1 << 30  # the server's own limit on a message (PQ_LARGE_MESSAGE_LIMIT)
FRONTEND: Final = frozenset(b"BCdcfDEHFPpQSX")
_EXTENDED: Final = frozenset(b"PBDECHS")  # the messages of an extended-protocol batch, Sync last
BACKEND: Final = frozenset(b"RK23CdcGHWDIEVvnNAtS1sZT")
_ASYNC: Final = frozenset(b"NAS")  # notices, notifications, parameter changes: may come at any time
_STARTUP_REPLY: Final = frozenset(b"RK")  # authentication and key data: only before the first ReadyForQuery
_INT = struct.Struct("!I")


def _cstring(buf: Buffer, pos: int, end: int) -> tuple[bytes, int] | None:
    nul = buf.find(b"\x00", pos, end)
    return None if nul < 0 else (bytes(buf[pos:nul]), nul + 1)


def _head(buf: Buffer) -> tuple[int, int] | None:
    """(type, length) of the typed message at buf[0], None if fewer than 5 bytes."""
    if len(buf) < 5:
        return None
    return buf[0], _INT.unpack_from(buf, 1)[0]


def _skip(consumed: int, total: int) -> Framing:
    rest = total - consumed
    return Framing(BodyKind.LENGTH, rest) if rest > 0 else NO_BODY


def _statement(buf: Buffer, pos: int, total: int) -> tuple[SqlSummary, int] | None:
    """The statement text starting at ``pos`` of a message of ``total`` bytes, sanitized: None if more
    bytes are needed, else (summary, bytes of the message consumed as its head)."""
    have = min(len(buf), total)
    if have < total and have - pos < MIN_PREFIX:
        return None
    end = min(have, pos + MAX_HEAD)
    nul = buf.find(b"\x00", pos, end)
    text = bytes(buf[pos : nul if nul >= 0 else end]).decode("utf-8", "replace")
    return sanitize(text, SYSTEM), end


def _database(buf: Buffer, end: int) -> str:
    """The StartupMessage's "database" parameter (db.namespace), "" if absent or implausible."""
    pos = 8
    while pos < end and buf[pos] != 0:
        key = _cstring(buf, pos, end)
        value = _cstring(buf, key[1], end) if key is not None else None
        if key is None or value is None:
            return ""
        if key[0] == b"database":
            name = value[0].decode("utf-8", "replace")
            return name if 0 < len(name) <= MAX_NAMESPACE else ""
        pos = value[1]
    return ""


def find_frame_boundary(buf: Buffer, start: int, kind: MessageKind) -> int:
    """Next offset with a known type byte and a plausible length (< 16 MiB: its first byte 0)."""
    types = FRONTEND if kind is MessageKind.REQUEST else BACKEND
    for i in range(start, len(buf)):
        if buf[i] not in types:
            continue
        if len(buf) - i < 5:
            return i
        if buf[i + 1] == 0 and _INT.unpack_from(buf, i + 1)[0] >= 4:
            return i
    return len(buf)


class Postgres:
    """The registered instance is a template; ``for_connection`` gives each connection its own state."""

    name: Final = SYSTEM
    datagram: Final = False
    default_timeout_ns: Final = 300 * 10**9  # analytics and COPY legitimately run for minutes

    def __init__(self) -> None:
        self.statements: StatementCache[bytes] = StatementCache()
        self.namespace = ""  # db.namespace: the database the StartupMessage named
        self._batch_summary = EMPTY  # the statement of the extended-protocol batch being read
        self._batch_bytes = 0
        self._batch_executes = 0
        self._startup = False  # a StartupMessage went out; its replies run to the first ReadyForQuery
        self._ssl_asked = False  # an SSLRequest/GSSENCRequest waits for its one-byte answer
        self._acc: Acc | None = None  # the response being read
        self._rest = 0  # bytes of the message just parsed that follow its head (skipped, never buffered)
        self.cut = CutResponses()

    def for_connection(self) -> Postgres:
        return Postgres()

    def state_counters(self) -> dict[str, int]:
        return {"state_evictions": self.statements.evictions, "state_misses": self.statements.misses,
                "cut_responses": self.cut.counted}  # fmt: skip

    def lost_bytes(self, kind: MessageKind) -> None:
        """The tracker dropped bytes of a direction: a response in progress lost its end."""
        if kind is MessageKind.RESPONSE:
            self.cut.lose(self._acc)
            self._acc = None
        else:
            self._batch_summary, self._batch_bytes, self._batch_executes = EMPTY, 0, 0

    # -- runs of messages -----------------------------------------------------------------
    # A pgbench SELECT is one Query and four backend messages (extended: five and three). Parsed one
    # per tracker round they cost ~10 us each in the tracker's loop; the messages after the first that
    # belong to the same operation and are whole in the buffer are parsed here in the same call.

    def parse_request(self, buf: Buffer) -> ParseResult:
        first = self._request_one(buf)
        if first.state is not ParseState.IGNORED or first.frame is not END or first.consumed + self._rest > len(buf):
            return first
        return self._run(buf, first, self._request_one, _EXTENDED)

    def parse_response(self, buf: Buffer, request_hint: Any | None) -> ParseResult:
        first = self._response_one(buf)
        if first.state not in (ParseState.SUCCESS, ParseState.IGNORED) or first.consumed + self._rest > len(buf):
            return first
        if self._acc is None:
            return first
        return self._run(buf, first, self._response_one, BACKEND)

    def _run(
        self, buf: Buffer, first: ParseResult, one: Callable[[Buffer], ParseResult], types: frozenset[int]
    ) -> ParseResult:
        """Whole messages after ``first`` parsed in place while they continue its operation; stops at
        the one that ends it (returned as the run's outcome unless the run began the operation)."""
        pos, state, frame = first.consumed + self._rest, first.state, first.frame  # the first one whole
        self._rest = 0
        while pos + 5 <= len(buf) and buf[pos] in types:
            total = 1 + _INT.unpack_from(buf, pos + 1)[0]
            if total < 5 or pos + total > len(buf):
                break
            r = one(bytes(buf[pos : pos + total]))
            if r.state not in (ParseState.SUCCESS, ParseState.IGNORED):
                break
            pos += total
            self._rest = 0
            if r.state is ParseState.SUCCESS:
                if state is not ParseState.SUCCESS:
                    state, frame = r.state, r.frame
                break
            if self._acc is None and types is BACKEND:
                break
        return ParseResult(state, pos, frame)

    # -- frontend -------------------------------------------------------------------------

    def find_frame_boundary(self, buf: Buffer, start: int, kind: MessageKind) -> int:
        if kind is MessageKind.RESPONSE and self.cut.lost is not None:
            return len(buf)  # the rest of a cut response: skipped up to the client's next request
        return find_frame_boundary(buf, start, kind)

    def _request_one(self, buf: Buffer) -> ParseResult:
        if len(buf) < 8 and (not buf or buf[0] == 0):
            return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
        if buf[0] == 0:
            return self._startup_message(buf)
        head = _head(buf)
        if head is None:
            return ParseResult(ParseState.NEEDS_MORE_DATA if buf[0] in FRONTEND else ParseState.INVALID, 0, None)
        typ, length = head
        if typ not in FRONTEND or not 4 <= length <= MAX_MESSAGE:
            return ParseResult(ParseState.INVALID, 0, None)
        total = 1 + length
        if typ == ord("Q"):
            got = _statement(buf, 5, total)
            if got is None:
                return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
            summary, at = got
            self.cut.request_seen()
            return self._ok(ParseState.SUCCESS, at, total, SqlRequest(summary, total, bool(summary.text)))
        if typ == ord("S"):
            frame = SqlRequest(
                self._batch_summary, self._batch_bytes + total, self._batch_executes > 0, self._batch_executes
            )
            self._batch_summary, self._batch_bytes, self._batch_executes = EMPTY, 0, 0
            self.cut.request_seen()
            return self._ok(ParseState.SUCCESS, 5, total, frame)
        used: int | None = 5
        if typ == ord("P"):
            used = self._parse_message(buf, total)
        elif typ == ord("B"):
            used = self._bind(buf, total)
        if used is None:
            return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
        if typ == ord("C") and len(buf) >= 7 and buf[5] == ord("S"):
            name = _cstring(buf, 6, min(len(buf), total))
            if name is None:
                return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None) if len(buf) < total else self._bad()
            self.statements.pop(name[0])
            used = name[1]
        elif typ == ord("E"):
            self._batch_executes += 1
        self._batch_bytes += total
        # Bind, Describe, Execute, Close, Flush, CopyData/Done/Fail, password, Terminate: part of an
        # operation already counted or none
        return self._ok(ParseState.IGNORED, used, total, END)

    @staticmethod
    def _bad() -> ParseResult:
        return ParseResult(ParseState.INVALID, 0, None)

    def _ok(self, state: ParseState, used: int, total: int, frame: object) -> ParseResult:
        # body_reader() runs right after this parse returns: the rest of the message is skipped by length
        self._rest = total - used
        return ParseResult(state, used, frame)

    def _parse_message(self, buf: Buffer, total: int) -> int | None:
        """Parse: statement name, then its text. Remembered by name (the unnamed one too: "")."""
        name = _cstring(buf, 5, min(len(buf), total, 5 + 1024))
        if name is None:
            return None if len(buf) < min(total, 5 + 1024) else 5  # an absurd name: skip the message
        got = _statement(buf, name[1], total)
        if got is None:
            return None
        summary, used = got
        self.statements.put(name[0], summary)
        if self._batch_summary.empty:
            self._batch_summary = summary
        return used

    def _bind(self, buf: Buffer, total: int) -> int | None:
        end = min(len(buf), total)
        portal = _cstring(buf, 5, end)
        stmt = _cstring(buf, portal[1], end) if portal is not None else None
        if stmt is None:
            return None if len(buf) < total else 5
        if self._batch_summary.empty:
            self._batch_summary = self.statements.get(stmt[0])
        return stmt[1]

    def _startup_message(self, buf: Buffer) -> ParseResult:
        length, code = struct.unpack_from("!II", buf, 0)
        if code in (SSL_REQUEST, GSSENC_REQUEST) and length == 8:
            self._ssl_asked = True
        elif code == CANCEL_REQUEST and length == 16:
            pass
        elif code == PROTOCOL_3_0 and 8 < length <= 10000:
            if len(buf) < length:
                return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
            self._startup = True
            self.namespace = _database(buf, length) or self.namespace
            return self._ok(ParseState.IGNORED, length, length, END)
        else:
            return self._bad()
        return self._ok(ParseState.IGNORED, 8, length, END)

    # -- backend --------------------------------------------------------------------------

    def cut_head(self, buf: Buffer, kind: MessageKind, request_hint: Any | None) -> ParseResult | None:
        """An ErrorResponse or CommandComplete the capture bound cut (a long error message): read from
        what was captured (SQLSTATE and tag come first), its rest skipped by length."""
        head = _head(buf) if kind is MessageKind.RESPONSE and not self._startup else None
        if head is None or head[0] not in (ord("E"), ord("C")) or len(buf) >= 1 + head[1]:
            return None
        result = self._response_one(buf, cut=True)
        return result if result.state in (ParseState.SUCCESS, ParseState.IGNORED) else None

    def _response_one(self, buf: Buffer, cut: bool = False) -> ParseResult:
        if not buf:
            return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
        if self._ssl_asked and buf[0] in b"SNG":
            # the one-byte answer to SSLRequest/GSSENCRequest: S/G, encryption follows; N, it does not
            self._ssl_asked = False
            state = ParseState.IGNORED if buf[0] == ord("N") else ParseState.EOS
            return self._ok(state, 1, 1, END)
        head = _head(buf)
        if head is None:
            return ParseResult(ParseState.NEEDS_MORE_DATA if buf[0] in BACKEND else ParseState.INVALID, 0, None)
        typ, length = head
        if typ not in BACKEND or not 4 <= length <= MAX_MESSAGE:
            return self._bad()
        total = 1 + length
        if typ in _STARTUP_REPLY or (typ in _ASYNC and self._acc is None) or self._startup:
            if typ == ord("Z"):
                self._startup = False
            return self._ok(ParseState.IGNORED, 5, total, END)
        used = 5
        if typ == ord("E") or typ == ord("C"):
            if len(buf) < total and len(buf) < 5 + 1024 and not cut:
                return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
            used = min(len(buf), total)
        first = self._acc is None
        acc = self._acc if self._acc is not None else Acc()
        acc.bytes += total
        if typ == ord("D"):
            acc.rows += 1
        elif typ == ord("E"):
            self._error(acc, buf, used)
        elif typ == ord("C"):
            self._complete(acc, buf, used)
        if typ == ord("Z"):
            acc.done = True
            self._acc = None
            if self._startup:
                self._startup = False
        else:
            self._acc = acc
        if first:
            return self._ok(ParseState.SUCCESS, used, total, SqlResponse(acc))
        return self._ok(ParseState.SUCCESS if typ == ord("Z") else ParseState.IGNORED, used, total, END)

    @staticmethod
    def _error(acc: Acc, buf: Buffer, end: int) -> None:
        """ErrorResponse: (code byte, cstring)* 0. Only field C (SQLSTATE) is read."""
        pos = 5
        while pos < end and buf[pos] != 0:
            field = buf[pos]
            value = _cstring(buf, pos + 1, end)
            if value is None:
                return
            if field == ord("C") and not acc.status_code and len(value[0]) == 5 and value[0].isalnum():
                acc.status_code = acc.error_type = value[0].decode("ascii")
            pos = value[1]

    @staticmethod
    def _complete(acc: Acc, buf: Buffer, end: int) -> None:
        """CommandComplete: the tag ("SELECT 5", "INSERT 0 1", "COPY 3", "CREATE TABLE")."""
        tag = _cstring(buf, 5, end)
        if tag is None:
            return
        words = tag[0].split(b" ", 2)
        if not acc.operation and words[0].isalpha() and len(words[0]) <= 32:
            acc.operation = words[0].decode("ascii").upper()
        if words[0] == b"COPY" and len(words) == 2 and words[1].isdigit() and not acc.rows:
            acc.rows = int(words[1])  # COPY FROM: rows loaded (COPY TO sent them as CopyData)

    def body_reader(self, frame: Any) -> BodyReader | None:
        return generic_reader(_skip(0, self._rest))

    def stitch(self, requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
        return stitch(SYSTEM, requests, responses, self.namespace)

    def timeout_record(self, request: Message[Any], now_ns: int) -> Any | None:
        return None  # counted (expired_requests), not reported: a slow query is not a failed one
