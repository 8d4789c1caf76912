"""An HTTP/2 client that cuts its frames across write calls, for the kernel frame walk's tests.

h2split.py IP PORT [PINGS]
    Prior knowledge over one connection (PINGS: that many PING frames in one write first): GET
    /index.html with its frame header cut after 4 bytes, GET /index.html with the header whole and
    the block cut after 3 bytes, then POST /index.html whose 10,000-byte DATA frame has its header
    cut after 2 bytes and its payload cut in three. Each piece is its own write (TCP_NODELAY, a pause
    between), so each is its own send call. Prints one JSON line: per stream, the bytes of its frames
    each way as they went over the wire (9 + payload per HEADERS/DATA frame), and the response's
    :status.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

from hpack import Decoder, Encoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING = 0, 1, 4, 6
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack("!I", sid) + payload


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    enc, dec = Encoder(), Decoder()
    buf = b""
    sent: dict[int, int] = {}
    got: dict[int, int] = {}
    status: dict[int, str] = {}

    def write(*pieces: bytes) -> None:
        for p in pieces:
            sock.sendall(p)
            time.sleep(0.05)

    def answer(sid: int) -> None:
        nonlocal buf
        while True:
            while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
                more = sock.recv(65536)
                if not more:
                    raise SystemExit("connection closed")
                buf += more
            n, ftype, flags, fsid = int.from_bytes(buf[:3], "big"), buf[3], buf[4], struct.unpack("!I", buf[5:9])[0]
            payload, buf = buf[9 : 9 + n], buf[9 + n :]
            if ftype == SETTINGS and not flags & ACK:
                write(frame(SETTINGS, ACK, 0, b""))
            if fsid != sid or ftype not in (DATA, HEADERS):
                continue
            got[sid] = got.get(sid, 0) + 9 + n
            if ftype == HEADERS:
                status[sid] = {str(k): str(v) for k, v in dec.decode(payload)}.get(":status", "")
            if flags & END_STREAM:
                return

    def head(method: str, sid: int, end: bool) -> bytes:
        block = enc.encode([(":method", method), (":scheme", "http"), (":authority", host),
                            (":path", "/index.html")])  # fmt: skip
        sent[sid] = 9 + len(block)
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block)

    write(PREFACE + frame(SETTINGS, 0, 0, b""))
    if len(sys.argv) > 3:  # one send call of many small frames (the kernel walk's step bound)
        write(frame(PING, 0, 0, b"12345678") * int(sys.argv[3]))
    h = head("GET", 1, True)
    write(h[:4], h[4:])  # the frame header cut after 4 bytes
    answer(1)
    h = head("GET", 3, True)
    write(h[:12], h[12:])  # the block cut after 3 bytes
    answer(3)
    h = head("POST", 5, False)
    body = frame(DATA, END_STREAM, 5, b"y" * 10_000)
    sent[5] += len(body)
    write(h + body[:2], body[2:9], body[9:4000], body[4000:])  # the DATA header cut after 2 bytes
    answer(5)
    print(json.dumps({"sent": sent, "got": got, "status": status}), flush=True)
    sock.close()


if __name__ == "__main__":
    main()
