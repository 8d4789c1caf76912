"""PostgreSQL: startup, simple and extended queries, prepared statements by name (bounded), errors,
COPY, SSLRequest; fed whole, byte by byte and with trailing bytes; fuzzed."""

from __future__ import annotations

import random
import struct

import pytest

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, DbRecord, Direction, Role
from node_exporter.protocols.postgres import MAX_MESSAGE, Postgres
from node_exporter.protocols.sqlbase import MAX_STATEMENTS
from tests.node_exporter.protocols.sqlwire import (
    PG_COPY_DATA,
    PG_COPY_DONE_REPLY,
    PG_COPY_IN,
    PG_COPY_IN_REPLY,
    PG_ERROR,
    PG_EXECUTE,
    PG_EXECUTE_REPLY,
    PG_PREPARE,
    PG_PREPARE_REPLY,
    PG_QUERY,
    PG_ROWS,
    PG_SSL_REQUEST,
    PG_STARTUP,
    PG_STARTUP_REPLY,
    SECRET,
    pg,
)

EG, IN = Direction.EGRESS, Direction.INGRESS
PG = PROTOCOLS["postgresql"]


def feed(t: ConnectionTracker, d: Direction, data: bytes, ts: int, byte_by_byte: bool = False) -> list[DbRecord]:
    if not byte_by_byte:
        return t.feed(d, data, ts)
    out: list[DbRecord] = []
    for i in range(len(data)):
        out += t.feed(d, data[i : i + 1], ts)
    return out


def session(byte_by_byte: bool = False, role: Role = Role.CLIENT) -> tuple[ConnectionTracker, list[DbRecord]]:
    t = ConnectionTracker(PG, role)
    req, resp = (EG, IN) if role is Role.CLIENT else (IN, EG)
    out: list[DbRecord] = []
    steps = [
        (req, PG_STARTUP), (resp, PG_STARTUP_REPLY), (req, PG_QUERY), (resp, PG_ROWS),
        (req, pg(b"Q", b"SELECT 1 FROM nope\0")), (resp, PG_ERROR), (req, PG_PREPARE), (resp, PG_PREPARE_REPLY),
        (req, PG_EXECUTE), (resp, PG_EXECUTE_REPLY),
        (req, PG_EXECUTE), (resp, PG_EXECUTE_REPLY), (req, PG_COPY_IN), (resp, PG_COPY_IN_REPLY), (req, PG_COPY_DATA),
        (resp, PG_COPY_DONE_REPLY),
    ]  # fmt: skip
    for ts, (d, data) in enumerate(steps):
        out += feed(t, d, data, ts * 10, byte_by_byte)
    return t, out


@pytest.mark.parametrize("byte_by_byte", [False, True])
@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_session(byte_by_byte: bool, role: Role) -> None:
    t, recs = session(byte_by_byte, role)
    assert [(r.operation, r.collection, r.status_code, r.returned_rows) for r in recs] == [
        ("SELECT", "users", "", 2),
        ("SELECT", "nope", "42P01", 0),
        ("SELECT", "pgbench_accounts", "", 1),
        ("SELECT", "pgbench_accounts", "", 1),
        ("COPY", "kv", "", 2),
    ]
    first = recs[0]
    assert first.system == "postgresql"
    assert {r.namespace for r in recs} == {"bench"}  # the StartupMessage's database
    assert first.query_text == "SELECT name FROM users WHERE token = ?"
    assert first.query_summary == "SELECT users"
    assert (first.request_bytes, first.response_bytes) == (len(PG_QUERY), len(PG_ROWS))
    assert (first.start_ns, first.latency_ns) == (20, 10)
    assert recs[1].error_type == "42P01"
    assert recs[2].query_text == "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    assert recs[2].request_bytes == len(PG_EXECUTE)
    assert SECRET not in repr(recs)
    c = t.counters()
    assert c["invalid_frames"] == c["unanswered_requests"] == c["orphan_responses"] == c["state_misses"] == 0


def test_trailing_bytes_stay_for_the_next_message() -> None:
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, PG_QUERY + PG_QUERY[:7], 1)
    (rec,) = t.feed(IN, PG_ROWS, 2)
    assert rec.collection == "users"
    assert t.pending_requests() == 0 and t.buffered_bytes(EG) == 7
    t.feed(EG, PG_QUERY[7:], 3)
    assert t.pending_requests() == 1


