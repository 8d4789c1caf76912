"""DNS: a dig exchange built by hand with struct, over UDP and TCP; compression; pairing; timeouts."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, Direction, DnsRecord, Role, TrackerLimits
from node_exporter.protocols.base import MessageKind, ParseState
from node_exporter.protocols.dns import _BAD, DnsMessage, find_frame_boundary, parse_tcp, parse_udp, read_name

UDP, TCP = PROTOCOLS["dns"], PROTOCOLS["dns_tcp"]
EG, IN = Direction.EGRESS, Direction.INGRESS
A, AAAA, IN_CLASS = 1, 28, 1
COOKIE = bytes.fromhex("c1a55ed0b0e5f00d")


def qname(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label) + b"\x00"


def opt(cookie: bytes) -> bytes:
    """EDNS(0) OPT pseudo-RR: root owner, UDP size 1232, one COOKIE option (RFC 7873)."""
    return b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 4 + len(cookie)) + struct.pack("!HH", 10, len(cookie)) + cookie


def query(msg_id: int, name: str, qtype: int = A, flags: int = 0x0120) -> bytes:
    """What dig 9.18 sends: RD and AD set, one question, an OPT record with a client cookie."""
    return (
        struct.pack("!6H", msg_id, flags, 1, 0, 0, 1) + qname(name) + struct.pack("!HH", qtype, IN_CLASS) + opt(COOKIE)
    )


def answer(
    msg_id: int, name: str, qtype: int = A, rcode: int = 0, addrs: tuple[bytes, ...] = (b"\x5d\xb8\xd7\x0e",)
) -> bytes:
    """QR RD RA + rcode; each answer's owner is a pointer to the question name at offset 12."""
    head = struct.pack("!6H", msg_id, 0x8180 | rcode, 1, len(addrs), 0, 1) + qname(name) + struct.pack("!HH", qtype, 1)
    rrs = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", qtype, IN_CLASS, 3600, len(a)) + a for a in addrs)
    return head + rrs + opt(COOKIE + bytes(range(16)))


# `dig example.com A` as it leaves the host (52 bytes, "MSG SIZE sent: 52") and its answer (84).
DIG_QUERY = query(0x8E2B, "example.com")
DIG_ANSWER = answer(0x8E2B, "example.com")


def test_dig_wire_bytes() -> None:
    assert DIG_QUERY.hex() == (
        "8e2b01200001000000000001"  # id, RD|AD, QD=1, AN=0, NS=0, AR=1
        "076578616d706c6503636f6d0000010001"  # example.com A IN
        "00" "0029" "04d0" "00000000" "000c"  # OPT: root, type 41, UDP 1232, no flags, 12 bytes
        "000a" "0008" "c1a55ed0b0e5f00d"  # COOKIE, 8-byte client cookie
    )  # fmt: skip
    assert len(DIG_QUERY) == 52 and len(DIG_ANSWER) == 84


