"""Redis RESP2/RESP3: a real redis-cli session fed whole, byte by byte and with trailing bytes; pipelining;
MULTI/EXEC; pub/sub pushes; errors; capture truncation; resync; keys and values never kept; fuzz."""

from __future__ import annotations

import random
from typing import Any

import pytest

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, DbRecord, Direction, Role, TrackerLimits
from node_exporter.protocols.base import MessageKind, ParseState
from node_exporter.protocols.redis import (
    RedisCommand,
    RespReader,
    cut_reply,
    find_frame_boundary,
    parse_request,
    parse_response,
)
from tests.node_exporter.protocols.wire_redis import (
    CLI_OPERATIONS,
    CLI_SESSION,
    MESSAGE_RESP2,
    MESSAGE_RESP3,
    SUBSCRIBE_RESP2,
    SUBSCRIBE_RESP3,
    SUBSCRIBED_RESP2,
    SUBSCRIBED_RESP3,
)

REDIS = PROTOCOLS["redis"]
EG, IN = Direction.EGRESS, Direction.INGRESS


def feed_session(t: ConnectionTracker, session: list[tuple[str, bytes]], split: int | None = None) -> list[Any]:
    """Client side: C is egress, S ingress; each send split into `split`-byte chunks (None: whole)."""
    out: list[Any] = []
    seq = {EG: 0, IN: 0}
    for ts, (who, data) in enumerate(session, start=1):
        d = EG if who == "C" else IN
        step = split or len(data)
        for i in range(0, len(data), step):
            out += t.feed(d, data[i : i + step], ts * 1000, seq[d])
            seq[d] += len(data[i : i + step])
    return out


def by_op(records: list[DbRecord]) -> list[str]:
    return [r.operation for r in records]


@pytest.mark.parametrize("split", [None, 1, 7])
def test_cli_session_whole_and_byte_by_byte(split: int | None) -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT)
    recs = feed_session(t, CLI_SESSION, split)
    assert by_op(recs) == CLI_OPERATIONS
    assert all(r.system == "redis" and r.query_text == "" for r in recs)
    set_, get_hit, get_miss, mget, _lpush, wrongtype, multi, incr, _set2, exec_, auth, hello, *_ = recs
    assert (get_hit.cache_hits, get_hit.cache_misses) == (1, 0)
    assert (get_miss.cache_hits, get_miss.cache_misses) == (0, 1)
    assert (mget.cache_hits, mget.cache_misses, mget.returned_rows) == (1, 1, 1)
    assert (wrongtype.status_code, wrongtype.error_type) == ("WRONGTYPE", "WRONGTYPE")
    assert (auth.status_code, auth.error_type) == ("ERR", "ERR")
    assert exec_.batch_size == 2 and multi.batch_size == 0 and incr.error_type == ""
    assert set_.error_type == "" and hello.error_type == ""
    # sizes are the wire's, latency first byte to first byte
    assert (set_.request_bytes, set_.response_bytes, set_.latency_ns) == (len(CLI_SESSION[0][1]), 5, 1000)
    assert t.counters()["invalid_frames"] == 0 and t.pending_requests() == t.pending_responses() == 0


def test_server_side_sees_the_same_operations() -> None:
    t = ConnectionTracker(REDIS, Role.SERVER)
    flipped = [("S" if who == "C" else "C", data) for who, data in CLI_SESSION]
    assert by_op(feed_session(t, flipped)) == CLI_OPERATIONS


def test_no_key_value_or_password_survives() -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT)
    recs = feed_session(t, CLI_SESSION)
    frames = [parse_request(d).frame for who, d in CLI_SESSION if who == "C"]
    assert "SECRET" not in repr(recs) + repr(frames)


def test_pipelined_commands_in_one_send_pair_in_order() -> None:
    # redis-benchmark -P 16: sixteen commands in one write, sixteen replies in one read.
    cmds = b"".join(b"*2\r\n$3\r\nGET\r\n$6\r\nkey:%02d\r\n" % i for i in range(8))
    cmds += b"".join(b"*3\r\n$3\r\nSET\r\n$6\r\nkey:%02d\r\n$3\r\nxxx\r\n" % i for i in range(8))
    replies = b"$3\r\nxxx\r\n" * 4 + b"$-1\r\n" * 4 + b"+OK\r\n" * 8
    t = ConnectionTracker(REDIS, Role.CLIENT)
    assert t.feed(EG, cmds, 1, 0) == []
    recs = t.feed(IN, replies, 2, 0)
    assert by_op(recs) == ["GET"] * 8 + ["SET"] * 8
    assert [r.cache_hits for r in recs[:8]] == [1] * 4 + [0] * 4
    assert sum(r.response_bytes for r in recs) == len(replies)


