#!/usr/bin/env python3
"""A grpcio unary ping-pong for bench/h2.py: a server, and a closed-loop client over several channels.

grpc_pingpong.py server PORT
    demo.v1.Echo/Ping answers each request with it (bytes in, bytes out, no generated code); prints
    ``listening``.
grpc_pingpong.py client PORT CHANNELS SECONDS
    One call in flight per channel (each channel its own HTTP/2 connection): a call's completion
    starts the next on its channel, for SECONDS. Prints one JSON line: calls done, calls failed,
    calls per second.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc

METHOD = "/demo.v1.Echo/Ping"
PAYLOAD = b"x" * 64


def server(port: int) -> None:
    handler = grpc.method_handlers_generic_handler(
        "demo.v1.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    srv.add_generic_rpc_handlers((handler,))
    srv.add_insecure_port(f"127.0.0.1:{port}")
    srv.start()
    print("listening", flush=True)
    srv.wait_for_termination()


def client(port: int, channels: int, seconds: float) -> None:
    # a distinct option per channel: grpcio would otherwise share one connection among them
    chans = [grpc.insecure_channel(f"ipv4:127.0.0.1:{port}", options=[("kscope.bench.channel", i)])
             for i in range(channels)]  # fmt: skip
    for c in chans:
        grpc.channel_ready_future(c).result(timeout=10)
    stubs = [c.unary_unary(METHOD) for c in chans]
    lock = threading.Lock()
    done = [0, 0]  # ok, failed
    deadline = time.monotonic() + seconds
    finished = threading.Semaphore(0)

    def start(i: int) -> None:
        stubs[i].future(PAYLOAD).add_done_callback(lambda f: on_done(i, f))

    def on_done(i: int, f: Any) -> None:
        with lock:
            done[0 if f.exception() is None else 1] += 1
        if time.monotonic() < deadline:
            start(i)
        else:
            finished.release()

    t0 = time.monotonic()
    for i in range(channels):
        start(i)
    for _ in range(channels):
        finished.acquire()
    elapsed = time.monotonic() - t0
    print(json.dumps({"calls": done[0], "failed": done[1], "rps": done[0] / elapsed}), flush=True)
    for c in chans:
        c.close()


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
