"""HTTP/2 through the shared tracker: a real gRPC exchange fed whole, byte by byte and with trailing
bytes; streams, CONTINUATION, padding, resets; joining mid-connection; bad input and bounds; fuzz."""

from __future__ import annotations

import random
import struct

import pytest
from hpack import Encoder

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, Direction, Http2Record, Role
from node_exporter.protocols import http2 as h2
from node_exporter.protocols.base import MessageKind, ParseState
from node_exporter.protocols.http2_session import MAX_HEADER_BLOCK, MAX_STREAMS
from tests.node_exporter.protocols import wire_h2 as w
from tests.node_exporter.protocols.wire_h2 import frame

H2 = PROTOCOLS["http2"]
EG, IN = Direction.EGRESS, Direction.INGRESS


def frames_of(data: bytes) -> list[bytes]:
    """Split a captured direction into its preface and frames (test helper, trusts its input)."""
    out, pos = [], 0
    if data.startswith(h2.PREFACE):
        out.append(h2.PREFACE)
        pos = len(h2.PREFACE)
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 3], "big") + 9
        out.append(data[pos : pos + n])
        pos += n
    return out


def feed(t: ConnectionTracker, direction: Direction, data: bytes, ts: int, mode: str = "whole") -> list[Http2Record]:
    if mode == "whole":
        return t.feed(direction, data, ts)
    out: list[Http2Record] = []
    for i in range(len(data)):
        out += t.feed(direction, data[i : i + 1], ts)
    return out


def server() -> ConnectionTracker:
    return ConnectionTracker(H2, Role.SERVER)


def run_grpc_capture(t: ConnectionTracker, mode: str) -> list[Http2Record]:
    """The capture replayed in its real order: each request's frames, then the server's answer."""
    req_dir, resp_dir = (IN, EG) if t.role is Role.SERVER else (EG, IN)
    c2s, s2c = frames_of(w.GRPC_C2S), frames_of(w.GRPC_S2C)
    # c2s: preface, SETTINGS, WINDOW_UPDATE, HEADERS+DATA (call 1), ... ; s2c answers in between
    first_call_end = next(i for i, f in enumerate(c2s) if f[3] == h2.DATA) + 1
    second = next(i for i, f in enumerate(s2c) if f[3] == h2.HEADERS and f[4] & h2.END_STREAM) + 1
    out = feed(t, req_dir, b"".join(c2s[:first_call_end]), 1_000, mode)
    out += feed(t, resp_dir, b"".join(s2c[:second]), 5_000, mode)
    out += feed(t, req_dir, b"".join(c2s[first_call_end:]), 9_000, mode)
    out += feed(t, resp_dir, b"".join(s2c[second:]), 12_000, mode)
    return out


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_real_grpc_exchange(role: Role, mode: str) -> None:
    t = ConnectionTracker(H2, role)
    recs = run_grpc_capture(t, mode)
    assert [(r.method, r.path, r.rpc_system, r.rpc_service, r.rpc_method, r.status, r.grpc_status) for r in recs] == [
        ("POST", "/demo.v1.Echo/Ping", "grpc", "demo.v1.Echo", "Ping", 200, 0),
        ("POST", "/demo.v1.Echo/Ping", "grpc", "demo.v1.Echo", "Ping", 200, 5),
    ]
    assert recs[0].traceparent == w.GRPC_TRACEPARENT and recs[1].traceparent == ""
    assert [(r.start_ns, r.latency_ns) for r in recs] == [(1_000, 4_000), (9_000, 3_000)]
    assert all(r.request_bytes > 9 + 2 and r.response_bytes > 9 + 7 for r in recs)
    c = t.counters()
    assert (c["records"], c["requests_parsed"], c["invalid_frames"], c["h2_hpack_unknown_index"]) == (2, 2, 0, 0)
    assert sum(v for k, v in c.items() if k.startswith("h2_hpack_bad")) == 0
    assert b"secret-42" in w.GRPC_S2C and "secret" not in repr(recs)  # grpc-message is never kept


