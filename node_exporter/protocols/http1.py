"""HTTP/1.0 and HTTP/1.1: heads parsed, bodies framed and counted, pairs stitched in order.

Strict where it is cheap (a known method or ``HTTP/1.x`` in the first bytes, token
header names, no control characters), so random bytes are INVALID within a few bytes
and resync stays fast; lenient where real peers are (bare LF line ends, leading blank
lines before a request, a status line without a reason phrase).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

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
    fifo_pair,
    generic_reader,
)
from node_exporter.protocols.http_fields import request_id, route_template, target_path, valid_traceparent

MAX_HEAD: Final = 16 * 1024  # request/status line plus header fields; larger is INVALID
MAX_CHUNK_LINE: Final = 4096  # chunk-size line with extensions
MAX_TRAILERS: Final = 16 * 1024
METHODS: Final = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"})
_MAX_METHOD: Final = max(len(m) for m in METHODS)
_VERSIONS: Final = (b"HTTP/1.1", b"HTTP/1.0")
_WANTED: Final = frozenset({b"content-length", b"transfer-encoding", b"traceparent", b"x-request-id"})

_METHOD_ALT = b"|".join(sorted(METHODS))
_REQUEST_LINE = re.compile(rb"(" + _METHOD_ALT + rb") ([^\x00-\x20\x7f]+) HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_TOKEN_PREFIX = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")
_REQUEST_START = re.compile(rb"^(?:" + _METHOD_ALT + rb") ", re.M)
_RESPONSE_START = re.compile(rb"^HTTP/1\.[01] ", re.M)
_REQUEST_TOKENS: Final = tuple(m + b" " for m in METHODS)
_RESPONSE_TOKENS: Final = tuple(v + b" " for v in _VERSIONS)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str  # without query string or fragment, at most MAX_PATH characters
    route: str  # path template with ids collapsed: bounded cardinality
    version: str  # "1.0" or "1.1"
    traceparent: str  # validated W3C traceparent, or ""
    request_id: str  # x-request-id, or ""
    framing: Framing
    head_bytes: int


@dataclass(frozen=True, slots=True)
class HttpResponse:
    version: str
    status: int
    framing: Framing
    head_bytes: int


@dataclass(frozen=True, slots=True)
class HttpRecord:
    method: str
    path: str
    route: str
    status: int
    request_bytes: int  # on the wire, head and body
    response_bytes: int
    start_ns: int  # first byte of the request as seen from this side
    latency_ns: int  # response first byte - request first byte
    traceparent: str
    request_id: str
    # Not a field: a record of one request (built slot by slot on the agent's exchange path) has
    # no summary and pays nothing for it; HttpSummaryRecord overrides it with a slot of its own.
    summary: ClassVar[HttpSummary | None] = None
    # The same for the TCP sequence numbers that link both ends' records (HttpLinkedRecord).
    tcp_seqs: ClassVar[tuple[int, int] | None] = None
    # ... and for a client call's confirmed parent (HttpChildRecord).
    parent: ClassVar[tuple[int, int, int] | None] = None


@dataclass(frozen=True, slots=True)
class HttpSummary:
    """Requests of one socket with the same method, route and status that the kernel summed instead
    of sending one by one (bpf_src/abi/l7.h ``kscope_l7_summary``): counts and sums are exact."""

    count: int  # requests summed, >= 1
    latency_sum_ns: int
    latency_min_ns: int
    latency_max_ns: int
    buckets: tuple[int, ...]  # per kscope_common.latency bucket (bound[i-1] < latency <= bound[i]); sums to count
    end_ns: int  # the last summed request's start (start_ns is the first one's)


@dataclass(frozen=True, slots=True)
class HttpSummaryRecord(HttpRecord):
    """A summary as a record: start_ns is the first summed request's start, request/response bytes
    are sums, latency_ns is 0 (the sum is ``summary.latency_sum_ns``), no trace headers."""

    summary: HttpSummary = field()  # type: ignore[misc]  # a slot here; None on HttpRecord


@dataclass(frozen=True, slots=True)
class HttpLinkedRecord(HttpRecord):
    """A record of one request with the TCP sequence numbers both ends of its connection saw
    (bpf_src/abi/l7.h ``tcp_req_seq``/``tcp_resp_seq``): what links them (docs/traces.md)."""

    tcp_seqs: tuple[int, int] = field()  # type: ignore[misc]  # (request, response); None on HttpRecord


@dataclass(frozen=True, slots=True)
class HttpChildRecord(HttpLinkedRecord):
    """A client record made inside a server request of the same thread, confirmed
    (node_exporter/l7/causal.py): that server record's TCP sequence numbers and start."""

    # (tcp_req_seq, tcp_resp_seq, start_ns CLOCK_MONOTONIC) of the parent; None on HttpRecord
    parent: tuple[int, int, int] = field()  # type: ignore[misc]


