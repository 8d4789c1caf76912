"""Memcached wire constants: pymemcache 4.0.0 (text protocol) and meta-memcache 4.3.0 (meta commands) <->
memcached 1.6.18 (Debian bookworm), captured byte for byte with a TCP relay on loopback. Keys and values
carry SECRET markers that must never reach a record."""

from __future__ import annotations

PYMEMCACHE_SESSION: list[tuple[str, bytes]] = [
    ("C", b"set k:SECRETKEY 0 0 11\r\nSECRETVALUE\r\n"),
    ("S", b"STORED\r\n"),
    ("C", b"get k:SECRETKEY\r\n"),
    ("S", b"VALUE k:SECRETKEY 0 11\r\nSECRETVALUE\r\nEND\r\n"),
    ("C", b"get nokey\r\n"),
    ("S", b"END\r\n"),
    ("C", b"get k:SECRETKEY nokey k2\r\n"),
    ("S", b"VALUE k:SECRETKEY 0 11\r\nSECRETVALUE\r\nEND\r\n"),
    ("C", b"gets k:SECRETKEY\r\n"),
    ("S", b"VALUE k:SECRETKEY 0 11 1\r\nSECRETVALUE\r\nEND\r\n"),
    ("C", b"add k:SECRETKEY 0 0 1\r\nx\r\n"),
    ("S", b"NOT_STORED\r\n"),
    ("C", b"set ctr 0 0 2 noreply\r\n10\r\n"),
    ("C", b"incr ctr 5\r\n"),
    ("S", b"15\r\n"),
    ("C", b"incr nokey 1\r\n"),
    ("S", b"NOT_FOUND\r\n"),
    ("C", b"delete ctr\r\n"),
    ("S", b"DELETED\r\n"),
    ("C", b"delete nokey\r\n"),
    ("S", b"NOT_FOUND\r\n"),
    ("C", b"touch k:SECRETKEY 100\r\n"),
    ("S", b"TOUCHED\r\n"),
    ("C", b"bogus SECRETARG\r\n"),  # pymemcache raw_command: not a command, the server says ERROR
    ("S", b"ERROR\r\n"),
]
PYMEMCACHE_OPERATIONS = ["set", "get", "get", "get", "gets", "add", "set", "incr", "incr", "delete", "delete",
                         "touch"]  # fmt: skip

META_SESSION: list[tuple[str, bytes]] = [
    ("C", b"ms m:SECRETKEY 11 T60 F0\r\nSECRETVALUE\r\n"),
    ("S", b"HD\r\n"),
    ("C", b"mg m:SECRETKEY f v t l h\r\n"),
    ("S", b"VA 11 f0 t60 l0 h0\r\nSECRETVALUE\r\n"),
    ("C", b"mg m:nokey f v t l h\r\n"),
    ("S", b"EN\r\n"),
    ("C", b"md m:SECRETKEY\r\n"),
    ("S", b"HD\r\n"),
    ("C", b"md m:nokey\r\n"),
    ("S", b"NF\r\n"),
    ("C", b"mg m:a f v t l h\r\nmg m:b f v t l h\r\n"),  # multi_get: two mg in one send
    ("S", b"VA 1 f2 t60 l0 h0\r\n1\r\nEN\r\n"),
    ("C", b"ma m:a D2\r\n"),
    ("S", b"HD\r\n"),
]
META_OPERATIONS = ["ms", "mg", "mg", "md", "md", "mg", "mg", "ma"]