def test_ssl_request_answered_s_ends_cleartext_parsing() -> None:
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, PG_SSL_REQUEST, 1)
    t.feed(IN, b"S", 2)
    assert t.eos
    t.feed(EG, b"\x16\x03\x01\x02\x00" + bytes(64), 3)  # a TLS ClientHello: not parsed, counted
    assert t.unparsed_bytes == 69 and t.invalid_frames == 0


def test_ssl_request_answered_n_goes_on_in_cleartext() -> None:
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, PG_SSL_REQUEST, 1)
    t.feed(IN, b"N", 2)
    t.feed(EG, PG_STARTUP, 3)
    t.feed(IN, PG_STARTUP_REPLY, 4)
    t.feed(EG, PG_QUERY, 5)
    (rec,) = t.feed(IN, PG_ROWS, 6)
    assert rec.returned_rows == 2 and not t.eos


def test_statements_are_bounded_and_misses_counted() -> None:
    t = ConnectionTracker(PG, Role.CLIENT)
    for i in range(MAX_STATEMENTS + 1):
        t.feed(EG, pg(b"P", f"s{i}\0SELECT {i} FROM t{i}\0\0\0".encode()) + pg(b"S", b""), i)
        t.feed(IN, pg(b"1", b"") + pg(b"Z", b"I"), i)
    assert t.counters()["state_evictions"] == 1
    bind = pg(b"B", b"\0s0\0\0\0\0\0\0\0") + pg(b"E", b"\0\0\0\0\0") + pg(b"S", b"")
    t.feed(EG, bind, 1000)
    (rec,) = t.feed(IN, PG_EXECUTE_REPLY, 1001)
    assert rec.operation == "SELECT" and rec.query_text == ""  # the operation from the CommandComplete tag
    assert t.counters()["state_misses"] == 1


def test_long_query_cut_by_the_capture_is_sanitized_from_its_prefix() -> None:
    text = b"SELECT v FROM kv WHERE k IN (" + b",".join(b"'%s%d'" % (SECRET.encode(), i) for i in range(400)) + b")\0"
    msg = pg(b"Q", text)
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, msg[:512], 1, 0, length=len(msg))  # the kernel captured 512 of its bytes
    (rec,) = t.feed(IN, PG_EXECUTE_REPLY[5:], 2, 0)
    assert rec.collection == "kv" and rec.request_bytes == len(msg) and SECRET not in rec.query_text
    assert t.truncations == 1 and t.gaps == 0


def test_garbage_is_invalid_and_resyncs() -> None:
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, b"\xff\xfegarbage!" + PG_QUERY, 1)
    (rec,) = t.feed(IN, PG_ROWS, 2)
    assert rec.collection == "users" and t.invalid_frames >= 1


def test_absurd_length_is_invalid() -> None:
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, b"Q" + struct.pack("!I", 2), 1)
    assert t.invalid_frames == 1


def test_each_connection_has_its_own_statements() -> None:
    a, b = ConnectionTracker(PG, Role.CLIENT), ConnectionTracker(PG, Role.CLIENT)
    a.feed(EG, PG_PREPARE, 1)
    assert isinstance(a.protocol, Postgres) and isinstance(b.protocol, Postgres)
    assert len(a.protocol.statements) == 1 and len(b.protocol.statements) == 0


def test_fuzz_never_raises_and_stays_bounded() -> None:
    """10^5 short sessions on fresh trackers: real messages in order, with bytes flipped, cut, or
    replaced by random bytes; nothing raises, buffers and queues stay within their bounds."""
    rng = random.Random(5432)
    script = [(EG, PG_STARTUP), (IN, PG_STARTUP_REPLY), (EG, PG_QUERY), (IN, PG_ROWS), (EG, PG_PREPARE),
              (IN, PG_PREPARE_REPLY), (EG, PG_EXECUTE), (IN, PG_ERROR), (EG, PG_COPY_IN), (IN, PG_COPY_IN_REPLY),
              (EG, PG_COPY_DATA), (IN, PG_COPY_DONE_REPLY)]  # fmt: skip
    records = 0
    for i in range(100_000):
        t = ConnectionTracker(PG, Role.CLIENT)
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
    assert records > 1000  # the mutations left many sessions parseable: the fuzz reached the parser's depths


