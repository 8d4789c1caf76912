"""HPACK: RFC 7541 Appendix C, the mid-connection rules (unknown, never guessed), bounds, bad blocks."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder

from node_exporter.protocols import hpack_state as hp
from tests.node_exporter.protocols import wire_h2 as w


def hint(value: int, prefix: int, first: int = 0) -> bytes:
    """An RFC 7541 5.1 integer with a ``prefix``-bit prefix, the first byte's high bits ``first``."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes([first | value])
    out, value = [first | mask], value - mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def wanted(fields: list[hp.Field | None]) -> list[tuple[bytes, bytes | None]]:
    return [f for f in fields if f is not None and f[0] in hp.WANTED]


@pytest.mark.parametrize("blocks", [w.C3_REQUESTS, w.C4_REQUESTS], ids=["C.3", "C.4"])
def test_rfc7541_requests(blocks: tuple[bytes, ...]) -> None:
    t = hp.DynamicTable(complete=True)
    lib = Decoder()
    for block, expect, size in zip(blocks, w.C_REQUEST_FIELDS, w.C_REQUEST_TABLE_SIZES, strict=True):
        assert tuple(lib.decode(block, raw=True)) == expect  # the constant is the RFC's
        fields, err = t.decode(block)
        assert err is None
        assert [f[0] for f in fields if f] == [n for n, _ in expect]
        assert wanted(fields) == [(n, v) for n, v in expect if n in hp.WANTED]
        assert t.size == size
    # values of names we do not report are not kept, even in the table
    assert all(v is None for n, v, _ in t.entries if n not in hp.WANTED)
    assert (b"custom-key", None, 54) in t.entries


@pytest.mark.parametrize("blocks", [w.C5_RESPONSES, w.C6_RESPONSES], ids=["C.5", "C.6"])
def test_rfc7541_responses_with_eviction(blocks: tuple[bytes, ...]) -> None:
    t = hp.DynamicTable(complete=True)
    lib = Decoder()
    lib.header_table_size = 256
    for i, block in enumerate(blocks):
        assert next(iter(lib.decode(block, raw=True))) == (b":status", w.C_RESPONSE_STATUS[i])
        fields, err = t.decode((w.SIZE_UPDATE_256 if i == 0 else b"") + block)
        assert err is None
        assert wanted(fields) == [(b":status", w.C_RESPONSE_STATUS[i])]
        assert (t.size, len(t.entries)) == (w.C_RESPONSE_TABLE_SIZES[i], w.C_RESPONSE_TABLE_ENTRIES[i])
    assert t.unknown_index == 0


def test_joined_mid_connection_decodes_static_and_literals_and_marks_the_rest_unknown() -> None:
    t = hp.DynamicTable(complete=False)
    # C.3.2 refers to an entry inserted by C.3.1, which we did not see: :authority is unknown
    fields, err = t.decode(w.C3_REQUESTS[1])
    assert err is None
    assert fields[:3] == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    assert fields[3] is None and t.unknown_index == 1
    # C.3.3 refers to index 62 = the entry C.3.2 inserted (cache-control): known exactly, newest first;
    # its own :authority (index 63 then, i.e. C.3.1's) is still unknown
    fields, err = t.decode(w.C3_REQUESTS[2])
    assert err is None
    assert fields[2] == (b":path", b"/index.html")
    assert fields[3] is None and t.unknown_index == 2
    assert not t.complete


def test_known_entries_resolve_after_joining() -> None:
    enc = Encoder()
    enc.encode([(":method", "POST"), (":path", "/a/secret-path")])  # before we joined: unseen
    t = hp.DynamicTable(complete=False)
    second = enc.encode([(":method", "POST"), ("content-type", "application/grpc"), (":path", "/b")])
    third = enc.encode([(":method", "POST"), ("content-type", "application/grpc"), (":path", "/a/secret-path")])
    fields, err = t.decode(second)
    assert err is None and (b"content-type", b"application/grpc") in fields
    fields, err = t.decode(third)
    assert err is None
    assert (b"content-type", b"application/grpc") in fields  # inserted by `second`: resolved
    assert None in fields  # /a/secret-path was inserted before we joined: unknown, not guessed
    assert (b":path", b"/b") not in fields


def test_size_update_to_zero_brings_the_table_back_in_step() -> None:
    t = hp.DynamicTable(complete=False)
    _, err = t.decode(bytes([0x20]) + w.C3_REQUESTS[0])  # size update 0 then a block
    assert err is None and t.complete
    _, err = t.decode(bytes([0xBE]))  # index 62 with an empty table (max 0): a real error now
    assert err == hp.BAD_INDEX


def test_known_entries_filling_a_known_maximum_complete_the_table() -> None:
    t = hp.DynamicTable(complete=False)
    _, err = t.decode(w.SIZE_UPDATE_256 + w.C5_RESPONSES[0])  # 222 of 256 bytes: 34 left, an old entry fits
    assert err is None and not t.complete
    _, err = t.decode(w.C5_RESPONSES[1])  # evicts to 222 again
    assert not t.complete
    _, err = t.decode(bytes([0x40, 1, ord("x"), 1, ord("y")]))  # a 34-byte entry fills it: nothing older fits
    assert err is None and t.complete


