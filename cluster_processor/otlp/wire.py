"""Protobuf wire-format pieces for OTLP, assembled at the byte level.

Why not build messages field by field: a processor re-exports every cumulative stream each
interval, tens of thousands of data points whose attributes never change and whose numbers are
fixed-width on the wire (``fixed64`` times, ``sfixed64``/``double`` values). The wire format
concatenates: a message is its fields' bytes in any order, a repeated field is its elements one
after another, and a nested message is a tag, a length and its bytes. So the parts that do not
change (a series' ``KeyValue`` list, a resource, a metric's name and unit) are encoded once and
kept as bytes, and only the numbers are packed again. The result goes on the wire as it is
(``encode.EncodedRequest``), so it must be exactly what the generated classes would serialize:
fields in field-number order, proto3 defaults left out.

Field numbers are opentelemetry-proto's (``common/v1``, ``resource/v1``, ``metrics/v1``,
``trace/v1``); tests compare these bytes, parsed back, with messages built by the generated
classes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from functools import lru_cache
from typing import Final

from cluster_processor.resolved import Attrs, AttrValue

_LEN: Final = 2  # wire type of strings, bytes, nested messages and packed repeated fields
_U64: Final = (1 << 64) - 1
_SMALL: Final = tuple(bytes([n]) for n in range(0x80))

pack_fixed64: Final = struct.Struct("<Q").pack
pack_sfixed64: Final = struct.Struct("<q").pack
pack_double: Final = struct.Struct("<d").pack


def varint(n: int) -> bytes:
    """Base-128 varint; a negative int64 takes ten bytes (two's complement), as protobuf encodes it."""
    if 0 <= n < 0x80:
        return _SMALL[n]
    if 0 < n < 0x200000:  # two and three bytes (lengths, ports) without the loop
        if n < 0x4000:
            return b"%c%c" % ((n & 0x7F) | 0x80, n >> 7)
        return b"%c%c%c" % ((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14)
    n &= _U64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field: int, wire_type: int = _LEN) -> bytes:
    return varint((field << 3) | wire_type)


_LEN_TAGS: Final = tuple(tag(f) for f in range(32))


def message(field: int, payload: bytes) -> bytes:
    """A length-delimited field: a nested message, a string or a packed repeated field."""
    n = len(payload)
    return (_LEN_TAGS[field] if field < 32 else tag(field)) + (_SMALL[n] if n < 0x80 else varint(n)) + payload


def string(field: int, text: str) -> bytes:
    """A string field, omitted when empty (proto3 has no presence for plain strings)."""
    return message(field, text.encode()) if text else b""


def any_value(value: AttrValue) -> bytes:
    """The bytes of one ``AnyValue`` message. A oneof member has presence, so "", 0 and false are
    written too, as the generated classes do (string_value = 1, bool_value = 2, int_value = 3,
    double_value = 4)."""
    if type(value) is float:  # not cached: 0.0 and -0.0 are one cache key but two encodings
        return b"\x21" + pack_double(value)
    return _any_value(value)


# Typed: True and 1 are equal as cache keys but two different AnyValues. Bounded: values come from
# the wire (routes, addresses) and must not grow the cache without limit.
@lru_cache(maxsize=65_536, typed=True)
def _any_value(value: AttrValue) -> bytes:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + pack_double(value)
    return message(1, value.encode())


def key_value_uncached(key: str, value: AttrValue) -> bytes:
    """``key_value`` for a value seen once (a request's path): encoded without touching the caches."""
    if isinstance(value, str):
        return string(1, key) + message(2, message(1, value.encode()))
    return key_value(key, value)


@lru_cache(maxsize=1024)
def _key_field(key: str) -> bytes:
    return string(1, key)


def attribute_uncached(field: int, key: str, value: AttrValue) -> bytes:
    """``message(field, key_value_uncached(key, value))``: one element of a repeated ``KeyValue``
    field whose value is seen once (a request's path, a client's port), the value not cached (the
    key is)."""
    t = type(value)
    if t is str:
        v = value.encode()  # type: ignore[union-attr]
        n = len(v)
        if field < 32:
            k = _key_field(key)
            kv_len = len(k) + n + 4
            if kv_len < 0x80:  # every length one byte (a path, a port): the field in one formatting
                # tag, len(kv), KeyValue.key = 1, KeyValue.value = 2 (len), AnyValue.string_value = 1 (len)
                return b"%s%c%s\x12%c\x0a%c%s" % (_LEN_TAGS[field], kv_len, k, n + 2, n, v)
        av = b"\x0a" + (_SMALL[n] if n < 0x80 else varint(n)) + v  # AnyValue.string_value = 1
    elif t is int:
        av = b"\x18" + varint(value)  # type: ignore[arg-type]  # AnyValue.int_value = 3
        if field < 32:
            k = _key_field(key)
            kv_len = len(k) + len(av) + 2
            if kv_len < 0x80:
                return b"%s%c%s\x12%c%s" % (_LEN_TAGS[field], kv_len, k, len(av), av)
    else:
        return message(field, key_value_uncached(key, value))
    if field >= 32:
        return message(field, _key_field(key) + message(2, av))
    n = len(av)
    kv = _key_field(key) + b"\x12" + (_SMALL[n] if n < 0x80 else varint(n)) + av  # KeyValue.value = 2
    n = len(kv)
    return _LEN_TAGS[field] + (_SMALL[n] if n < 0x80 else varint(n)) + kv


def key_value(key: str, value: AttrValue) -> bytes:
    """The bytes of one ``KeyValue`` message (key = 1, value = 2), without its own tag. An empty key
    is left out, as a proto3 string is; the value, a message, is always written."""
    return string(1, key) + message(2, any_value(value))


@lru_cache(maxsize=65_536, typed=True)
def _length_prefixed_kv(key: str, value: AttrValue) -> bytes:
    kv = key_value(key, value)
    return varint(len(kv)) + kv


def attributes(field: int, pairs: Attrs | Iterable[tuple[str, AttrValue]]) -> bytes:
    """A repeated ``KeyValue`` field (``attributes`` of a data point, resource, span or log)."""
    t = tag(field)
    out = []
    for k, v in pairs:
        # A float is encoded afresh: 0.0 and -0.0 are one cache key but two encodings.
        if type(v) is float:
            kv = key_value(k, v)
            out.append(t + varint(len(kv)) + kv)
        else:
            out.append(t + _length_prefixed_kv(k, v))
    return b"".join(out)


def attribute(field: int, key: str, value: AttrValue) -> bytes:
    """One element of a repeated ``KeyValue`` field."""
    if type(value) is float:
        return attributes(field, ((key, value),))
    return _attribute(field, key, value)


@lru_cache(maxsize=65_536, typed=True)
def _attribute(field: int, key: str, value: AttrValue) -> bytes:
    return tag(field) + _length_prefixed_kv(key, value)


class AttributesCache:
    """``attributes`` remembered per attribute tuple *object*: many series share one tuple (the L4
    metrics of an edge, which ``semconv`` hands out once per edge), and a set recurs every time a
    stream is created again. Keyed by identity, not equality, on purpose: equal tuples may still
    encode differently (``True`` == 1, ``0.0`` == ``-0.0``). Each entry holds its tuple, so an id
    cannot be reused while cached; cleared when full."""

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int = 16_384) -> None:
        self._entries: dict[tuple[int, int], tuple[Attrs, bytes]] = {}
        self._limit = limit

    def clear(self) -> None:
        self._entries.clear()

    def __call__(self, field: int, pairs: Attrs) -> bytes:
        key = (field, id(pairs))
        entry = self._entries.get(key)
        if entry is not None and entry[0] is pairs:
            return entry[1]
        encoded = attributes(field, pairs)
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[key] = (pairs, encoded)
        return encoded
