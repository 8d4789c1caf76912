"""A TCP peer driven over stdin/stdout, run inside a test namespace (``netns.Topology.peer``).

Stand-alone on purpose (only the standard library, plus netfilterqueue for ``nfq-delay``):
it runs as its own process under ``ip netns exec``. Every answer is one JSON line.

    peer.py listen  --bind IP --port P [--backlog N] [--no-accept] [--comm NAME]
    peer.py connect --to IP --port P [--comm NAME]
    peer.py flood   --to IP --port P [--comm NAME]
    peer.py nfq-delay --queue N --delay SECONDS

After ``connected`` it reads commands, one a line:
    send N | recv N | recv_eof | recv_err | linger0 | close | exit
``flood`` takes ``connect K`` (K non-blocking connects, then waits up to 1 s for each to
complete), ``poke`` (one byte on every connected socket) and ``exit``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import socket
import struct
import sys
import time
from typing import Any

CHUNK = 65536


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def set_comm(name: str | None) -> None:
    if name:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def comm() -> str:
    with open("/proc/self/comm") as f:
        return f.read().strip()


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def describe(sock: socket.socket) -> dict[str, object]:
    local, remote = sock.getsockname(), sock.getpeername()
    return {"pid": os.getpid(), "comm": comm(), "local": list(local[:2]), "remote": list(remote[:2])}


def recv_exact(sock: socket.socket, n: int) -> int:
    got = 0
    while got < n:
        data = sock.recv(min(CHUNK, n - got))
        if not data:
            break
        got += len(data)
    return got


def serve(sock: socket.socket) -> None:
    payload = bytes(range(256)) * (CHUNK // 256)
    for raw in sys.stdin:
        cmd = raw.split()
        if not cmd:
            continue
        op, arg = cmd[0], int(cmd[1]) if len(cmd) > 1 else 0
        if op == "send":
            left = arg
            while left:
                n = min(left, CHUNK)
                sock.sendall(payload[:n])
                left -= n
            emit("sent", n=arg)
        elif op == "recv":
            got = recv_exact(sock, arg)
            emit("recvd", n=got)
        elif op == "recv_eof":
            extra = 0
            while data := sock.recv(CHUNK):
                extra += len(data)
            emit("eof", n=extra)
        elif op == "recv_err":
            try:
                data = sock.recv(CHUNK)
                emit("recv_err", errno=0, n=len(data))
            except OSError as exc:
                emit("recv_err", errno=exc.errno, name=errno.errorcode.get(exc.errno or 0, "?"))
        elif op == "linger0":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            emit("ok")
        elif op == "close":
            sock.close()
            emit("closed")
        elif op == "exit":
            emit("bye")
            return
        else:
            emit("error", message=f"unknown command {raw!r}")
            return


def cmd_listen(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    lsock = socket.socket(family_of(args.bind), socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.bind, args.port))
    lsock.listen(args.backlog)
    emit("listening", pid=os.getpid(), comm=comm(), port=lsock.getsockname()[1])
    if args.no_accept:
        serve(lsock)
        return
    conn, _ = lsock.accept()
    lsock.close()
    emit("connected", **describe(conn))
    serve(conn)


def cmd_connect(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    sock = socket.socket(family_of(args.to), socket.SOCK_STREAM)
    t0 = time.monotonic_ns()
    try:
        sock.connect((args.to, args.port))
    except OSError as exc:
        emit("connect_error", errno=exc.errno, name=errno.errorcode.get(exc.errno or 0, "?"),
             elapsed_ns=time.monotonic_ns() - t0, pid=os.getpid(), comm=comm())  # fmt: skip
        return
    emit("connected", connect_ns=time.monotonic_ns() - t0, **describe(sock))
    serve(sock)


def cmd_flood(args: argparse.Namespace) -> None:
    set_comm(args.comm)
    socks: list[socket.socket] = []
    connected: list[socket.socket] = []
    emit("ready", pid=os.getpid(), comm=comm())
    for raw in sys.stdin:
        cmd = raw.split()
        if not cmd:
            continue
        if cmd[0] == "connect":
            batch = []
            for _ in range(int(cmd[1])):
                s = socket.socket(family_of(args.to), socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex((args.to, args.port))
                if err not in (0, errno.EINPROGRESS):
                    emit("error", message=f"connect: {errno.errorcode.get(err, err)}")
                    return
                batch.append(s)
            socks.extend(batch)
            deadline = time.monotonic() + 1.0
            pending = list(batch)
            while pending and time.monotonic() < deadline:
                _, writable, _ = select.select([], pending, [], max(0.0, deadline - time.monotonic()))
                for s in writable:
                    pending.remove(s)
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        connected.append(s)
            emit("connects", connected=len(connected), total=len(socks))
        elif cmd[0] == "poke":
            for s in connected:
                s.send(b"!")
            emit("poked", n=len(connected))
        elif cmd[0] == "exit":
            emit("bye")
            return


def cmd_nfq_delay(args: argparse.Namespace) -> None:
    from netfilterqueue import NetfilterQueue

    delayed = 0

    def hold(pkt: Any) -> None:  # netfilterqueue.Packet
        nonlocal delayed
        time.sleep(args.delay)
        pkt.accept()
        delayed += 1
        emit("delayed", count=delayed)

    nfq = NetfilterQueue()
    nfq.bind(args.queue, hold)
    emit("ready", pid=os.getpid())
    try:
        nfq.run()
    finally:
        nfq.unbind()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("listen")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backlog", type=int, default=16)
    p.add_argument("--no-accept", action="store_true")
    p.add_argument("--comm")
    p.set_defaults(func=cmd_listen)
    p = sub.add_parser("connect")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--comm")
    p.set_defaults(func=cmd_connect)
    p = sub.add_parser("flood")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--comm")
    p.set_defaults(func=cmd_flood)
    p = sub.add_parser("nfq-delay")
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--delay", type=float, required=True)
    p.set_defaults(func=cmd_nfq_delay)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
