"""HTTP/2 as the kernel's frame walk sends it (DATA payloads cut out), through the per-call loop
(http2_frames.pump): the same records as the raw stream through the per-frame path, fed whole, byte by
byte and in random cuts; bad input resyncs (counted); fuzz."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hpack import Encoder

from node_exporter.protocols import PROTOCOLS, ConnectionTracker, Direction, Http2Record, Role
from node_exporter.protocols import http2 as h2
from tests.node_exporter.protocols import wire_h2 as w
from tests.node_exporter.protocols.test_http2 import frames_of, grpc_request, grpc_response, run_grpc_capture
from tests.node_exporter.protocols.wire_h2 import frame

RAW, WALK = PROTOCOLS["http2"], PROTOCOLS["http2_frames"]
EG, IN = Direction.EGRESS, Direction.INGRESS


def cut(f: bytes) -> bytes:
    """A frame (or the preface) as the kernel's walk sends it: a DATA frame without its payload."""
    return f[:9] if f[3] == h2.DATA and f != h2.PREFACE else f


def compact(data: bytes) -> bytes:
    return b"".join(cut(f) for f in frames_of(data))


class Walked(ConnectionTracker):
    """A tracker fed the raw stream as the kernel would send it (whole frames in each chunk here)."""

    def feed(self, direction: Direction, data: bytes, ts_ns: int, seq: int | None = None, *, gap: bool = False,
             length: int | None = None) -> list[Any]:  # fmt: skip
        return super().feed(direction, compact(data), ts_ns, seq, gap=gap, length=length)


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_real_grpc_exchange_same_records_as_the_raw_stream(role: Role) -> None:
    raw = run_grpc_capture(ConnectionTracker(RAW, role), "whole")
    walked = run_grpc_capture(Walked(WALK, role), "whole")
    assert len(raw) == 2 and walked == raw  # every field: paths, statuses, times, byte counts


def exchange(rng: random.Random, streams: int) -> tuple[bytes, bytes]:
    """A client->server and a server->client byte stream of ``streams`` gRPC calls, some padded,
    some split into CONTINUATION, bodies of random sizes."""
    cenc, senc = Encoder(), Encoder()
    c2s, s2c = [w.CLIENT_START], [w.SETTINGS_EMPTY]
    for sid in range(1, 2 * streams, 2):
        req = grpc_request(cenc, sid, f"/svc.S{sid % 3}/M{sid % 5}")
        if rng.random() < 0.3:  # the block in two: HEADERS without END_HEADERS, then CONTINUATION
            block = req[9:]
            cut = rng.randrange(1, len(block))
            req = frame(h2.HEADERS, 0, sid, block[:cut]) + frame(h2.CONTINUATION, h2.END_HEADERS, sid, block[cut:])
        elif rng.random() < 0.3:  # padded
            block = req[9:]
            req = frame(h2.HEADERS, h2.END_HEADERS | h2.PADDED, sid, bytes([3]) + block + b"\0\0\0")
        c2s.append(req + frame(h2.DATA, h2.END_STREAM, sid, rng.randbytes(rng.randrange(1, 3000))))
        s2c.append(grpc_response(senc, sid, rng.choice([0, 5, 13]), body=rng.randbytes(rng.randrange(0, 20_000))))
    return b"".join(c2s), b"".join(s2c)


def replay(t: ConnectionTracker, c2s: bytes, s2c: bytes, rng: random.Random, walk: bool) -> list[Http2Record]:
    """Both directions in chunks of whole frames, each chunk cut in two inside one of its frames (the
    same frame, and the same side of the cut for that frame's first byte, in the raw and the walked
    stream: a frame's time is the time of the chunk holding its first byte)."""
    out: list[Http2Record] = []
    for direction, data in ((IN, c2s), (EG, s2c)):
        pos, ts = 0, 0
        frames = [f if not walk else cut(f) for f in frames_of(data)]
        while pos < len(frames):
            k = rng.randrange(1, 5)
            part = frames[pos : pos + k]
            j, q = rng.randrange(len(part)), rng.random()
            inner = 0 if q < 0.2 else max(1, int(q * len(part[j])))
            at = sum(len(f) for f in part[:j]) + inner
            chunk = b"".join(part)
            out += t.feed(direction, chunk[:at], ts)
            out += t.feed(direction, chunk[at:], ts + 1)
            pos += k
            ts += 10
    return out


