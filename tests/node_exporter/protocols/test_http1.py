"""HTTP/1.x: real exchanges fed whole, byte by byte and with trailing bytes; edge framings; fuzz."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, Direction, HttpRecord, Role, TrackerLimits
from node_exporter.protocols.base import BodyKind, MessageKind, ParseState
from node_exporter.protocols.http1 import (
    MAX_HEAD,
    ChunkedReader,
    HttpRequest,
    find_frame_boundary,
    parse_request,
    parse_response,
)
from node_exporter.protocols.http_fields import MAX_REQUEST_ID, route_template, valid_traceparent
from tests.node_exporter.protocols import wire

HTTP = PROTOCOLS["http1"]
EG, IN = Direction.EGRESS, Direction.INGRESS


def client() -> ConnectionTracker:
    return ConnectionTracker(HTTP, Role.CLIENT)


def feed_all(t: ConnectionTracker, direction: Direction, data: bytes, ts: int, mode: str) -> list[HttpRecord]:
    """Feed ``data`` whole or one byte per chunk (h11's two basic feeding modes)."""
    if mode == "whole":
        return t.feed(direction, data, ts)
    out: list[HttpRecord] = []
    for i in range(len(data)):
        out += t.feed(direction, data[i : i + 1], ts + i)
    return out


# (request, response, expected status, expected path, expected route)
EXCHANGES = {
    "curl_get_query": (wire.CURL_GET_QUERY, wire.NGINX_200_JSON, 200, "/api/v1/users/42", "/api/v1/users/{id}"),
    "curl_head": (wire.CURL_HEAD, wire.NGINX_HEAD_200, 200, "/index.html", "/index.html"),
    "curl_chunked_gzip": (wire.CURL_GET_GZIP, wire.NGINX_CHUNKED_GZIP, 200, "/stream.txt", "/stream.txt"),
    "curl_304": (wire.CURL_IF_NONE_MATCH, wire.NGINX_304, 304, "/index.html", "/index.html"),
}


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("name", sorted(EXCHANGES))
def test_real_exchanges(name: str, mode: str) -> None:
    req, resp, status, path, route = EXCHANGES[name]
    t = client()
    assert feed_all(t, EG, req, 1_000, mode) == []
    (rec,) = feed_all(t, IN, resp, 50_000, mode)
    assert (rec.method, rec.path, rec.route, rec.status) == (req.split(b" ")[0].decode(), path, route, status)
    assert rec.request_bytes == len(req) and rec.response_bytes == len(resp)
    assert rec.start_ns == 1_000 and rec.latency_ns == 49_000
    assert t.buffered_bytes(EG) == t.buffered_bytes(IN) == 0
    assert t.invalid_frames == t.discarded_bytes == 0


@pytest.mark.parametrize("name", sorted(EXCHANGES))
def test_trailing_bytes_stay_for_the_next_message(name: str) -> None:
    req, resp, *_ = EXCHANGES[name]
    assert parse_request(req + b"GET /next HT") == parse_request(req)
    t = client()
    t.feed(EG, req + b"GET /nex", 1)
    (rec,) = t.feed(IN, resp + b"HTTP/1.1 2", 2)
    assert rec.response_bytes == len(resp)
    assert t.buffered_bytes(EG) == len(b"GET /nex") and t.buffered_bytes(IN) == len(b"HTTP/1.1 2")
    assert t.invalid_frames == 0


def test_request_head_fields() -> None:
    state, consumed, frame = parse_request(wire.CURL_GET_QUERY)
    assert state is ParseState.SUCCESS and consumed == len(wire.CURL_GET_QUERY)
    assert isinstance(frame, HttpRequest)
    assert (frame.method, frame.path, frame.version, frame.framing.kind) == (
        "GET",
        "/api/v1/users/42",
        "1.1",
        BodyKind.NONE,
    )


def test_keepalive_then_pipelining_pairs_in_order() -> None:
    t = client()
    out = t.feed(EG, wire.CURL_HEAD, 10) + t.feed(IN, wire.NGINX_HEAD_200, 20)
    out += t.feed(EG, wire.PIPELINED_GET_1 + wire.PIPELINED_GET_2, 30)
    out += t.feed(IN, wire.NGINX_PIPELINED_200 + wire.NGINX_PIPELINED_404, 40)
    assert [(r.method, r.route, r.status) for r in out] == [
        ("HEAD", "/index.html", 200),
        ("GET", "/index.html", 200),
        ("GET", "/orders/{id}/items", 404),
    ]
    assert out[2].request_bytes == len(wire.PIPELINED_GET_2)
    assert out[2].response_bytes == len(wire.NGINX_PIPELINED_404)


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_expect_100_continue(mode: str) -> None:
    t = client()
    assert feed_all(t, EG, wire.CURL_POST_EXPECT, 100, mode) == []
    assert feed_all(t, IN, wire.NGINX_100_CONTINUE, 200, mode) == []  # not the final response
    assert feed_all(t, EG, wire.CURL_POST_BODY, 300, mode) == []
    (rec,) = feed_all(t, IN, wire.NGINX_201, 400, mode)
    assert (rec.method, rec.status, rec.latency_ns) == ("POST", 201, 300)
    assert rec.request_bytes == len(wire.CURL_POST_EXPECT) + len(wire.CURL_POST_BODY)
    assert rec.response_bytes == len(wire.NGINX_201)
    assert t.ignored_messages == 1 and t.invalid_frames == 0


def test_final_response_before_request_body_still_pairs() -> None:
    t = client()
    t.feed(EG, wire.CURL_POST_EXPECT, 100)
    t.feed(IN, wire.NGINX_100_CONTINUE, 200)
    assert t.feed(IN, wire.NGINX_201, 250) == []  # server answered early; body still on its way
    (rec,) = t.feed(EG, wire.CURL_POST_BODY, 300)
    assert rec.status == 201 and rec.latency_ns == 150


def test_head_response_has_no_body_despite_content_length() -> None:
    frame = parse_response(wire.NGINX_HEAD_200, parse_request(wire.CURL_HEAD).frame).frame
    assert frame.framing.kind is BodyKind.NONE
    as_get = parse_response(wire.NGINX_HEAD_200, None).frame
    assert as_get.framing.kind is BodyKind.LENGTH and as_get.framing.length == 17


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_chunked_with_extensions_and_trailers(mode: str) -> None:
    t = client()
    feed_all(t, EG, wire.CURL_GET_GZIP + wire.CURL_IF_NONE_MATCH, 1, mode)
    first, second = feed_all(t, IN, wire.CHUNKED_WITH_TRAILERS + wire.NGINX_304, 500, mode)
    assert first.response_bytes == len(wire.CHUNKED_WITH_TRAILERS)  # the trailer section is part of it
    assert (second.status, second.response_bytes) == (304, len(wire.NGINX_304))
    assert t.invalid_frames == 0


@pytest.mark.parametrize(
    "body",
    [b"zz\r\n", b"5\r\nabcdeX\r\n", b"0\r\nnot a trailer\r\n\r\n", b"1" * 17 + b"\r\n", b"5\r\nabcde\rX"],
)
def test_broken_chunked_framing_is_invalid(body: bytes) -> None:
    assert ChunkedReader().read(body)[0] is ParseState.INVALID


def test_upgrade_stops_parsing_the_connection() -> None:
    t = client()
    t.feed(EG, wire.WS_UPGRADE_REQUEST, 1)
    (rec,) = t.feed(IN, wire.WS_101, 2)
    assert (rec.status, rec.route) == (101, "/chat")
    assert t.feed(EG, wire.WS_CLIENT_FRAME, 3) == [] and t.feed(IN, wire.WS_SERVER_FRAME, 4) == []
    assert t.eos and t.invalid_frames == 0
    assert t.unparsed_bytes == len(wire.WS_CLIENT_FRAME) + len(wire.WS_SERVER_FRAME)


def test_connect_tunnel_stops_parsing() -> None:
    t = client()
    t.feed(EG, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 1)
    (rec,) = t.feed(IN, b"HTTP/1.1 200 Connection established\r\n\r\n", 2)
    assert (rec.method, rec.path, rec.status) == ("CONNECT", "example.com:443", 200)
    t.feed(EG, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 3)  # TLS ClientHello in the tunnel
    assert t.invalid_frames == 0


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_http10_response_delimited_by_close(mode: str) -> None:
    t = client()
    feed_all(t, EG, wire.HTTP10_GET, 1, mode)
    assert feed_all(t, IN, wire.HTTP10_UNTIL_CLOSE, 10, mode) == []  # the end is the close
    (rec,) = t.close()
    assert rec.status == 200 and rec.response_bytes == len(wire.HTTP10_UNTIL_CLOSE)
    assert parse_response(wire.HTTP10_UNTIL_CLOSE, None).state is ParseState.EOS


def test_large_bodies_stream_without_buffering() -> None:
    t = ConnectionTracker(HTTP, Role.CLIENT, TrackerLimits(max_buffer=4096))
    body = 1024 * 1024
    t.feed(EG, b"PUT /blob HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % body, 1)
    for i in range(body // 16384):
        t.feed(EG, b"x" * 16384, 2 + i)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    t.feed(IN, head, 100)
    for i in range(64):
        t.feed(IN, b"4000\r\n" + b"y" * 16384 + b"\r\n", 101 + i)
    (rec,) = t.feed(IN, b"0\r\n\r\n", 200)
    assert rec.request_bytes > body and rec.response_bytes > 64 * 16384
    assert t.buffer_overflows == 0 and t.invalid_frames == 0


def test_only_named_header_values_leave_the_parser() -> None:
    assert {f.name for f in dataclasses.fields(HttpRecord)} == {
        "method", "path", "route", "status", "request_bytes", "response_bytes", "start_ns", "latency_ns",
        "traceparent", "request_id",
    }  # fmt: skip
    req = (
        b"GET /pay?card=4111111111111111 HTTP/1.1\r\nAuthorization: Bearer secret\r\nCookie: s=1\r\n"
        b"traceparent: " + wire.TRACEPARENT + b"\r\nX-Request-ID: abc-123\r\n\r\n"
    )
    frame = parse_request(req).frame
    assert (frame.path, frame.traceparent, frame.request_id) == ("/pay", wire.TRACEPARENT.decode(), "abc-123")
    assert "secret" not in repr(frame) and "4111" not in repr(frame)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (wire.TRACEPARENT, True),
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", True),
        (wire.TRACEPARENT.upper(), False),
        (wire.TRACEPARENT + b"-x", False),  # version 00 is exactly 55 characters
        (b"ff" + wire.TRACEPARENT[2:], False),
        (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01", False),
        (b"garbage", False),
    ],
)
def test_traceparent_validation(value: bytes, ok: bool) -> None:
    assert valid_traceparent(value) == (value[:55].decode() if ok else "")


def test_request_id_is_bounded() -> None:
    frame = parse_request(b"GET / HTTP/1.1\r\nx-request-id: " + b"r" * 500 + b"\r\n\r\n").frame
    assert frame.request_id == "r" * MAX_REQUEST_ID


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/", "/"),
        ("/users/42", "/users/{id}"),
        ("/v1/orders/550e8400-e29b-41d4-a716-446655440000", "/v1/orders/{id}"),
        ("/objects/5f8d0d55b54764421b7156c3", "/objects/{id}"),
        ("/commits/0123456789abcdef0123456789abcdef01234567/files", "/commits/{id}/files"),
        ("/s/aZ3kP9qR2xY7mN4b", "/s/{id}"),
        ("/api/v2/users/ada/profile", "/api/v2/users/ada/profile"),
        ("/cafe/deadbeefcafe", "/cafe/deadbeefcafe"),  # hex-looking words without digits stay
        ("/a/b/c/d/e/f/g/h/i/j/k", "/a/b/c/d/e/f/g/h/{rest}"),
        ("*", "*"),
    ],
)
def test_route_template(path: str, route: str) -> None:
    assert route_template(path) == route


