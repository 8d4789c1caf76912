#!/usr/bin/env python3
"""L4 capture cost: nginx `return 200` under wrk on loopback, without and with the agent.

Runs are interleaved (without, with, without, with ...) in one invocation and the
median of the per-pair throughput ratios is reported, because absolute figures
drift a lot on our shared machines (shared/KERNEL.md). Two workloads:

- keep-alive: the worst case for per-call hooks (a few µs of CPU per request);
- churn: `Connection: close`, one TCP connection per request, to price the agent's
  per-connection work (agent CPU seconds per 1,000 connections).

Usage: make bench   (or: .venv/bin/python bench/l4_overhead.py --pairs 5 --seconds 5)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / ".venv" / "bin" / "kscope-agent"
CLK_TCK = os.sysconf("SC_CLK_TCK")

NGINX_CONF = """
worker_processes 1;
worker_cpu_affinity 01;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wrk(port: int, seconds: int, connections: int, close: bool) -> float:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run([*cmd, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    return int(m.group(1)) / seconds


class AgentProc:
    def __enter__(self) -> AgentProc:
        self.proc = subprocess.Popen(
            [str(AGENT), "--interval", "1", "--log-level", "info"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stderr:
            if "agent_started" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not start")
        else:
            raise RuntimeError(f"agent exited: {self.proc.wait()}")
        self.cpu0 = cpu_seconds(self.proc.pid)
        return self

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) - self.cpu0

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def run_pairs(port: int, pairs: int, seconds: int, connections: int, close: bool) -> dict[str, object]:
    ratios, base, with_agent, agent_cpu_per_1k = [], [], [], []
    for _ in range(pairs):
        b = wrk(port, seconds, connections, close)
        with AgentProc() as agent:
            a = wrk(port, seconds, connections, close)
            time.sleep(1.2)  # let the agent finish the interval that saw the run
            cpu = agent.cpu()
        base.append(b)
        with_agent.append(a)
        ratios.append(a / b)
        if close:
            agent_cpu_per_1k.append(cpu / (a * seconds / 1000))
    result: dict[str, object] = {
        "throughput_ratio_median": round(statistics.median(ratios), 4),
        "ratios": [round(r, 4) for r in ratios],
        "baseline_rps_median": round(statistics.median(base)),
        "agent_rps_median": round(statistics.median(with_agent)),
    }
    if close:
        result["agent_cpu_s_per_1000_connections_median"] = round(statistics.median(agent_cpu_per_1k), 4)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (the agent loads BPF programs)", file=sys.stderr)
        return 2
    for tool in ("nginx", "wrk", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} not found (make setup installs it)", file=sys.stderr)
            return 2
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kscope-bench-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port))
        nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", tmp])
        try:
            time.sleep(1.0)
            wrk(port, 1, args.connections, False)  # warm up
            results = {
                "keepalive": run_pairs(port, args.pairs, args.seconds, args.connections, close=False),
                "churn": run_pairs(port, args.pairs, args.seconds, args.connections, close=True),
            }
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=10)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
