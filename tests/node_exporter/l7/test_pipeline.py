"""Kernel chunks through the pipeline: decode, route per connection, pair, bound, count."""

from __future__ import annotations

import ctypes
import struct

from hypothesis import given
from hypothesis import strategies as st

from node_exporter.bpf.abi import KscopeL7Header, L7Direction, L7Flags, L7Protocol, L7RecordType, Role
from node_exporter.l7.chunks import HEADER_SIZE, decode_chunk
from node_exporter.l7.pipeline import L7Pipeline
from node_exporter.protocols import DnsRecord, HttpRecord
from node_exporter.protocols import Role as PRole

EGRESS, INGRESS = L7Direction.KSCOPE_DIR_EGRESS, L7Direction.KSCOPE_DIR_INGRESS
REQ = b"GET /users/42/orders?session=abc HTTP/1.1\r\nHost: shop\r\nUser-Agent: curl/7.88.1\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


def chunk_bytes(
    data: bytes, *, direction: int = EGRESS, cookie: int = 7, seq: int = 0, ts: int = 1_000, length: int | None = None,
    protocol: int = L7Protocol.KSCOPE_PROTO_HTTP1, role: int = Role.KSCOPE_ROLE_CLIENT, ip_proto: int = 6,
    flags: int = 0, dport: int = 80, parent_ns: int = 0, tid: int = 101, tgid: int = 100,
) -> bytes:  # fmt: skip
    h = KscopeL7Header()
    h.type, h.direction, h.protocol, h.flags = L7RecordType.KSCOPE_REC_L7, direction, protocol, flags
    h.sock_cookie, h.ts_ns, h.seq, h.tgid, h.pid, h.parent_ns = cookie, ts, seq, tgid, tid, parent_ns
    h.saddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 1]
    h.daddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 2]
    h.len = len(data) if length is None else length
    h.captured = len(data)
    h.sport, h.dport, h.family, h.role, h.ip_proto = 40000, dport, 2, role, ip_proto
    h.comm[:4] = list(b"curl")
    return bytes(h) + data


def test_header_mirror_size() -> None:
    assert HEADER_SIZE == ctypes.sizeof(KscopeL7Header) == 112


def test_decode_roundtrip() -> None:
    c = decode_chunk(chunk_bytes(REQ, seq=5))
    assert c is not None
    assert (c.direction, c.protocol, c.seq, c.length) == (EGRESS, L7Protocol.KSCOPE_PROTO_HTTP1, 5, len(REQ))
    assert c.data == REQ
    assert (c.local_ip, c.remote_ip, c.local_port, c.remote_port, c.comm) == ("198.18.0.1", "198.18.0.2", 40000, 80,
                                                                              "curl")  # fmt: skip


def test_decode_rejects_inconsistent_headers() -> None:
    good = chunk_bytes(REQ)
    assert decode_chunk(good[:50]) is None  # short
    assert decode_chunk(b"\x01" + good[1:]) is None  # L4 type byte
    assert decode_chunk(good[:-10]) is None  # captured says more than is there
    bad_len = bytearray(good)
    struct.pack_into("<I", bad_len, KscopeL7Header.len.offset, 3)  # captured > len
    assert decode_chunk(bytes(bad_len)) is None


@given(st.binary(max_size=400))
def test_decode_never_raises(blob: bytes) -> None:
    decode_chunk(blob)
    decode_chunk(chunk_bytes(b"")[:HEADER_SIZE] + blob)


def _chunks(*raws: bytes) -> list:  # type: ignore[type-arg]
    out = [decode_chunk(r) for r in raws]
    assert all(c is not None for c in out)
    return out


def test_client_request_response_pair() -> None:
    pipe = L7Pipeline()
    events = pipe.feed(_chunks(chunk_bytes(REQ, ts=1_000), chunk_bytes(RESP, direction=INGRESS, ts=5_000)))
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev.record, HttpRecord)
    r = ev.record
    assert (r.method, r.path, r.route, r.status) == ("GET", "/users/42/orders", "/users/{id}/orders", 200)
    assert ev.record.latency_ns == 4_000
    assert ev.conn.side is PRole.CLIENT and ev.conn.comm == "curl" and not ev.conn.tls
    assert "session" not in repr(ev)