def test_resp2_pubsub_pushes_are_not_requests_or_answers() -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT)
    out = t.feed(EG, SUBSCRIBE_RESP2, 1, 0) + t.feed(IN, SUBSCRIBED_RESP2 + MESSAGE_RESP2, 2, 0)
    # PING while subscribed answers with an array too, but not a push-shaped one; a message comes first.
    out += t.feed(EG, b"*1\r\n$4\r\nPING\r\n", 3, len(SUBSCRIBE_RESP2))
    out += t.feed(IN, MESSAGE_RESP2 + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", 4, len(SUBSCRIBED_RESP2 + MESSAGE_RESP2))
    assert by_op(out) == ["PING"] and out[0].error_type == ""
    c = t.counters()
    assert c["ignored_messages"] == 1 + 2 + 2  # SUBSCRIBE, two confirmations, two messages
    assert (c["orphan_responses"], c["invalid_frames"], t.pending_requests()) == (0, 0, 0)


def test_resp3_pushes_are_ignored() -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT)
    out = t.feed(EG, SUBSCRIBE_RESP3, 1, 0) + t.feed(IN, SUBSCRIBED_RESP3 + MESSAGE_RESP3, 2, 0)
    out += t.feed(EG, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 3, len(SUBSCRIBE_RESP3))
    out += t.feed(IN, MESSAGE_RESP3 + b"_\r\n", 4, len(SUBSCRIBED_RESP3 + MESSAGE_RESP3))
    assert by_op(out) == ["GET"] and out[0].cache_misses == 1
    assert t.counters()["ignored_messages"] == 4


def test_resp3_types_and_attributes_are_skipped_whole() -> None:
    reply = (
        b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n"  # attribute before the reply (ignored)
        b"*6\r\n#t\r\n,3.14\r\n(3492890328409238509324850943850943825024385\r\n=15\r\ntxt:Some string\r\n"
        b"~2\r\n:1\r\n:2\r\n!21\r\nSYNTAX invalid syntax\r\n"
    )
    t = ConnectionTracker(REDIS, Role.CLIENT)
    t.feed(EG, b"*1\r\n$5\r\nDEBUG\r\n", 1, 0)
    recs = t.feed(IN, reply, 2, 0)
    assert by_op(recs) == ["DEBUG"] and recs[0].response_bytes == len(reply) - len(
        b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n"
    )
    assert t.counters()["ignored_messages"] == 1 and t.counters()["invalid_frames"] == 0


def test_inline_command() -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT)
    t.feed(EG, b"PING\r\n", 1, 0)
    assert by_op(t.feed(IN, b"+PONG\r\n", 2, 0)) == ["PING"]