def test_trailing_bytes_stay_for_the_next_frame() -> None:
    t = server()
    c2s = frames_of(w.GRPC_C2S)
    cut = len(c2s[0]) + len(c2s[1]) + 4  # preface, SETTINGS, 4 bytes of the next frame header
    data = b"".join(c2s)
    assert feed(t, IN, data[:cut], 1) == []
    assert t.buffered_bytes(IN) == 4
    feed(t, IN, data[cut:], 2)
    assert t.counters()["invalid_frames"] == 0 and t.pending_requests() == 2


def grpc_request(enc: Encoder, sid: int, path: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    block = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "svc:50051"),
                        ("content-type", "application/grpc"), ("te", "trailers"), *(extra or [])])  # fmt: skip
    return frame(h2.HEADERS, h2.END_HEADERS, sid, block)


def grpc_response(enc: Encoder, sid: int, status: int, body: bytes = b"\0\0\0\0\x02ok") -> bytes:
    head = enc.encode([(":status", "200"), ("content-type", "application/grpc")])
    trailers = enc.encode([("grpc-status", str(status)), ("grpc-message", "user 1234 not found")])
    return (
        frame(h2.HEADERS, h2.END_HEADERS, sid, head)
        + frame(h2.DATA, 0, sid, body)
        + frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, sid, trailers)
    )


def test_interleaved_streams_pair_by_stream_id() -> None:
    t = server()
    cenc, senc = Encoder(), Encoder()
    feed(t, IN, w.CLIENT_START, 0)
    req1, req3 = grpc_request(cenc, 1, "/a.A/One"), grpc_request(cenc, 3, "/b.B/Two")
    end3, end1 = frame(h2.DATA, h2.END_STREAM, 3, b"\0" * 5), frame(h2.DATA, h2.END_STREAM, 1, b"\0" * 5)
    feed(t, IN, req1 + req3, 10)
    feed(t, IN, end3 + end1, 20)
    resp3, resp1 = grpc_response(senc, 3, 0), grpc_response(senc, 1, 14)
    recs = feed(t, EG, resp3, 30)
    recs += feed(t, EG, resp1, 50)
    assert [(r.rpc_service, r.rpc_method, r.grpc_status, r.latency_ns) for r in recs] == [
        ("b.B", "Two", 0, 20),
        ("a.A", "One", 14, 40),
    ]
    assert [(r.request_bytes, r.response_bytes) for r in recs] == [
        (len(req3) + len(end3), len(resp3)),
        (len(req1) + len(end1), len(resp1)),
    ]


def test_headers_with_padding_priority_and_continuation() -> None:
    t = server()
    enc = Encoder()
    block = enc.encode([(":method", "GET"), (":scheme", "https"), (":path", "/users/42?token=secret"),
                        (":authority", "x"), ("x-request-id", "req-1")])  # fmt: skip
    pad = 7
    payload = bytes([pad]) + struct.pack("!IB", 0, 16) + block[:5] + b"\0" * pad
    req = frame(h2.HEADERS, h2.PADDED | h2.PRIORITY_FLAG | h2.END_STREAM, 1, payload)
    req += frame(h2.CONTINUATION, 0, 1, block[5:9]) + frame(h2.CONTINUATION, h2.END_HEADERS, 1, block[9:])
    feed(t, IN, w.CLIENT_START + req, 0)
    senc = Encoder()
    resp = frame(h2.HEADERS, h2.END_HEADERS, 1, senc.encode([(":status", "100")]))  # informational: skipped
    resp += frame(h2.HEADERS, h2.END_HEADERS, 1, senc.encode([(":status", "404")]))
    resp += frame(h2.DATA, h2.PADDED | h2.END_STREAM, 1, b"\x02nf\0\0")
    (r,) = feed(t, EG, resp, 9)
    assert (r.method, r.path, r.route, r.status, r.request_id, r.rpc_system) == (
        "GET", "/users/42", "/users/{id}", 404, "req-1", "")  # fmt: skip
    assert r.response_bytes == len(resp)