def test_absolute_form_target_keeps_only_the_path() -> None:
    frame = parse_request(b"GET http://example.com/a/1?q=2 HTTP/1.1\r\nHost: example.com\r\n\r\n").frame
    assert (frame.path, frame.route) == ("/a/1", "/a/{id}")


@pytest.mark.parametrize(
    ("data", "state"),
    [
        (b"", ParseState.NEEDS_MORE_DATA),
        (b"GE", ParseState.NEEDS_MORE_DATA),
        (b"\r\nGET / HTTP/1.1\r\n", ParseState.NEEDS_MORE_DATA),
        (b"GET /x HTTP/1.1\r\nHost: a\r\n", ParseState.NEEDS_MORE_DATA),
        (b"GET /x HTTP/1.1\r\nHo", ParseState.NEEDS_MORE_DATA),
        (b"\x16\x03\x01\x02\x00\x01", ParseState.INVALID),  # TLS ClientHello
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ParseState.INVALID),  # HTTP/2 preface
        (b"GETX / HTTP/1.1\r\n", ParseState.INVALID),
        (b"get / HTTP/1.1\r\n", ParseState.INVALID),
        (b"GET / HTTP/2.0\r\n", ParseState.INVALID),
        (b"GET /a\x00b", ParseState.INVALID),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", ParseState.INVALID),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", ParseState.INVALID),
        (b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n", ParseState.INVALID),
        (b"GET / HTTP/1.1\r\nBad\x7f", ParseState.INVALID),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", ParseState.INVALID),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", ParseState.INVALID),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", ParseState.INVALID),
        (b"GET relative HTTP/1.1\r\n\r\n", ParseState.INVALID),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD, ParseState.INVALID),
        (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", ParseState.SUCCESS),
        (b"GET / HTTP/1.0\n\n", ParseState.SUCCESS),  # bare LF line ends
    ],
)
def test_request_states(data: bytes, state: ParseState) -> None:
    assert parse_request(data).state is state


