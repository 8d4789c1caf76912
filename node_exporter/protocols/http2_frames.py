"""The kernel frame walk's HTTP/2 stream (DATA payloads cut out) parsed in one loop per call.

The shared tracker loop costs a handful of objects per frame (a parse result, a frame, a pending
message, a message); an HTTP/2 request is five to ten frames, so that was most of the agent's time
(bench/RESULTS.md). Here every frame of the buffer is read in place (its header unpacked once, a
header block sliced out) and handed to the session by its fields; only the rare frames the session
reads whole (SETTINGS, RST_STREAM, GOAWAY, the preface) become ``H2Frame`` objects. The checks are
``parse_frame``'s: a frame it would call INVALID stops the loop at that frame, and the tracker resyncs
as it does for every protocol.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from node_exporter.protocols.base import Message, MessageKind, Stitched
from node_exporter.protocols.http2 import (
    _HEADER,
    _RULES,
    CONTINUATION,
    DATA,
    GOAWAY,
    HEADER_LEN,
    HEADERS,
    MAX_CONTROL,
    PADDED,
    PREFACE,
    PREFACE_FRAME,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    _payload,
)
from node_exporter.protocols.http2_session import H2Session

_WHOLE: Final = frozenset({RST_STREAM, SETTINGS, GOAWAY})  # the session reads these decoded
_PREFACE_LEN: Final = len(PREFACE)


def pump(session: H2Session, kind: MessageKind, buf: bytearray, chunks: deque[tuple[int, int]],
         base: int) -> tuple[int, Stitched, bool]:  # fmt: skip
    """Every whole frame at the front of ``buf`` (stream offset ``base``; ``chunks``: (offset, ts) of the
    calls it came in) to ``session``: (bytes consumed, what the session made, stopped at an invalid
    frame). A frame takes the time of the call holding its first byte."""
    out = Stitched()
    n = len(buf)
    off = ci = 0
    last = len(chunks) - 1
    unpack = _HEADER.unpack_from
    rules = _RULES
    frame = session.frame
    request = kind is MessageKind.REQUEST
    while n - off >= HEADER_LEN:
        while ci < last and chunks[ci + 1][0] <= base + off:
            ci += 1
        ts = chunks[ci][1] if chunks else 0
        if request and buf[off] == 0x50:  # "P": the client preface, once, before the first frame
            if n - off < _PREFACE_LEN and PREFACE.startswith(buf[off:]):
                break
            if buf[off : off + _PREFACE_LEN] == PREFACE:
                session.message(kind, Message(PREFACE_FRAME, ts, _PREFACE_LEN, False))  # makes no record
                off += _PREFACE_LEN
                continue
        hi, lo, ftype, flags, sid = unpack(buf, off)
        length = (hi << 16) | lo
        sid &= 0x7FFFFFFF
        rule = rules.get(ftype)
        if rule is None:
            return off, out, True
        size, on_zero, _ = rule
        if on_zero is not None and (sid == 0) != on_zero:
            return off, out, True
        if size is not None and (length % -size if size < 0 else length != size):
            return off, out, True
        if ftype == DATA:  # its payload stayed in the kernel
            frame(kind, DATA, flags, sid, length, b"", ts, None, out)
            off += HEADER_LEN
            continue
        if length > MAX_CONTROL:
            return off, out, True
        end = off + HEADER_LEN + length
        if end > n:
            break
        start = off + HEADER_LEN
        if ftype in (HEADERS, CONTINUATION):
            pad = 0
            if ftype == HEADERS:
                if flags & PADDED:
                    if not length:
                        return off, out, True
                    pad = buf[start]
                    start += 1
                if flags & PRIORITY_FLAG:
                    start += 5
                if start + pad > end:
                    return off, out, True
            frame(kind, ftype, flags, sid, length, buf[start : end - pad], ts, None, out)
        elif ftype in _WHOLE or ftype == PUSH_PROMISE:
            f = _payload(ftype, flags, sid, length, bytes(buf[start:end]))
            if f is None:
                return off, out, True
            frame(kind, ftype, flags, sid, length, f.block, ts, f, out)
        else:  # PING, WINDOW_UPDATE, PRIORITY, extensions: counted, nothing to read
            frame(kind, ftype, flags, sid, length, b"", ts, None, out)
        off = end
    return off, out, False