def test_reset_and_goaway_end_streams_counted() -> None:
    t = server()
    enc = Encoder()
    feed(t, IN, w.CLIENT_START + grpc_request(enc, 1, "/a.A/X") + grpc_request(enc, 3, "/a.A/Y"), 0)
    feed(t, IN, grpc_request(enc, 5, "/a.A/Z"), 0)
    assert feed(t, IN, frame(h2.RST_STREAM, 0, 1, struct.pack("!I", 8)), 1) == []  # CANCEL
    feed(t, EG, frame(h2.GOAWAY, 0, 0, struct.pack("!II", 3, 0)), 2)  # streams past 3 are refused
    c = t.counters()
    assert (c["h2_streams_reset"], c["h2_streams_refused"], c["unanswered_requests"]) == (1, 1, 2)
    assert t.pending_requests() == 1
    assert t.close() == []
    assert t.counters()["unanswered_requests"] == 3


def test_joining_mid_connection_marks_unknown_and_never_guesses() -> None:
    """The agent starts after the first call: the second call's :path is an index into a table we
    never saw. The record keeps what static entries and literals give, and the path stays empty."""
    t = server()
    c2s, s2c = frames_of(w.GRPC_C2S), frames_of(w.GRPC_S2C)
    first_headers = [i for i, f in enumerate(c2s) if f[3] == h2.HEADERS]
    resp_headers = [i for i, f in enumerate(s2c) if f[3] == h2.HEADERS]
    feed(t, IN, b"".join(c2s[first_headers[1] :]), 100)
    (r,) = feed(t, EG, b"".join(s2c[resp_headers[2] :]), 200)  # the second call's response only
    assert (r.method, r.path, r.route, r.rpc_system, r.status) == ("POST", "", "", "", 200)
    c = t.counters()
    assert c["h2_hpack_unknown_index"] >= 1 and c["h2_requests_unknown_path"] == 1
    assert c["invalid_frames"] == 0


def test_a_fresh_connection_after_joining_parses_fully() -> None:
    t = server()
    enc = Encoder()
    enc.encode([(":path", "/seen.before/Join")])
    feed(t, IN, grpc_request(enc, 7, "/seen.before/Join"), 0)
    assert t.counters()["h2_hpack_unknown_index"] == 1
    t2 = server()  # the next connection starts with its preface: fully known
    feed(t2, IN, w.CLIENT_START + grpc_request(Encoder(), 1, "/a.A/B"), 0)
    (r,) = feed(t2, EG, grpc_response(Encoder(), 1, 0), 5)
    assert r.path == "/a.A/B" and t2.counters()["h2_hpack_unknown_index"] == 0


def test_garbage_after_preface_resyncs_to_the_next_frame() -> None:
    t = server()
    enc = Encoder()
    junk = b"\xde\xad\xbe\xef" * 8
    feed(t, IN, w.CLIENT_START + junk + grpc_request(enc, 1, "/a.A/B") + frame(h2.DATA, h2.END_STREAM, 1, b"x"), 0)
    (r,) = feed(t, EG, grpc_response(Encoder(), 1, 0), 3)
    c = t.counters()
    assert c["invalid_frames"] == 1 and c["discarded_bytes"] == len(junk)
    assert r.rpc_method == "B"  # HPACK state survives: the junk held no header block


def test_frame_length_past_the_maximum() -> None:
    t = server()
    big_data = frame(h2.DATA, 0, 1, b"\0" * 20_000)  # past the default SETTINGS_MAX_FRAME_SIZE
    feed(t, IN, w.CLIENT_START + big_data, 1)
    assert t.counters()["h2_frame_too_large"] == 1  # counted, its bytes still read as DATA
    huge = frame(h2.HEADERS, h2.END_HEADERS, 1, length=h2.MAX_CONTROL + 1)  # more than we parse whole
    feed(t, IN, huge + b"\0" * 64 + w.PING, 2)
    c = t.counters()
    assert c["invalid_frames"] == 1 and c["discarded_bytes"] == 9 + 64
    assert c["h2_frames"] == 4  # preface, SETTINGS, DATA, PING: resynchronised


@pytest.mark.parametrize(
    ("block", "counter"),
    [(bytes([0x84, 0x04, 0x81, 0xFF]), "h2_hpack_bad_huffman"), (bytes([0x83, 0xC5]), "h2_hpack_bad_index")],
)
def test_headers_that_do_not_decode_are_counted_per_kind(block: bytes, counter: str) -> None:
    t = server()
    feed(t, IN, w.CLIENT_START + frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, block), 0)
    feed(t, EG, frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, bytes([0x88])), 1)
    c = t.counters()
    assert c[counter] == 1
    assert c["records"] == 1  # the stream still ends; what did not decode is unknown, not invented


