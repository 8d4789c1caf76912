#!/usr/bin/env python3
"""What HTTP/2 tracing costs: h2load against nghttpd (cleartext, prior knowledge) on loopback,
without the agent and with ``--l7 --l7-record-rate 0``, rounds interleaved in one run (ratios, not
absolutes: our shared machines drift, bench/RESULTS.md).

nghttpd is pinned to core 0, h2load to core 1 (one thread, ``-c`` connections, ``-m`` streams
each, ``-D`` seconds); the agent runs unpinned at its default nice. Per round: h2load's requests/s;
with the agent, from the agent's own final counters (its ``agent_stopped`` line) and its CPU from
start-up done to exit (``wait4``: the agent goes on parsing what it read after the load stops, and
that work is the load's): HTTP/2 requests parsed (both ends of each request are traced, so 2 per
h2load request), what was lost (kernel ring full, counted; parser gaps; truncations), and how long
it took to exit after SIGTERM.

Usage: .venv/bin/python bench/h2.py --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import free_port
from overhead import AgentProc


class H2Agent(AgentProc):
    """AgentProc read at exit: its final counters, its CPU, how long it took to stop."""

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--streams", type=int, default=10)
    a = ap.parse_args()
    port = free_port()
    base: list[float] = []
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "index.html").write_text("ok\n")
        server = subprocess.Popen(["taskset", "-c", "0", "nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", tmp,
                                   str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(1.0)
            for _ in range(a.rounds):
                base.append(h2load(port, a.seconds, a.clients, a.streams)[0])
                agent = H2Agent(l7=True, record_rate=0)
                with agent:
                    rps, done = h2load(port, a.seconds, a.clients, a.streams)
                c = agent.final
                runs.append({
                    "rps": rps, "done": done, "cpu": agent.cpu_s, "stop": agent.stop_s,
                    "parsed": c.get("l7_requests", 0), "rb_full": c.get("l7_kernel_rb_full", 0),
                    "gaps": c.get("l7_gaps", 0), "truncations": c.get("l7_truncations", 0),
                })  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=10)
    cpu_per_1000 = [1e6 * r["cpu"] / max(r["parsed"], 1) for r in runs]
    print(
        json.dumps(
            {
                "note": "noisy: shared 2-core machine, short rounds; the agent also traces whatever else runs",
                "throughput_ratio_median": round(
                    statistics.median(r["rps"] / b for r, b in zip(runs, base, strict=True)), 3
                ),
                "throughput_ratio_rounds": [round(r["rps"] / b, 3) for r, b in zip(runs, base, strict=True)],
                "baseline_rps_rounds": [round(b) for b in base],
                "parsed_share_of_traced_requests_rounds": [round(r["parsed"] / (2 * r["done"]), 3) for r in runs],
                "parsed_requests_per_agent_cpu_second_median": round(
                    statistics.median(r["parsed"] / r["cpu"] for r in runs)
                ),
                "agent_cpu_ms_per_1000_parsed_median": round(statistics.median(cpu_per_1000), 1),
                "kernel_ring_full_rounds": [r["rb_full"] for r in runs],
                "gaps_rounds": [r["gaps"] for r in runs],
                "truncations_rounds": [r["truncations"] for r in runs],
                "agent_stop_after_sigterm_s_rounds": [round(r["stop"], 1) for r in runs],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