def tcp(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


def test_udp_exchange() -> None:
    t = ConnectionTracker(UDP, Role.CLIENT)
    assert t.feed(EG, DIG_QUERY, 1_000) == []
    (rec,) = t.feed(IN, DIG_ANSWER, 4_000)
    assert rec == DnsRecord(0x8E2B, "example.com", "A", "NOERROR", 1, 52, 84, 1_000, 3_000, False)


def test_server_side_udp() -> None:
    t = ConnectionTracker(UDP, Role.SERVER)
    t.feed(IN, DIG_QUERY, 10)
    (rec,) = t.feed(EG, DIG_ANSWER, 30)
    assert rec.latency_ns == 20


@pytest.mark.parametrize(
    ("rcode", "name"), [(0, "NOERROR"), (2, "SERVFAIL"), (3, "NXDOMAIN"), (5, "REFUSED"), (11, "RCODE11")]
)
def test_rcode_names(rcode: int, name: str) -> None:
    t = ConnectionTracker(UDP, Role.CLIENT)
    t.feed(EG, query(7, "nope.example"), 1)
    (rec,) = t.feed(IN, answer(7, "nope.example", rcode=rcode, addrs=()), 2)
    assert (rec.rcode, rec.answers) == (name, 0)


@pytest.mark.parametrize(
    ("qtype", "name"), [(1, "A"), (28, "AAAA"), (33, "SRV"), (65, "HTTPS"), (255, "ANY"), (999, "TYPE999")]
)
def test_qtype_names(qtype: int, name: str) -> None:
    t = ConnectionTracker(UDP, Role.CLIENT)
    t.feed(EG, query(9, "svc.cluster.local", qtype), 1)
    (rec,) = t.feed(IN, answer(9, "svc.cluster.local", qtype, addrs=()), 2)
    assert rec.qtype == name


def test_pairing_is_by_id_and_question_not_order() -> None:
    # glibc sends A and AAAA back to back on one socket; answers come in any order.
    t = ConnectionTracker(UDP, Role.CLIENT)
    t.feed(EG, query(0x1111, "api.internal", A), 10)
    t.feed(EG, query(0x2222, "api.internal", AAAA), 11)
    t.feed(IN, answer(0x1111, "other.internal", A), 12)  # same id, other question: no pair
    (r1,) = t.feed(IN, answer(0x2222, "api.internal", AAAA, addrs=(bytes(16),)), 20)
    (r2,) = t.feed(IN, answer(0x1111, "api.internal", A), 30)
    assert (r1.qtype, r1.latency_ns, r2.qtype, r2.latency_ns) == ("AAAA", 9, "A", 20)
    assert t.pending_responses() == 1  # the mismatched answer waits until expire()
    t.expire(10**12)
    assert t.orphan_responses == 1


def test_names_are_lowercased_0x20() -> None:
    t = ConnectionTracker(UDP, Role.CLIENT)
    t.feed(EG, query(5, "ExAmPlE.CoM"), 1)
    (rec,) = t.feed(IN, answer(5, "ExAmPlE.CoM"), 2)
    assert rec.name == "example.com"


def test_timeouts_and_retransmissions() -> None:
    t = ConnectionTracker(UDP, Role.CLIENT, TrackerLimits(timeout_ns=5_000))
    t.feed(EG, query(1, "slow.example"), 1_000)
    t.feed(EG, query(2, "dead.example"), 1_500)
    t.feed(EG, query(1, "slow.example"), 3_000)  # the resolver retries with the same id
    assert t.expire(4_000) == []
    (rec,) = t.feed(IN, answer(1, "slow.example"), 4_500)
    assert rec.latency_ns == 3_500  # from the first send: what the application waited
    (timeout,) = t.expire(7_000)
    assert timeout == DnsRecord(2, "dead.example", "A", "", 0, len(query(2, "dead.example")), 0, 1_500, 5_500, True)
    assert t.expired_requests == 1 and t.pending_requests() == 0


def test_capture_truncated_answer_still_parses() -> None:
    # The kernel may ship only a payload head; the question is all we need.
    cut = DIG_ANSWER[:29]
    state, _, frame = parse_udp(cut, True)
    assert state is ParseState.SUCCESS and frame.answers == 1
    assert parse_udp(DIG_ANSWER[:20], True).state is ParseState.INVALID


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_tcp_exchange(mode: str) -> None:
    t = ConnectionTracker(TCP, Role.CLIENT)
    q, a = tcp(DIG_QUERY), tcp(DIG_ANSWER)
    if mode == "whole":
        out = t.feed(EG, q, 1) + t.feed(IN, a, 9)
    elif mode == "bytewise":
        out = [r for i in range(len(q)) for r in t.feed(EG, q[i : i + 1], 1 if i == 0 else 5)]
        out += [r for i in range(len(a)) for r in t.feed(IN, a[i : i + 1], 9 if i == 0 else 12)]
    else:
        out = t.feed(EG, q + tcp(query(2, "next.example"))[:7], 1) + t.feed(IN, a + b"\x00", 9)
        assert t.buffered_bytes(EG) == 7 and t.buffered_bytes(IN) == 1
    (rec,) = out
    assert (rec.name, rec.request_bytes, rec.response_bytes, rec.latency_ns) == ("example.com", 54, 86, 8)
    assert t.invalid_frames == 0


def test_tcp_two_messages_in_one_chunk_and_big_answer_streams() -> None:
    t = ConnectionTracker(TCP, Role.CLIENT, TrackerLimits(max_buffer=512))
    t.feed(EG, tcp(query(1, "a.example")) + tcp(query(2, "b.example", AAAA)), 1)
    big = answer(2, "b.example", AAAA, addrs=(bytes(16),) * 150)  # ~4 KiB, well over max_buffer
    out = t.feed(IN, tcp(big)[:300], 2) + t.feed(IN, tcp(big)[300:] + tcp(answer(1, "a.example")), 3)
    assert [(r.name, r.answers) for r in out] == [("b.example", 150), ("a.example", 1)]
    assert t.buffer_overflows == 0


def test_tcp_skips_non_query_messages_whole() -> None:
    t = ConnectionTracker(TCP, Role.SERVER)
    soa = b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, 0, 30) + bytes(30)  # NOTIFY carries the new SOA
    notify = struct.pack("!6H", 9, 0x2400, 1, 1, 0, 0) + qname("zone.example") + struct.pack("!HH", 6, 1) + soa
    t.feed(IN, tcp(notify) + tcp(DIG_QUERY), 1)
    (rec,) = t.feed(EG, tcp(DIG_ANSWER), 2)
    assert rec.name == "example.com" and t.ignored_messages == 1 and t.invalid_frames == 0


