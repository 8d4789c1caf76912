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
meshapp.py load --url URL --rate R --duration S --timeout S [--gate]
    A load generator: one request every 1/R seconds for S seconds, each in its own thread on a
    new connection; waits for every request, prints one ``done`` JSON line with the counts.
    With ``--gate`` it starts once a line arrives on stdin (the test moves it into its pod's
    cgroup first).
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


def fetch(url: str, timeout: float) -> str:
    """``ok``, or the kind of failure (``http_502``, ``timeout``, the OS error's name)."""
    # No proxy: the environment's proxy variables must not take the request off the pod network.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
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
            also = fetch(args.also, 1.0) if args.also else ""
            downstream = fetch(args.next, args.timeout) if args.next else ""
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
                     lookup=looked_up)  # fmt: skip

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
        t = threading.Thread(target=lambda: outcomes.append(fetch(args.url, args.timeout)))
        t.start()
        threads.append(t)
        n += 1
    for t in threads:
        t.join()
    emit("done", sent=n, ok=outcomes.count("ok"), failed=sorted(o for o in outcomes if o != "ok"))


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
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("load")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--gate", action="store_true")
    p.set_defaults(func=cmd_load)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