def test_streams_in_flight_are_bounded() -> None:
    t = server()
    enc = Encoder()
    feed(t, IN, w.CLIENT_START, 0)
    for sid in range(1, 2 * (MAX_STREAMS + 5), 2):
        feed(t, IN, grpc_request(enc, sid, "/a.A/B"), sid)
    assert t.pending_requests() == MAX_STREAMS
    c = t.counters()
    assert c["h2_streams_dropped"] == 5


def test_header_block_bound() -> None:
    t = server()
    feed(t, IN, w.CLIENT_START + frame(h2.HEADERS, 0, 1, bytes([0x82])), 0)
    for _ in range(MAX_HEADER_BLOCK // 8000 + 1):
        feed(t, IN, frame(h2.CONTINUATION, 0, 1, b"\x00" * 8000), 1)
    assert t.counters()["h2_header_block_too_large"] == 1


def test_truncated_data_keeps_framing() -> None:
    """The kernel captured only the head of a big DATA write: the rest is skipped, not parsed."""
    t = server()
    enc = Encoder()
    data = w.CLIENT_START + grpc_request(enc, 1, "/a.A/B")
    feed(t, IN, data, 0)
    body = frame(h2.DATA, h2.END_STREAM, 1, b"\0" * 50_000)
    t.feed(IN, body[:200], 1, seq=len(data), length=len(body))
    (r,) = feed(t, EG, grpc_response(Encoder(), 1, 0), 2)
    assert r.request_bytes == len(grpc_request(Encoder(), 1, "/a.A/B")) + len(body)
    assert t.counters()["truncations"] == 1 and t.counters()["invalid_frames"] == 0


@pytest.mark.parametrize(
    ("data", "state"),
    [
        (h2.PREFACE[:10], ParseState.NEEDS_MORE_DATA),
        (w.SETTINGS_EMPTY[:8], ParseState.NEEDS_MORE_DATA),
        (w.SETTINGS_ACK, ParseState.SUCCESS),
        (w.PING, ParseState.SUCCESS),
        (frame(h2.PING, 0, 0, b"1234"), ParseState.INVALID),  # PING is 8 bytes
        (frame(h2.SETTINGS, 0, 1), ParseState.INVALID),  # SETTINGS on a stream
        (frame(h2.DATA, 0, 0, b"x"), ParseState.INVALID),  # DATA on stream 0
        (frame(0x33, 0, 0), ParseState.INVALID),  # an unknown type
        (b"GET / HTTP/1.1\r\n", ParseState.INVALID),
    ],
)
def test_frame_states(data: bytes, state: ParseState) -> None:
    assert h2.parse_frame(data, MessageKind.REQUEST).state is state


def test_find_frame_boundary() -> None:
    junk = b"\x01\x02\x03garbage!" * 3
    buf = junk + w.PING + w.SETTINGS_ACK
    assert h2.find_frame_boundary(buf, 0, MessageKind.RESPONSE) == len(junk)
    assert h2.find_frame_boundary(junk + h2.PREFACE, 0, MessageKind.REQUEST) == len(junk)


def test_fuzz_tracker_never_raises() -> None:
    """10^5 inputs: mutated real frames and random bytes, in random chunks, both directions."""
    rng = random.Random(9113)
    seeds = frames_of(w.GRPC_C2S)[1:] + frames_of(w.GRPC_S2C)
    t = server()
    for i in range(100_000):
        if i % 3 == 0:
            data = rng.randbytes(rng.randrange(1, 30))
        else:
            b = bytearray(b"".join(rng.choice(seeds) for _ in range(rng.randrange(1, 3))))
            for _ in range(rng.randrange(0, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
        t.feed(IN if rng.random() < 0.5 else EG, data, i)
        if i % 2000 == 0:
            t.close()
            t = server()
            t.feed(IN, w.CLIENT_START, i)
    assert t.pending_requests() <= MAX_STREAMS
