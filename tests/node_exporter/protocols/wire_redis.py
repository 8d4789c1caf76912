"""Redis wire constants: redis-cli 7.0.15 <-> redis-server 7.0.15 (Debian bookworm), captured byte for byte
with a TCP relay on loopback (one (direction, bytes) per send as the relay read it). Keys, values, the AUTH
password and a channel carry SECRET markers that must never reach a record."""

from __future__ import annotations

# redis-cli reading commands from stdin (RESP2, HELLO 3 switches to RESP3 mid-session).
CLI_SESSION: list[tuple[str, bytes]] = [
    ("C", b"*3\r\n$3\r\nSET\r\n$11\r\nk:SECRETKEY\r\n$11\r\nSECRETVALUE\r\n"),
    ("S", b"+OK\r\n"),
    ("C", b"*2\r\n$3\r\nGET\r\n$11\r\nk:SECRETKEY\r\n"),
    ("S", b"$11\r\nSECRETVALUE\r\n"),
    ("C", b"*2\r\n$3\r\nGET\r\n$5\r\nnokey\r\n"),
    ("S", b"$-1\r\n"),
    ("C", b"*3\r\n$4\r\nMGET\r\n$11\r\nk:SECRETKEY\r\n$5\r\nnokey\r\n"),
    ("S", b"*2\r\n$11\r\nSECRETVALUE\r\n$-1\r\n"),
    ("C", b"*3\r\n$5\r\nLPUSH\r\n$3\r\nlst\r\n$1\r\na\r\n"),
    ("S", b":1\r\n"),
    ("C", b"*2\r\n$3\r\nGET\r\n$3\r\nlst\r\n"),
    ("S", b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
    ("C", b"*1\r\n$5\r\nMULTI\r\n"),
    ("S", b"+OK\r\n"),
    ("C", b"*2\r\n$4\r\nINCR\r\n$3\r\nctr\r\n"),
    ("S", b"+QUEUED\r\n"),
    ("C", b"*3\r\n$3\r\nSET\r\n$2\r\nk2\r\n$1\r\nv\r\n"),
    ("S", b"+QUEUED\r\n"),
    ("C", b"*1\r\n$4\r\nEXEC\r\n"),
    ("S", b"*2\r\n:1\r\n+OK\r\n"),
    ("C", b"*2\r\n$4\r\nAUTH\r\n$10\r\nSECRETPASS\r\n"),
    ("S", b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your"
          b" configuration is correct?\r\n"),
    ("C", b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"),
    ("S", b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n$2\r\nid\r\n"
          b":3\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"),
    ("C", b"*2\r\n$3\r\nGET\r\n$11\r\nk:SECRETKEY\r\n"),
    ("S", b"$11\r\nSECRETVALUE\r\n"),
    ("C", b"*2\r\n$7\r\nHGETALL\r\n$6\r\nnohash\r\n"),
    ("S", b"%0\r\n"),
]  # fmt: skip
CLI_OPERATIONS = ["SET", "GET", "GET", "MGET", "LPUSH", "GET", "MULTI", "INCR", "SET", "EXEC", "AUTH", "HELLO",
                  "GET", "HGETALL"]  # fmt: skip

# `redis-cli subscribe ch SECRETCH` (RESP2), then PUBLISH ch SECRETMSG from another client.
SUBSCRIBE_RESP2 = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n$8\r\nSECRETCH\r\n"
SUBSCRIBED_RESP2 = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$8\r\nSECRETCH\r\n:2\r\n"
MESSAGE_RESP2 = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$9\r\nSECRETMSG\r\n"
# `redis-cli -3 subscribe ch` (after its HELLO 3): confirmations and messages are RESP3 pushes.
SUBSCRIBE_RESP3 = b"*2\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n"
SUBSCRIBED_RESP3 = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
MESSAGE_RESP3 = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$9\r\nSECRETMSG\r\n"
