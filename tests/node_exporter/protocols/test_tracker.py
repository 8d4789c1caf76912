"""The shared loop: roles, timestamps, gaps and resync, bounds, eviction, and fuzzed feeds."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, Direction, Role, TrackerLimits
from node_exporter.protocols.base import MessageKind
from node_exporter.protocols.tracker import COUNTERS
from tests.node_exporter.protocols import wire
from tests.node_exporter.protocols.test_dns import DIG_ANSWER, DIG_QUERY, tcp

HTTP = PROTOCOLS["http1"]
EG, IN = Direction.EGRESS, Direction.INGRESS


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: svc\r\n\r\n" % path.encode()


def ok(body: bytes = b"ok", status: int = 200) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def test_registry_is_a_table_of_protocols() -> None:
    assert set(PROTOCOLS) == {"http1", "http2", "http2_frames", "dns", "dns_tcp", "redis", "memcached", "postgresql",
                              "mysql"}  # fmt: skip
    for name, proto in PROTOCOLS.items():
        assert proto.name == name
        assert proto.default_timeout_ns > 0
        assert proto.find_frame_boundary(b"", 0, MessageKind.REQUEST) == 0
    assert PROTOCOLS["dns"].datagram and not PROTOCOLS["dns_tcp"].datagram
    with pytest.raises(TypeError):
        PROTOCOLS["x"] = HTTP  # type: ignore[index]


def test_server_role_reverses_directions_and_latency_is_first_byte_to_first_byte() -> None:
    t = ConnectionTracker(HTTP, Role.SERVER)
    req, resp = wire.CURL_GET_QUERY, wire.NGINX_200_JSON
    assert t.feed(IN, req[:10], 100) == [] and t.feed(IN, req[10:], 180) == []
    assert t.feed(EG, resp[:50], 400) == []
    (rec,) = t.feed(EG, resp[50:], 900)
    assert (rec.start_ns, rec.latency_ns) == (100, 300)
    # The same bytes the other way round make no sense on a server socket.
    assert ConnectionTracker(HTTP, Role.SERVER).feed(EG, req, 1) == []


def test_gap_inside_a_body_is_absorbed() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT)
    t.feed(EG, get("/big"), 1, seq=0)
    resp = ok(b"b" * 1000)
    head = len(resp) - 1000
    t.feed(IN, resp[: head + 100], 2, seq=0)
    (rec,) = t.feed(IN, resp[head + 500 :], 3, seq=head + 500)  # 400 body bytes never captured
    assert rec.response_bytes == len(resp)
    assert (t.gaps, t.gap_bytes, t.discarded_bytes, t.aborted_messages) == (1, 400, 0, 0)


def test_a_call_captured_in_part_completes_its_body_and_is_a_truncation_not_a_gap() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT)
    t.feed(EG, get("/big"), 1, seq=0)
    resp = ok(b"b" * 1000)
    head = len(resp) - 1000
    # one read moved the whole response; only its first head + 100 bytes were captured
    (rec,) = t.feed(IN, resp[: head + 100], 2, seq=0, length=len(resp))
    assert rec.response_bytes == len(resp)
    assert (t.truncations, t.truncated_bytes, t.gaps, t.gap_bytes) == (1, 900, 0, 0)
    # the stream goes on right after the moved bytes, with nothing counted twice
    t.feed(EG, get("/next"), 3, seq=len(get("/big")))
    (again,) = t.feed(IN, ok(), 4, seq=len(resp))
    assert again.status == 200 and (t.truncations, t.gaps) == (1, 0)


def test_gap_in_a_head_resyncs_at_the_next_request() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT)
    r1, r2 = get("/lost") + b"", get("/kept")
    t.feed(EG, r1[:12], 10, seq=0)
    # Bytes 12..19 lost; the chunk resumes mid-header, then the next request.
    assert t.feed(EG, r1[20:] + r2, 30, seq=20) == []
    out = t.feed(IN, ok(b"1"), 20) + t.feed(IN, ok(b"2"), 40)  # non-pipelined: S1 precedes R2
    assert [(r.path, r.latency_ns) for r in out] == [("/kept", 10)]
    assert t.orphan_responses == 1 and t.invalid_frames == 0 and t.gaps == 1
    assert t.discarded_bytes == 12 + len(r1) - 20


def test_unknown_gap_in_responses_pairs_the_next_with_the_latest_request() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT)
    out = t.feed(EG, get("/1"), 10) + t.feed(IN, ok(b"one"), 20)
    t.feed(EG, get("/2"), 30)
    t.feed(IN, ok(b"two" * 100)[:40], 40)  # head and part of the body, then the capture lost bytes
    t.feed(EG, get("/3"), 50)
    out += t.feed(IN, ok(b"three"), 60, gap=True)
    assert [r.path for r in out] == ["/1", "/3"]
    assert (t.unanswered_requests, t.aborted_messages, t.gaps) == (1, 1, 1)


def test_overlapping_and_duplicate_chunks_are_trimmed() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT)
    req = get("/dup")
    t.feed(EG, req[:8], 1, seq=0)
    t.feed(EG, req[:8], 2, seq=0)  # a re-read of the same bytes
    t.feed(EG, req[4:], 3, seq=4)
    (rec,) = t.feed(IN, ok(), 4)
    assert rec.request_bytes == len(req) and t.duplicate_bytes == 12 and t.gaps == 0


def test_buffer_overflow_is_counted_bounded_and_recovers() -> None:
    limits = TrackerLimits(max_buffer=1024)
    t = ConnectionTracker(HTTP, Role.CLIENT, limits)
    t.feed(EG, b"GET /huge HTTP/1.1\r\n", 1)
    for i in range(20):
        t.feed(EG, b"X-Pad: " + b"a" * 91 + b"\r\n", 2 + i)
        assert t.buffered_bytes(EG) <= limits.max_buffer
    assert t.buffer_overflows == 1
    t.feed(EG, b"\r\n" + get("/after"), 30)
    (rec,) = t.feed(IN, ok(), 40)
    assert rec.path == "/after"


def test_unmatched_requests_are_bounded_and_evictions_counted() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT, TrackerLimits(max_pending=4))
    for i in range(10):
        t.feed(EG, get(f"/r{i}"), i)
    assert t.pending_requests() == 4 and t.evicted_requests == 6
    (rec,) = t.feed(IN, ok(), 100)
    assert rec.path == "/r6"  # the oldest survivors are answered first


def test_orphan_response_waits_then_is_dropped_by_a_later_request() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT)
    assert t.feed(IN, ok(b"stray"), 5) == [] and t.pending_responses() == 1
    t.feed(EG, get("/new"), 10)
    (rec,) = t.feed(IN, ok(), 20)
    assert rec.path == "/new" and rec.latency_ns == 10 and t.orphan_responses == 1


def test_garbage_before_a_request_is_skipped() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT)
    junk = b"\x00\xffnot http at all\r\nGET"
    t.feed(EG, junk + b"\r\n" + get("/x"), 1)
    (rec,) = t.feed(IN, ok(), 2)
    assert rec.path == "/x" and t.invalid_frames >= 1 and t.discarded_bytes == len(junk) + 2


def test_close_and_expire_account_for_everything() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT, TrackerLimits(timeout_ns=100))
    t.feed(EG, get("/old"), 0)
    t.feed(EG, get("/new"), 500)
    assert t.expire(550) == [] and t.expired_requests == 1
    t.feed(IN, ok(b"x" * 50)[:45], 600)  # head and 7 of 50 body bytes
    assert t.close() == []
    assert (t.unanswered_requests, t.aborted_messages) == (1, 1)
    assert t.feed(EG, get("/late"), 700) == [] and t.unparsed_bytes == len(get("/late"))
    assert set(t.counters()) == set(COUNTERS)


def test_dns_datagrams_ignore_seq_and_count_short_ones() -> None:
    t = ConnectionTracker(PROTOCOLS["dns"], Role.CLIENT)
    t.feed(EG, DIG_QUERY, 1, seq=0)
    t.feed(EG, DIG_QUERY[:5], 2, seq=999)
    (rec,) = t.feed(IN, DIG_ANSWER, 3)
    assert rec.name == "example.com" and t.invalid_frames == 1 and t.gaps == 0


# -- properties ---------------------------------------------------------------------------

LIMITS = TrackerLimits(max_buffer=2048, max_pending=8)
FRAGMENTS = [
    wire.CURL_GET_QUERY, wire.NGINX_200_JSON, wire.NGINX_CHUNKED_GZIP, wire.NGINX_100_CONTINUE, wire.NGINX_HEAD_200,
    wire.CURL_POST_EXPECT, wire.WS_101, wire.HTTP10_UNTIL_CLOSE, wire.CHUNKED_WITH_TRAILERS, DIG_QUERY, DIG_ANSWER,
    tcp(DIG_QUERY), tcp(DIG_ANSWER), b"\r\n", b"0\r\n\r\n", b"ffffffff\r\n",
]  # fmt: skip
pieces = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda f, a, b: f[min(a, b) : max(a, b)], st.sampled_from(FRAGMENTS), st.integers(0, 600), st.integers(0, 600)
    ),
)
ops = st.lists(
    st.tuples(st.sampled_from(list(Direction)), pieces, st.integers(0, 3), st.booleans()),
    max_size=25,
)


def check_bounds(t: ConnectionTracker) -> None:
    for d in Direction:
        assert t.buffered_bytes(d) <= LIMITS.max_buffer
        s: Any = t._streams[d]  # internal, but the memory bound is the point of the test
        assert len(s.chunks) <= len(s.buf) + 1
    assert t.pending_requests() <= LIMITS.max_pending and t.pending_responses() <= LIMITS.max_pending


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(PROTOCOLS)), st.sampled_from(list(Role)), ops)
def test_arbitrary_feeds_never_raise_and_stay_bounded(name: str, role: Role, steps: list[Any]) -> None:
    t = ConnectionTracker(PROTOCOLS[name], role, LIMITS)
    seqs = dict.fromkeys(Direction, 0)
    now = 0
    for direction, data, jump, gap in steps:
        now += 1_000
        # jump 0: in order; 1: lost bytes; 2: no seq at all; 3: a re-read of earlier bytes
        seq = {0: seqs[direction], 1: seqs[direction] + 7, 2: None, 3: max(0, seqs[direction] - 3)}[jump]
        t.feed(direction, data, now, seq, gap=gap)
        seqs[direction] = (seq if seq is not None else seqs[direction]) + len(data)
        check_bounds(t)
    t.expire(now + 10**12)
    t.close()
    assert all(v >= 0 for v in t.counters().values())
