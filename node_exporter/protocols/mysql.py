"""MySQL/MariaDB client/server protocol (MariaDB and MySQL "Client/Server Protocol" docs).

Every packet is a 3-byte little-endian payload length and a sequence number; a command starts at
sequence 0 and its response at 1. Commands: COM_QUERY, COM_STMT_PREPARE/EXECUTE (the statement's
text remembered by its id, sanitized, bounded), the administrative ones by name. A response is
OK, ERR (error number and SQLSTATE; never its message, which may quote values), or a result set:
column count, column definitions, [EOF], rows (counted, their bytes skipped by length), EOF/OK.
Whether the intermediate EOF exists (CLIENT_DEPRECATE_EOF) is read from the handshake when we saw
it; on a connection older than us, a response that ends where we did not expect it is found by
its successor's sequence number 1. After an SSL request the socket carries TLS.
"""

from __future__ import annotations

import enum
from collections import deque
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
from node_exporter.protocols.sql import SqlSummary, sanitize
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

COM_QUIT: Final = 0x01
COM_INIT_DB: Final = 0x02
COM_QUERY: Final = 0x03
COM_FIELD_LIST: Final = 0x04
COM_STATISTICS: Final = 0x09
COM_PING: Final = 0x0E
COM_CHANGE_USER: Final = 0x11
COM_STMT_PREPARE: Final = 0x16
COM_STMT_EXECUTE: Final = 0x17
COM_STMT_SEND_LONG_DATA: Final = 0x18
COM_STMT_CLOSE: Final = 0x19
COM_STMT_RESET: Final = 0x1A
COM_SET_OPTION: Final = 0x1B
COM_STMT_FETCH: Final = 0x1C
COM_RESET_CONNECTION: Final = 0x1F
# commands answered by OK/ERR (or a result set), named as db.operation.name
COMMANDS: Final = {
    COM_INIT_DB: "USE", COM_FIELD_LIST: "FIELD_LIST", 0x05: "CREATE_DB", 0x06: "DROP_DB", 0x07: "REFRESH",
    0x08: "SHUTDOWN", COM_STATISTICS: "STATISTICS", 0x0A: "PROCESS_INFO", 0x0C: "PROCESS_KILL", 0x0D: "DEBUG",
    COM_PING: "PING", COM_STMT_RESET: "STMT_RESET", COM_SET_OPTION: "SET_OPTION", COM_STMT_FETCH: "STMT_FETCH",
    COM_RESET_CONNECTION: "RESET_CONNECTION",
}  # fmt: skip
NO_RESPONSE: Final = frozenset({COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE})
CLIENT_SSL: Final = 0x0800
CLIENT_DEPRECATE_EOF: Final = 0x01000000
SERVER_MORE_RESULTS_EXISTS: Final = 0x0008
OK, EOF, ERR, LOCAL_INFILE = 0x00, 0xFE, 0xFF, 0xFB
MAX_PAYLOAD: Final = 0xFFFFFF
MAX_NAMESPACE: Final = 64  # the longest database name MySQL and MariaDB accept
_PEEK: Final = 32  # payload bytes a response packet is classified by (ERR: 9, OK: at most 1+9+9+4)


class _Phase(enum.Enum):
    IDLE = 0  # between responses: the next packet (sequence 1) starts one
    AUTH = 1  # handshake and authentication: nothing recorded until its OK/ERR
    COLS = 2  # column definitions to go (self._left)
    COL_EOF = 3  # after the definitions: an EOF (classic) or the first row (CLIENT_DEPRECATE_EOF)
    ROWS = 4  # rows until EOF/OK (0xFE) or ERR
    MORE = 5  # SERVER_MORE_RESULTS_EXISTS: another result (OK, ERR or a column count) follows
    SKIP = 6  # a prepare's parameter and column definitions (self._blocks), answered already


