"""HPACK (RFC 7541) decoding that tolerates a dynamic table it has not seen from the start.

The PyPI ``hpack`` package (python-hyper) gives us the static table and the Huffman code; its
``Decoder`` does not fit: it raises on an index past its table, which is the normal case for a
connection older than the agent (its dynamic table was filled before we looked), and after a raise
its table no longer matches the peer's. So the index and table logic is here (docs/http2.md has
the measurement). Rules:

- Positions count from the newest entry and eviction removes the oldest, so every entry inserted
  since we started watching sits at the same index in the peer's table as in ours, whatever we do
  not know about older ones. A reference to one of those is exact; one past them is *unknown*
  while the table is incomplete, and an error once it is complete. Never a guess.
- The table is complete from a connection's start (the client preface), after a size update to 0,
  and once entries we know fill a known maximum so that no older entry (>= 32 bytes) can remain.
- Values are kept only for the header names we report (``WANTED``); other values are dropped where
  they are read, their size counted for eviction. Our table never grows past ``MAX_TABLE``: a peer
  allowed more loses its oldest entries here (counted), which only makes the table incomplete.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC: Final[tuple[tuple[bytes, bytes], ...]] = HeaderTable.STATIC_TABLE
STATIC_LEN: Final = len(STATIC)  # 61
DEFAULT_TABLE: Final = 4096  # RFC 9113 6.5.2 SETTINGS_HEADER_TABLE_SIZE initial value
MAX_TABLE: Final = 64 * 1024  # bytes of dynamic table we model per direction (our bound)
MAX_STRING: Final = 16 * 1024  # a header name or value longer than this is an error here
ENTRY_OVERHEAD: Final = 32  # RFC 7541 4.1
WANTED: Final = frozenset(
    {b":method", b":path", b":status", b":scheme", b"content-type", b"grpc-status", b"traceparent", b"x-request-id"}
)
UNKNOWN: Final = None  # a field whose name (and value) an unknown index hid

# Error kinds, also the suffixes of the counters the session keeps.
BAD_INTEGER: Final = "hpack_bad_integer"
BAD_STRING: Final = "hpack_bad_string"
BAD_HUFFMAN: Final = "hpack_bad_huffman"
BAD_INDEX: Final = "hpack_bad_index"  # an index past a complete table, or 0
BAD_SIZE_UPDATE: Final = "hpack_bad_size_update"  # not at the block's start, or above the allowed maximum


class HpackError(Exception):
    """Internal to this module: a block that does not decode (``decode`` returns the kind)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


Field = tuple[bytes, bytes | None]  # (name, value or None when not WANTED)


