"""gRPC peers for the HTTP/2 tests (grpcio, no generated code: bytes in, bytes out).

grpcpeer.py server --bind IP --port P
    Service demo.v1.Echo: Ping (unary; a request "fail" is aborted NOT_FOUND with a grpc-message,
    "boom" INTERNAL, anything else answered "pong:" + request), Watch (server streaming: the request
    is a count N, answered with N messages), Chat (bidi: each message echoed). ``listening`` once
    it serves.
grpcpeer.py client --to IP --port P
    One channel, so one HTTP/2 connection; ``connected`` once it is ready, then commands, one a line:
        unary N [PAYLOAD]    N calls one after the other
        big N SIZE           N calls one after the other, each request SIZE bytes (answered SIZE + 5)
        concurrent N         N unary calls in flight at once (N streams on the connection)
        watch N              one server-streaming call answered with N messages
        chat N               one bidi call with N messages each way
        close
    each answered with one ``done`` JSON line: the status code names of the calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "demo.v1.Echo"


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such user: secret-42")
    if request == b"boom":
        context.abort(grpc.StatusCode.INTERNAL, "boom")
    return b"pong:" + request


def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"tick %d" % i


def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for r in requests:
        yield b"echo:" + r


def server(bind: str, port: int) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Ping": grpc.unary_unary_rpc_method_handler(ping),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.max_concurrent_streams", 1000)])
    srv.add_generic_rpc_handlers((handler,))
    srv.add_insecure_port(f"{bind}:{port}")
    srv.start()
    emit("listening")
    srv.wait_for_termination()


def _code(call: Any) -> str:
    try:
        call.result() if hasattr(call, "result") else None
    except grpc.RpcError as e:
        return str(e.code().name)
    return "OK"


def client(to: str, port: int) -> None:
    # ipv4:/ipv6: targets skip name resolution (the namespaces have no resolver)
    target = f"ipv6:[{to}]:{port}" if ":" in to else f"ipv4:{to}:{port}"
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    grpc.channel_ready_future(channel).result(timeout=10)
    unary = channel.unary_unary(f"/{SERVICE}/Ping")
    stream = channel.unary_stream(f"/{SERVICE}/Watch")
    bidi = channel.stream_stream(f"/{SERVICE}/Chat")
    emit("connected")
    for line in sys.stdin:
        cmd, *args = line.split()
        codes: Counter[str] = Counter()
        if cmd == "unary":
            payload = args[1].encode() if len(args) > 1 else b"hi"
            for _ in range(int(args[0])):
                codes[_code(unary.future(payload))] += 1
        elif cmd == "big":
            for _ in range(int(args[0])):
                codes[_code(unary.future(b"x" * int(args[1])))] += 1
        elif cmd == "concurrent":
            calls = [unary.future(b"hi") for _ in range(int(args[0]))]
            codes.update(_code(c) for c in calls)
        elif cmd == "watch":
            got = list(stream(args[0].encode()))
            codes["OK" if len(got) == int(args[0]) else "SHORT"] += 1
        elif cmd == "chat":
            got = list(bidi(iter([b"m%d" % i for i in range(int(args[0]))])))
            codes["OK" if len(got) == int(args[0]) else "SHORT"] += 1
        elif cmd == "close":
            channel.close()
            emit("done", codes={})
            return
        emit("done", codes=dict(codes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["server", "client"])
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--to", default="")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    if a.mode == "server":
        server(a.bind, a.port)
    else:
        client(a.to, a.port)


if __name__ == "__main__":
    main()
