"""MySQL/MariaDB: handshake, COM_QUERY, result sets (rows counted), ERR with SQLSTATE, prepared
statements by id (bounded), SSL request; fed whole, byte by byte and with trailing bytes; fuzzed."""

from __future__ import annotations

import random
import struct

import pytest

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, DbRecord, Direction, Role
from node_exporter.protocols.sqlbase import MAX_STATEMENTS
from tests.node_exporter.protocols.sqlwire import (
    MY_BINARY_ROWS,
    MY_ERR,
    MY_EXECUTE,
    MY_GREETING,
    MY_HANDSHAKE_RESPONSE,
    MY_OK1,
    MY_OK2,
    MY_PING,
    MY_PREPARE,
    MY_PREPARE_OK,
    MY_QUERY,
    MY_ROWS,
    MY_SSL_REQUEST,
    MY_STMT_CLOSE,
    SECRET,
    my,
)

EG, IN = Direction.EGRESS, Direction.INGRESS
MY = PROTOCOLS["mysql"]


def session(byte_by_byte: bool = False, greeting: bool = True) -> tuple[ConnectionTracker, list[DbRecord]]:
    t = ConnectionTracker(MY, Role.CLIENT)
    steps = [(IN, MY_GREETING), (EG, MY_HANDSHAKE_RESPONSE), (IN, MY_OK2)] if greeting else []
    steps += [
        (EG, MY_QUERY), (IN, MY_ROWS), (EG, my(0, b"\x03SELECT 1 FROM nope")), (IN, MY_ERR), (EG, MY_PREPARE),
        (IN, MY_PREPARE_OK), (EG, MY_EXECUTE), (IN, MY_BINARY_ROWS), (EG, MY_STMT_CLOSE), (EG, MY_PING), (IN, MY_OK1),
    ]  # fmt: skip
    out: list[DbRecord] = []
    for ts, (d, data) in enumerate(steps):
        chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
        for c in chunks:
            out += t.feed(d, c, ts * 10)
    return t, out


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_session(byte_by_byte: bool) -> None:
    t, recs = session(byte_by_byte)
    assert [(r.system, r.operation, r.collection, r.status_code, r.error_type, r.returned_rows) for r in recs] == [
        ("mariadb", "SELECT", "kv", "", "", 2),
        ("mariadb", "SELECT", "nope", "1146", "42S02", 0),
        ("mariadb", "SELECT", "kv", "", "", 1),
        ("mariadb", "PING", "", "", "", 0),
    ]
    assert recs[0].query_text == "SELECT v FROM kv WHERE k = ?"
    assert recs[2].query_text == "SELECT v FROM kv WHERE k = ?"  # the prepared text, found by statement id
    assert (recs[0].request_bytes, recs[0].response_bytes) == (len(MY_QUERY), len(MY_ROWS))
    assert SECRET not in repr(recs)
    c = t.counters()
    assert c["invalid_frames"] == c["unanswered_requests"] == c["orphan_responses"] == c["state_misses"] == 0


def test_connection_older_than_the_agent() -> None:
    """No greeting seen: "mysql", and the classic EOF assumed; the same records otherwise."""
    _, recs = session(greeting=False)
    assert [(r.system, r.operation, r.returned_rows) for r in recs] == [
        ("mysql", "SELECT", 2), ("mysql", "SELECT", 0), ("mysql", "SELECT", 1), ("mysql", "PING", 0),
    ]  # fmt: skip


def test_deprecate_eof_result_set() -> None:
    """CLIENT_DEPRECATE_EOF: no EOF after the column definitions, an OK (0xFE header) at the end."""
    t = ConnectionTracker(MY, Role.CLIENT)
    t.feed(IN, MY_GREETING, 1)
    caps = struct.unpack_from("<I", MY_HANDSHAKE_RESPONSE, 4)[0] | 0x01000000
    t.feed(EG, MY_HANDSHAKE_RESPONSE[:4] + struct.pack("<I", caps) + MY_HANDSHAKE_RESPONSE[8:], 2)
    t.feed(IN, MY_OK2, 3)
    t.feed(EG, MY_QUERY, 4)
    rows = my(1, b"\x01") + my(2, b"\x03def" + bytes(20)) + my(3, b"\x01a") + my(4, b"\x01b") + my(5, b"\x01c")
    assert t.feed(IN, rows, 5) == []
    (rec,) = t.feed(IN, my(6, b"\xfe\0\0\x02\0\0\0"), 6)
    assert rec.returned_rows == 3


def test_ssl_request_ends_cleartext_parsing() -> None:
    t = ConnectionTracker(MY, Role.CLIENT)
    t.feed(IN, MY_GREETING, 1)
    t.feed(EG, MY_SSL_REQUEST, 2)
    assert t.eos