@pytest.mark.parametrize(
    ("data", "state"),
    [
        (b"HTTP/1.1 200", ParseState.NEEDS_MORE_DATA),
        (b"HTTP/1.1 204\r\n\r\n", ParseState.SUCCESS),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n", ParseState.IGNORED),
        (b"HTTP/1.1 099 Low\r\n\r\n", ParseState.INVALID),
        (b"HTTP/1.1 20x OK\r\n", ParseState.INVALID),
        (b"HTTP/2 200\r\n\r\n", ParseState.INVALID),
        (b"ICY 200 OK\r\n", ParseState.INVALID),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", ParseState.INVALID),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", ParseState.EOS),  # read until close
    ],
)
def test_response_states(data: bytes, state: ParseState) -> None:
    assert parse_response(data, None).state is state


def test_find_frame_boundary() -> None:
    junk = b"\x00\x01garbage GET / HTTP/1.1 inline\r\n"
    assert find_frame_boundary(junk + wire.CURL_HEAD, 1, MessageKind.REQUEST) == len(junk)
    assert find_frame_boundary(junk + b"HEA", 1, MessageKind.REQUEST) == len(junk)  # split head kept
    assert find_frame_boundary(junk, 1, MessageKind.REQUEST) == len(junk)
    resp = b"tail of a body\n" + wire.NGINX_304
    assert find_frame_boundary(resp, 0, MessageKind.RESPONSE) == 15


