"""DNS (RFC 1035) over UDP, one message per datagram, and over TCP with its 2-byte length.

Only the header and the question are decoded: that is all a record needs, and it is
the part a payload head captured in the kernel reliably holds. Answers are counted from
the header, never walked, so a datagram cut short by the capture still parses.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from dataclasses import dataclass, replace
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

QTYPES: Final = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 35: "NAPTR", 39: "DNAME", 43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 52: "TLSA",
    64: "SVCB", 65: "HTTPS", 99: "SPF", 251: "IXFR", 252: "AXFR", 255: "ANY", 257: "CAA",
}  # fmt: skip
RCODES: Final = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE",
}  # fmt: skip
QCLASSES: Final = frozenset({1, 3, 4, 254, 255})  # IN, CH, HS, NONE, ANY
OPCODE_QUERY: Final = 0
OPCODES: Final = frozenset({0, 1, 2, 4, 5, 6})  # QUERY, IQUERY, STATUS, NOTIFY, UPDATE, DSO
MAX_NAME_WIRE: Final = 255  # RFC 1035 2.3.4
MAX_NAME_TEXT: Final = 255  # characters kept after escaping
MAX_JUMPS: Final = 16  # compression pointers followed per name
_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_MIN_MESSAGE = 12 + 1 + 4  # header, root name, type and class
_PLAIN_LABEL = re.compile(rb"[a-z0-9_-]+")
_TRUNCATED, _BAD = -1, -2


@dataclass(frozen=True, slots=True)
class DnsMessage:
    id: int
    response: bool
    opcode: int
    rcode: int
    name: str  # question name, lowercased, escaped like dig (\. \\ \DDD), "." for the root
    qtype: int
    qclass: int
    answers: int  # ANCOUNT from the header
    framing: Framing  # over TCP, the rest of the message after the question


@dataclass(frozen=True, slots=True)
class DnsRecord:
    id: int
    name: str
    qtype: str  # "A", "AAAA", … or "TYPE<n>" (RFC 3597)
    rcode: str  # "NOERROR", "NXDOMAIN", … or "RCODE<n>"; "" for a timeout
    answers: int
    request_bytes: int
    response_bytes: int  # 0 for a timeout
    start_ns: int
    latency_ns: int  # for a timeout: how long we waited
    timed_out: bool
    parent: tuple[int, int, int] | None = None  # as DbRecord.parent: a lookup made inside a server request


def qtype_name(qtype: int) -> str:
    return QTYPES.get(qtype, f"TYPE{qtype}")


def rcode_name(rcode: int) -> str:
    return RCODES.get(rcode, f"RCODE{rcode}")


def _label_text(raw: bytes) -> str:
    raw = raw.lower()
    if _PLAIN_LABEL.fullmatch(raw):
        return raw.decode("ascii")
    return "".join(("\\" + chr(b)) if b in b".\\" else chr(b) if 0x21 <= b <= 0x7E else f"\\{b:03d}" for b in raw)


def read_name(buf: Buffer, base: int, pos: int, end: int) -> tuple[str, int] | int:
    """Decode a possibly compressed name at ``pos``; offsets in pointers are from ``base``.

    Returns (name, offset after the name) or _TRUNCATED / _BAD. Pointers must jump strictly
    backwards (as every compressor emits them), which alone rules out loops; MAX_JUMPS and
    the 255-byte name limit bound the work on hostile input.
    """
    labels: list[str] = []
    wire = 1
    after = -1
    floor = pos
    jumps = 0
    while True:
        if pos >= end:
            return _TRUNCATED
        n = buf[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 == 0xC0:
            if pos + 1 >= end:
                return _TRUNCATED
            target = base + (((n & 0x3F) << 8) | buf[pos + 1])
            jumps += 1
            if target >= floor or target < base + 12 or jumps > MAX_JUMPS:
                return _BAD
            if after < 0:
                after = pos + 2
            floor = pos = target
            continue
        if n & 0xC0:
            return _BAD  # 0x40 / 0x80 label types are obsolete or reserved
        wire += n + 1
        if wire > MAX_NAME_WIRE:
            return _BAD
        if pos + 1 + n > end:
            return _TRUNCATED
        labels.append(_label_text(bytes(buf[pos + 1 : pos + 1 + n])))
        pos += 1 + n
    name = ".".join(labels)[:MAX_NAME_TEXT] or "."
    return name, after if after >= 0 else pos


def _plausible_header(buf: Buffer, off: int, response: bool) -> bool:
    _id, flags, qd, an, ns, _ar = _HEADER.unpack_from(buf, off)
    if bool(flags & 0x8000) != response or flags & 0x0040 or qd != 1:
        return False
    opcode = (flags >> 11) & 0xF
    if opcode not in OPCODES:
        return False
    # A plain query carries no answers and no rcode (IXFR may carry one SOA in authority).
    return response or opcode != OPCODE_QUERY or (an == 0 and ns <= 1 and flags & 0xF == 0)


def parse_message(buf: Buffer, base: int, length: int, response: bool) -> ParseResult:
    """Parse the message occupying buf[base : base + length] (which may not all be there yet)."""
    end = min(len(buf), base + length)
    complete = end == base + length

    def short() -> ParseResult:
        return ParseResult(ParseState.INVALID if complete else ParseState.NEEDS_MORE_DATA, 0, None)

    if end - base < 12:
        return short()
    msg_id, flags, qd, an, _ns, _ar = _HEADER.unpack_from(buf, base)
    opcode, rcode = (flags >> 11) & 0xF, flags & 0xF
    if bool(flags & 0x8000) != response or flags & 0x0040 or opcode not in OPCODES:
        return ParseResult(ParseState.INVALID, 0, None)
    if opcode != OPCODE_QUERY or qd == 0:
        # Well-formed but not a lookup (NOTIFY, UPDATE, DSO keepalives): skip it whole.
        skip = Framing(BodyKind.LENGTH, length - 12)
        frame = DnsMessage(msg_id, response, opcode, rcode, "", 0, 0, an, skip)
        return ParseResult(ParseState.IGNORED, base + 12, frame)
    if qd != 1 or not _plausible_header(buf, base, response):
        return ParseResult(ParseState.INVALID, 0, None)
    name = read_name(buf, base, base + 12, end)
    if name == _TRUNCATED:
        return short()
    if isinstance(name, int):
        return ParseResult(ParseState.INVALID, 0, None)
    qname, pos = name
    if pos + 4 > end:
        return short()
    qtype, qclass = _QUESTION_TAIL.unpack_from(buf, pos)
    if qtype == 0 or qclass & 0x7FFF not in QCLASSES:  # mDNS uses the top bit of qclass
        return ParseResult(ParseState.INVALID, 0, None)
    pos += 4
    rest = base + length - pos
    framing = Framing(BodyKind.LENGTH, rest) if rest else NO_BODY
    frame = DnsMessage(msg_id, response, opcode, rcode, qname, qtype, qclass & 0x7FFF, an, framing)
    return ParseResult(ParseState.SUCCESS, pos, frame)


def parse_udp(buf: Buffer, response: bool) -> ParseResult:
    result = parse_message(buf, 0, len(buf), response)
    if result.frame is None:
        return result
    # The datagram is the message: nothing of it is left to read.
    return ParseResult(result.state, len(buf), replace(result.frame, framing=NO_BODY))


def parse_tcp(buf: Buffer, response: bool) -> ParseResult:
    if len(buf) < 2:
        return ParseResult(ParseState.NEEDS_MORE_DATA, 0, None)
    length = (buf[0] << 8) | buf[1]
    if length < _MIN_MESSAGE:
        return ParseResult(ParseState.INVALID, 0, None)
    return parse_message(buf, 2, length, response)


def find_frame_boundary(buf: Buffer, start: int, kind: MessageKind) -> int:
    """Next offset whose length prefix and header look like a DNS message of ``kind``.

    QDCOUNT is 1 in every real lookup, so candidates are found by searching for it.
    """
    response = kind is MessageKind.RESPONSE
    idx = buf.find(b"\x00\x01", start + 6)
    while idx >= 0:
        p = idx - 6
        if len(buf) - p < 14:
            return p
        if (buf[p] << 8) | buf[p + 1] >= _MIN_MESSAGE and _plausible_header(buf, p + 2, response):
            return p
        idx = buf.find(b"\x00\x01", idx + 1)
    # Too short to judge: keep the tail that could still be the start of a message.
    return min(len(buf), max(start, len(buf) - 7))


def _key(m: Message[Any]) -> tuple[int, str, int, int]:
    f: DnsMessage = m.frame
    return f.id, f.name, f.qtype, f.qclass


def stitch(requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
    """Pair by (id, question), not by order: resolvers send A and AAAA queries together."""
    out = Stitched()
    waiting: deque[Message[Any]] = deque()
    while responses:
        resp = responses.popleft()
        key = _key(resp)
        matches = [i for i, req in enumerate(requests) if _key(req) == key and req.ts_ns <= resp.ts_ns]
        if not matches:
            waiting.append(resp)  # its query may still be on its way; expire() bounds the wait
            continue
        req = requests[matches[0]]
        # Later copies of the same query are retransmissions this response answers too.
        for i in reversed(matches):
            del requests[i]
        q: DnsMessage = req.frame
        r: DnsMessage = resp.frame
        out.records.append(
            DnsRecord(
                id=q.id,
                name=q.name,
                qtype=qtype_name(q.qtype),
                rcode=rcode_name(r.rcode),
                answers=r.answers,
                request_bytes=req.size,
                response_bytes=resp.size,
                start_ns=req.ts_ns,
                latency_ns=resp.ts_ns - req.ts_ns,
                timed_out=False,
            )
        )
    responses.extend(waiting)
    return out


class Dns:
    """DNS as a registered ``Protocol``: ``Dns(tcp=False)`` for UDP, ``Dns(tcp=True)`` for TCP."""

    __slots__ = ("_tcp",)

    def __init__(self, *, tcp: bool) -> None:
        self._tcp = tcp

    @property
    def name(self) -> str:
        return "dns_tcp" if self._tcp else "dns"

    @property
    def datagram(self) -> bool:
        return not self._tcp

    @property
    def default_timeout_ns(self) -> int:
        return 5 * 10**9  # glibc's resolver retries after 5 s

    def find_frame_boundary(self, buf: Buffer, start: int, kind: MessageKind) -> int:
        return find_frame_boundary(buf, start, kind) if self._tcp else len(buf)

    def parse_request(self, buf: Buffer) -> ParseResult:
        return parse_tcp(buf, False) if self._tcp else parse_udp(buf, False)

    def parse_response(self, buf: Buffer, request_hint: Any | None) -> ParseResult:
        return parse_tcp(buf, True) if self._tcp else parse_udp(buf, True)

    def body_reader(self, frame: Any) -> BodyReader | None:
        return generic_reader(frame.framing)

    def stitch(self, requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
        return stitch(requests, responses)

    def timeout_record(self, request: Message[Any], now_ns: int) -> Any | None:
        q: DnsMessage = request.frame
        return DnsRecord(q.id, q.name, qtype_name(q.qtype), "", 0, request.size, 0, request.ts_ns,
                         now_ns - request.ts_ns, True)  # fmt: skip