def test_tcp_resync_after_gap() -> None:
    t = ConnectionTracker(TCP, Role.CLIENT)
    q1, q2 = tcp(query(1, "lost.example")), tcp(query(2, "kept.example"))
    t.feed(EG, q1[:10], 1, seq=0)
    t.feed(EG, b"\xff" * 5 + q2, 2, seq=20)  # bytes 10..19 lost: junk, then a real message
    (rec,) = t.feed(IN, tcp(answer(2, "kept.example")), 3)
    assert rec.name == "kept.example" and t.gaps == 1 and t.aborted_messages == 0


def test_compression_and_loops() -> None:
    msg = bytearray(12) + qname("example.com") + b"\x03www\xc0\x0c" + b"\xc0\x19" + b"\xc0\x21"
    assert read_name(msg, 0, 12, len(msg)) == ("example.com", 25)
    assert read_name(msg, 0, 25, len(msg)) == ("www.example.com", 31)
    assert read_name(msg, 0, 31, len(msg)) == ("www.example.com", 33)  # a pointer to a pointer
    assert read_name(msg, 0, 33, len(msg)) == _BAD  # points to itself
    fwd = bytearray(12) + b"\xc0\x0e" + qname("x")
    assert read_name(fwd, 0, 12, len(fwd)) == _BAD  # forward pointers are never emitted
    assert read_name(bytearray(12) + b"\xc0\x02", 0, 12, 14) == _BAD  # into the header
    too_long = bytearray(12) + b"\x3f" + b"a" * 63
    too_long = too_long + too_long[12:] * 4 + b"\x00"
    assert read_name(too_long, 0, 12, len(too_long)) == _BAD  # over 255 bytes
    assert read_name(bytearray(12) + b"\x41", 0, 12, 13) == _BAD  # reserved label type
    odd = bytearray(12) + b"\x04a.B\x01\x00"
    assert read_name(odd, 0, 12, len(odd)) == ("a\\.b\\001", 18)


@pytest.mark.parametrize(
    ("data", "response", "state"),
    [
        (DIG_QUERY, True, ParseState.INVALID),  # QR says query
        (DIG_ANSWER, False, ParseState.INVALID),
        (struct.pack("!6H", 1, 0x2000, 1, 0, 0, 0), False, ParseState.IGNORED),  # NOTIFY
        (struct.pack("!6H", 1, 0x0100, 0, 0, 0, 0), False, ParseState.IGNORED),  # no question
        (
            struct.pack("!6H", 1, 0x0100, 2, 0, 0, 0) + qname("a") * 2 + b"\x00\x01\x00\x01" * 2,
            False,
            ParseState.INVALID,
        ),
        (struct.pack("!6H", 1, 0x0140, 1, 0, 0, 0) + qname("a") + b"\x00\x01\x00\x01", False, ParseState.INVALID),  # Z
        (struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + qname("a") + b"\x00\x01\x00\x09", False, ParseState.INVALID),
        (b"\x16\x03\x01\x02\x00\x01\x00\x00\x01\xfc\x03\x03", False, ParseState.INVALID),
    ],
)
def test_udp_states(data: bytes, response: bool, state: ParseState) -> None:
    assert parse_udp(data, response).state is state


def test_tcp_states() -> None:
    assert parse_tcp(b"\x00", False).state is ParseState.NEEDS_MORE_DATA
    assert parse_tcp(b"\x00\x05hello", False).state is ParseState.INVALID
    assert parse_tcp(tcp(DIG_QUERY)[:20], False).state is ParseState.NEEDS_MORE_DATA
    whole = parse_tcp(tcp(DIG_QUERY) + b"trailing", False)
    assert whole.state is ParseState.SUCCESS and whole.consumed == 2 + 12 + 17
    assert isinstance(whole.frame, DnsMessage) and whole.frame.framing.length == 23  # the OPT RR, skipped


def test_find_frame_boundary() -> None:
    junk = b"\x07\x00\x01" * 5
    assert find_frame_boundary(junk + tcp(DIG_QUERY), 1, MessageKind.REQUEST) == len(junk)
    assert find_frame_boundary(junk + tcp(DIG_QUERY), 1, MessageKind.RESPONSE) >= len(junk) + 6


@settings(max_examples=500)
@given(st.binary(max_size=300), st.booleans())
def test_parsers_never_raise(data: bytes, response: bool) -> None:
    for result in (parse_udp(data, response), parse_tcp(data, response)):
        assert 0 <= result.consumed <= len(data)
    read_name(data, 0, 12, len(data))
    assert min(1, len(data)) <= find_frame_boundary(data, 1, MessageKind.REQUEST) <= len(data)


@settings(max_examples=200)
@given(st.integers(0, len(DIG_ANSWER) - 1), st.integers(0, 255))
def test_corrupted_answers_never_raise(pos: int, value: int) -> None:
    bad = bytearray(DIG_ANSWER)
    bad[pos] = value
    t = ConnectionTracker(UDP, Role.CLIENT)
    t.feed(EG, DIG_QUERY, 1)
    out = t.feed(IN, bytes(bad), 2)
    assert len(out) <= 1 and t.pending_responses() <= 1
