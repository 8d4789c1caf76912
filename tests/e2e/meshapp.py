"""The services of the real-cluster scenario, run inside a pod namespace (standard library only).

meshapp.py serve --name NAME --bind IP --port P [--next URL] [--also URL] [--lookup NAME] [--timeout S]
    A threading HTTP/1.1 server (http.server, without the getfqdn() on bind that blocks in an
    isolated namespace). Per request it resolves ``--lookup`` (the result is ignored: a failing
    name is the point), then calls ``--next`` with urllib, which resolves the host name through
    glibc's getaddrinfo and this namespace's resolv.conf, on a new connection each time (as a
    plain HTTP client does); ``--also`` is called first, with a 1 s timeout, and its failure only
    noted (Bookinfo's page without its details). It answers 200 when the next hop answered, 502 when it did not
    (the page degrades, as Bookinfo's does), and prints one ``served`` JSON line per request
    received, answered or not (a caller that gave up may have closed the connection).
    With ``--forward-path`` the call to ``--next`` carries the incoming request's path (each hop's
    calls name the request that caused them: tests/e2e/test_causal.py checks parents with it);
    ``--delay S`` waits before answering (requests of several callers overlap). ``--memcached
    HOST:PORT``: first, per request, a ``set`` through pymemcache (a real client; imported only
    then) on a new connection, its value 100 + i bytes long for a path ending in a number i, so the
    call's size on the wire names the request that caused it.
meshapp.py aserve --bind IP --port P --next URL --delay S --audit-after S
    An asyncio HTTP/1.1 server (one thread, an event loop): per request it waits ``--delay``,
    answers, and ``--audit-after`` seconds later calls ``--next`` + "/audit" + its path, from the
    loop's thread, while it may be serving the next request (what a wrong parent would name).
meshapp.py load --url URL --rate R --duration S --timeout S [--gate] [--number] [--traceparent]
    A load generator: one request every 1/R seconds for S seconds, each in its own thread on a
    new connection; waits for every request, prints one ``done`` JSON line with the counts.
    With ``--gate`` it starts once a line arrives on stdin (the test moves it into its pod's
    cgroup first). ``--number``: request i goes to URL + "/i" (every request's path unique);
    ``--traceparent``: request i carries ``traceparent: 00-<i+1 as 32 hex>-<i+1 as 16 hex>-01``.
    ``--request-id unique``: request i carries an ``X-Request-ID`` of its own; ``--request-id V``: V on all.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_out = threading.Lock()


def emit(event: str, **fields: object) -> None:
    with _out:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


def fetch(url: str, timeout: float, headers: dict[str, str] | None = None) -> str:
    """``ok``, or the kind of failure (``http_502``, ``timeout``, the OS error's name)."""
    # No proxy: the environment's proxy variables must not take the request off the pod network.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            resp.read()
        return "ok"
    except urllib.error.HTTPError as e:
        return f"http_{e.code}"
    except urllib.error.URLError as e:
        if isinstance(e.reason, socket.gaierror):
            return f"gaierror_{e.reason.errno}"
        return type(e.reason).__name__ if not isinstance(e.reason, str) else "url_error"
    except (TimeoutError, OSError) as e:
        return type(e).__name__


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(): a DNS lookup we do not want counted.
        socket.socket.bind(self.socket, self.server_address)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def memcached_value_len(path: str) -> int:
    last = path.split("?", 1)[0].rsplit("/", 1)[-1]
    return 100 + int(last) if last.isdigit() else 100


def _memcached_set(addr: str, path: str) -> str:
    """``ok`` or the failure's name: one ``set`` on a new connection (a request's own call)."""
    from pymemcache.client.base import Client  # the venv's: only the tests that ask for it need it

    host, port = addr.rsplit(":", 1)
    client = Client((host, int(port)), connect_timeout=5, timeout=5)
    try:
        return "ok" if client.set("k", b"v" * memcached_value_len(path), noreply=False) else "not_stored"
    except Exception as e:  # pymemcache raises its own errors besides OSError
        return type(e).__name__
    finally:
        client.close()


def cmd_serve(args: argparse.Namespace) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            looked_up = ""
            if args.lookup:
                try:
                    socket.getaddrinfo(args.lookup, 443, type=socket.SOCK_STREAM)
                    looked_up = "ok"
                except socket.gaierror as e:
                    looked_up = f"gaierror_{e.errno}"
            cached = _memcached_set(args.memcached, self.path) if args.memcached else ""
            also = fetch(args.also, 1.0) if args.also else ""
            url = args.next + self.path.split("?", 1)[0] if args.forward_path else args.next
            downstream = fetch(url, args.timeout) if args.next else ""
            if args.delay:
                time.sleep(args.delay)
            status = 200 if downstream in ("", "ok") else 502
            body = json.dumps({"service": args.name, "downstream": downstream}).encode()
            answered = False
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                answered = True
            except OSError:
                pass  # the caller gave up (its timeout): the request still arrived and counts
            finally:
                path = self.path.split("?", 1)[0]
                emit("served", path=path, status=status, answered=answered, downstream=downstream, also=also,
                     lookup=looked_up, cached=cached)  # fmt: skip

        def log_message(self, format: str, *a: object) -> None:
            pass

    server = _Server((args.bind, args.port), Handler)
    emit("listening", port=args.port)
    server.serve_forever()


def cmd_load(args: argparse.Namespace) -> None:
    if args.gate:
        sys.stdin.readline()
    outcomes: list[str] = []
    threads = []
    start = time.monotonic()
    n = 0
    while (due := start + n / args.rate) < start + args.duration:
        time.sleep(max(0.0, due - time.monotonic()))
        url = f"{args.url}/{n}" if args.number else args.url
        # an instrumented caller: request n carries trace n + 1, span n + 1 (the test knows them)
        headers = {"traceparent": f"00-{n + 1:032x}-{n + 1:016x}-01"} if args.traceparent else {}
        if args.request_id:  # "unique": request n's own; anything else: that one value on every request
            headers["X-Request-ID"] = f"req-{n}-{start:.6f}" if args.request_id == "unique" else args.request_id
        t = threading.Thread(target=lambda url=url, h=headers: outcomes.append(fetch(url, args.timeout, h)))
        t.start()
        threads.append(t)
        n += 1
    for t in threads:
        t.join()
    emit("done", sent=n, ok=outcomes.count("ok"), failed=sorted(o for o in outcomes if o != "ok"))


def cmd_aserve(args: argparse.Namespace) -> None:
    import asyncio
    import urllib.parse

    nxt = urllib.parse.urlsplit(args.next)
    tasks: set[asyncio.Task[None]] = set()

    async def call(path: str) -> None:
        # a plain HTTP/1.1 client on the loop's own thread (asyncio streams, no executor)
        try:
            r, w = await asyncio.open_connection(nxt.hostname, nxt.port or 80)
            w.write(f"GET {nxt.path}{path} HTTP/1.1\r\nHost: {nxt.hostname}\r\nConnection: close\r\n\r\n".encode())
            await w.drain()
            await r.read()
            w.close()
            emit("called", path=path)
        except OSError as e:
            emit("call_failed", path=path, error=type(e).__name__)

    async def audit_later(path: str) -> None:
        await asyncio.sleep(args.audit_after)
        await call("/audit" + path)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                await asyncio.sleep(args.delay)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
                t = asyncio.get_running_loop().create_task(audit_later(path))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                emit("served", path=path)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, args.bind, args.port)
        emit("listening", port=args.port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(required=True)
    p = sub.add_parser("serve")
    p.add_argument("--name", required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--next", default="")
    p.add_argument("--also", default="")
    p.add_argument("--lookup", default="")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--forward-path", action="store_true")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--memcached", default="")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("aserve")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--next", required=True)
    p.add_argument("--delay", type=float, default=0.1)
    p.add_argument("--audit-after", type=float, default=0.05)
    p.set_defaults(func=cmd_aserve)
    p = sub.add_parser("load")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--gate", action="store_true")
    p.add_argument("--number", action="store_true")
    p.add_argument("--traceparent", action="store_true")
    p.add_argument("--request-id", default="")
    p.set_defaults(func=cmd_load)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
