"""Wire constants for the PostgreSQL and MySQL tests, written out from the protocol documentation
(PostgreSQL "Message Formats", protocol 3.0; MariaDB "Client/Server Protocol"), field by field."""

from __future__ import annotations

import struct

SECRET = "s3cr3tMARK"


# -- PostgreSQL: a type byte, then an int32 length that counts itself ----------------------


def pg(typ: bytes, body: bytes) -> bytes:
    return typ + struct.pack("!I", len(body) + 4) + body


def pg_startup(**params: str) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    return struct.pack("!I", len(body) + 5) + body + b"\0"


PG_SSL_REQUEST = struct.pack("!II", 8, 80877103)
PG_STARTUP = pg_startup(user="kscope", database="bench", application_name="psql")
# AuthenticationOk, two ParameterStatus, BackendKeyData, ReadyForQuery(idle)
PG_STARTUP_REPLY = (
    pg(b"R", struct.pack("!I", 0)) + pg(b"S", b"server_version\x0015.10\0") + pg(b"S", b"TimeZone\0UTC\0")
    + pg(b"K", struct.pack("!II", 4242, 99)) + pg(b"Z", b"I")
)  # fmt: skip
PG_QUERY = pg(b"Q", f"SELECT name FROM users WHERE token = '{SECRET}'\0".encode())
PG_ROWS = (
    pg(b"T", b"\0\x01name\0" + struct.pack("!IhIhih", 16384, 1, 25, -1, -1, 0))
    + pg(b"D", b"\0\x01" + struct.pack("!I", len(SECRET)) + SECRET.encode())
    + pg(b"D", b"\0\x01" + struct.pack("!i", -1))
    + pg(b"C", b"SELECT 2\0")
    + pg(b"Z", b"I")
)  # fmt: skip
PG_ERROR = (
    pg(b"E", b"SERROR\0VERROR\0C42P01\0M" + f'relation "{SECRET}" does not exist\0'.encode() + b"P15\0\0")
    + pg(b"Z", b"I")
)  # fmt: skip
# pgbench -M prepared: Parse names the statement once, then Bind/Execute/Sync by name
PG_PREPARE = (
    pg(b"P", b"P0_1\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0")
    + pg(b"D", b"SP0_1\0") + pg(b"S", b"")
)  # fmt: skip
PG_PREPARE_REPLY = pg(b"1", b"") + pg(b"t", b"\0\x01\0\0\0\x17") + pg(b"T", b"\0\0") + pg(b"Z", b"I")
PG_EXECUTE = (
    pg(b"B", b"\0P0_1\0\0\x01\0\0\0\x01\0\0\0\x0512345\0\x01\0\x01")
    + pg(b"E", b"\0\0\0\0\0") + pg(b"S", b"")
)  # fmt: skip
PG_EXECUTE_REPLY = pg(b"2", b"") + pg(b"D", b"\0\x01\0\0\0\x01" + b"0") + pg(b"C", b"SELECT 1\0") + pg(b"Z", b"I")
PG_COPY_IN = pg(b"Q", b"COPY kv FROM STDIN\0")
PG_COPY_IN_REPLY = pg(b"G", b"\0\0\x01\0\0")
PG_COPY_DATA = pg(b"d", f"1\t{SECRET}\n".encode()) + pg(b"d", b"2\tb\n") + pg(b"c", b"")
PG_COPY_DONE_REPLY = pg(b"C", b"COPY 2\0") + pg(b"Z", b"I")


# -- MySQL/MariaDB: 3-byte little-endian length, sequence number ----------------------------


def my(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


MY_GREETING = my(
    0,
    b"\x0a5.5.5-10.11.6-MariaDB-0+deb12u1\0" + struct.pack("<I", 7) + b"abcdefgh\0"
    + struct.pack("<HBHH", 0xF7FE, 45, 0x0002, 0x81BF) + b"\x15" + b"\0" * 6 + struct.pack("<I", 0x1D)
    + b"ijklmnopqrst\0mysql_native_password\0",
)  # fmt: skip
_CAPS = 0x0200 | 0x8000 | 0x0008 | 0x00080000  # PROTOCOL_41, SECURE_CONNECTION, CONNECT_WITH_DB, PLUGIN_AUTH
MY_HANDSHAKE_RESPONSE = my(
    1, struct.pack("<IIB", _CAPS, 1 << 24, 45) + b"\0" * 23 + b"root\0" + b"\x14" + SECRET.encode()[:10] * 2 + b"db\0"
)
MY_SSL_REQUEST = my(1, struct.pack("<IIB", _CAPS | 0x0800, 1 << 24, 45) + b"\0" * 23)
MY_OK2 = my(2, b"\0\0\0\x02\0\0\0")
MY_QUERY = my(0, b"\x03" + f"SELECT v FROM kv WHERE k = '{SECRET}'".encode())
_COLDEF = b"\x03def\x02db\x02kv\x02kv\x01v\x01v\x0c\x21\0\xff\xff\0\0\xfd\0\0\0\0\0"
MY_ROWS = (
    my(1, b"\x01") + my(2, _COLDEF) + my(3, b"\xfe\0\0\x22\0")
    + my(4, bytes([len(SECRET)]) + SECRET.encode()) + my(5, b"\x01b") + my(6, b"\xfe\0\0\x22\0")
)  # fmt: skip
MY_ERR = my(1, b"\xff\x7a\x04#42S02" + f"Table 'db.{SECRET}' doesn't exist".encode())
MY_PREPARE = my(0, b"\x16SELECT v FROM kv WHERE k = ?")
MY_PREPARE_OK = (
    my(1, b"\0" + struct.pack("<IHHBH", 7, 1, 1, 0, 0))
    + my(2, _COLDEF) + my(3, b"\xfe\0\0\x02\0") + my(4, _COLDEF) + my(5, b"\xfe\0\0\x02\0")
)  # fmt: skip
MY_EXECUTE = my(0, b"\x17" + struct.pack("<IBI", 7, 0, 1) + b"\0\x01\xfe\0" + bytes([len(SECRET)]) + SECRET.encode())
MY_BINARY_ROWS = (
    my(1, b"\x01") + my(2, _COLDEF) + my(3, b"\xfe\0\0\x22\0")
    + my(4, b"\0\0" + bytes([len(SECRET)]) + SECRET.encode()) + my(5, b"\xfe\0\0\x22\0")
)  # fmt: skip
MY_STMT_CLOSE = my(0, b"\x19" + struct.pack("<I", 7))
MY_PING = my(0, b"\x0e")
MY_OK1 = my(1, b"\0\0\0\x02\0\0\0")
