"""Exchange records (HTTP/1 paired in the kernel): decode, head parsing, events, counters."""

from __future__ import annotations

import ctypes

from hypothesis import given
from hypothesis import strategies as st

from node_exporter.bpf.abi import L7_HEAD, KscopeL7Exchange, L7Emit, L7ExchangeFlags, L7RecordType, Role
from node_exporter.l7.exchanges import (
    _RING_HDR,
    DISCARD_BIT,
    EXCHANGE,
    EXCHANGE_SIZE,
    HEAD_OFFSET,
    MAX_PATH_CACHE,
    ExchangeBatch,
    HeadParser,
)
from node_exporter.l7.pipeline import MAX_EXCHANGE_CONNS, L7Event, L7Pipeline
from node_exporter.protocols import HttpRecord
from node_exporter.protocols import Role as PRole
from node_exporter.protocols.base import ParseState
from node_exporter.protocols.http1 import parse_request

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
GET = b"GET /users/42/orders?session=secret HTTP/1.1\r\nHost: shop\r\nCookie: sid=hunter2\r\n\r\n"
TRACED = (
    b"POST /api/v1/items HTTP/1.1\r\nHost: shop\r\nTraceParent: " + TRACEPARENT.encode() + b"\r\n"
    b"X-REQUEST-ID: AbC-123\r\nContent-Length: 4\r\n\r\n"
)


def exchange_bytes(
    head: bytes, *, cookie: int = 7, status: int = 200, start: int = 1_000, latency: int = 500,
    req_bytes: int | None = None, resp_bytes: int = 99, role: int = Role.KSCOPE_ROLE_CLIENT,
    head_len: int | None = None, reason: int = L7Emit.KSCOPE_EMIT_NEXT, seqs: tuple[int, int] | None = None,
) -> bytes:  # fmt: skip
    x = KscopeL7Exchange()
    x.type, x.role, x.method, x.reason = L7RecordType.KSCOPE_REC_L7_EXCHANGE, role, 1, reason
    x.netns_ino, x.sock_cookie, x.start_ns, x.latency_ns = 4026531840, cookie, start, latency
    x.request_bytes = len(head) if req_bytes is None else req_bytes
    x.response_bytes, x.status, x.tgid, x.pid = resp_bytes, status, 100, 101
    x.saddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 1]
    x.daddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 2]
    x.sport, x.dport, x.family = 40000, 80, 2
    x.comm[:4] = list(b"curl")
    data = head[:L7_HEAD]
    x.head[: len(data)] = list(data)
    x.head_len = len(data) if head_len is None else head_len
    if seqs is not None:
        x.flags = L7ExchangeFlags.KSCOPE_X_TCP_SEQ
        x.tcp_req_seq, x.tcp_resp_seq = seqs
    return bytes(x)


def http(event: L7Event) -> HttpRecord:
    assert isinstance(event.record, HttpRecord)
    return event.record


def test_exchange_format_matches_mirror() -> None:
    assert EXCHANGE_SIZE == ctypes.sizeof(KscopeL7Exchange) == 504
    assert EXCHANGE.size == HEAD_OFFSET == EXCHANGE_SIZE - L7_HEAD - 16  # the TCP sequence numbers, parent_start_ns
    raw = exchange_bytes(GET, status=404, latency=7, resp_bytes=3)
    fields = EXCHANGE.unpack_from(raw)
    before_head = [f[0] for f in KscopeL7Exchange._fields_][: [f[0] for f in KscopeL7Exchange._fields_].index("head")]
    names = [n for n in before_head if n != "_pad"]
    got = dict(zip(names, fields, strict=True))
    assert (got["type"], got["status"], got["latency_ns"], got["response_bytes"]) == (3, 404, 7, 3)
    assert (got["sport"], got["dport"], got["family"], got["head_len"]) == (40000, 80, 2, len(GET))
    assert raw[HEAD_OFFSET : HEAD_OFFSET + len(GET)] == GET


# ---- the head parser --------------------------------------------------------------------------


def test_head_keeps_method_path_route_only() -> None:
    h = HeadParser().parse(GET)
    assert h == ("GET", "/users/42/orders", "/users/{id}/orders", "", "")
    assert "secret" not in repr(h) and "hunter2" not in repr(h)


def test_head_trace_headers_case_insensitive_values_kept_as_sent() -> None:
    assert HeadParser().parse(TRACED) == ("POST", "/api/v1/items", "/api/v1/items", TRACEPARENT, "AbC-123")


def test_head_last_header_and_bare_lf() -> None:
    head = b"GET /x HTTP/1.0\nx-request-id: last\n\n"
    assert HeadParser().parse(head) == ("GET", "/x", "/x", "", "last")
    assert HeadParser().parse(b"GET /x HTTP/1.1\r\nX-Request-Id: r1\r\n\r\n") == ("GET", "/x", "/x", "", "r1")


