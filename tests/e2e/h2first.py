"""An HTTP/2 server (prior knowledge) that writes first, for the kernel frame walk's tests.

h2first.py IP PORT
    On each connection: SETTINGS and WINDOW_UPDATE at once (two frames in one write: the kernel finds
    HTTP/2 from them, on the server's side, before the client's preface is read), a pause, then it
    reads; every request (HEADERS with END_STREAM) is answered 200 with a 3-byte body. ``listening``
    once it accepts.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

from hpack import Decoder, Encoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, WINDOW_UPDATE = 0, 1, 4, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack("!I", sid) + payload


def serve(conn: socket.socket) -> None:
    conn.sendall(frame(SETTINGS, 0, 0, b"") + frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", 1 << 20)))
    time.sleep(0.2)  # the client's preface waits in the socket: our write is the kernel's first call
    enc, dec = Encoder(), Decoder()
    buf = b""
    while True:
        more = conn.recv(65536)
        if not more:
            return
        buf += more
        if buf.startswith(PREFACE):
            buf = buf[len(PREFACE) :]
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n, ftype, flags, sid = int.from_bytes(buf[:3], "big"), buf[3], buf[4], struct.unpack("!I", buf[5:9])[0]
            payload, buf = buf[9 : 9 + n], buf[9 + n :]
            if ftype == SETTINGS and not flags & ACK:
                conn.sendall(frame(SETTINGS, ACK, 0, b""))
            elif ftype == HEADERS:
                dec.decode(payload)  # keep the table in step
                if flags & END_STREAM:
                    head = enc.encode([(":status", "200")])
                    conn.sendall(frame(HEADERS, END_HEADERS, sid, head) + frame(DATA, END_STREAM, sid, b"ok\n"))


def main() -> None:
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
