#!/usr/bin/env python3
"""What ``kscope run``'s local pipeline costs over the agent alone, and what its live map costs.

Pipeline (default): the keep-alive and churn workloads of ``overhead.py`` (nginx ``return 200`` pinned
to core 0, wrk on core 1, loopback), each round running (a) ``kscope-agent --l7`` and (b) ``kscope run
--no-live`` (the same agent, its batches folded by the processor's Aggregator through LocalNamer, one
JSON map per interval to /dev/null), interleaved. Reported per arm: the process's CPU seconds per 1,000
requests (keep-alive) or connections (churn, one request each), and the median of the per-round
ratios run / agent (goal: <= 1.10). ``--no-l7`` runs both arms with L4 only. ``--profile FILE`` runs
arm (b) once more under cProfile and prints where its time goes.

View (``--view``): the live map at ``--edges`` busy edges without a terminal: each second, one
interval made by the real Aggregator from a synthetic batch (every edge busy, HTTP requests at both
ends) is folded into the map (``MapOutput.update``) and the map is drawn at the view's real redraw
rate (``app.MAX_FPS`` frames a second into a rich Console writing to /dev/null, 200x50) for
``--seconds`` seconds; reported: CPU seconds per wall second of the update and of the frames (goal:
< 0.02 together), frames drawn.

Usage: .venv/bin/python bench/local.py [--rounds 5 --seconds 5 | --view --edges 1000 --seconds 20]
"""

from __future__ import annotations

import argparse
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, free_port, missing_prerequisite, nginx, wrk_requests
from overhead import AgentProc, med

KSCOPE = REPO / ".venv" / "bin" / "kscope"


class RunProc(AgentProc):
    """``kscope run --no-live``: the agent with the local pipeline, its JSON map to /dev/null."""

    def __init__(self, l7: bool, profile: str = "") -> None:
        super().__init__(l7)
        self.profile = profile

    def command(self) -> list[str]:
        head = [sys.executable, "-m", "cProfile", "-o", self.profile, str(KSCOPE)] if self.profile else [str(KSCOPE)]
        return [*head, "run", "--no-live", *([] if self.l7 else ["--no-l7"])]


def arm(proc: AgentProc, port: int, seconds: int, connections: int, close: bool) -> tuple[float, int]:
    """(the process's CPU seconds over the run and the interval that follows it, requests made)."""
    with proc as p:
        n = wrk_requests(port, seconds, connections, close)
        time.sleep(1.5)  # the interval that saw the end of the run is folded (and drawn) too
        return p.cpu(), n


def pipeline(port: int, rounds: int, seconds: int, connections: int, close: bool, l7: bool) -> dict[str, object]:
    agent_ms: list[float] = []
    run_ms: list[float] = []
    rps: list[float] = []
    for _ in range(rounds):
        a_cpu, a_n = arm(AgentProc(l7=l7), port, seconds, connections, close)
        r_cpu, r_n = arm(RunProc(l7=l7), port, seconds, connections, close)
        agent_ms.append(a_cpu / a_n * 1e6)  # ms per 1,000
        run_ms.append(r_cpu / r_n * 1e6)
        rps += [a_n / seconds, r_n / seconds]
    unit = "connections" if close else "requests"
    return {
        "rps_median": round(statistics.median(rps)),
        f"agent_cpu_ms_per_1000_{unit}_median": med(agent_ms, 3),
        f"run_cpu_ms_per_1000_{unit}_median": med(run_ms, 3),
        "run_over_agent_cpu_ratio_median": med([r / a for r, a in zip(run_ms, agent_ms, strict=True)], 3),
        "run_over_agent_cpu_ratio_rounds": [round(r / a, 3) for r, a in zip(run_ms, agent_ms, strict=True)],
    }


def profiled(port: int, seconds: int, connections: int, close: bool, l7: bool, path: str, top: int = 25) -> str:
    with RunProc(l7=l7, profile=path) as p:
        wrk_requests(port, seconds, connections, close)
        time.sleep(1.5)
        pid = p.proc.pid
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return f"kscope run (pid {pid}) under cProfile, by own time:\n{out.getvalue()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--only", choices=("keepalive", "churn"), help="one workload")
    ap.add_argument("--no-l7", dest="l7", action="store_false", help="both arms with L4 only")
    ap.add_argument("--profile", metavar="FILE", help="also profile kscope run once per workload (cProfile)")
    ap.add_argument("--view", action="store_true", help="the live map's cost instead (no root needed)")
    ap.add_argument("--edges", type=int, default=1000, help="--view: busy edges")
    args = ap.parse_args()
    if args.view:
        from view_cost import view_bench  # the map alone: no agent, no nginx

        print(json.dumps(view_bench(args.edges, args.seconds, args.profile or ""), indent=2))
        return 0
    why = missing_prerequisite(("nginx", "wrk", "taskset"))
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    port = free_port()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kscope-bench-") as tmp, nginx(Path(tmp), port):
        wrk_requests(port, 1, args.connections)  # warm up
        for name, close in (("keepalive", False), ("churn", True)):
            if args.only not in (None, name):
                continue
            results[name] = pipeline(port, args.rounds, args.seconds, args.connections, close, args.l7)
            if args.profile:
                print(profiled(port, args.seconds, args.connections, close, args.l7, f"{args.profile}.{name}"),
                      file=sys.stderr)  # fmt: skip
    print(json.dumps({"l7": args.l7, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