# -- properties ---------------------------------------------------------------------------

STREAM_REQ = wire.CURL_GET_QUERY + wire.CURL_HEAD + wire.CURL_GET_GZIP + wire.CURL_POST_EXPECT + wire.CURL_POST_BODY
STREAM_RESP = wire.NGINX_200_JSON + wire.NGINX_HEAD_200 + wire.NGINX_CHUNKED_GZIP + wire.NGINX_100_CONTINUE
STREAM_RESP += wire.NGINX_201


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_parsers_never_raise(data: bytes) -> None:
    for result in (parse_request(data), parse_response(data, None)):
        assert 0 <= result.consumed <= len(data)
        assert (result.frame is None) == (result.state in (ParseState.INVALID, ParseState.NEEDS_MORE_DATA)) or (
            result.state is ParseState.IGNORED
        )
    ChunkedReader().read(data)
    for kind in MessageKind:
        assert min(1, len(data)) <= find_frame_boundary(data, 1, kind) <= len(data)


@settings(max_examples=100)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM_RESP)), max_size=12))
def test_any_chunking_gives_the_same_records(cuts: list[int]) -> None:
    def chunks(data: bytes) -> list[bytes]:
        points = sorted({c % len(data) for c in cuts} | {0, len(data)})
        return [data[a:b] for a, b in itertools.pairwise(points)]

    t = client()
    out: list[HttpRecord] = []
    for c in chunks(STREAM_REQ):
        out += t.feed(EG, c, 1)
    for c in chunks(STREAM_RESP):
        out += t.feed(IN, c, 2)
    assert [(r.method, r.status, r.request_bytes, r.response_bytes) for r in out] == [
        ("GET", 200, len(wire.CURL_GET_QUERY), len(wire.NGINX_200_JSON)),
        ("HEAD", 200, len(wire.CURL_HEAD), len(wire.NGINX_HEAD_200)),
        ("GET", 200, len(wire.CURL_GET_GZIP), len(wire.NGINX_CHUNKED_GZIP)),
        ("POST", 201, len(wire.CURL_POST_EXPECT) + len(wire.CURL_POST_BODY), len(wire.NGINX_201)),
    ]
    assert t.invalid_frames == 0 and t.buffered_bytes(EG) == t.buffered_bytes(IN) == 0