def test_a_response_cut_by_the_capture_pairs_at_the_next_request() -> None:
    """A large result in calls of 8 KiB of which the kernel keeps 512 bytes each: its terminator is
    lost. It is recorded (no status, no rows) when the client's next query shows it was read whole,
    and the next response parses again."""
    rows = b"".join(pg(b"D", b"\0\x01" + struct.pack("!I", 90) + bytes(90)) for _ in range(1000))
    resp = pg(b"T", b"\0\x01name\0" + bytes(18)) + rows + pg(b"C", b"SELECT 1000\0") + pg(b"Z", b"I")
    t = ConnectionTracker(PG, Role.CLIENT)
    assert t.feed(EG, PG_QUERY, 1, 0) == []
    seq = 0
    for i in range(0, len(resp), 8192):
        call = resp[i : i + 8192]
        assert t.feed(IN, call[:512], 2 + i, seq, length=len(call)) == []
        seq += len(call)
    (cut,) = t.feed(EG, PG_QUERY, 10**6, len(PG_QUERY))
    assert (cut.collection, cut.status_code, cut.returned_rows, cut.start_ns, cut.latency_ns) == ("users", "", 0, 1, 1)
    (nxt,) = t.feed(IN, PG_ROWS, 10**6 + 5, seq)
    assert (nxt.returned_rows, nxt.latency_ns) == (2, 5)
    c = t.counters()
    assert c["cut_responses"] == 1 and c["truncations"] > 1 and c["unanswered_requests"] == c["orphan_responses"] == 0


LONG_ERROR = pg(b"E", b"SERROR\0VERROR\0CP0001\0M" + b"x" * 2000 + b"\0\0")


@pytest.mark.parametrize("together", [True, False])
def test_an_error_longer_than_the_capture_keeps_its_sqlstate(together: bool) -> None:
    """RAISE EXCEPTION with a 2,000-byte message: the ErrorResponse is cut at 512 bytes, its SQLSTATE
    (before the message) read from the head. ReadyForQuery in the same call (lost with the cut): the
    response ends at the next query; in a call of its own: it ends the response."""
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, PG_QUERY, 1, 0)
    z = pg(b"Z", b"I")
    call = LONG_ERROR + z if together else LONG_ERROR
    recs = t.feed(IN, call[:512], 2, 0, length=len(call))
    if not together:
        recs += t.feed(IN, z, 3, len(call))
    nxt = t.feed(EG, PG_QUERY, 4, len(PG_QUERY))
    (rec,) = recs + nxt
    assert (rec.status_code, rec.error_type, rec.collection) == ("P0001", "P0001", "users")
    assert rec.response_bytes == len(LONG_ERROR) + (0 if together else len(z))
    c = t.counters()
    assert (c["truncations"], c["cut_responses"], c["unanswered_requests"]) == (1, int(together), 0)


def test_another_protocol_mid_connection_is_counted_then_resynced() -> None:
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, PG_QUERY, 1)
    assert len(t.feed(IN, PG_ROWS, 2)) == 1
    t.feed(EG, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x7f\xff\xff\xff" * 4, 3)  # HTTP, then absurd lengths
    assert t.invalid_frames >= 1 and t.pending_requests() == 0
    t.feed(EG, PG_QUERY, 4)
    (rec,) = t.feed(IN, PG_ROWS, 5)
    assert rec.collection == "users"


@pytest.mark.parametrize("length", [3, MAX_MESSAGE + 1, 0xFFFFFFFF])
def test_absurd_lengths_are_invalid(length: int) -> None:
    t = ConnectionTracker(PG, Role.CLIENT)
    t.feed(EG, b"Q" + struct.pack("!I", length) + b"SELECT 1\0", 1)
    t.feed(IN, b"Z" + struct.pack("!I", length) + b"I", 2)
    assert t.invalid_frames >= 2 and t.requests_parsed == t.responses_parsed == 0