class DynamicTable:
    """One direction's dynamic table, as far as we know it."""

    __slots__ = ("allowed", "complete", "entries", "evicted_unknown", "max_known", "max_size", "size", "unknown_index")

    def __init__(self, *, complete: bool) -> None:
        self.entries: deque[tuple[bytes | None, bytes | None, int]] = deque()  # newest first: name, value, size
        self.size = 0
        self.max_size = DEFAULT_TABLE
        self.max_known = complete  # a fresh connection starts at the default; a joined one: unknown
        self.allowed = DEFAULT_TABLE  # the decoder's SETTINGS_HEADER_TABLE_SIZE, bound for size updates
        self.complete = complete
        self.unknown_index = 0  # references we could not resolve (h2_hpack_unknown_index)
        self.evicted_unknown = 0  # entries dropped by our MAX_TABLE bound while the peer keeps them

    def lost_step(self) -> None:
        """Something of this direction was not decoded (a gap, an oversized block). What it inserted
        is unknown, so every entry we hold may sit at another index now: forget them all; from now
        on indexes past what we insert are unknown."""
        self.complete = False
        self.entries.clear()
        self.size = 0

    def set_allowed(self, value: int) -> None:
        self.allowed = value

    def _resize(self, new_max: int) -> None:
        self.max_size = new_max
        self.max_known = True
        if new_max == 0:
            self.complete = True  # every entry is gone, on both sides
        self._evict()

    def _evict(self) -> None:
        bound = min(self.max_size, MAX_TABLE)
        while self.entries and self.size > bound:
            if self.size <= self.max_size and self.complete:
                # the peer keeps this entry and we drop it (our bound): we no longer know them all
                self.complete = False
                self.evicted_unknown += 1
            _, _, sz = self.entries.pop()
            self.size -= sz
        if self.max_known and not self.complete and self.max_size - self.size < ENTRY_OVERHEAD:
            self.complete = True  # entries we know fill the table: no older one can remain

    def _insert(self, name: bytes | None, value: bytes | None, size: int) -> None:
        if size > self.max_size:
            # RFC 7541 4.4: an entry larger than the table empties it
            self.entries.clear()
            self.size = 0
            if self.max_known:
                self.complete = True
            return
        self.entries.appendleft((name, value if name in WANTED else None, size))
        self.size += size
        self._evict()

    def _lookup(self, index: int) -> tuple[bytes | None, bytes | None]:
        if index == 0:
            raise HpackError(BAD_INDEX)
        if index <= STATIC_LEN:
            return STATIC[index - 1]
        i = index - STATIC_LEN - 1
        if i < len(self.entries):
            name, value, _ = self.entries[i]
            return name, value
        if self.complete:
            raise HpackError(BAD_INDEX)
        self.unknown_index += 1
        return UNKNOWN, UNKNOWN

    def decode(self, block: bytes) -> tuple[list[Field | None], str | None]:
        """Decode one header block: its fields (None for a field an unknown index hid) and an error
        kind or None. On an error the fields so far are returned and the table is marked incomplete
        (what the block would have inserted after the error is lost)."""
        if block and min(block) >= 0x80 and 0xFF not in block:
            return self._decode_indexed(block)
        return self._decode(block)

    def _decode_indexed(self, block: bytes) -> tuple[list[Field | None], str | None]:
        """A block of one-byte indexed fields only (every byte 0x80..0xFE: index < 127, RFC 7541
        6.1), the usual repeat request or response once the tables are warm: what ``_decode`` does
        for it, without its integer decoding per field: 2.2 instead of 5.0 us for grpcio's 8-field repeat
        request (min of 5 x 50,000 here)."""
        fields: list[Field | None] = []
        lookup = self._lookup
        try:
            for b in block:
                name, value = lookup(b & 0x7F)
                fields.append(None if name is None else (name, value))
        except HpackError as e:
            self.lost_step()
            return fields, e.kind
        return fields, None

    def _decode(self, block: bytes) -> tuple[list[Field | None], str | None]:
        fields: list[Field | None] = []
        pos = 0
        end = len(block)
        first = True
        try:
            while pos < end:
                b = block[pos]
                if b & 0x80:  # indexed field
                    index, pos = _integer(block, pos, 7)
                    name, value = self._lookup(index)
                    fields.append(None if name is None else (name, value))
                elif b & 0xE0 == 0x20:  # dynamic table size update, only at the block's start
                    size, pos = _integer(block, pos, 5)
                    if not first or size > self.allowed:
                        raise HpackError(BAD_SIZE_UPDATE)
                    self._resize(size)
                    continue
                else:
                    indexing = b & 0xC0 == 0x40
                    index, pos = _integer(block, pos, 6 if indexing else 4)
                    if index:
                        name, _ = self._lookup(index)
                        name_len = -1 if name is None else len(name)
                    else:
                        raw, pos = _string(block, pos)
                        name, name_len = raw.lower(), len(raw)
                    value_len, keep, value, pos = _value(block, pos, name, indexing)
                    if indexing:
                        # an entry whose name an unknown index hid: its size is unknown too, but only
                        # eviction (never naming) depends on sizes, so a lower bound does
                        size = max(name_len, 0) + value_len + ENTRY_OVERHEAD
                        self._insert(name, value if keep else None, size)
                    fields.append(None if name is None else (name, value if keep else None))
                first = False
        except HpackError as e:
            # the rest of the block may have inserted entries: positions of ours are unknown now
            self.lost_step()
            return fields, e.kind
        return fields, None


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """RFC 7541 5.1; at most 4 continuation bytes (28 bits): larger is an error here."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    for _ in range(4):
        if pos >= len(block):
            raise HpackError(BAD_INTEGER)
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
    raise HpackError(BAD_INTEGER)


def _string_bounds(block: bytes, pos: int) -> tuple[bool, int, int]:
    if pos >= len(block):
        raise HpackError(BAD_STRING)
    huffman = bool(block[pos] & 0x80)
    length, pos = _integer(block, pos, 7)
    if length > MAX_STRING or pos + length > len(block):
        raise HpackError(BAD_STRING)
    return huffman, pos, pos + length


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    huffman, start, end = _string_bounds(block, pos)
    raw = block[start:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError:
            raise HpackError(BAD_HUFFMAN) from None
    return raw, end


def _value(block: bytes, pos: int, name: bytes | None, exact: bool) -> tuple[int, bool, bytes | None, int]:
    """A field's value: (decoded length, kept?, value if kept, new pos). A value of a name we do not
    report is dropped here; it is decoded only when an entry's size depends on it (``exact``:
    eviction must match the peer's, or a later index would point at the wrong entry)."""
    if name in WANTED or exact:
        value, pos = _string(block, pos)
        keep = name in WANTED
        return len(value), keep, (value if keep else None), pos
    _, _, end = _string_bounds(block, pos)
    return 0, False, None, end
