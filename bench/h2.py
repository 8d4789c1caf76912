#!/usr/bin/env python3
"""What HTTP/2 tracing costs, two loads: h2load against nghttpd (cleartext, prior knowledge), and a
grpcio unary ping-pong (bench/grpc_pingpong.py: one call in flight per channel, several channels),
on loopback. Per round, interleaved in one run (ratios, not absolutes: our shared machines drift,
bench/RESULTS.md): without the agent, with ``--l7 --l7-record-rate 0`` and the kernel's frame walk
(DATA payloads never leave the kernel; the default), and with the old full capture
(KSCOPE_L7_H2_FULL_CAPTURE=1: each call's first 4 KiB).

The server is pinned to core 0, the load to core 1 (h2load: one thread, ``-c`` connections, ``-m``
streams each; ping-pong: ``--channels``), ``--seconds`` each; the agent runs unpinned at its default
nice. Per round and agent: requests/s; from the agent's own final counters (its ``agent_stopped``
line) and its CPU from start-up done to exit (``wait4``: the agent goes on parsing what it read after
the load stops, and that work is the load's): HTTP/2 requests parsed (both ends of each request are
traced, so 2 per request), what was lost (kernel ring full, counted; parser gaps; truncations), and
how long it took to exit after SIGTERM.

Usage: .venv/bin/python bench/h2.py --load h2load --rounds 3 --seconds 5
       .venv/bin/python bench/h2.py --load grpc --rounds 3 --seconds 5 --channels 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import free_port
from overhead import AgentProc

PINGPONG = Path(__file__).with_name("grpc_pingpong.py")
MODES = {"walk": "0", "full": "1"}  # KSCOPE_L7_H2_FULL_CAPTURE


class H2Agent(AgentProc):
    """AgentProc read at exit: its final counters, its CPU, how long it took to stop; ``full``: the
    old full capture (KSCOPE_L7_H2_FULL_CAPTURE=1)."""

    def __init__(self, full: str) -> None:
        super().__init__(l7=True, record_rate=0)
        self.full = full

    def __enter__(self) -> H2Agent:
        os.environ["KSCOPE_L7_H2_FULL_CAPTURE"] = self.full  # the agent inherits it
        try:
            super().__enter__()
        finally:
            del os.environ["KSCOPE_L7_H2_FULL_CAPTURE"]
        return self

    def __exit__(self, *exc: object) -> None:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.stop_s = time.monotonic() - t0
        self.cpu_s = usage.ru_utime + usage.ru_stime - self.cpu0
        assert self.proc.stderr is not None
        stopped = [line for line in self.proc.stderr.read().splitlines() if '"agent_stopped"' in line]
        self.final: dict[str, Any] = json.loads(stopped[-1]) if stopped else {}


def h2load(port: int, seconds: int, clients: int, streams: int) -> tuple[float, int]:
    """(requests/s, requests done) of one h2load run; every request must succeed."""
    cmd = ["taskset", "-c", "1", "h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{seconds}",
           f"http://127.0.0.1:{port}/index.html"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, (\d+) errored", out)
    if m is None or done is None or done.groups()[1:] != ("0", "0"):
        raise RuntimeError(f"h2load failed:\n{out}")
    return float(m.group(1)), int(done.group(1))


def pingpong(port: int, seconds: int, channels: int) -> tuple[float, int]:
    """(calls/s, calls done) of one ping-pong run; every call must succeed."""
    cmd = ["taskset", "-c", "1", sys.executable, str(PINGPONG), "client", str(port), str(channels), str(seconds)]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    if out["failed"]:
        raise RuntimeError(f"ping-pong failed: {out}")
    return float(out["rps"]), int(out["calls"])


def summary(runs: list[dict[str, float]], base: list[float]) -> dict[str, Any]:
    return {
        "throughput_ratio_median": round(statistics.median(r["rps"] / b for r, b in zip(runs, base, strict=True)), 3),
        "throughput_ratio_rounds": [round(r["rps"] / b, 3) for r, b in zip(runs, base, strict=True)],
        "parsed_share_of_traced_requests_rounds": [round(r["parsed"] / (2 * r["done"]), 3) for r in runs],
        "parsed_requests_per_agent_cpu_second_median": round(statistics.median(r["parsed"] / r["cpu"] for r in runs)),
        "agent_cpu_ms_per_1000_parsed_median": round(
            statistics.median(1e6 * r["cpu"] / max(r["parsed"], 1) for r in runs), 1
        ),
        "kernel_ring_full_rounds": [r["rb_full"] for r in runs],
        "kernel_h2_lost_rounds": [r["h2_lost"] for r in runs],
        "gaps_rounds": [r["gaps"] for r in runs],
        "truncations_rounds": [r["truncations"] for r in runs],
        "agent_stop_after_sigterm_s_rounds": [round(r["stop"], 1) for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", choices=["h2load", "grpc"], default="h2load")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4, help="h2load -c")
    ap.add_argument("--streams", type=int, default=10, help="h2load -m")
    ap.add_argument("--channels", type=int, default=8, help="ping-pong channels (connections)")
    a = ap.parse_args()
    port = free_port()
    base: list[float] = []
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        load: Callable[[], tuple[float, int]]
        if a.load == "h2load":
            (Path(tmp) / "index.html").write_text("ok\n")
            cmd = ["taskset", "-c", "0", "nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", tmp, str(port)]
            load = lambda: h2load(port, a.seconds, a.clients, a.streams)  # noqa: E731
        else:
            cmd = ["taskset", "-c", "0", sys.executable, str(PINGPONG), "server", str(port)]
            load = lambda: pingpong(port, a.seconds, a.channels)  # noqa: E731
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            for _ in range(a.rounds):
                base.append(load()[0])
                for mode, full in MODES.items():
                    agent = H2Agent(full)
                    with agent:
                        rps, done = load()
                    c = agent.final
                    runs[mode].append({
                        "rps": rps, "done": done, "cpu": agent.cpu_s, "stop": agent.stop_s,
                        "parsed": c.get("l7_requests", 0), "rb_full": c.get("l7_kernel_rb_full", 0),
                        "h2_lost": c.get("l7_kernel_h2_lost", 0), "gaps": c.get("l7_gaps", 0),
                        "truncations": c.get("l7_truncations", 0),
                    })  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(json.dumps({
        "note": "noisy: shared 2-core machine, short rounds; the agent also traces whatever else runs",
        "load": a.load, "baseline_rps_rounds": [round(b) for b in base],
        **{mode: summary(r, base) for mode, r in runs.items()},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