def _lenenc(buf: Buffer, pos: int, end: int) -> tuple[int, int] | None:
    if pos >= end:
        return None
    b = buf[pos]
    if b < 0xFB:
        return b, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(b)
    if size is None or pos + 1 + size > end:
        return None
    return int.from_bytes(buf[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


def _header(buf: Buffer) -> tuple[int, int] | None:
    if len(buf) < 4:
        return None
    return buf[0] | buf[1] << 8 | buf[2] << 16, buf[3]


def find_frame_boundary(buf: Buffer, start: int, kind: MessageKind) -> int:
    """Next offset whose header starts a command (sequence 0, known command) or a response (sequence 1)."""
    for i in range(start, len(buf)):
        if len(buf) - i < 5:
            return i
        plen, seq = _header(buf[i : i + 4]) or (0, 0)
        if plen == 0:
            continue
        if kind is MessageKind.REQUEST and seq == 0 and (buf[i + 4] in COMMANDS or buf[i + 4] in _TEXT_COMMANDS):
            return i
        if kind is MessageKind.RESPONSE and seq == 1:
            return i
    return len(buf)


_TEXT_COMMANDS: Final = frozenset({COM_QUERY, COM_STMT_PREPARE, COM_STMT_EXECUTE})
_KNOWN: Final = frozenset(COMMANDS) | _TEXT_COMMANDS | NO_RESPONSE | {COM_CHANGE_USER}


class MySql:
    """The registered instance is a template; ``for_connection`` gives each connection its own state."""

    name: Final = "mysql"
    datagram: Final = False
    default_timeout_ns: Final = 300 * 10**9

    def __init__(self) -> None:
        self.system = "mysql"  # "mariadb" once a greeting said so
        self.statements: StatementCache[int] = StatementCache()
        self.namespace = ""  # db.namespace: the database COM_INIT_DB selected
        self._deprecate_eof: bool | None = None  # from the handshake, None if we did not see it
        self._phase = _Phase.IDLE
        self._acc: Acc | None = None  # the response being read (not done)
        self._left = 0
        self._blocks: list[int] = []
        self._seq = 0  # sequence number the next packet of this response should carry
        self._commands = False  # a command was seen: from then on the client sends nothing else at sequence > 0
        self._infile = False  # the server asked for a LOAD DATA LOCAL file: the client's packets follow
        self._rest = 0  # payload bytes after the parsed head of the last packet (skipped by length)
        self.cut = CutResponses()

    def for_connection(self) -> MySql:
        return MySql()

    def state_counters(self) -> dict[str, int]:
        return {"state_evictions": self.statements.evictions, "state_misses": self.statements.misses,
                "cut_responses": self.cut.counted}  # fmt: skip

    def lost_bytes(self, kind: MessageKind) -> None:
        """The tracker dropped bytes of a direction: a response in progress lost its end."""
        if kind is MessageKind.RESPONSE:
            self.cut.lose(self._acc)
            self._acc = None
            if self._phase is not _Phase.AUTH:
                self._phase = _Phase.IDLE

    def find_frame_boundary(self, buf: Buffer, start: int, kind: MessageKind) -> int:
        if kind is MessageKind.RESPONSE and self.cut.lost is not None:
            return len(buf)  # the rest of a cut response: skipped up to the client's next request
        return find_frame_boundary(buf, start, kind)

    def _ok(self, state: ParseState, used: int, total: int, frame: object) -> ParseResult:
        self._rest = total - used
        return ParseResult(state, used, frame)

    # -- client -> server -----------------------------------------------------------------

    def parse_request(self, buf: Buffer) -> ParseResult:
        head = _header(buf)
        if head is None or len(buf) < 5:
            return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
        plen, seq = head
        total = 4 + plen
        if self._infile and seq != 0:
            self._infile = plen > 0  # LOAD DATA LOCAL: the file's packets, an empty one ends it
            return self._ok(ParseState.IGNORED, 4, total, END)
        if plen == 0:
            return ParseResult(ParseState.INVALID, 0, None)
        if seq != 0:
            if self._phase is not _Phase.AUTH and self._commands:
                return ParseResult(ParseState.INVALID, 0, None)  # not a command: another protocol, or garbage
            return self._handshake_response(buf, plen, seq, total)
        cmd = buf[4]
        if cmd not in _KNOWN:
            return ParseResult(ParseState.INVALID, 0, None)
        # before the first command we may have joined mid-handshake (TLS plaintext starts there)
        self._commands = True
        if cmd in (COM_QUERY, COM_STMT_PREPARE):
            have = min(len(buf), total)
            if have < total and have - 5 < MIN_PREFIX:
                return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
            end = min(have, 5 + MAX_HEAD)
            summary = sanitize(bytes(buf[5:end]).decode("utf-8", "replace"), "mysql")
            frame = SqlRequest(summary, total, cmd == COM_QUERY, command=cmd)
            self.cut.request_seen()
            return self._ok(ParseState.SUCCESS, end, total, frame)
        if cmd in (COM_STMT_EXECUTE, COM_STMT_CLOSE):
            if len(buf) < 9:
                return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
            stmt_id = int.from_bytes(buf[5:9], "little")
            if cmd == COM_STMT_CLOSE:
                self.statements.pop(stmt_id)
                return self._ok(ParseState.IGNORED, 9, total, END)
            frame = SqlRequest(self.statements.get(stmt_id), total, True, command=cmd)
            self.cut.request_seen()
            return self._ok(ParseState.SUCCESS, 9, total, frame)
        if cmd in NO_RESPONSE:
            return self._ok(ParseState.IGNORED, 5, total, END)
        if cmd == COM_CHANGE_USER:
            self._phase = _Phase.AUTH
            return self._ok(ParseState.IGNORED, 5, total, END)
        name = COMMANDS.get(cmd)
        if name is None:
            return ParseResult(ParseState.INVALID, 0, None)
        if cmd == COM_INIT_DB and total <= len(buf) and 0 < plen - 1 <= MAX_NAMESPACE:
            self.namespace = bytes(buf[5:total]).decode("utf-8", "replace")  # db.namespace from here on
        frame = SqlRequest(SqlSummary(name, "", "", name), total, True, command=cmd)
        self.cut.request_seen()
        return self._ok(ParseState.SUCCESS, 5, total, frame)

    def _handshake_response(self, buf: Buffer, plen: int, seq: int, total: int) -> ParseResult:
        """Sequence > 0 from the client: the handshake response (or SSL request), auth data, a
        LOAD DATA LOCAL file. Only the capability flags are read."""
        if seq == 1 and plen >= 32 and self._phase is _Phase.AUTH:
            if len(buf) < 8:
                return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
            caps = int.from_bytes(buf[4:8], "little")
            self._deprecate_eof = bool(caps & CLIENT_DEPRECATE_EOF)
            if caps & CLIENT_SSL and plen == 32:
                return self._ok(ParseState.EOS, 8, total, END)  # TLS from here: the OpenSSL probes see the rest
            return self._ok(ParseState.IGNORED, 8, total, END)
        return self._ok(ParseState.IGNORED, 4, total, END)

    # -- server -> client -----------------------------------------------------------------

    def parse_response(self, buf: Buffer, request_hint: Any | None) -> ParseResult:
        """The first packet, and the whole packets after it in ``buf`` that continue the same
        response (a result set's definitions, rows and end): one tracker round instead of one each."""
        first = self._response_one(buf, request_hint)
        pos = first.consumed + self._rest
        if first.state not in (ParseState.SUCCESS, ParseState.IGNORED) or pos > len(buf) or self._acc is None:
            return first
        self._rest = 0
        state, frame = first.state, first.frame
        while pos + 4 <= len(buf) and self._acc is not None:
            total = 4 + (buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16)
            if pos + total > len(buf) or buf[pos + 3] == 1:  # sequence 1: the next response's first packet
                break
            r = self._response_one(bytes(buf[pos : pos + total]), request_hint)
            if r.state not in (ParseState.SUCCESS, ParseState.IGNORED):
                break
            pos += total
            self._rest = 0
            if r.state is ParseState.SUCCESS:
                if state is not ParseState.SUCCESS:
                    state, frame = r.state, r.frame
                break
        return ParseResult(state, pos, frame)

    def _response_one(self, buf: Buffer, request_hint: Any | None) -> ParseResult:
        head = _header(buf)
        if head is None:
            return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
        plen, seq = head
        total = 4 + plen
        used = 4 + min(plen, _PEEK)
        if len(buf) < used:
            return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
        if plen == 0:
            return ParseResult(ParseState.INVALID, 0, None)
        p0 = buf[4]
        if seq == 0 and p0 == 0x0A and plen > 20:
            # the server's greeting, protocol 10: "5.5.5-10.11.6-MariaDB-0+deb12u1" names the system
            self._phase = _Phase.AUTH
            if b"MariaDB" in buf[5:used]:
                self.system = "mariadb"
            return self._ok(ParseState.IGNORED, used, total, END)
        if self._phase is _Phase.AUTH:
            if p0 in (OK, ERR):
                self._phase = _Phase.IDLE
            return self._ok(ParseState.IGNORED, used, total, END)
        if self._phase is not _Phase.IDLE and seq == 1 and seq != self._seq:
            # a new response: the one we were in ended where we did not expect (see the module doc)
            if self._acc is not None:
                self._acc.done = True
            self._acc, self._phase = None, _Phase.IDLE
        self._seq = (seq + 1) & 0xFF
        if self._phase is _Phase.IDLE:
            if seq != 1:
                return self._ok(ParseState.IGNORED, used, total, END)  # the rest of a response we joined late
            acc = Acc()
            acc.bytes = total
            self._first(acc, buf, plen, request_hint)
            self._acc = None if acc.done else acc
            return self._ok(ParseState.SUCCESS, used, total, SqlResponse(acc))
        cur = self._acc
        if cur is None:  # SKIP: the response was answered at its first packet
            self._skip(p0, plen)
            return self._ok(ParseState.IGNORED, used, total, END)
        cur.bytes += total
        self._next(cur, buf, p0, plen)
        if cur.done:
            self._acc = None
            return self._ok(ParseState.SUCCESS, used, total, END)
        return self._ok(ParseState.IGNORED, used, total, END)

    def _first(self, acc: Acc, buf: Buffer, plen: int, hint: Any | None) -> None:
        command = hint.command if isinstance(hint, SqlRequest) else 0
        p0 = buf[4]
        if command == COM_STATISTICS:
            acc.done = True  # a bare status string
        elif command == COM_FIELD_LIST and p0 != ERR:
            self._phase, acc.rows = _Phase.ROWS, 0  # column definitions up to EOF
        elif p0 == OK and plen >= 7 and command == COM_STMT_PREPARE and isinstance(hint, SqlRequest):
            stmt_id = int.from_bytes(buf[5:9], "little")
            ncols, nparams = int.from_bytes(buf[9:11], "little"), int.from_bytes(buf[11:13], "little")
            self.statements.put(stmt_id, hint.summary)
            acc.done = True
            self._blocks = [n for n in (nparams, ncols) if n]
            self._start_block()
        else:
            self._result_start(acc, buf, p0, plen)

    def _result_start(self, acc: Acc, buf: Buffer, p0: int, plen: int) -> None:
        """The first packet of a (further) result: OK, ERR, LOCAL INFILE, or a column count."""
        end = 4 + min(plen, _PEEK)
        if p0 == ERR:
            self._error(acc, buf, end)
        elif p0 in (OK, LOCAL_INFILE) or (p0 == EOF and plen < 9):
            self._infile = p0 == LOCAL_INFILE
            if p0 == OK and self._more(buf, end, ok=True):
                self._phase = _Phase.MORE
                return
            acc.done = True
            self._phase = _Phase.IDLE
        else:
            count = _lenenc(buf, 4, end)
            if count is None or count[0] == 0:
                acc.done = True
                self._phase = _Phase.IDLE
                return
            self._phase, self._left = _Phase.COLS, count[0]

    def _next(self, acc: Acc, buf: Buffer, p0: int, plen: int) -> None:
        end = 4 + min(plen, _PEEK)
        phase = self._phase
        if phase is _Phase.MORE:
            self._result_start(acc, buf, p0, plen)
        elif phase is _Phase.COLS:
            self._left -= 1
            if self._left <= 0:
                self._phase = _Phase.COL_EOF
        elif p0 == ERR and plen < 0xFFFF:
            self._error(acc, buf, end)
            acc.done = True
            self._phase = _Phase.IDLE
        elif p0 == EOF and plen < MAX_PAYLOAD and (phase is _Phase.ROWS or plen < 9):
            if phase is _Phase.COL_EOF and not self._deprecate_eof:
                self._phase = _Phase.ROWS  # the classic EOF after the column definitions
            elif self._more(buf, end, ok=plen >= 9):
                self._phase = _Phase.MORE
            else:
                acc.done = True
                self._phase = _Phase.IDLE
        else:
            acc.rows += 1
            self._phase = _Phase.ROWS

    def _skip(self, p0: int, plen: int) -> None:
        if self._left > 0:
            self._left -= 1
            if self._left == 0 and self._deprecate_eof:
                self._blocks.pop(0)
                self._start_block()
            return
        if p0 == EOF and plen < 9:  # the EOF closing a block of definitions
            if self._blocks:
                self._blocks.pop(0)
            self._start_block()

    def _start_block(self) -> None:
        if self._blocks:
            self._phase, self._left = _Phase.SKIP, self._blocks[0]
        else:
            self._phase = _Phase.IDLE

    @staticmethod
    def _more(buf: Buffer, end: int, ok: bool) -> bool:
        """SERVER_MORE_RESULTS_EXISTS in an OK (after its two length-encoded ints) or EOF packet."""
        pos = 5
        if ok:
            for _ in range(2):
                got = _lenenc(buf, pos, end)
                if got is None:
                    return False
                pos = got[1]
        else:
            pos = 7  # EOF: warnings (2), then status
        return pos + 2 <= end and bool(int.from_bytes(buf[pos : pos + 2], "little") & SERVER_MORE_RESULTS_EXISTS)

    @staticmethod
    def _error(acc: Acc, buf: Buffer, end: int) -> None:
        """ERR: error number (2, little-endian), '#' and SQLSTATE (protocol 4.1); the message is not read."""
        if end < 7:
            return
        code = str(int.from_bytes(buf[5:7], "little"))
        state = bytes(buf[8:13]) if end >= 13 and buf[7] == ord("#") else b""
        acc.status_code = code
        # error.type: the SQLSTATE (a portable class of error) when the server sent one
        acc.error_type = state.decode("ascii") if state.isalnum() and len(state) == 5 else code
        acc.done = True

    def body_reader(self, frame: Any) -> BodyReader | None:
        rest = self._rest
        return generic_reader(Framing(BodyKind.LENGTH, rest) if rest > 0 else NO_BODY)

    def stitch(self, requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
        return stitch(self.system, requests, responses, self.namespace)

    def timeout_record(self, request: Message[Any], now_ns: int) -> Any | None:
        return None  # counted (expired_requests), not reported: a slow query is not a failed one
