#!/usr/bin/env python3
"""What the agent costs: nginx `return 200` under wrk/hey on loopback, without and with it.

Runs are interleaved (baseline, L4 only, L4+L7, baseline, ...) in one invocation and
the median of the per-round ratios is reported, because absolute figures drift a lot on
our shared machines (shared/KERNEL.md). Workloads:

- keep-alive at saturation (wrk): the worst case for per-call hooks, a few µs of CPU
  per request; with L7 on, every request is also captured and parsed (both ends);
- churn: `Connection: close`, one TCP connection per request: the per-connection cost
  (agent CPU seconds per 1,000 connections);
- fixed rate (hey -q): p99 latency with and without the agent at a rate nginx can hold.

The agent's own figures come from its Prometheus endpoint: requests parsed, kernel
ring-buffer drops, parser gaps; "parsed requests per agent CPU second" is the rate one
agent core keeps up with.

Usage: make bench   (or: .venv/bin/python bench/overhead.py --rounds 5 --seconds 5)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import REPO, cpu_seconds, free_port, nginx, wrk_requests

AGENT = REPO / ".venv" / "bin" / "kscope-agent"


def wrk(port: int, seconds: int, connections: int, close: bool) -> float:
    return wrk_requests(port, seconds, connections, close) / seconds


def hey_p99(port: int, seconds: int, rate: int, connections: int) -> float:
    """p99 latency in ms at a fixed total rate (hey's -q is per worker)."""
    per_worker = max(1, rate // connections)
    cmd = ["taskset", "-c", "1", "hey", "-z", f"{seconds}s", "-c", str(connections), "-q", str(per_worker),
           f"http://127.0.0.1:{port}/"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"99%+ in ([\d.]+) secs", out)
    if not m:
        raise RuntimeError(f"cannot read hey output:\n{out}")
    return float(m.group(1)) * 1000


class AgentProc:
    def __init__(self, l7: bool) -> None:
        self.l7 = l7
        self.metrics_port = free_port()

    def __enter__(self) -> AgentProc:
        cmd = [str(AGENT), "--interval", "1", "--metrics-port", str(self.metrics_port)]
        if self.l7:
            cmd.append("--l7")
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "agent_started" in line:
                break
        else:
            raise RuntimeError(f"agent exited: {self.proc.wait()}")
        self.cpu0 = cpu_seconds(self.proc.pid)
        self.counters0 = self.counters()
        return self

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) - self.cpu0

    def counters(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        out = {}
        for m in re.finditer(r'^kscope_agent_counter\{name="([^"]+)"\} ([\d.e+]+)$', text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def delta(self, name: str) -> float:
        return self.counters().get(name, 0.0) - self.counters0.get(name, 0.0)

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def med(values: list[float], digits: int = 4) -> float:
    return round(statistics.median(values), digits)


def saturation(port: int, rounds: int, seconds: int, connections: int, close: bool) -> dict[str, object]:
    r_l4, r_l7, base, cpu_conn, cpu_req, parsed_rate, drops = [], [], [], [], [], [], []
    exchanges: list[float] = []  # HTTP/1 exchange records the kernel sent (paired in the kernel)
    fallbacks: list[float] = []  # sockets the kernel switched to chunks (pipelining)
    for _ in range(rounds):
        b = wrk(port, seconds, connections, close)
        with AgentProc(l7=False) as agent:
            a4 = wrk(port, seconds, connections, close)
            time.sleep(1.2)  # let the agent finish the interval that saw the run
            if close:
                cpu_conn.append(agent.cpu() / (a4 * seconds / 1000))
        with AgentProc(l7=True) as agent:
            a7 = wrk(port, seconds, connections, close)
            time.sleep(1.5)
            cpu, parsed = agent.cpu(), agent.delta("l7_requests")
            drops.append(agent.delta("l7_kernel_rb_full") + agent.delta("l7_gaps"))
            exchanges.append(agent.delta("l7_kernel_exchanges"))
            fallbacks.append(agent.delta("l7_kernel_fallback"))
        base.append(b)
        r_l4.append(a4 / b)
        r_l7.append(a7 / b)
        if parsed:
            cpu_req.append(cpu / (parsed / 1000))
            parsed_rate.append(parsed / cpu)
    result: dict[str, object] = {
        "baseline_rps_median": round(statistics.median(base)),
        "ratio_l4_median": med(r_l4),
        "ratio_l4_rounds": [round(r, 3) for r in r_l4],
        "ratio_l4_l7_median": med(r_l7),
        "ratio_l4_l7_rounds": [round(r, 3) for r in r_l7],
        "agent_cpu_s_per_1000_parsed_requests_median": med(cpu_req) if cpu_req else None,
        "parsed_requests_per_agent_cpu_second_median": round(statistics.median(parsed_rate)) if parsed_rate else None,
        "l7_drops_and_gaps_per_round": drops,
        "l7_kernel_exchanges_per_round": exchanges,
        "l7_kernel_fallbacks_per_round": fallbacks,
    }
    if close:
        result["agent_cpu_s_per_1000_connections_l4_median"] = med(cpu_conn)
    return result


def fixed_rate(port: int, rounds: int, seconds: int, rate: int, connections: int) -> dict[str, object]:
    base, with_agent = [], []
    for _ in range(rounds):
        base.append(hey_p99(port, seconds, rate, connections))
        with AgentProc(l7=True):
            with_agent.append(hey_p99(port, seconds, rate, connections))
    return {
        "rate_rps": rate,
        "p99_ms_baseline_median": med(base, 3),
        "p99_ms_agent_median": med(with_agent, 3),
        "p99_ratio_median": med([a / b for a, b in zip(with_agent, base, strict=True)]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rate", type=int, default=10_000, help="fixed-rate workload, requests/s")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (the agent loads BPF programs)", file=sys.stderr)
        return 2
    for tool in ("nginx", "wrk", "hey", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} not found (make setup installs it)", file=sys.stderr)
            return 2
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kscope-bench-") as tmp, nginx(Path(tmp), port):
        wrk(port, 1, args.connections, False)  # warm up
        results = {
            "keepalive": saturation(port, args.rounds, args.seconds, args.connections, close=False),
            "churn": saturation(port, args.rounds, args.seconds, args.connections, close=True),
            "fixed_rate": fixed_rate(port, args.rounds, args.seconds, args.rate, args.connections),
        }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