BIG_HEAD = b"HTTP/1.1 404 Not Found\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 40) for i in range(30))


def test_a_response_head_longer_than_the_capture_is_answered_from_its_status_line() -> None:
    """The capture (512 bytes) cut a response head of ~1.5 KiB: the status line gives the status, the
    response ends with the cut (its framing was lost with it); the rest of its body, in the next call, is
    skipped up to the next status line, and the next request pairs with its own response."""
    body = b"x" * 3000
    resp = BIG_HEAD + b"Content-Length: 3000\r\n\r\n" + body
    t = client()
    t.feed(EG, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n", 1, 0)
    recs = t.feed(IN, resp[:512], 2, 0, length=2000)
    assert [(r.path, r.status, r.response_bytes) for r in recs] == [("/a", 404, 2000)]
    assert t.feed(IN, resp[2000:2512], 3, 2000, length=len(resp) - 2000) == []
    t.feed(EG, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n", 4, 28)
    recs = t.feed(IN, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 5, len(resp))
    assert [(r.path, r.status) for r in recs] == [("/b", 200)]
    c = t.counters()
    assert (c["cut_responses"], c["truncations"], c["unanswered_requests"], c["invalid_frames"]) == (1, 2, 0, 0)
    assert c["discarded_bytes"] == 512


@pytest.mark.parametrize(
    "cut",
    [b"HTTP/1.1 200 OK", b"HTTP/1.1 100 Continue\r\nX: y", b"HTTP/1.1 2x0 OK\r\nX: y", b"GET / HTTP/1.1\r\nX: y"],
)
def test_a_cut_head_without_a_final_status_line_is_not_guessed(cut: bytes) -> None:
    t = client()
    t.feed(EG, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1, 0)
    assert t.feed(IN, cut, 2, 0, length=2000) == []
    assert t.counters()["cut_responses"] == 0
