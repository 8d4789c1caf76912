"""HTTP/2 (RFC 9113) framing: one frame per parse, registered like HTTP/1 and DNS.

The frame layer is stateless like every parser here: a frame header is checked against the
rules every peer must follow (stream 0 or not, fixed payload sizes, reserved bit clear), so
random bytes are INVALID within 9 bytes and resync finds the next frame. DATA payloads are read
through a ``LengthReader`` (counted, never kept: a capture that cut them short costs nothing);
every other frame is parsed whole. What a connection remembers (HPACK tables, streams) lives in
the per-connection ``H2Session`` (http2_session.py), which the tracker creates through
``new_session`` and hands every frame in arrival order.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from node_exporter.protocols.base import (
    BodyReader,
    Buffer,
    LengthReader,
    Message,
    MessageKind,
    ParseResult,
    ParseState,
    Role,
    Stitched,
)

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER_LEN: Final = 9
MAX_CONTROL: Final = 32 * 1024  # payload of a frame we parse whole (not DATA); past it INVALID
DEFAULT_MAX_FRAME: Final = 16384  # RFC 9113 6.5.2 SETTINGS_MAX_FRAME_SIZE initial value; resync wants <=

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
ALTSVC, ORIGIN, PRIORITY_UPDATE = 0x0A, 0x0C, 0x10  # extensions real peers send (RFC 7838, 8336, 9218)
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_MAX_FRAME_SIZE: Final = 0x5

# type -> (payload length rule, on stream 0?, flags defined). Length rule: exact size, or -n: a
# multiple of n (SETTINGS), or None: any. On stream 0: True must, False must not, None either.
_RULES: Final[dict[int, tuple[int | None, bool | None, int]]] = {
    DATA: (None, False, END_STREAM | PADDED),
    HEADERS: (None, False, END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG),
    PRIORITY: (5, False, 0),
    RST_STREAM: (4, False, 0),
    SETTINGS: (-6, True, ACK),
    PUSH_PROMISE: (None, False, END_HEADERS | PADDED),
    PING: (8, True, ACK),
    GOAWAY: (None, True, 0),
    WINDOW_UPDATE: (4, None, 0),
    CONTINUATION: (None, False, END_HEADERS),
    ALTSVC: (None, None, 0),
    ORIGIN: (None, True, 0),
    PRIORITY_UPDATE: (None, True, 0),
}
_HEADER = struct.Struct("!BHBBI")  # length as 8 + 16 bits, type, flags, stream id
_SETTING = struct.Struct("!HI")


@dataclass(frozen=True, slots=True)
class H2Frame:
    type: int  # frame type; -1 for the client connection preface
    flags: int
    stream_id: int
    length: int  # payload bytes on the wire (padding included)
    block: bytes = b""  # HEADERS / PUSH_PROMISE / CONTINUATION: the header block fragment
    code: int = 0  # RST_STREAM / GOAWAY error code
    last_stream_id: int = 0  # GOAWAY
    settings: tuple[tuple[int, int], ...] = ()  # SETTINGS (identifier, value)


PREFACE_FRAME: Final = H2Frame(-1, 0, 0, 0)


def _header(buf: Buffer, off: int) -> tuple[int, int, int, int, int]:
    hi, lo, ftype, flags, sid = _HEADER.unpack_from(buf, off)
    return (hi << 16) | lo, ftype, flags, sid & 0x7FFFFFFF, sid >> 31


def plausible_header(buf: Buffer, off: int, *, strict: bool) -> bool:
    """True if the 9 bytes at ``off`` follow the rules every sender must (RFC 9113 4.1, 6). ``strict``
    (resync, kernel-style inference) also wants a reserved bit of 0 and only flags the type defines;
    a peer in step may set either (receivers must ignore them)."""
    length, ftype, flags, sid, reserved = _header(buf, off)
    rule = _RULES.get(ftype)
    if rule is None:
        return False
    size, on_zero, defined = rule
    if strict and (reserved or flags & ~defined or length > DEFAULT_MAX_FRAME):
        return False
    if strict and ftype == DATA and not length and not flags & END_STREAM:
        return False  # legal but useless, and what runs of zero bytes look like
    if on_zero is not None and (sid == 0) != on_zero:
        return False
    if size is not None and (length % -size if size < 0 else length != size):
        return False
    return ftype == DATA or length <= MAX_CONTROL


def _payload(ftype: int, flags: int, sid: int, length: int, p: bytes) -> H2Frame | None:
    """Decode a whole non-DATA payload; None if it breaks the frame's own rules (padding past the
    payload, a SETTINGS value out of range ...)."""
    if ftype in (HEADERS, PUSH_PROMISE):
        pad = 0
        if flags & PADDED:
            if not p:
                return None
            pad, p = p[0], p[1:]
        skip = 5 if ftype == HEADERS and flags & PRIORITY_FLAG else 4 if ftype == PUSH_PROMISE else 0
        if pad + skip > len(p):
            return None
        return H2Frame(ftype, flags, sid, length, block=p[skip : len(p) - pad])
    if ftype == CONTINUATION:
        return H2Frame(ftype, flags, sid, length, block=p)
    if ftype == RST_STREAM:
        return H2Frame(ftype, flags, sid, length, code=int.from_bytes(p, "big"))
    if ftype == GOAWAY:
        if len(p) < 8:
            return None
        last = int.from_bytes(p[:4], "big") & 0x7FFFFFFF
        return H2Frame(ftype, flags, sid, length, code=int.from_bytes(p[4:8], "big"), last_stream_id=last)
    if ftype == SETTINGS:
        if flags & ACK and length:
            return None
        pairs = tuple(_SETTING.unpack_from(p, i) for i in range(0, len(p), 6))
        for ident, value in pairs:
            if ident == SETTINGS_MAX_FRAME_SIZE and not 16384 <= value <= 0xFFFFFF:
                return None
        return H2Frame(ftype, flags, sid, length, settings=pairs)
    return H2Frame(ftype, flags, sid, length)


def parse_frame(buf: Buffer, kind: MessageKind, compact: bool = False) -> ParseResult:
    """One frame (or the client preface, before the client's first frame) from the front of ``buf``.
    ``compact``: the kernel cut DATA payloads out of the stream (bpf_src/l7_h2.h), so a DATA frame is
    its 9-byte header alone (its length still says how many bytes it carried)."""
    n = len(buf)
    if kind is MessageKind.REQUEST and buf[:1] == b"P" and buf[: len(PREFACE)] == PREFACE[:n]:
        if n < len(PREFACE):
            return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
        return ParseResult(ParseState.SUCCESS, len(PREFACE), PREFACE_FRAME)
    if n < HEADER_LEN:
        return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
    if not plausible_header(buf, 0, strict=False):
        return ParseResult(ParseState.INVALID, 0, None)
    length, ftype, flags, sid, _ = _header(buf, 0)
    if ftype == DATA:
        return ParseResult(ParseState.SUCCESS, HEADER_LEN, H2Frame(ftype, flags, sid, length))
    if n < HEADER_LEN + length:
        return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
    frame = _payload(ftype, flags, sid, length, bytes(buf[HEADER_LEN : HEADER_LEN + length]))
    if frame is None:
        return ParseResult(ParseState.INVALID, 0, None)
    return ParseResult(ParseState.SUCCESS, HEADER_LEN + length, frame)


def find_frame_boundary(buf: Buffer, start: int, kind: MessageKind, compact: bool = False) -> int:
    """First offset >= start holding a strictly plausible frame header whose frame, if it ends inside
    ``buf``, is followed by another plausible header (or the end); the preface on the request side.
    A candidate cut by the end of ``buf`` counts (it may be a frame straddling two chunks).
    ``compact``: DATA frames are their header alone (``parse_frame``)."""
    preface = buf.find(PREFACE, start) if kind is MessageKind.REQUEST else -1
    limit = preface if preface >= 0 else len(buf)
    for off in range(start, limit):
        if len(buf) - off < HEADER_LEN:
            return off
        if not plausible_header(buf, off, strict=True):
            continue
        length, ftype = _header(buf, off)[:2]
        nxt = off + HEADER_LEN + (0 if compact and ftype == DATA else length)
        if nxt + HEADER_LEN <= len(buf) and not plausible_header(buf, nxt, strict=True):
            continue
        return off
    return preface if preface >= 0 else len(buf)


class Http2:
    """HTTP/2 as a registered ``Protocol``; frames go to the connection's ``H2Session``, which
    makes the records (``stitch`` never sees a frame)."""

    datagram: Final = False
    default_timeout_ns: Final = 300 * 10**9  # streaming RPCs and long polls are legitimate

    def __init__(self, *, compact: bool = False) -> None:
        self.compact = compact  # chunks of the kernel's frame walk: DATA payloads cut out
        self.name = "http2_frames" if compact else "http2"  # its registry key; connections are named http2

    def find_frame_boundary(self, buf: Buffer, start: int, kind: MessageKind) -> int:
        return find_frame_boundary(buf, start, kind, self.compact)

    def parse_request(self, buf: Buffer) -> ParseResult:
        return parse_frame(buf, MessageKind.REQUEST, self.compact)

    def parse_response(self, buf: Buffer, request_hint: Any | None) -> ParseResult:
        return parse_frame(buf, MessageKind.RESPONSE, self.compact)

    def body_reader(self, frame: Any) -> BodyReader | None:
        f: H2Frame = frame
        return LengthReader(f.length) if f.type == DATA and f.length and not self.compact else None

    def stitch(self, requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
        return Stitched()  # unused: the session pairs streams

    def timeout_record(self, request: Message[Any], now_ns: int) -> Any | None:
        return None

    def frames_pump(self) -> Callable[..., tuple[int, Stitched, bool]] | None:
        """The per-call loop (http2_frames.pump) for the frame walk's stream, which has no DATA
        payloads to read through; None for raw captures (the tracker's per-frame loop reads them)."""
        if not self.compact:
            return None
        from node_exporter.protocols.http2_frames import pump  # it imports this module

        return pump

    def new_session(self, role: Role) -> Any:
        from node_exporter.protocols.http2_session import H2Session  # the session imports this module

        return H2Session(role)