# -- heads --------------------------------------------------------------------------------


def _request_line_prefix_ok(p: bytes) -> bool:
    sp = p.find(b" ")
    if sp < 0:
        return len(p) <= _MAX_METHOD and any(m.startswith(p) for m in METHODS)
    if p[:sp] not in METHODS:
        return False
    rest = p[sp + 1 :]
    sp2 = rest.find(b" ")
    if sp2 < 0:
        return _TARGET_BAD.search(rest) is None
    return sp2 > 0 and _TARGET_BAD.search(rest[:sp2]) is None and any(v.startswith(rest[sp2 + 1 :]) for v in _VERSIONS)


def _status_line_prefix_ok(p: bytes) -> bool:
    if len(p) <= 9:
        return any(t.startswith(p) for t in _RESPONSE_TOKENS)
    if not any(p.startswith(t) for t in _RESPONSE_TOKENS):
        return False
    code = p[9:12]
    return code.isdigit() and code[:1] != b"0" and (len(p) <= 12 or (p[12:13] == b" " and not _CTL.search(p, 13)))


def _field_prefix_ok(p: bytes) -> bool:
    colon = p.find(b":")
    if colon < 0:
        return _TOKEN_PREFIX.fullmatch(p) is not None
    return colon > 0 and _TOKEN_PREFIX.fullmatch(p, 0, colon) is not None and not _CTL.search(p, colon)


def _scan_head(buf: Buffer, start: int, request: bool) -> tuple[ParseState, int, bytes, list[tuple[bytes, bytes]]]:
    """Find the end of a head and validate every line on the way.

    Returns (state, head_end, start_line, wanted_fields). Incomplete lines are checked as
    prefixes, so garbage is rejected without waiting for a newline that may never come.
    Header values other than _WANTED are never copied out of the buffer.
    """
    fields: list[tuple[bytes, bytes]] = []
    first: bytes | None = None
    pos = start
    limit = min(len(buf), MAX_HEAD)
    while True:
        nl = buf.find(b"\n", pos, limit)
        if nl < 0:
            if len(buf) >= MAX_HEAD:
                return ParseState.INVALID, 0, b"", []
            partial = bytes(buf[pos:limit])
            if partial.endswith(b"\r"):
                partial = partial[:-1]
            if pos == start:
                ok = _request_line_prefix_ok(partial) if request else _status_line_prefix_ok(partial)
            else:
                ok = _field_prefix_ok(partial)
            return (ParseState.NEEDS_MORE_DATA if ok else ParseState.INVALID), 0, b"", []
        line = bytes(buf[pos : nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl])
        pos = nl + 1
        if first is None:
            if not (_REQUEST_LINE if request else _STATUS_LINE).fullmatch(line):
                return ParseState.INVALID, 0, b"", []
            first = line
            continue
        if not line:
            return ParseState.SUCCESS, pos, first, fields
        m = _FIELD.fullmatch(line)  # obs-fold (leading whitespace) fails here, as in h11
        if m is None:
            return ParseState.INVALID, 0, b"", []
        name = m[1].lower()
        if name in _WANTED:
            fields.append((name, m[2]))


def _content_length(values: list[bytes]) -> int | None:
    """RFC 9110 8.6: a list of identical values is one value; anything else is invalid."""
    seen: set[bytes] = set()
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part.isdigit() or len(part) > 18:
                return None
            seen.add(part.lstrip(b"0") or b"0")
    return int(seen.pop()) if len(seen) == 1 else None