def test_statements_are_bounded_and_misses_counted() -> None:
    t = ConnectionTracker(MY, Role.CLIENT)
    for i in range(MAX_STATEMENTS + 1):
        t.feed(EG, my(0, b"\x16SELECT ? FROM t"), i)
        t.feed(IN, my(1, b"\0" + struct.pack("<IHHBH", i, 0, 0, 0, 0)), i)
    assert t.counters()["state_evictions"] == 1
    t.feed(EG, my(0, b"\x17" + struct.pack("<IBI", 0, 0, 1)), 1000)
    (rec,) = t.feed(IN, MY_OK1, 1001)
    assert rec.query_text == "" and t.counters()["state_misses"] == 1


def test_trailing_bytes_and_garbage() -> None:
    t = ConnectionTracker(MY, Role.CLIENT)
    t.feed(EG, b"\x05\x00\x00\x00\xee\xee\xee\xee\xee" + MY_PING + MY_PING[:3], 1)
    (rec,) = t.feed(IN, MY_OK1, 2)
    assert rec.operation == "PING" and t.invalid_frames >= 1 and t.buffered_bytes(EG) == 3


def test_fuzz_never_raises_and_stays_bounded() -> None:
    """10^5 short sessions on fresh trackers: real packets in order, with bytes flipped, cut, or
    replaced by random bytes; nothing raises, buffers and queues stay within their bounds."""
    rng = random.Random(3306)
    script = [(IN, MY_GREETING), (EG, MY_HANDSHAKE_RESPONSE), (IN, MY_OK2), (EG, MY_QUERY), (IN, MY_ROWS),
              (EG, MY_PREPARE), (IN, MY_PREPARE_OK), (EG, MY_EXECUTE), (IN, MY_BINARY_ROWS), (EG, MY_PING),
              (IN, MY_ERR)]  # fmt: skip
    records = 0
    for i in range(100_000):
        t = ConnectionTracker(MY, Role.CLIENT)
        start = rng.randrange(len(script))
        for d, msg in script[start : start + 4]:
            data = bytearray(msg)
            kind = rng.randrange(4)
            if kind == 0:
                data = bytearray(rng.randbytes(rng.randrange(1, 40)))
            elif kind == 1:
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 2:
                data = data[: rng.randrange(1, len(data) + 1)]
            records += len(t.feed(d, bytes(data), i))
        assert t.buffered_bytes(EG) <= t.limits.max_buffer and t.buffered_bytes(IN) <= t.limits.max_buffer
        assert t.pending_requests() <= t.limits.max_pending and t.pending_responses() <= t.limits.max_pending
        t.close()
    assert records > 1000


def test_a_response_cut_by_the_capture_pairs_at_the_next_request() -> None:
    rows = b"".join(my((4 + i) & 0xFF, b"\x5a" + bytes(90)) for i in range(1000))
    resp = my(1, b"\x01") + my(2, b"\x03def" + bytes(20)) + my(3, b"\xfe\0\0\x22\0") + rows
    resp += my((4 + 1000) & 0xFF, b"\xfe\0\0\x22\0")
    t = ConnectionTracker(MY, Role.CLIENT)
    t.feed(EG, MY_QUERY, 1, 0)
    seq = 0
    for i in range(0, len(resp), 8192):
        call = resp[i : i + 8192]
        assert t.feed(IN, call[:512], 2 + i, seq, length=len(call)) == []
        seq += len(call)
    (cut,) = t.feed(EG, MY_PING, 10**6, len(MY_QUERY))
    assert (cut.collection, cut.status_code, cut.returned_rows) == ("kv", "", 0)
    (ping,) = t.feed(IN, MY_OK1, 10**6 + 5, seq)
    assert ping.operation == "PING" and t.counters()["cut_responses"] == 1


def test_another_protocol_mid_connection_is_counted_then_resynced() -> None:
    t = ConnectionTracker(MY, Role.CLIENT)
    t.feed(EG, MY_PING, 1)
    assert len(t.feed(IN, MY_OK1, 2)) == 1
    t.feed(EG, b"*1\r\n$4\r\nPING\r\n", 3)  # a Redis command on the same socket: not MySQL
    assert t.invalid_frames >= 1 and t.pending_requests() == 0
    t.feed(EG, MY_QUERY, 4)
    (rec,) = t.feed(IN, MY_ROWS, 5)
    assert rec.returned_rows == 2


def test_init_db_names_the_namespace() -> None:
    t = ConnectionTracker(MY, Role.CLIENT)
    t.feed(EG, my(0, b"\x02shop"), 1)
    (use,) = t.feed(IN, MY_OK1, 2)
    t.feed(EG, MY_QUERY, 3)
    (rec,) = t.feed(IN, MY_ROWS, 4)
    assert (use.operation, use.namespace, rec.namespace) == ("USE", "shop", "shop")