def test_head_cut_by_capture() -> None:
    p = HeadParser()
    # inside a header value: that value is not used (a cut id would be a wrong id)
    assert p.parse(b"GET /a HTTP/1.1\r\nX-Request-ID: abcdef") == ("GET", "/a", "/a", "", "")
    assert p.parse(b"GET /a HTTP/1.1\r\ntraceparent: " + TRACEPARENT.encode()[:30]) == ("GET", "/a", "/a", "", "")
    # inside the request line: the path is what was captured of it
    assert p.parse(b"GET /very/long/pa") == ("GET", "/very/long/pa", "/very/long/pa", "", "")
    assert p.parse(b"GET /q?tok") == ("GET", "/q", "/q", "", "")


def test_head_body_is_not_searched() -> None:
    head = b"POST /f HTTP/1.1\r\nContent-Length: 30\r\n\r\nx\ntraceparent: " + TRACEPARENT.encode()
    assert HeadParser().parse(head) == ("POST", "/f", "/f", "", "")


def test_head_forms_of_target() -> None:
    p = HeadParser()
    assert p.parse(b"GET http://shop:8080/a/1?x HTTP/1.1\r\n\r\n") == ("GET", "/a/1", "/a/{id}", "", "")
    assert p.parse(b"CONNECT shop:443 HTTP/1.1\r\n\r\n") == ("CONNECT", "shop:443", "shop:443", "", "")
    assert p.parse(b"OPTIONS * HTTP/1.1\r\n\r\n") == ("OPTIONS", "*", "*", "", "")


def test_head_rejects() -> None:
    p = HeadParser()
    for bad in (b"", b"FOO / HTTP/1.1\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET  / HTTP/1.1\r\n\r\n",
                b"GET /\x01 HTTP/1.1\r\n\r\n", b"GET nothttp HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1 x\r\n\r\n",
                b"GET /\r\n\r\n"):  # fmt: skip
        assert p.parse(bad) is None, bad


def test_path_cache_is_bounded() -> None:
    p = HeadParser()
    for i in range(MAX_PATH_CACHE + 10):
        assert p.parse(b"GET /p%d?q=%d HTTP/1.1\r\n\r\n" % (i, i)) is not None
    assert len(p._paths) <= MAX_PATH_CACHE
    assert not any(b"?" in k for k in p._paths)  # the query never reaches the cache


@given(st.binary(max_size=L7_HEAD))
def test_head_parser_never_raises(data: bytes) -> None:
    HeadParser().parse(data)


_METHOD = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH"])
_SEGMENT = st.text("abcxyz0123456789-_.~%", min_size=0, max_size=12)
_NAME = st.sampled_from(["Host", "Accept", "traceparent", "TRACEPARENT", "X-Request-ID", "x-request-id", "Cookie"])
_VALUE = st.one_of(st.just(TRACEPARENT), st.text("abcXYZ0123-_/ ", max_size=20).map(str.strip))


@given(
    _METHOD,
    st.lists(_SEGMENT, max_size=5),
    st.text("a=1&b", max_size=6),
    st.lists(st.tuples(_NAME, _VALUE), max_size=6),
    st.sampled_from(["1.0", "1.1"]),
)
def test_head_parser_agrees_with_stream_parser(
    method: str, segments: list[str], query: str, fields: list[tuple[str, str]], version: str
) -> None:
    """For a whole head, the exchange path keeps exactly what the chunk path's parser keeps."""
    target = "/" + "/".join(segments) + (f"?{query}" if query else "")
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
    raw = head.encode()
    want = parse_request(raw)
    got = HeadParser().parse(raw)
    if want.state is not ParseState.SUCCESS:
        return  # e.g. a field the stream parser rejects: the exchange path may be more lenient
    f = want.frame
    assert got == (f.method, f.path, f.route, f.traceparent, f.request_id)


# ---- exchanges through the pipeline ---------------------------------------------------------


def test_pipeline_turns_exchanges_into_events() -> None:
    pipe = L7Pipeline()
    batch = ExchangeBatch.of([exchange_bytes(GET, start=5_000, latency=700, req_bytes=120, resp_bytes=300)])
    (e,) = pipe.feed([batch])
    assert e.record == HttpRecord(
        method="GET", path="/users/42/orders", route="/users/{id}/orders", status=200, request_bytes=120,
        response_bytes=300, start_ns=5_000, latency_ns=700, traceparent="", request_id="",
    )  # fmt: skip
    c = e.conn
    assert (c.sock_cookie, c.side, c.protocol, c.tls, c.family) == (7, PRole.CLIENT, "http1", False, 2)
    assert (c.local_ip, c.local_port, c.remote_ip, c.remote_port) == ("198.18.0.1", 40000, "198.18.0.2", 80)
    assert (c.tgid, c.comm, c.netns_ino) == (100, "curl", 4026531840)
    assert pipe.counters()["exchange_records"] == 1