def test_lost_bytes_forget_the_entries_whose_positions_they_may_have_shifted() -> None:
    t = hp.DynamicTable(complete=True)
    t.decode(w.C3_REQUESTS[0])  # inserts :authority www.example.com at 62
    t.lost_step()  # a gap: the lost frames may have inserted entries before it
    fields, err = t.decode(bytes([0xBE]))  # index 62: no longer known to be that entry
    assert err is None and fields == [None] and t.unknown_index == 1


def test_never_indexed_and_without_indexing_literals_do_not_enter_the_table() -> None:
    t = hp.DynamicTable(complete=True)
    block = bytes([0x10, 11]) + b"traceparent" + bytes([3]) + b"abc" + bytes([0x04, 2]) + b"/p"  # never, w/o
    fields, err = t.decode(block)
    assert err is None
    assert fields == [(b"traceparent", b"abc"), (b":path", b"/p")]
    assert not t.entries


def test_table_bound_makes_the_table_incomplete_and_counts() -> None:
    t = hp.DynamicTable(complete=True)
    t.set_allowed(1 << 20)
    _, err = t.decode(hint(1 << 20, 5, 0x20))
    assert err is None
    value = b"v" * 1000
    for i in range(80):  # ~80 kB of entries: past our 64 KiB bound
        _, err = t.decode(bytes([0x40, 4]) + b"k%03d" % i + hint(len(value), 7) + value)
        assert err is None
    assert t.size <= hp.MAX_TABLE
    assert t.evicted_unknown == 1 and not t.complete
    fields, err = t.decode(hint(253, 7, 0x80))  # an index past what we kept: unknown, not an error
    assert err is None and fields == [None]


@pytest.mark.parametrize(
    ("block", "kind"),
    [
        (bytes([0xFF, 0x80, 0x80, 0x80, 0x80, 0x01]), hp.BAD_INTEGER),  # 5 continuation bytes
        (bytes([0xFF]), hp.BAD_INTEGER),  # continuation missing
        (bytes([0x40, 0x05, 0x61]), hp.BAD_STRING),  # name longer than the block
        (bytes([0x04, 0x81, 0xFF]), hp.BAD_HUFFMAN),  # :path value, Huffman with EOS bits inside
        (bytes([0x80]), hp.BAD_INDEX),  # index 0
        (bytes([0xBE]), hp.BAD_INDEX),  # index 62 in an empty complete table
        (bytes([0x82, 0x20]), hp.BAD_SIZE_UPDATE),  # size update after a field
        (hint(4097, 5, 0x20), hp.BAD_SIZE_UPDATE),  # 4096 + 1 > allowed
    ],
)
def test_bad_blocks_give_their_kind_and_leave_the_table_incomplete(block: bytes, kind: str) -> None:
    t = hp.DynamicTable(complete=True)
    _, err = t.decode(block)
    assert err == kind
    assert not t.complete


def test_fuzz_never_raises() -> None:
    """10^5 blocks: random bytes and mutated real blocks, into complete and incomplete tables."""
    rng = random.Random(7541)
    seeds = [*w.C3_REQUESTS, *w.C4_REQUESTS, *w.C5_RESPONSES, *w.C6_RESPONSES]
    tables = [hp.DynamicTable(complete=True), hp.DynamicTable(complete=False)]
    for i in range(100_000):
        if i % 2:
            block = rng.randbytes(rng.randrange(0, 40))
        else:
            b = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            block = bytes(b[: rng.randrange(1, len(b) + 1)])
        t = tables[i % 2]
        _, err = t.decode(block)
        assert err is None or err.startswith("hpack_")
        assert t.size <= hp.MAX_TABLE
        if i % 5000 == 0:
            tables = [hp.DynamicTable(complete=True), hp.DynamicTable(complete=False)]


def test_indexed_only_blocks_take_the_fast_path_with_the_general_results() -> None:
    """Blocks of one-byte indexed fields (the warm-table case) decoded by the fast path give what the
    general decoder gives: fields, errors, unknown counts and table state, on complete and joined
    tables, for random such blocks (indexes 0 and past the table included)."""
    rng = random.Random(9113)
    enc = Encoder()
    warm = enc.encode([(":method", "POST"), (":path", "/demo.v1.Echo/Ping"), ("content-type", "application/grpc"),
                       ("x-request-id", "r1"), ("te", "trailers")])  # fmt: skip
    for i in range(2_000):
        complete = i % 2 == 0
        fast, slow = hp.DynamicTable(complete=complete), hp.DynamicTable(complete=complete)
        fast.decode(warm), slow.decode(warm)  # a few dynamic entries (62.. 66)
        block = bytes(rng.randrange(0x80, 0xFF) for _ in range(rng.randrange(1, 12)))
        got, want = fast.decode(block), slow._decode(block)
        assert got == want, block.hex()
        assert (fast.complete, fast.unknown_index, list(fast.entries)) == (
            slow.complete, slow.unknown_index, list(slow.entries))  # fmt: skip
    # what does not qualify goes the general way: a two-byte index, a literal
    t = hp.DynamicTable(complete=False)
    assert t.decode(bytes([0xFF, 0x00])) == ([None], None) and t.unknown_index == 1