@pytest.mark.parametrize("seed", range(20))
def test_random_exchanges_same_records_as_the_raw_stream(seed: int) -> None:
    c2s, s2c = exchange(random.Random(seed), streams=random.Random(seed).randrange(1, 30))
    raw = replay(ConnectionTracker(RAW, Role.SERVER), c2s, s2c, random.Random(seed), walk=False)
    t = ConnectionTracker(WALK, Role.SERVER)
    walked = replay(t, c2s, s2c, random.Random(seed), walk=True)
    assert raw and walked == raw
    c = t.counters()
    assert c["invalid_frames"] == c["gaps"] == 0 and c["records"] == len(raw)
    assert len(compact(s2c)) < len(s2c)  # payloads were cut out, yet counted (equal byte counts)


def test_byte_by_byte() -> None:
    c2s, s2c = exchange(random.Random(1), streams=3)
    t = ConnectionTracker(WALK, Role.SERVER)
    out: list[Http2Record] = []
    for direction, data in ((IN, compact(c2s)), (EG, compact(s2c))):
        for i in range(len(data)):
            out += t.feed(direction, data[i : i + 1], i)
    raw = ConnectionTracker(RAW, Role.SERVER)
    want = raw.feed(IN, c2s, 0) + raw.feed(EG, s2c, 0)
    assert [(r.path, r.grpc_status, r.request_bytes, r.response_bytes) for r in out] == [
        (r.path, r.grpc_status, r.request_bytes, r.response_bytes) for r in want]  # fmt: skip


def test_garbage_resyncs_to_the_next_frame_counted() -> None:
    t = ConnectionTracker(WALK, Role.SERVER)
    enc = Encoder()
    junk = b"\xde\xad\xbe\xef" * 8
    t.feed(IN, w.CLIENT_START + junk + grpc_request(enc, 1, "/a.A/B") + frame(h2.DATA, h2.END_STREAM, 1, b"x")[:9], 0)
    (r,) = t.feed(EG, compact(grpc_response(Encoder(), 1, 0)), 3)
    c = t.counters()
    assert c["invalid_frames"] == 1 and c["discarded_bytes"] == len(junk)
    assert (r.rpc_method, r.request_bytes) == ("B", len(grpc_request(Encoder(), 1, "/a.A/B")) + 10)


def test_a_truncated_chunk_is_skipped_and_resynced() -> None:
    """The walk's output past the 4 KiB a chunk holds: the rest is a truncation (counted), parsing goes
    on at the next chunk's frame."""
    t = ConnectionTracker(WALK, Role.SERVER)
    enc = Encoder()
    start = w.CLIENT_START + grpc_request(enc, 1, "/a.A/B")
    t.feed(IN, start, 0, seq=0, length=len(start))
    big = frame(h2.CONTINUATION, h2.END_HEADERS, 7, b"\0" * 6000)  # cut at 4 KiB by the kernel
    t.feed(IN, big[:4096], 1, seq=len(start), length=len(big))
    after = grpc_request(enc, 3, "/a.A/C")
    t.feed(IN, after, 2, seq=len(start) + len(big), length=len(after))
    assert t.counters()["truncations"] == 1 and t.pending_requests() == 2


def test_fuzz_never_raises() -> None:
    """10^5 inputs: mutated walked frames and random bytes, in random chunks, both directions."""
    rng = random.Random(7541)
    seeds = [cut(f) for f in frames_of(w.GRPC_C2S)[1:] + frames_of(w.GRPC_S2C)]
    t = ConnectionTracker(WALK, Role.SERVER)
    for i in range(100_000):
        if i % 3 == 0:
            data = rng.randbytes(rng.randrange(1, 30))
        else:
            b = bytearray(b"".join(rng.choice(seeds) for _ in range(rng.randrange(1, 3))))
            for _ in range(rng.randrange(0, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
        t.feed(IN if rng.random() < 0.5 else EG, data, i)
        if i % 2000 == 0:
            t.close()
            t = ConnectionTracker(WALK, Role.SERVER)
            t.feed(IN, w.CLIENT_START, i)


def test_a_response_ending_in_data_with_no_request_is_an_orphan() -> None:
    """Its request was lost (the walk out of step, a gap): the end of its response is counted."""
    t = ConnectionTracker(WALK, Role.SERVER)
    t.feed(IN, w.CLIENT_START, 0)
    head = Encoder().encode([(":status", "200")])
    t.feed(EG, frame(h2.HEADERS, h2.END_HEADERS, 9, head) + frame(h2.DATA, h2.END_STREAM, 9, b"abc")[:9], 1)
    assert t.counters()["orphan_responses"] == 1 and t.counters()["records"] == 0
