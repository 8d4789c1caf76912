"""Decoding kernel bytes: exact round trip, and garbage never raises."""

from __future__ import annotations

import ctypes

from hypothesis import given
from hypothesis import strategies as st

from node_exporter.bpf.abi import ConnectStatus, KscopeL4Record, L4Reason, RecordType, Role
from node_exporter.l4.records import RECORD_SIZE, DecodeStats, decode_batch, decode_l4, decode_many


def _record(**kw: object) -> bytes:
    rec = KscopeL4Record()
    rec.type = RecordType.KSCOPE_REC_L4
    rec.reason = L4Reason.KSCOPE_L4_CLOSE
    rec.role = Role.KSCOPE_ROLE_SERVER
    rec.connect_status = ConnectStatus.KSCOPE_CONNECT_NONE
    rec.sock_cookie = 0xDEADBEEF
    rec.saddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 2]
    rec.daddr[:] = [0x20, 0x01, 0x0D, 0xB8] + [0] * 11 + [1]
    rec.sport, rec.dport, rec.family = 8080, 40000, 10
    rec.total[0], rec.delta[0] = 1_000_003, 3
    rec.comm[:5] = list(b"nginx")
    for key, value in kw.items():
        setattr(rec, key, value)
    return bytes(rec)


def test_decode_fields() -> None:
    r = decode_l4(_record())
    assert r is not None
    assert r.is_close and r.role == Role.KSCOPE_ROLE_SERVER
    assert r.local_ip == "198.18.0.2" and r.local_port == 8080
    assert r.remote_ip == "2001:db8::1" and r.remote_port == 40000
    assert r.total.bytes_sent == 1_000_003 and r.delta.bytes_sent == 3
    assert r.comm == "nginx" and r.sock_cookie == 0xDEADBEEF


def test_wrong_type_and_short_records_are_counted() -> None:
    stats = DecodeStats()
    good = _record()
    out = decode_many([good, b"\x09" + good[1:], good[:17]], stats)
    assert len(out) == 1
    assert stats.bad_type == 1 and stats.bad_length == 1


def test_batch_with_trailing_bytes() -> None:
    stats = DecodeStats()
    out = decode_batch(_record() * 3 + b"\x01\x02", stats)
    assert len(out) == 3 and stats.bad_length == 1


@given(st.binary(max_size=4 * RECORD_SIZE))
def test_garbage_never_raises(blob: bytes) -> None:
    stats = DecodeStats()
    decode_batch(blob, stats)
    decode_many([blob], stats)
    decode_l4(blob)


@given(st.binary(min_size=RECORD_SIZE, max_size=RECORD_SIZE))
def test_any_full_size_record_decodes_or_is_rejected(blob: bytes) -> None:
    blob = bytes([RecordType.KSCOPE_REC_L4]) + blob[1:]
    r = decode_l4(blob)
    assert r is not None
    assert ctypes.sizeof(KscopeL4Record) == RECORD_SIZE
