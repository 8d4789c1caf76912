"""Memcached: real pymemcache and meta-memcache sessions fed whole and byte by byte; noreply; quiet meta
commands; hits and misses; errors; values larger than the capture; resync; keys never kept; fuzz."""

from __future__ import annotations

import random

import pytest

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, DbRecord, Direction, Role
from node_exporter.protocols.base import MessageKind, ParseState
from node_exporter.protocols.memcached import cut_reply, find_frame_boundary, parse_request, parse_response
from tests.node_exporter.protocols.test_redis import by_op, feed_session
from tests.node_exporter.protocols.wire_memcached import (
    META_OPERATIONS,
    META_SESSION,
    PYMEMCACHE_OPERATIONS,
    PYMEMCACHE_SESSION,
)

MC = PROTOCOLS["memcached"]
EG, IN = Direction.EGRESS, Direction.INGRESS


def hits(recs: list[DbRecord]) -> list[tuple[int, int]]:
    return [(r.cache_hits, r.cache_misses) for r in recs]


@pytest.mark.parametrize("split", [None, 1, 5])
def test_pymemcache_text_session(split: int | None) -> None:
    t = ConnectionTracker(MC, Role.CLIENT)
    recs = feed_session(t, PYMEMCACHE_SESSION, split)
    assert by_op(recs) == PYMEMCACHE_OPERATIONS
    assert all(r.system == "memcached" for r in recs)
    set_, get_hit, get_miss, get3, gets, add, set_noreply, incr, incr_nf, _del, del_nf, touch = recs
    assert hits([get_hit, get_miss, get3, gets]) == [(1, 0), (0, 1), (1, 2), (1, 0)]
    assert add.status_code == "NOT_STORED" and add.error_type == ""
    assert (set_noreply.response_bytes, set_noreply.latency_ns) == (0, 0)  # noreply: no response, at once
    assert incr.status_code == "" and incr_nf.status_code == "NOT_FOUND" and del_nf.status_code == "NOT_FOUND"
    assert set_.error_type == touch.error_type == ""
    assert get_hit.response_bytes == len(PYMEMCACHE_SESSION[3][1])
    # `bogus SECRETARG` is not memcached: counted invalid; its ERROR waits for a request, and is an
    # orphan at close; nothing invented
    assert (t.counters()["invalid_frames"], t.pending_responses()) == (1, 1)
    assert t.close() == [] and t.counters()["orphan_responses"] == 1


def test_meta_session() -> None:
    t = ConnectionTracker(MC, Role.CLIENT)
    recs = feed_session(t, META_SESSION)
    assert by_op(recs) == META_OPERATIONS
    assert hits([r for r in recs if r.operation == "mg"]) == [(1, 0), (0, 1), (1, 0), (0, 1)]
    assert [r.status_code for r in recs if r.operation == "md"] == ["", "NF"]
    assert t.counters()["invalid_frames"] == 0 and t.pending_requests() == 0


def test_server_side_sees_the_same() -> None:
    t = ConnectionTracker(MC, Role.SERVER)
    flipped = [("S" if who == "C" else "C", d) for who, d in META_SESSION]
    assert by_op(feed_session(t, flipped)) == META_OPERATIONS


def test_keys_and_values_never_survive() -> None:
    recs = feed_session(ConnectionTracker(MC, Role.CLIENT), PYMEMCACHE_SESSION + META_SESSION)
    frames = [parse_request(d).frame for w, d in PYMEMCACHE_SESSION + META_SESSION if w == "C"]
    frames += [parse_response(d, None).frame for w, d in PYMEMCACHE_SESSION + META_SESSION if w == "S"]
    assert recs and "SECRET" not in repr(recs) + repr(frames)


