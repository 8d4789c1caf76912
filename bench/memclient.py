#!/usr/bin/env python3
"""Many live keep-alive HTTP/1 connections from one process (``bench/memory.py``'s agent workload).

Opens ``--connections`` TCP connections to HOST:PORT in steps, one GET on each as it opens (so the
agent's L7 path knows every one of them), then keeps them all open and busy slowly: ``--rate`` GETs
per second over the whole set, each on a connection picked at random; one in ``--split-every`` is
sent in two writes ``--split-pause`` seconds apart (a head the L7 parser holds half of meanwhile).

Control on stdin, one word a line: ``open N`` opens connections until N are live, then prints
``open N``; ``stats`` prints ``stats <live> <requests> <responses> <errors>``. Stdout is flushed per line.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

REQUEST = b"GET /api/items/%d HTTP/1.1\r\nHost: bench\r\nUser-Agent: kscope-memclient\r\n\r\n"


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.busy = False


class Client:
    def __init__(self, host: str, port: int, split_every: int, split_pause: float) -> None:
        self.host, self.port = host, port
        self.split_every, self.split_pause = split_every, split_pause
        self.conns: list[Conn] = []
        self.requests = self.responses = self.errors = 0

    async def request(self, c: Conn) -> None:
        """One GET and its whole response (nginx answers with a Content-Length)."""
        c.busy = True
        try:
            self.requests += 1
            data = REQUEST % random.randrange(1_000_000)
            if self.split_every and self.requests % self.split_every == 0:
                c.writer.write(data[:20])
                await c.writer.drain()
                await asyncio.sleep(self.split_pause)
                data = data[20:]
            c.writer.write(data)
            await c.writer.drain()
            head = await c.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await c.reader.readexactly(length)
            self.responses += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.errors += 1
        finally:
            c.busy = False

    async def open_until(self, n: int, parallel: int = 200) -> None:
        async def one() -> None:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.errors += 1
                return
            c = Conn(reader, writer)
            self.conns.append(c)
            await self.request(c)

        while len(self.conns) < n:
            step = min(parallel, n - len(self.conns))
            await asyncio.gather(*(one() for _ in range(step)))

    async def slow_traffic(self, rate: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        while True:
            await asyncio.sleep(1 / rate)
            if not self.conns:
                continue
            c = random.choice(self.conns)
            if c.busy:
                continue
            t = asyncio.create_task(self.request(c))
            tasks.add(t)
            t.add_done_callback(tasks.discard)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--rate", type=float, default=200.0, help="GETs per second over all connections")
    ap.add_argument("--split-every", type=int, default=10)
    ap.add_argument("--split-pause", type=float, default=1.0)
    a = ap.parse_args()
    client = Client(a.host, a.port, a.split_every, a.split_pause)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    traffic = asyncio.create_task(client.slow_traffic(a.rate))
    while line := (await reader.readline()).decode().split():
        if line[0] == "open":
            await client.open_until(int(line[1]))
            print(f"open {len(client.conns)}", flush=True)
        elif line[0] == "stats":
            print(f"stats {len(client.conns)} {client.requests} {client.responses} {client.errors}", flush=True)
    traffic.cancel()


if __name__ == "__main__":
    asyncio.run(main())
