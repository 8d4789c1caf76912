"""Application peers for the L7 tests, run inside a test namespace (standard library only).

l7peer.py http-client --to IP --port P [--comm NAME]
    One keep-alive HTTP/1.1 connection; after ``connected`` it reads commands, one a line:
        get PATH [N]         N requests one after the other (default 1)
        pipeline PATH...     every request in ONE send, then every response read
        ahead PATH...        each request in its own send (50 ms apart), then every response read
        post PATH SIZE [expect]  a POST whose body (SIZE bytes) leaves in two sends after the head;
                             with ``expect``, after the server's 100 Continue
        upgrade PATH         GET with Upgrade:, then (after 101) three request-looking lines echoed
        close
    and answers each with one JSON line: the statuses, and the exact bytes of each
    request and response as they went over the wire.
l7peer.py slow-http --bind IP --port P --delay S
    A plain-socket HTTP server (no http.server: it would call getfqdn() on bind, which
    blocks in an isolated namespace) that sleeps S seconds before each answer; ``received``
    (the request line) once it has a request's head.
l7peer.py http-server --bind IP --port P
    A keep-alive HTTP/1.1 server on plain sockets that answers 100 Continue to ``Expect:``,
    /chunked with a chunked body in several writes, /upgrade with 101 and then echoes, and
    anything else with 200 "ok". Each exchange ends with one ``served`` JSON line: path,
    status and the exact request/response bytes (1xx interim bytes apart).
l7peer.py servfail --bind IP --port P
    A UDP DNS "server" that answers every query with its own question and rcode SERVFAIL.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import threading
import time


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def set_comm(name: str | None) -> None:
    if name:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class Reader:
    """Reads whole HTTP/1.1 responses (Content-Length framed) off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("peer closed")
        self.buf += data

    def head(self) -> tuple[int, dict[bytes, bytes], int]:
        """(status, lower-cased fields, head bytes), consumed from the buffer."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        return int(head.split(b" ", 2)[1]), fields, len(head) + 4

    def response(self) -> tuple[int, int]:
        """(status, bytes on the wire): Content-Length or chunked (no trailers)."""
        status, fields, size = self.head()
        if fields.get(b"transfer-encoding") == b"chunked":
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                line = self.buf.split(b"\r\n", 1)[0]
                n = int(line, 16)
                total = len(line) + 2 + n + 2
                while len(self.buf) < total:
                    self._fill()
                self.buf = self.buf[total:]
                size += total
                if n == 0:
                    return status, size
        length = int(fields.get(b"content-length", b"0"))
        while len(self.buf) < length:
            self._fill()
        self.buf = self.buf[length:]
        return status, size + length


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: kscope.test\r\nUser-Agent: l7peer\r\n\r\n".encode()


def cmd_http_client(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    sock = socket.create_connection((args.to, args.port))
    reader = Reader(sock)
    local = sock.getsockname()
    emit("connected", pid=os.getpid(), local=[local[0], local[1]])
    for raw in sys.stdin:
        cmd = raw.split()
        if not cmd:
            continue
        if cmd[0] == "get":
            n = int(cmd[2]) if len(cmd) > 2 else 1
            req = request(cmd[1])
            statuses: dict[int, int] = {}
            sizes: set[int] = set()
            for _ in range(n):
                sock.sendall(req)
                status, size = reader.response()
                statuses[status] = statuses.get(status, 0) + 1
                sizes.add(size)
            emit("done", n=n, statuses=statuses, request_bytes=len(req), response_bytes=sorted(sizes))
        elif cmd[0] in ("pipeline", "ahead"):
            # pipeline: every request in one send; ahead: one send each, all before any answer is read
            reqs = [request(p) for p in cmd[1:]]
            if cmd[0] == "pipeline":
                sock.sendall(b"".join(reqs))
            for r in reqs if cmd[0] == "ahead" else ():
                sock.sendall(r)
                time.sleep(0.05)
            answers = [reader.response() for _ in reqs]
            emit(
                "done",
                paths=cmd[1:],
                statuses=[s for s, _ in answers],
                request_bytes=[len(r) for r in reqs],
                response_bytes=[n for _, n in answers],
            )
        elif cmd[0] == "post":
            size, expect = int(cmd[2]), cmd[3:] == ["expect"]
            head = (f"POST {cmd[1]} HTTP/1.1\r\nHost: kscope.test\r\nContent-Length: {size}\r\n"
                    + ("Expect: 100-continue\r\n" if expect else "") + "\r\n").encode()  # fmt: skip
            sock.sendall(head)
            interim = 0
            if expect:
                status, _, interim = reader.head()
                if status != 100:
                    emit("error", message=f"expected 100 Continue, got {status}")
                    return
            body = b"x" * size
            sock.sendall(body[: size // 2])
            time.sleep(0.02)
            sock.sendall(body[size // 2 :])
            status, n = reader.response()
            emit("done", status=status, request_bytes=len(head) + size, response_bytes=n, interim_bytes=interim)
        elif cmd[0] == "upgrade":
            req = (f"GET {cmd[1]} HTTP/1.1\r\nHost: kscope.test\r\nConnection: Upgrade\r\n"
                   "Upgrade: kscope-echo\r\n\r\n").encode()  # fmt: skip
            sock.sendall(req)
            status, _, n = reader.head()
            echoed = 0
            for _ in range(3):
                line = b"GET /after-upgrade HTTP/1.1\r\n\r\n"
                sock.sendall(line)
                while len(reader.buf) < len(line):
                    reader._fill()
                reader.buf = reader.buf[len(line) :]
                echoed += 1
            emit("done", status=status, request_bytes=len(req), response_bytes=n, echoed=echoed)
        elif cmd[0] == "close":
            sock.close()
            emit("closed")
            return
        else:
            emit("error", message=f"unknown command {raw!r}")
            return


def cmd_slow_http(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.bind, args.port))
    lsock.listen(64)
    emit("listening", pid=os.getpid())

    def serve(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            emit("received", line=buf.split(b"\r\n", 1)[0].decode(errors="replace"))
            time.sleep(args.delay)
            body = b"slow\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def cmd_http_server(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.bind, args.port))
    lsock.listen(64)
    emit("listening", pid=os.getpid())

    def exchange(conn: socket.socket, reader: Reader) -> bool:
        while b"\r\n\r\n" not in reader.buf:
            data = conn.recv(65536)
            if not data:
                return False
            reader.buf += data
        head, reader.buf = reader.buf.split(b"\r\n\r\n", 1)
        path = head.split(b" ", 2)[1].decode().split("?")[0]
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        interim = b""
        if fields.get(b"expect", b"").lower() == b"100-continue":
            interim = b"HTTP/1.1 100 Continue\r\n\r\n"
            conn.sendall(interim)
        length = int(fields.get(b"content-length", b"0"))
        while len(reader.buf) < length:
            reader._fill()
        reader.buf = reader.buf[length:]
        request_bytes = len(head) + 4 + length
        if path == "/upgrade":
            resp = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: kscope-echo\r\n\r\n"
            conn.sendall(resp)
            emit("served", path=path, status=101, request_bytes=request_bytes, response_bytes=len(resp),
                 interim_bytes=0)  # fmt: skip
            while data := conn.recv(65536):
                conn.sendall(data)
            return False
        if path == "/chunked":
            time.sleep(0.2)  # the latency the records must show (after any 100 Continue)
            parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
            parts += [b"%x\r\n%s\r\n" % (len(d), d) for d in (b"a" * 100, b"b" * 3000, b"c" * 7)]
            parts.append(b"0\r\n\r\n")
            for part in parts:
                conn.sendall(part)
                time.sleep(0.01)  # separate writes
            resp = b"".join(parts)
        else:
            resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
            conn.sendall(resp)
        emit("served", path=path, status=200, request_bytes=request_bytes, response_bytes=len(resp),
             interim_bytes=len(interim))  # fmt: skip
        return True

    def serve(conn: socket.socket) -> None:
        with conn:
            reader = Reader(conn)
            try:
                while exchange(conn, reader):
                    pass
            except ConnectionError:
                pass

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def cmd_servfail(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, args.port))
    emit("listening", pid=os.getpid())
    while True:
        query, peer = sock.recvfrom(4096)
        if len(query) < 12:
            continue
        flags = int.from_bytes(query[2:4], "big")
        # QR=1, keep opcode and RD, RA=1, RCODE=2 (SERVFAIL); question kept, no other section.
        flags = 0x8000 | (flags & 0x7900) | 0x0080 | 2
        end = 12
        while query[end] != 0:
            end += 1 + query[end]
        end += 5  # root label, QTYPE, QCLASS
        answer = query[:2] + flags.to_bytes(2, "big") + b"\x00\x01\x00\x00\x00\x00\x00\x00" + query[12:end]
        sock.sendto(answer, peer)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("http-client")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--comm")
    p.set_defaults(func=cmd_http_client)
    p = sub.add_parser("slow-http")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, required=True)
    p.add_argument("--comm")
    p.set_defaults(func=cmd_slow_http)
    p = sub.add_parser("http-server")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--comm")
    p.set_defaults(func=cmd_http_server)
    p = sub.add_parser("servfail")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.set_defaults(func=cmd_servfail)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
