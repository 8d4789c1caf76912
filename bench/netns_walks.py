#!/usr/bin/env python3
"""What the agent's sweeps cost on a node with many network namespaces (pods).

A sweep (L4's and L7's) walks namespaces with TCP iterators, one per namespace, and each walk goes
through the whole established-socket hash table the namespaces share (docs/architecture.md). Only
namespaces whose sockets marked them are walked, and busy sockets report themselves, so what matters is how
the agent's CPU grows with namespaces that are idle and with namespaces that are busy. Arms, each a
fresh agent (`--interval 1 --l7`), run one after the other:

- no extra namespace (the baseline);
- N idle namespaces (a process in each, no traffic);
- M busy namespaces (nginx `return 200` in each, hey keep-alive at R requests/s on its loopback),
  at the agent's default --sweep-interval and at --sweep-interval 1.

Reported: the agent's CPU as a share of one core, its increase per namespace over the baseline, and
the namespaces walked per second (the agent's `netns_walked`).

Usage: .venv/bin/python bench/netns_walks.py [--idle 50] [--busy 20] [--rate 5] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from common import REPO, cpu_seconds, free_port, missing_prerequisite, nginx_conf

AGENT = REPO / ".venv" / "bin" / "kscope-agent"
PORT = 8080


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def namespaces(n: int, busy: bool, rate: int, tmp: Path) -> Iterator[None]:
    """``n`` namespaces named kscope-bench-PID-I, each with a process in it (busy: nginx and hey);
    everything killed and deleted whatever happens."""
    names = [f"kscope-bench-{os.getpid()}-{i}" for i in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    nginx: list[subprocess.Popen[bytes]] = []  # stopped gracefully (SIGQUIT), the rest killed
    try:
        for i, name in enumerate(names):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
            run = ["ip", "netns", "exec", name]
            if not busy:
                procs.append(subprocess.Popen([*run, "sleep", "infinity"]))
                continue
            d = tmp / name
            d.mkdir()
            (d / "nginx.conf").write_text(nginx_conf(d, f"127.0.0.1:{PORT}"))
            nginx.append(subprocess.Popen([*run, "nginx", "-c", str(d / "nginx.conf"), "-p", str(d)]))
            procs.append(nginx[-1])
            time.sleep(0.05 if i else 0.5)
            hey = ["hey", "-z", "3600s", "-c", "1", "-q", str(rate), f"http://127.0.0.1:{PORT}/"]
            procs.append(subprocess.Popen([*run, *hey], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGQUIT if p in nginx else signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def walked(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r'^kscope_agent_counter\{name="netns_walked"\} ([\d.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def agent_cpu(seconds: int, sweep_s: float | None) -> dict[str, float]:
    """One agent: its CPU (share of one core) and namespaces walked per second over ``seconds``,
    after its start-up and two seconds to settle."""
    port = free_port()
    cmd = [str(AGENT), "--interval", "1", "--l7", "--metrics-port", str(port)]
    if sweep_s is not None:
        cmd += ["--sweep-interval", str(sweep_s)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "agent_started" in line:
                break
        else:
            raise RuntimeError(f"agent exited: {proc.wait()}")
        time.sleep(2)
        c0, w0 = cpu_seconds(proc.pid), walked(port)
        time.sleep(seconds)
        c1, w1 = cpu_seconds(proc.pid), walked(port)
        return {
            "agent_core_share": round((c1 - c0) / seconds, 4),
            "namespaces_walked_per_s": round((w1 - w0) / seconds, 2),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=50, help="idle namespaces")
    ap.add_argument("--busy", type=int, default=20, help="busy namespaces")
    ap.add_argument("--rate", type=int, default=5, help="requests/s in each busy namespace")
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    why = missing_prerequisite(("nginx", "hey", "ip"), "the agent loads BPF programs; namespaces")
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kscope-bench-") as tmp:
        base = agent_cpu(args.seconds, None)
        out["no_extra_namespace"] = base
        arms = [(f"{args.idle}_idle", args.idle, False, None), (f"{args.busy}_busy", args.busy, True, None),
                (f"{args.busy}_busy_sweep_1s", args.busy, True, 1.0)]  # fmt: skip
        for name, n, busy, sweep in arms:
            sub = Path(tmp) / name
            sub.mkdir()
            with namespaces(n, busy, args.rate, sub):
                r = agent_cpu(args.seconds, sweep)
            r["core_share_per_namespace"] = round((r["agent_core_share"] - base["agent_core_share"]) / n, 5)
            out[name] = r
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