def test_quiet_meta_batch_ended_by_mn() -> None:
    # mg a (hit), mg b (miss, EN suppressed), ms c (HD suppressed), md d (NF suppressed), mn
    t = ConnectionTracker(MC, Role.CLIENT)
    t.feed(EG, b"mg a v q\r\nmg b v q\r\nms c 1 q\r\nx\r\nmd d q\r\nmn\r\n", 1, 0)
    recs = t.feed(IN, b"VA 1\r\n1\r\nMN\r\n", 2, 0)
    assert by_op(recs) == ["mg", "mg", "ms", "md", "mn"]
    assert hits(recs[:2]) == [(1, 0), (0, 1)] and recs[1].response_bytes == 0
    assert t.pending_requests() == t.pending_responses() == 0


def test_quiet_replies_pair_by_opaque_token() -> None:
    t = ConnectionTracker(MC, Role.CLIENT)
    t.feed(EG, b"mg a v q O1\r\nmg b v q O2\r\nmn\r\n", 1, 0)
    recs = t.feed(IN, b"VA 1 O2\r\nz\r\nMN\r\n", 2, 0)
    assert hits(recs[:2]) == [(0, 1), (1, 0)]


def test_a_value_larger_than_the_capture() -> None:
    value = b"v" * 50_000
    reply = b"VALUE big 0 50000\r\n" + value + b"\r\nEND\r\n"
    t = ConnectionTracker(MC, Role.CLIENT)
    t.feed(EG, b"get big\r\n", 1, 0)
    out = t.feed(IN, reply[:4096], 2, 0, length=len(reply) - 5)  # one recv: all but END
    out += t.feed(IN, b"END\r\n", 3, len(reply) - 5)
    assert hits(out) == [(1, 0)] and out[0].response_bytes == len(reply)
    assert t.counters()["invalid_frames"] == 0


def test_server_errors() -> None:
    t = ConnectionTracker(MC, Role.CLIENT)
    t.feed(EG, b"set k 0 0 3\r\nabc\r\nget k\r\n", 1, 0)
    recs = t.feed(IN, b"SERVER_ERROR out of memory storing object\r\nCLIENT_ERROR bad data chunk\r\n", 2, 0)
    assert [(r.status_code, r.error_type) for r in recs] == [("SERVER_ERROR",) * 2, ("CLIENT_ERROR",) * 2]
    assert recs[1].cache_misses == 0  # an error is not a miss


def test_stats_reply_is_one_message() -> None:
    t = ConnectionTracker(MC, Role.CLIENT)
    t.feed(EG, b"stats\r\n", 1, 0)
    recs = t.feed(IN, b"STAT pid 1\r\nSTAT uptime 5\r\nEND\r\n", 2, 0)
    assert by_op(recs) == ["stats"] and t.counters()["orphan_responses"] == 0


def test_resync_after_garbage() -> None:
    t = ConnectionTracker(MC, Role.CLIENT)
    t.feed(EG, b"\x00\x01garbage\xff\r\nget k\r\n", 1, 0)
    assert by_op(t.feed(IN, b"END\r\n", 2, 0)) == ["get"]
    assert t.counters()["invalid_frames"] == 1


@pytest.mark.parametrize(
    ("data", "state"),
    [
        (b"get", ParseState.NEEDS_MORE_DATA),
        (b"get\r\n", ParseState.INVALID),
        (b"set k 0 0 x\r\n", ParseState.INVALID),
        (b"set k 0 0 99999999999\r\n", ParseState.INVALID),
        (b"ms k\r\n", ParseState.INVALID),
        (b"x" * 3000, ParseState.INVALID),
        (b"mn\r\n", ParseState.SUCCESS),
    ],
)
def test_request_states(data: bytes, state: ParseState) -> None:
    assert parse_request(data).state is state


def test_find_frame_boundary() -> None:
    buf = b"xx yy\r\nnot a cmd\r\nget k\r\n"
    assert find_frame_boundary(buf, 1, MessageKind.REQUEST) == buf.index(b"get")
    assert find_frame_boundary(b"junk\r\n42\r\n", 1, MessageKind.RESPONSE) == 6


