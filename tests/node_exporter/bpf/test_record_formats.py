"""The ``struct`` formats that unpack kernel records, and the positional decoders behind them,
checked field by field against the ctypes mirrors (which test_abi.py checks against BTF).

Each record is built by field name with a value no other field has (wide fields use their high
byte too), then decoded: a swapped, shifted or narrowed field in a format or decoder shows as one
named field with another's value. Needs no root.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

import pytest

from node_exporter.bpf import abi
from node_exporter.bpf.abi import (
    KscopeL4Record,
    KscopeL7Exchange,
    KscopeL7Header,
    KscopeL7Summary,
    struct_format,
)
from node_exporter.l4.records import Counters, DecodeStats, decode_batch, decode_l4
from node_exporter.l7.chunks import decode_chunk
from node_exporter.l7.exchanges import ExchangeBatch
from node_exporter.l7.pipeline import L7Pipeline
from node_exporter.protocols import Role as PRole
from node_exporter.protocols.http1 import HttpSummaryRecord
from tests.node_exporter.bpf.mirrors import STRUCTS

SADDR = bytes(10) + b"\xff\xff" + bytes([198, 18, 0, 1])  # ::ffff:198.18.0.1
DADDR = bytes(10) + b"\xff\xff" + bytes([198, 19, 0, 2])
COMM = b"ks-formats"
HEAD = b"GET /orders/7?secret=1 HTTP/1.1\r\nHost: shop\r\n\r\n"


def _fields(mirror: type[ctypes.Structure]) -> list[tuple[str, Any]]:
    return [(f[0], f[1]) for f in mirror._fields_]


def distinct(mirror: type[ctypes.Structure], **fixed: int | bytes | list[int]) -> Any:
    """An instance whose every field (array element) holds a value no other one has; ``fixed``
    fields (enums, addresses, lengths) take the value given."""
    rec = mirror()
    for i, (name, ctype) in enumerate(_fields(mirror), start=1):
        if name in fixed:
            value = fixed[name]
            if isinstance(value, bytes | list):
                getattr(rec, name)[: len(value)] = list(value)
            else:
                setattr(rec, name, value)
        elif issubclass(ctype, ctypes.Array):
            width = ctypes.sizeof(ctype._type_)
            for j in range(ctype._length_):
                getattr(rec, name)[j] = ((i * 16 + j) % 256) << (8 * width - 8) | i
        elif not name.startswith("_pad"):
            width = ctypes.sizeof(ctype)
            setattr(rec, name, i if width == 1 else (i << (8 * width - 8)) | i)
    return rec


def _expected_items(rec: ctypes.Structure, names: list[str]) -> list[Any]:
    out: list[Any] = []
    for name in names:
        value = getattr(rec, name)
        if isinstance(value, ctypes.Array):
            out.extend([bytes(value)] if value._type_ is ctypes.c_uint8 else list(value))
        else:
            out.append(value)
    return out


@pytest.mark.parametrize("struct_name", sorted(STRUCTS))
def test_derived_format_reads_each_field_at_its_own_offset(struct_name: str) -> None:
    _, mirror = STRUCTS[struct_name]
    fmt = struct.Struct(struct_format(mirror))
    assert fmt.size == ctypes.sizeof(mirror)
    rec = distinct(mirror)
    names = [n for n, _ in _fields(mirror) if not n.startswith("_pad")]
    assert list(fmt.unpack(bytes(rec))) == _expected_items(rec, names)


def test_derived_format_of_a_range_starts_and_stops_at_its_fields() -> None:
    """The summary's tail (count .. buckets) as the pipeline reads it, where an exchange's head starts."""
    tail = struct.Struct(struct_format(KscopeL7Summary, first="count", stop="head"))
    assert tail.size == KscopeL7Summary.head.offset - KscopeL7Summary.count.offset
    rec = distinct(KscopeL7Summary)
    names = ["count", "end_ns", "latency_min_ns", "latency_max_ns", "buckets"]
    assert list(tail.unpack_from(bytes(rec), KscopeL7Summary.count.offset)) == _expected_items(rec, names)
    prefix = struct_format(KscopeL7Exchange, stop="head")
    assert struct.calcsize(prefix) == KscopeL7Exchange.head.offset == KscopeL7Summary.count.offset


def test_derived_format_skips_holes_and_trailing_padding() -> None:
    class Holey(ctypes.Structure):  # what a mirror without explicit _pad fields would be
        _fields_ = [("a", ctypes.c_uint8), ("b", ctypes.c_uint64), ("c", ctypes.c_uint16)]

    assert struct_format(Holey) == "<B7xQH6x"
    assert struct_format(Holey, first="b", stop="c") == "<Q"


def _covered(mirror: type[ctypes.Structure], used: set[str], unused: set[str]) -> None:
    """Every C field is either checked or named as not surfaced: a new field cannot go unchecked."""
    assert used | unused == {n for n, _ in _fields(mirror)}, "a C field is neither checked nor listed unused"


def _check(decoded: Any, rec: ctypes.Structure, spec: dict[str, tuple[str, Callable[[Any], Any]]]) -> None:
    for attr, (field, conv) in spec.items():
        assert getattr(decoded, attr) == conv(getattr(rec, field)), f"{attr} <- {field}"


def _same(v: Any) -> Any:
    return v


def _addr(ip: str) -> Callable[[Any], str]:
    return lambda _raw: ip


def _comm(_raw: Any) -> str:
    return COMM.decode()


def test_l4_decoder_field_by_field() -> None:
    rec = distinct(KscopeL4Record, type=1, reason=2, role=3, connect_status=5, connect_errno=111, tcp_state=7,
                   family=10, saddr=SADDR, daddr=DADDR, comm=COMM)  # fmt: skip
    spec: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "reason": ("reason", abi.L4Reason), "role": ("role", abi.Role),
        "connect_status": ("connect_status", abi.ConnectStatus), "connect_errno": ("connect_errno", _same),
        "netns_ino": ("netns_ino", _same), "sock_cookie": ("sock_cookie", _same), "cgroup_id": ("cgroup_id", _same),
        "start_ns": ("start_ns", _same), "ts_ns": ("ts_ns", _same),
        "connect_latency_ns": ("connect_latency_ns", _same),
        "total": ("total", lambda a: Counters(*a)), "delta": ("delta", lambda a: Counters(*a)),
        "local_ip": ("saddr", _addr("198.18.0.1")), "local_port": ("sport", _same),
        "remote_ip": ("daddr", _addr("198.19.0.2")), "remote_port": ("dport", _same), "family": ("family", _same),
        "tgid": ("tgid", _same), "pid": ("pid", _same), "srtt_us": ("srtt_us", _same),
        "segs_out": ("segs_out", _same), "segs_in": ("segs_in", _same),
        "last_drop_reason": ("last_drop_reason", _same), "ack_backlog": ("ack_backlog", _same),
        "max_ack_backlog": ("max_ack_backlog", _same), "sk_drops": ("sk_drops", _same),
        "rttvar_us": ("rttvar_us", _same), "tcp_state": ("tcp_state", _same), "comm": ("comm", _comm),
    }  # fmt: skip
    _covered(KscopeL4Record, {f for f, _ in spec.values()}, {"type"})
    assert set(spec) == set(decode_l4(bytes(rec))._fields)  # type: ignore[union-attr]
    one = decode_l4(bytes(rec))
    (batched,) = decode_batch(bytes(rec), DecodeStats())
    for decoded in (one, batched):
        _check(decoded, rec, spec)


def test_l7_chunk_decoder_field_by_field() -> None:
    data = b"GET /"
    rec = distinct(KscopeL7Header, type=2, direction=2, protocol=1, flags=5, role=2, ip_proto=6, family=10,
                   len=70_000, captured=len(data), saddr=SADDR, daddr=DADDR, comm=COMM)  # fmt: skip
    spec: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "direction": ("direction", abi.L7Direction), "protocol": ("protocol", abi.L7Protocol),
        "flags": ("flags", abi.L7Flags), "netns_ino": ("netns_ino", _same), "sock_cookie": ("sock_cookie", _same),
        "ts_ns": ("ts_ns", _same), "seq": ("seq", _same), "local_ip": ("saddr", _addr("198.18.0.1")),
        "remote_ip": ("daddr", _addr("198.19.0.2")), "tgid": ("tgid", _same), "pid": ("pid", _same),
        "length": ("len", _same), "local_port": ("sport", _same), "remote_port": ("dport", _same),
        "family": ("family", _same), "role": ("role", _same), "ip_proto": ("ip_proto", _same),
        "comm": ("comm", _comm), "data": ("captured", lambda n: data[:n]), "parent_ns": ("parent_ns", _same),
    }  # fmt: skip
    _covered(KscopeL7Header, {f for f, _ in spec.values()}, {"type"})
    decoded = decode_chunk(bytes(rec) + data)
    assert decoded is not None
    assert set(spec) == set(decoded._fields)
    _check(decoded, rec, spec)


# What the exchange pipeline surfaces of an exchange's shared prefix, and what it does not.
_CONN_SPEC: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "sock_cookie": ("sock_cookie", _same), "netns_ino": ("netns_ino", _same),
    "side": ("role", lambda r: {1: PRole.CLIENT, 2: PRole.SERVER}[r]), "local_ip": ("saddr", _addr("198.18.0.1")),
    "local_port": ("sport", _same), "remote_ip": ("daddr", _addr("198.19.0.2")), "remote_port": ("dport", _same),
    "family": ("family", _same), "tgid": ("tgid", _same), "comm": ("comm", _comm),
}  # fmt: skip
_RECORD_SPEC: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "status": ("status", _same), "request_bytes": ("request_bytes", _same),
    "response_bytes": ("response_bytes", _same), "start_ns": ("start_ns", _same),
}  # fmt: skip
# type: dispatch; method: re-read from the head; reason: whether the socket is remembered; flags, pid:
# not kept; head_len: how much head is parsed (checked through the path)
_NOT_SURFACED = {"type", "method", "reason", "flags", "pid", "head_len", "_pad", "head"}
_PREFIX: dict[str, int | bytes | list[int]] = {
    "type": 3, "role": 2, "method": 1, "reason": 1, "flags": 0, "family": 10, "status": 503, "head_len": len(HEAD),
    "saddr": SADDR, "daddr": DADDR, "comm": COMM,
}  # fmt: skip


def test_l7_exchange_decoder_field_by_field() -> None:
    rec = distinct(KscopeL7Exchange, **_PREFIX, head=HEAD)
    (event,) = L7Pipeline().feed([ExchangeBatch.of([bytes(rec)])])
    _covered(KscopeL7Exchange, {f for f, _ in (*_CONN_SPEC.values(), *_RECORD_SPEC.values())}
             | {"latency_ns", "tcp_req_seq", "tcp_resp_seq", "parent_start_ns"},  # the last: test_causal.py
             _NOT_SURFACED)  # fmt: skip
    _check(event.conn, rec, _CONN_SPEC)
    _check(event.record, rec, {**_RECORD_SPEC, "latency_ns": ("latency_ns", _same)})
    assert (event.record.method, event.record.path) == ("GET", "/orders/7")  # type: ignore[union-attr]
    assert event.record.tcp_seqs is None  # type: ignore[union-attr]  # flags 0: not known


def test_l7_exchange_tcp_seqs_decoded_with_their_flag() -> None:
    rec = distinct(KscopeL7Exchange, **{**_PREFIX, "flags": abi.L7ExchangeFlags.KSCOPE_X_TCP_SEQ}, head=HEAD)
    (event,) = L7Pipeline().feed([ExchangeBatch.of([bytes(rec)])])
    assert event.record.tcp_seqs == (rec.tcp_req_seq, rec.tcp_resp_seq)  # type: ignore[union-attr]
    assert rec.tcp_req_seq != rec.tcp_resp_seq


def test_l7_summary_decoder_field_by_field() -> None:
    buckets = list(range(1, abi.L7_LATENCY_BUCKETS + 1))
    rec = distinct(KscopeL7Summary, **{**_PREFIX, "type": 4}, count=sum(buckets), buckets=buckets,
                   latency_min_ns=3_000_001, latency_max_ns=9_000_000_002, head=HEAD)  # fmt: skip
    (event,) = L7Pipeline().feed([ExchangeBatch.of([bytes(rec)])])
    record = event.record
    assert isinstance(record, HttpSummaryRecord)
    s = record.summary
    assert (s.count, s.latency_sum_ns, s.latency_min_ns, s.latency_max_ns, s.end_ns) == (
        rec.count, rec.latency_ns, rec.latency_min_ns, rec.latency_max_ns, rec.end_ns)  # fmt: skip
    assert s.buckets == tuple(buckets)
    _covered(KscopeL7Summary, {f for f, _ in (*_CONN_SPEC.values(), *_RECORD_SPEC.values())}
             | {"latency_ns", "count", "end_ns", "latency_min_ns", "latency_max_ns", "buckets"},
             _NOT_SURFACED | {"_pad2", "_pad3", "_pad4"})  # fmt: skip
    _check(event.conn, rec, _CONN_SPEC)
    _check(record, rec, _RECORD_SPEC)
    assert (record.method, record.path) == ("GET", "/orders/7")