def _framing(fields: list[tuple[bytes, bytes]], request: bool) -> Framing | None:
    te = [v for n, v in fields if n == b"transfer-encoding"]
    if te:
        codings = [c.strip(b" \t").lower() for c in b",".join(te).split(b",")]
        if codings[-1] == b"chunked":
            return Framing(BodyKind.CHUNKED)
        # RFC 9112 6.3: a request must then be rejected, a response is read until close.
        return None if request else Framing(BodyKind.UNTIL_CLOSE)
    cl = [v for n, v in fields if n == b"content-length"]
    if cl:
        length = _content_length(cl)
        if length is None:
            return None
        return Framing(BodyKind.LENGTH, length) if length else NO_BODY
    return NO_BODY if request else Framing(BodyKind.UNTIL_CLOSE)


def _first(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    return next((v for n, v in fields if n == name), b"")


def parse_request(buf: Buffer) -> ParseResult:
    # RFC 9112 2.2: ignore at least one empty line before a request-line (some clients
    # send a stray CRLF after a body).
    start = 0
    while start < 4 and start < len(buf) and buf[start] in (0x0D, 0x0A):
        start += 1
    if start == len(buf):
        return ParseResult(ParseState.NEEDS_MORE_DATA if start < 4 else ParseState.INVALID, 0, None)
    state, end, line, fields = _scan_head(buf, start, request=True)
    if state is not ParseState.SUCCESS:
        return ParseResult(state, 0, None)
    m = _REQUEST_LINE.fullmatch(line)
    framing = _framing(fields, request=True)
    if m is None or framing is None:
        return ParseResult(ParseState.INVALID, 0, None)
    path = target_path(m[1], m[2])
    if path is None:
        return ParseResult(ParseState.INVALID, 0, None)
    frame = HttpRequest(
        method=m[1].decode("ascii"),
        path=path,
        route=route_template(path),
        version="1." + m[3].decode("ascii"),
        traceparent=valid_traceparent(_first(fields, b"traceparent")),
        request_id=request_id(_first(fields, b"x-request-id")),
        framing=framing,
        head_bytes=end,
    )
    return ParseResult(ParseState.SUCCESS, end, frame)


def parse_response(buf: Buffer, request_hint: Any | None = None) -> ParseResult:
    state, end, line, fields = _scan_head(buf, 0, request=False)
    if state is not ParseState.SUCCESS:
        return ParseResult(state, 0, None)
    m = _STATUS_LINE.fullmatch(line)
    if m is None:
        return ParseResult(ParseState.INVALID, 0, None)
    status = int(m[2])
    version = "1." + m[1].decode("ascii")
    method = request_hint.method if isinstance(request_hint, HttpRequest) else ""
    if status == 101 or (method == "CONNECT" and 200 <= status < 300):
        # The connection now speaks another protocol (WebSocket, a tunnel): this is the
        # last HTTP/1 message on it.
        return ParseResult(ParseState.EOS, end, HttpResponse(version, status, NO_BODY, end))
    if status < 200:
        return ParseResult(ParseState.IGNORED, end, None)  # 100 Continue, 103: not the final response
    framing = NO_BODY if method == "HEAD" or status in (204, 304) else _framing(fields, request=False)
    if framing is None:
        return ParseResult(ParseState.INVALID, 0, None)
    state = ParseState.EOS if framing.kind is BodyKind.UNTIL_CLOSE else ParseState.SUCCESS
    return ParseResult(state, end, HttpResponse(version, status, framing, end))


def cut_response(buf: Buffer) -> ParseResult | None:
    """A response head the capture bound cut before its blank line (fields past the capture): its
    status line, if whole, gives the status. Its framing was in the lost part: the response ends with
    the cut, and the tracker skips what follows up to the next status line. None: not such a head."""
    eol = buf.find(b"\r\n")
    if eol < 0 or buf.find(b"\r\n\r\n") >= 0:
        return None
    m = _STATUS_LINE.fullmatch(bytes(buf[:eol]))
    if m is None or int(m[2]) < 200:
        return None  # 1xx: not the final response; 101 ends HTTP/1, which a cut head cannot tell safely
    return ParseResult(ParseState.SUCCESS, len(buf), HttpResponse("1." + m[1].decode("ascii"), int(m[2]), NO_BODY,
                                                                  len(buf)))  # fmt: skip


# -- bodies -------------------------------------------------------------------------------

_SIZE, _DATA, _DATA_CR, _DATA_LF, _TRAILER = range(5)


class ChunkedReader:
    """Streams over a chunked body, trailers included, holding nothing but a counter."""

    __slots__ = ("_remaining", "_state", "_trailer_bytes")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._trailer_bytes = 0

    def read(self, buf: Buffer) -> tuple[ParseState, int]:
        pos = 0
        end = len(buf)
        while pos < end:
            if self._state == _DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._state = _DATA_CR
            elif self._state in (_DATA_CR, _DATA_LF):
                byte = buf[pos]
                if byte == 0x0D and self._state == _DATA_CR:
                    self._state = _DATA_LF
                elif byte == 0x0A:
                    self._state = _SIZE
                else:
                    return ParseState.INVALID, pos
                pos += 1
            else:
                nl = buf.find(b"\n", pos, pos + MAX_CHUNK_LINE)
                if nl < 0:
                    if end - pos >= MAX_CHUNK_LINE:
                        return ParseState.INVALID, pos
                    break
                line = bytes(buf[pos:nl]).rstrip(b"\r")
                pos = nl + 1
                if self._state == _TRAILER:
                    if not line:
                        return ParseState.SUCCESS, pos
                    self._trailer_bytes += len(line)
                    if self._trailer_bytes > MAX_TRAILERS or not _FIELD.fullmatch(line):
                        return ParseState.INVALID, pos
                    continue
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    return ParseState.INVALID, pos
                self._remaining = int(size, 16)
                self._state = _DATA if self._remaining else _TRAILER
        return ParseState.NEEDS_MORE_DATA, pos

    def skip_gap(self, nbytes: int | None) -> bool:
        if self._state != _DATA or nbytes is None or nbytes > self._remaining:
            return False
        self._remaining -= nbytes
        return True

    def ends_at_close(self) -> bool:
        return False


# -- the protocol -------------------------------------------------------------------------


def find_frame_boundary(buf: Buffer, start: int, kind: MessageKind) -> int:
    """Next line start >= start that begins a request (method SP) or a status line."""
    request = kind is MessageKind.REQUEST
    m = (_REQUEST_START if request else _RESPONSE_START).search(buf, start)
    if m is not None:
        return m.start()
    tokens = _REQUEST_TOKENS if request else _RESPONSE_TOKENS
    for q in range(max(start, len(buf) - 9), len(buf)):
        if (q == 0 or buf[q - 1] == 0x0A) and any(t.startswith(buf[q:]) for t in tokens):
            return q
    return len(buf)


def stitch(requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
    """FIFO pairing (keep-alive and pipelining), guarded by timestamps (base.fifo_pair)."""
    out = Stitched()
    while requests and responses:
        pair = fifo_pair(requests, responses, out)
        if pair is None:
            continue
        req, resp = pair
        q: HttpRequest = req.frame
        r: HttpResponse = resp.frame
        out.records.append(
            HttpRecord(
                method=q.method,
                path=q.path,
                route=q.route,
                status=r.status,
                request_bytes=req.size,
                response_bytes=resp.size,
                start_ns=req.ts_ns,
                latency_ns=resp.ts_ns - req.ts_ns,
                traceparent=q.traceparent,
                request_id=q.request_id,
            )
        )
    return out


class Http1:
    """HTTP/1.x as a registered ``Protocol``; stateless, one instance serves every connection."""

    name: Final = "http1"
    datagram: Final = False
    default_timeout_ns: Final = 300 * 10**9  # long polls and slow uploads are legitimate

    def find_frame_boundary(self, buf: Buffer, start: int, kind: MessageKind) -> int:
        return find_frame_boundary(buf, start, kind)

    def parse_request(self, buf: Buffer) -> ParseResult:
        return parse_request(buf)

    def parse_response(self, buf: Buffer, request_hint: Any | None) -> ParseResult:
        return parse_response(buf, request_hint)

    def cut_head(self, buf: Buffer, kind: MessageKind, request_hint: Any | None) -> ParseResult | None:
        return cut_response(buf) if kind is MessageKind.RESPONSE else None

    def body_reader(self, frame: Any) -> BodyReader | None:
        framing: Framing = frame.framing
        return ChunkedReader() if framing.kind is BodyKind.CHUNKED else generic_reader(framing)

    def stitch(self, requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
        return stitch(requests, responses)

    def timeout_record(self, request: Message[Any], now_ns: int) -> Any | None:
        return None  # an unanswered HTTP request is counted, not reported