def test_fuzz_parsers_never_raise_100k() -> None:
    rng = random.Random(16)
    seeds = [d for _, d in PYMEMCACHE_SESSION + META_SESSION]
    inputs = []
    for _ in range(90_000):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(b) + 1)
            op = rng.randrange(4)
            if op == 0 and b:
                b[min(pos, len(b) - 1)] = rng.randrange(256)
            elif op == 1:
                b[pos:pos] = bytes([rng.choice(b" \r\n0123456789qOVAEND")])
            elif op == 2:
                del b[pos : pos + rng.randint(1, 8)]
            else:
                b[pos:pos] = str(rng.choice([-1, 0, 2**31, 2**64, 10**30])).encode()
        inputs.append(bytes(b))
    inputs += [rng.randbytes(rng.randrange(64)) for _ in range(10_000)]
    for data in inputs:
        for p in (parse_request(data), parse_response(data, None)):
            assert 0 <= p.consumed <= len(data)
            reader = MC.body_reader(p.frame) if p.frame is not None else None
            if reader is not None:
                _state, n = reader.read(data[p.consumed :])
                assert 0 <= n <= len(data) - p.consumed
        for kind in MessageKind:
            assert min(1, len(data)) <= find_frame_boundary(data, 1, kind) <= len(data)
        cut = cut_reply(data)
        assert cut is None or cut.consumed == len(data)


def test_fuzz_tracker_random_splits() -> None:
    rng = random.Random(17)
    c = b"".join(d for w, d in PYMEMCACHE_SESSION + META_SESSION if w == "C")
    s = b"".join(d for w, d in PYMEMCACHE_SESSION + META_SESSION if w == "S")
    for _ in range(1500):
        t = ConnectionTracker(MC, Role.CLIENT)
        bc, bs = bytearray(c), bytearray(s)
        for buf in (bc, bs):
            for _ in range(rng.randint(0, 3)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        ic = is_ = ts = 0
        while ic < len(bc) or is_ < len(bs):
            ts += 1
            n = rng.randint(1, 48)
            if ic < len(bc) and (is_ >= len(bs) or rng.random() < 0.5):
                t.feed(EG, bytes(bc[ic : ic + n]), ts, ic)
                ic += n
            else:
                t.feed(IN, bytes(bs[is_ : is_ + n]), ts, is_)
                is_ += n
        t.close()


LONG_ERROR = b"SERVER_ERROR backend unavailable: " + b"pool exhausted; " * 80 + b"\r\n"


def test_an_error_line_longer_than_the_capture_is_answered_from_its_head() -> None:
    """A SERVER_ERROR (~1.3 KiB, as a proxy in front of memcached may answer) cut at 512 bytes: the
    reply is that line, its keyword the error; its size the whole call's; the stream goes on."""
    t = ConnectionTracker(MC, Role.CLIENT)
    t.feed(EG, b"get k\r\n", 1, 0)
    recs = t.feed(IN, LONG_ERROR[:512], 2, 0, length=len(LONG_ERROR))
    assert [(r.operation, r.error_type, r.response_bytes) for r in recs] == [("get", "SERVER_ERROR", len(LONG_ERROR))]
    c = t.counters()
    assert (c["truncations"], c["cut_responses"], c["unanswered_requests"], c["invalid_frames"]) == (1, 1, 0, 0)
    t.feed(EG, b"get k\r\n", 3, 7)
    assert [hits(t.feed(IN, b"END\r\n", 4, len(LONG_ERROR)))] == [[(0, 1)]]


@pytest.mark.parametrize("cut", [b"VALUE k 0 5000", b"SERVER_ERROR x\r\nEN", b"STAT pid", b"x" * 40])
def test_a_cut_head_that_is_not_an_error_line_is_not_guessed(cut: bytes) -> None:
    assert cut_reply(cut) is None
    t = ConnectionTracker(MC, Role.CLIENT)
    t.feed(EG, b"get k\r\n", 1, 0)
    t.feed(IN, cut, 2, 0, length=6000)
    assert t.counters()["cut_responses"] == 0