def test_pipeline_keeps_the_tcp_seqs_only_when_the_kernel_set_them() -> None:
    # 0 is a sequence number like any other: the flag, not the value, says they are known
    raws = [exchange_bytes(GET, cookie=1, seqs=(0xFFFFFFFF, 0)), exchange_bytes(GET, cookie=2)]
    a, b = L7Pipeline().feed_exchanges(ExchangeBatch.of(raws))
    assert (http(a).tcp_seqs, http(b).tcp_seqs) == ((0xFFFFFFFF, 0), None)
    assert http(a).path == http(b).path == "/users/42/orders"


def test_pipeline_counts_what_it_cannot_use() -> None:
    pipe = L7Pipeline()
    events = pipe.feed(
        [
            ExchangeBatch.of(
                [
                    exchange_bytes(GET, status=0, latency=0),  # no response before close/sweep
                    exchange_bytes(b"garbage\r\n\r\n"),
                    exchange_bytes(GET, role=0),
                    exchange_bytes(GET, cookie=8, role=Role.KSCOPE_ROLE_SERVER),
                ]
            )
        ]
    )
    assert [e.conn.side for e in events] == [PRole.SERVER]
    counters = pipe.counters()
    assert (counters["exchange_unanswered"], counters["exchange_bad_head"], counters["exchange_bad_role"]) == (1, 1, 1)
    assert counters["exchange_records"] == 4


def test_pipeline_reuses_conn_info_until_close() -> None:
    pipe = L7Pipeline()
    a, b = pipe.feed([ExchangeBatch.of([exchange_bytes(GET), exchange_bytes(TRACED)])])
    assert a.conn is b.conn
    assert http(b).traceparent == TRACEPARENT and http(b).request_id == "AbC-123"
    pipe.close_sockets([7])
    (c,) = pipe.feed([ExchangeBatch.of([exchange_bytes(GET)])])
    assert c.conn is not a.conn and c.conn == a.conn


def test_pipeline_remembers_exchange_sockets_within_its_bound() -> None:
    pipe = L7Pipeline()
    extra = 10
    cookies = range(1, MAX_EXCHANGE_CONNS + extra + 1)
    events = pipe.feed([ExchangeBatch.of([exchange_bytes(GET, cookie=c) for c in cookies])])
    assert [e.conn.sock_cookie for e in events] == list(cookies)
    assert pipe.counters()["exchange_sockets_remembered"] == MAX_EXCHANGE_CONNS
    # the oldest were forgotten (rebuilt, equal, when they speak again); the newest are reused
    (old, new) = pipe.feed([ExchangeBatch.of([exchange_bytes(GET, cookie=1), exchange_bytes(GET, cookie=cookies[-1])])])
    assert old.conn is not events[0].conn and old.conn == events[0].conn
    assert new.conn is events[-1].conn


def test_pipeline_forgets_a_socket_with_its_last_record() -> None:
    """A record sent when its socket closed is the socket's last: its ConnInfo is not remembered
    (connection churn would otherwise fill the bounded map with dead sockets)."""
    pipe = L7Pipeline()
    close = L7Emit.KSCOPE_EMIT_CLOSE
    events = pipe.feed([ExchangeBatch.of([exchange_bytes(GET, cookie=c, reason=close) for c in range(1, 1001)])])
    assert len(events) == 1000 and {http(e).path for e in events} == {"/users/42/orders"}
    assert pipe.counters()["exchange_sockets_remembered"] == 0
    # a socket known from earlier records is forgotten with its last one too
    pipe.feed([ExchangeBatch.of([exchange_bytes(GET, cookie=c) for c in (7, 8)])])
    assert pipe.counters()["exchange_sockets_remembered"] == 2
    (last,) = pipe.feed([ExchangeBatch.of([exchange_bytes(GET, cookie=7, reason=close)])])
    assert last.conn.sock_cookie == 7 and pipe.counters()["exchange_sockets_remembered"] == 1


def test_pipeline_skips_discarded_slots_and_counts_bad_types() -> None:
    good = exchange_bytes(GET)
    discarded = _RING_HDR.pack(len(good) | DISCARD_BIT, 0) + exchange_bytes(TRACED)
    wrong_type = _RING_HDR.pack(len(good), 0) + b"\x02" + good[1:]
    ring_slot = ExchangeBatch.of([good])
    batch = ExchangeBatch(ring_slot.data + discarded + wrong_type, 3)
    pipe = L7Pipeline()
    (e,) = pipe.feed([batch])
    assert http(e).path == "/users/42/orders"
    counters = pipe.counters()
    assert (counters["exchange_records"], counters["exchange_bad_type"]) == (1, 1)