def test_a_value_larger_than_the_capture_is_skipped_by_its_length() -> None:
    value = b"v" * 100_000
    reply = b"$100000\r\n" + value + b"\r\n"
    t = ConnectionTracker(REDIS, Role.CLIENT)
    t.feed(EG, b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n", 1, 0)
    recs = t.feed(IN, reply[:4096], 2, 0, length=len(reply))  # what the kernel captured of one recv
    assert by_op(recs) == ["GET"] and recs[0].response_bytes == len(reply)
    t.feed(EG, b"*1\r\n$4\r\nPING\r\n", 3, 22)
    assert by_op(t.feed(IN, b"+PONG\r\n", 4, len(reply))) == ["PING"]
    assert t.counters()["truncations"] == 1 and t.counters()["invalid_frames"] == 0


DENIED = b"-DENIED Redis is running in protected mode because protected mode is enabled" + b" and ..." * 120 + b"\r\n"


def test_a_reply_line_longer_than_the_capture_is_answered_from_its_head() -> None:
    """-DENIED (~1 KiB, what a protected-mode server answers a non-loopback client) cut at 512 bytes:
    the reply is that line, its error prefix in the captured part; its size the whole call's."""
    t = ConnectionTracker(REDIS, Role.CLIENT)
    t.feed(EG, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", 1, 0)
    recs = t.feed(IN, DENIED[:512], 2, 0, length=len(DENIED))
    assert [(r.operation, r.error_type, r.response_bytes) for r in recs] == [("SET", "DENIED", len(DENIED))]
    c = t.counters()
    assert (c["truncations"], c["cut_responses"], c["unanswered_requests"], c["invalid_frames"]) == (1, 1, 0, 0)
    # the stream goes on after the cut: the next command pairs with its own reply
    t.feed(EG, b"*1\r\n$4\r\nPING\r\n", 3, 27)
    assert [r.operation for r in t.feed(IN, b"+PONG\r\n", 4, len(DENIED))] == ["PING"]


def test_a_cut_bulk_or_array_head_is_not_guessed() -> None:
    """Only a line reply is whole in its first line: a bulk or array head cut before its CRLF has no
    length to skip by; the reply is lost (counted) and pairing stays right."""
    assert cut_reply(b"$12345") is None and cut_reply(b"*3") is None and cut_reply(b"+OK\r\n+O") is None
    assert cut_reply(b"-ERR unknown") is not None
    t = ConnectionTracker(REDIS, Role.CLIENT)
    t.feed(EG, b"*1\r\n$4\r\nPING\r\n", 1, 0)
    assert t.feed(IN, b"$1234567", 2, 0, length=2000) == []
    c = t.counters()
    assert (c["truncations"], c["cut_responses"], c["aborted_messages"], c["discarded_bytes"]) == (1, 0, 0, 8)


def test_garbage_is_counted_and_parsing_resyncs() -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT)
    t.feed(EG, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"*1\r\n$4\r\nPING\r\n", 1, 0)
    assert by_op(t.feed(IN, b"+PONG\r\n", 2, 0)) == ["PING"]
    assert t.counters()["invalid_frames"] >= 1 and t.counters()["discarded_bytes"] == 11


def test_a_lost_reply_after_a_gap_does_not_shift_pairing() -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT)
    t.feed(EG, b"*1\r\n$4\r\nPING\r\n", 1, 0)
    assert by_op(t.feed(IN, b"+PONG\r\n", 2, 0)) == ["PING"]
    t.feed(EG, b"*1\r\n$4\r\nPING\r\n", 3, 14)
    t.feed(EG, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", 4, 28)
    # the second PING's reply was lost (7 bytes): the GET's reply must not be taken for the PING's
    recs = t.feed(IN, b"$-1\r\n", 5, 14)
    assert by_op(recs) == ["GET"] and t.counters()["unanswered_requests"] == 1


@pytest.mark.parametrize(
    ("data", "state"),
    [
        (b"", ParseState.NEEDS_MORE_DATA),
        (b"*2\r\n$3\r\nGE", ParseState.NEEDS_MORE_DATA),
        (b"*0\r\n", ParseState.INVALID),
        (b"*2\r\n:3\r\nGET\r\n", ParseState.INVALID),
        (b"*99999999999\r\n", ParseState.INVALID),
        (b"*2\r\n$3\r\nG T\r\n", ParseState.INVALID),
        (b"*1\r\n$9\r\nSUBSCRIBE\r\n", ParseState.IGNORED),
        (b"*1\r\n$4\r\nPING\r\n", ParseState.SUCCESS),
    ],
)
def test_request_states(data: bytes, state: ParseState) -> None:
    assert parse_request(data).state is state


def test_absurd_lengths_are_invalid_not_waited_for() -> None:
    assert parse_response(b"$999999999999\r\n", None).state is ParseState.INVALID
    assert parse_response(b"*-5\r\n", None).state is ParseState.INVALID
    assert parse_response(b"+" + b"x" * 5000, None).state is ParseState.INVALID  # no CRLF within MAX_LINE
    assert RespReader(1).read(b"$-7\r\n")[0] is ParseState.INVALID
    deep = b"*1\r\n" * 40
    assert RespReader(1).read(deep)[0] is ParseState.INVALID


def test_find_frame_boundary() -> None:
    buf = b"xx\r\n$3\r\nfoo\r\n*1\r\n$4\r\nPING\r\n"
    assert find_frame_boundary(buf, 0, MessageKind.REQUEST) == buf.index(b"*1")
    assert find_frame_boundary(buf, 1, MessageKind.RESPONSE) == 4
    assert find_frame_boundary(b"zzzz", 1, MessageKind.RESPONSE) == 4


def _mutants(rng: random.Random, seeds: list[bytes], n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(b) + 1)
            if op == 0 and b:
                b[min(pos, len(b) - 1)] = rng.randrange(256)
            elif op == 1:
                b[pos:pos] = bytes([rng.choice(b"*$+-:_#,(!=%~>|\r\n0123456789")])
            elif op == 2:
                del b[pos : pos + rng.randint(1, 8)]
            else:
                b[pos:pos] = str(rng.choice([-1, 0, 1, 2**31, 2**63, 10**12])).encode()
        out.append(bytes(b))
    return out


def test_fuzz_parsers_never_raise_100k() -> None:
    """10^5 mutated real messages and random bytes through every entry point: no exception, sane results."""
    rng = random.Random(14)
    seeds = [d for _, d in CLI_SESSION] + [SUBSCRIBED_RESP2, MESSAGE_RESP2, MESSAGE_RESP3, SUBSCRIBED_RESP3]
    inputs = _mutants(rng, seeds, 90_000) + [rng.randbytes(rng.randrange(64)) for _ in range(10_000)]
    hint = RedisCommand("GET", 1)
    for data in inputs:
        r = parse_request(data)
        assert 0 <= r.consumed <= len(data)
        for h in (None, hint):
            p = parse_response(data, h)
            assert 0 <= p.consumed <= len(data)
            if p.frame is not None:
                reader = REDIS.body_reader(p.frame)
                if reader is not None:
                    _state, n = reader.read(data[p.consumed :])
                    assert 0 <= n <= len(data) - p.consumed
        cut = cut_reply(data)
        assert cut is None or cut.consumed == len(data)
        assert min(1, len(data)) <= find_frame_boundary(data, 1, MessageKind.RESPONSE) <= len(data)
        assert find_frame_boundary(data, 0, MessageKind.REQUEST) <= len(data)


def test_fuzz_tracker_random_splits_never_raise() -> None:
    rng = random.Random(15)
    stream_c = b"".join(d for who, d in CLI_SESSION if who == "C")
    stream_s = b"".join(d for who, d in CLI_SESSION if who == "S")
    for _ in range(2000):
        t = ConnectionTracker(REDIS, Role.CLIENT)
        c, s = bytearray(stream_c), bytearray(stream_s)
        for buf in (c, s):
            for _ in range(rng.randint(0, 3)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        ic = is_ = 0
        ts = 0
        while ic < len(c) or is_ < len(s):
            ts += 1
            if ic < len(c) and (is_ >= len(s) or rng.random() < 0.5):
                n = rng.randint(1, 64)
                t.feed(EG, bytes(c[ic : ic + n]), ts, ic)
                ic += n
            else:
                n = rng.randint(1, 64)
                t.feed(IN, bytes(s[is_ : is_ + n]), ts, is_)
                is_ += n
        t.close()
        assert t.requests_parsed <= len(CLI_OPERATIONS) + 4


def test_a_protocol_switch_mid_connection_is_counted_not_parsed() -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT)
    t.feed(EG, b"*1\r\n$4\r\nPING\r\n", 1, 0)
    assert by_op(t.feed(IN, b"+PONG\r\n", 2, 0)) == ["PING"]
    http = b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n"
    out = t.feed(EG, http, 3, 14) + t.feed(IN, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 4, 7)
    assert out == [] and t.counters()["invalid_frames"] >= 2 and t.pending_requests() == 0


def test_unanswered_pipelined_commands_are_bounded_and_counted() -> None:
    t = ConnectionTracker(REDIS, Role.CLIENT, TrackerLimits(max_pending=256))
    t.feed(EG, b"*1\r\n$4\r\nPING\r\n" * 300, 1, 0)
    assert (t.pending_requests(), t.counters()["evicted_requests"]) == (256, 44)