def test_truncated_body_completes_without_waiting_for_the_next_chunk() -> None:
    # nginx writes head and body with writev: the kernel captures the first buffer only
    head = RESP[: RESP.index(b"\r\n\r\n") + 4]
    pipe = L7Pipeline()
    events = pipe.feed(
        _chunks(
            chunk_bytes(REQ, role=Role.KSCOPE_ROLE_SERVER, direction=INGRESS),
            chunk_bytes(head, role=Role.KSCOPE_ROLE_SERVER, length=len(RESP), flags=L7Flags.KSCOPE_L7_TRUNCATED),
        )
    )
    assert [e.record.status for e in events] == [200]  # type: ignore[union-attr]
    assert events[0].record.response_bytes == len(RESP)


def test_tls_plaintext_and_ciphertext_are_separate_connections() -> None:
    pipe = L7Pipeline()
    pipe.feed(_chunks(chunk_bytes(REQ, flags=L7Flags.KSCOPE_L7_TLS)))
    events = pipe.feed(_chunks(chunk_bytes(RESP, direction=INGRESS, flags=L7Flags.KSCOPE_L7_TLS)))
    assert len(events) == 1 and events[0].conn.tls


def test_close_flushes_and_forgets() -> None:
    pipe = L7Pipeline()
    until_close = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close"
    pipe.feed(_chunks(chunk_bytes(REQ), chunk_bytes(until_close, direction=INGRESS)))
    assert len(pipe) == 1
    events = pipe.close_sockets([7])
    assert [e.record.status for e in events] == [200]  # type: ignore[union-attr]
    assert len(pipe) == 0


def test_connection_bound_evicts_and_counts() -> None:
    pipe = L7Pipeline(max_connections=10)
    pipe.feed(_chunks(*(chunk_bytes(REQ, cookie=i) for i in range(25))))
    assert len(pipe) == 10
    counters = pipe.counters()
    assert counters["connections_evicted"] == 15
    assert counters["requests_parsed"] == 25  # evicted trackers' counters are kept


def _dns(qid: int, name: bytes, rcode: int = 0, answers: int = 0, response: bool = False) -> bytes:
    flags = (0x8180 | rcode) if response else 0x0100
    q = b"".join(bytes([len(p)]) + p for p in name.split(b".")) + b"\x00" + struct.pack(">HH", 1, 1)
    return struct.pack(">HHHHHH", qid, flags, 1, answers, 0, 0) + q


def test_udp_dns_pairs_per_peer_and_times_out() -> None:
    pipe = L7Pipeline()
    dns = dict(protocol=L7Protocol.KSCOPE_PROTO_DNS, ip_proto=17, dport=53)
    events = pipe.feed(
        _chunks(
            chunk_bytes(_dns(1, b"ok.test"), ts=10, **dns),
            chunk_bytes(_dns(1, b"ok.test", answers=1, response=True), direction=INGRESS, ts=30, **dns),
            chunk_bytes(_dns(2, b"nx.test", rcode=3, response=True), direction=INGRESS, ts=40, **dns),
            chunk_bytes(_dns(3, b"lost.test"), ts=50, **dns),
        )
    )
    assert [(e.record.name, e.record.rcode, e.record.answers) for e in events] == [("ok.test", "NOERROR", 1)]  # type: ignore[union-attr]
    assert events[0].conn.protocol == "dns"
    timeouts = pipe.expire(50 + 60 * 1_000_000_000)
    assert [(e.record.name, e.record.timed_out) for e in timeouts if isinstance(e.record, DnsRecord)] == [
        ("lost.test", True)
    ]


def test_chunks_without_role_are_counted_not_parsed() -> None:
    pipe = L7Pipeline()
    assert pipe.feed(_chunks(chunk_bytes(REQ, role=Role.KSCOPE_ROLE_UNKNOWN))) == []
    assert pipe.counters()["chunks_unusable"] == 1
