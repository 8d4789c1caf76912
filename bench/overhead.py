#!/usr/bin/env python3
"""What the agent costs: nginx `return 200` under wrk/hey on loopback, without and with it.

Runs are interleaved (baseline, L4 only, L4+L7, baseline, ...) in one invocation and
the median of the per-round ratios is reported, because absolute figures drift a lot on
our shared machines (bench/RESULTS.md). Workloads:

- keep-alive at saturation (wrk): the worst case for per-call hooks, a few µs of CPU
  per request; with L7 on, every request is also captured at both ends, in two modes: the
  agent's default (--l7-record-rate: past 1,000 records/s per CPU the kernel sums requests
  per socket, method, route and status) and every request a record of its own (rate 0);
- churn: `Connection: close`, one TCP connection per request: the per-connection cost
  (agent CPU seconds per 1,000 connections);
- fixed rate (hey -q): p99 latency with and without the agent at a rate nginx can hold, per
  round and over every round's requests pooled (hey prints 0.1 ms steps: interpolated within).

The agent's own figures come from its Prometheus endpoint: requests accounted for (a
summary counts as its requests), kernel ring-buffer drops, parser gaps; "records per agent
CPU second" (rate 0) is the rate of request records one agent core keeps up with.

Usage: make bench   (or: .venv/bin/python bench/overhead.py --rounds 5 --seconds 5)
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common import REPO, cpu_seconds, free_port, missing_prerequisite, nginx, wrk_requests

AGENT = REPO / ".venv" / "bin" / "kscope-agent"
FLOOR_OBJECT = REPO / "build" / "bpf" / "bench" / "l7_floor.bpf.o"  # make bench builds it


def wrk(port: int, seconds: int, connections: int, close: bool) -> float:
    return wrk_requests(port, seconds, connections, close) / seconds


NGINX_WORKER = 0  # the pinned nginx worker's pid, set in main


def measured_wrk(port: int, seconds: int, connections: int, close: bool, agent_pid: int = 0) -> tuple[float, float]:
    """(requests/s, CPU µs per request of nginx's worker + wrk + the agent if given). The CPU cost per
    request moves far less than throughput when a neighbour takes cycles on this shared machine: a
    second view of the same runs, not a replacement for the ratios."""

    def children() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    w0, n0, a0 = children(), cpu_seconds(NGINX_WORKER), cpu_seconds(agent_pid) if agent_pid else 0.0
    n = wrk_requests(port, seconds, connections, close)
    w1, n1, a1 = children(), cpu_seconds(NGINX_WORKER), cpu_seconds(agent_pid) if agent_pid else 0.0
    return n / seconds, ((w1 - w0) + (n1 - n0) + (a1 - a0)) / n * 1e6


def hey_latencies(port: int, seconds: int, rate: int, connections: int) -> list[float]:
    """Every request's latency in ms at a fixed total rate (hey's -q is per worker; -o csv)."""
    per_worker = max(1, rate // connections)
    cmd = ["taskset", "-c", "1", "hey", "-z", f"{seconds}s", "-c", str(connections), "-q", str(per_worker),
           "-o", "csv", f"http://127.0.0.1:{port}/"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    if not lines or not lines[0].startswith("response-time,"):
        raise RuntimeError(f"cannot read hey output:\n{out[:2000]}")
    rows = [line.split(",") for line in lines[1:] if line]
    bad = sum(1 for r in rows if r[6] != "200")
    if bad or not rows:
        raise RuntimeError(f"hey: {bad} of {len(rows)} requests failed")
    return [float(r[0]) * 1000 for r in rows]


HEY_STEP_MS = 0.1  # hey prints seconds with 4 decimals


def p99(latencies_ms: list[float]) -> float:
    """The 99th percentile, interpolated inside hey's 0.1 ms steps (as a histogram quantile is): the
    raw step would move a ~2 ms p99 by 5 % at a time, the size of the effect to be measured."""
    ordered = sorted(latencies_ms)
    rank = 0.99 * len(ordered)  # samples at or below the percentile
    value = ordered[max(0, math.ceil(rank) - 1)]  # the step where the running count reaches rank
    # samples printed as `value` lie in [value - step/2, value + step/2): spread them evenly there
    first = bisect.bisect_left(ordered, value - 1e-9)
    last = bisect.bisect_right(ordered, value + 1e-9)
    return value - HEY_STEP_MS / 2 + HEY_STEP_MS * (rank - first) / max(1, last - first)


AGENT_NICE: int | None = None  # --agent-nice: the agent's --nice in every arm (None: its default)


class AgentProc:
    def __init__(
        self, l7: bool, record_rate: int | None = None, nice: int | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        """``record_rate``: --l7-record-rate (None: the agent's default; 0: every request a record);
        ``nice``: the agent's --nice (None: AGENT_NICE, else the agent's default); ``extra``: more flags."""
        self.l7 = l7
        self.record_rate = record_rate
        self.nice = AGENT_NICE if nice is None else nice
        self.extra = extra
        self.metrics_port = free_port()

    def command(self) -> list[str]:
        """The program and its first arguments (``bench/local.py`` runs ``kscope run`` instead)."""
        return [str(AGENT)]

    def __enter__(self) -> AgentProc:
        cmd = [*self.command(), "--interval", "1", "--metrics-port", str(self.metrics_port)]
        if self.nice is not None:
            cmd += ["--nice", str(self.nice)]
        if self.l7:
            cmd.append("--l7")
            if self.record_rate is not None:
                cmd += ["--l7-record-rate", str(self.record_rate)]
        cmd += self.extra
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


def l7_round(
    port: int, seconds: int, connections: int, close: bool, record_rate: int | None, extra: tuple[str, ...] = ()
) -> dict[str, float]:
    """One run with the agent tracing L7: throughput and the agent's own figures."""
    with AgentProc(l7=True, record_rate=record_rate, extra=extra) as agent:
        rps, cpu_us = measured_wrk(port, seconds, connections, close, agent.proc.pid)
        time.sleep(1.5)  # let the agent finish the interval that saw the run
        return {
            "rps": rps,
            "cpu_us": cpu_us,
            "cpu": agent.cpu(),
            "requests": agent.delta("l7_requests"),  # a summary counts as the requests it stands for
            "summarized": agent.delta("l7_summarized_requests"),
            "drops": agent.delta("l7_kernel_rb_full") + agent.delta("l7_gaps"),
            "exchanges": agent.delta("l7_kernel_exchanges"),
            "summaries": agent.delta("l7_kernel_summaries"),
            "fallbacks": agent.delta("l7_kernel_fallback"),
        }


def l7_summary(runs: list[dict[str, float]], base: list[float], base_cpu: list[float]) -> dict[str, object]:
    cpu_req = [r["cpu"] / (r["requests"] / 1000) for r in runs if r["requests"]]
    records = [r["requests"] - r["summarized"] for r in runs]
    record_rate = [n / r["cpu"] for n, r in zip(records, runs, strict=True) if r["cpu"]]
    return {
        "ratio_median": med([r["rps"] / b for r, b in zip(runs, base, strict=True)]),
        "ratio_rounds": [round(r["rps"] / b, 3) for r, b in zip(runs, base, strict=True)],
        "cpu_us_per_request_median": med([r["cpu_us"] for r in runs], 2),
        "cpu_ratio_median": med([b / r["cpu_us"] for r, b in zip(runs, base_cpu, strict=True)]),
        "agent_cpu_ms_per_1000_requests_median": med([c * 1000 for c in cpu_req], 2) if cpu_req else None,
        "requests_per_agent_cpu_second_median": round(statistics.median(r["requests"] / r["cpu"] for r in runs))
        if all(r["cpu"] for r in runs) else None,
        "records_per_agent_cpu_second_median": round(statistics.median(record_rate)) if record_rate else None,
        "summarized_share_median": med([r["summarized"] / r["requests"] for r in runs if r["requests"]], 3),
        "drops_and_gaps_per_round": [r["drops"] for r in runs],
        "kernel_exchange_records_per_round": [r["exchanges"] for r in runs],
        "kernel_summary_records_per_round": [r["summaries"] for r in runs],
        "kernel_fallbacks_per_round": [r["fallbacks"] for r in runs],
    }  # fmt: skip


def floor_round(port: int, seconds: int, connections: int, close: bool) -> tuple[float, float]:
    """The agent with L4 only, plus bench/l7_floor.bpf.c: what the L7 capture design costs per call
    before any work of its own (socket storage lookup, user buffer found, 16 bytes read)."""
    from node_exporter.bpf.loader import BpfObject  # the bench process loads it: needs root, like the agent

    caps = {"floor_send": "floor", "floor_recv": "floor"}
    with BpfObject(FLOOR_OBJECT, capabilities=caps, required=frozenset({"floor"})), AgentProc(l7=False) as agent:
        return measured_wrk(port, seconds, connections, close, agent.proc.pid)


# The agent without the traces' per-request work: no causality hooks, no X-Request-ID links, a
# fixed share of 1 instead of auto (the sampler's per-exchange count and share lookup)
NO_TRACE_WORK = ("--no-l7-causal", "--l7-trace-ratio", "1")


def saturation(
    port: int, rounds: int, seconds: int, connections: int, close: bool, floor: bool = False, causal_ab: bool = False
) -> dict[str, object]:
    """Per round: baseline, L4 only, L4+L7 with the default record rate (summaries past it), and
    L4+L7 with every request a record (--l7-record-rate 0), interleaved; with ``floor``, also L4 and
    the floor probe (floor_round); with ``causal_ab``, also L4+L7 without the traces' per-request work
    (NO_TRACE_WORK: what causality, X-Request-ID links and the auto share cost, docs/traces.md)."""
    r_floor, floor_cpu = [], []
    r_l4, base, cpu_conn, base_cpu, l4_cpu = [], [], [], [], []
    default: list[dict[str, float]] = []
    records: list[dict[str, float]] = []
    no_causal: list[dict[str, float]] = []
    for _ in range(rounds):
        b, b_cpu = measured_wrk(port, seconds, connections, close)
        with AgentProc(l7=False) as agent:
            a4, a4_cpu = measured_wrk(port, seconds, connections, close, agent.proc.pid)
            time.sleep(1.2)
            if close:
                cpu_conn.append(agent.cpu() / (a4 * seconds / 1000))
        if floor:
            f, f_cpu = floor_round(port, seconds, connections, close)
            r_floor.append(f / b)
            floor_cpu.append(f_cpu)
        default.append(l7_round(port, seconds, connections, close, None))
        if causal_ab:
            no_causal.append(l7_round(port, seconds, connections, close, None, NO_TRACE_WORK))
        records.append(l7_round(port, seconds, connections, close, 0))
        base.append(b)
        base_cpu.append(b_cpu)
        l4_cpu.append(a4_cpu)
        r_l4.append(a4 / b)
    result: dict[str, object] = {
        "baseline_rps_median": round(statistics.median(base)),
        "baseline_cpu_us_per_request_median": med(base_cpu, 2),
        "ratio_l4_median": med(r_l4),
        "ratio_l4_rounds": [round(r, 3) for r in r_l4],
        "l4_cpu_us_per_request_median": med(l4_cpu, 2),
        "l4_cpu_ratio_median": med([b / a for a, b in zip(l4_cpu, base_cpu, strict=True)]),
        "l4_l7": l7_summary(default, base, base_cpu),
        "l4_l7_every_request_a_record": l7_summary(records, base, base_cpu),
    }
    if causal_ab:
        result["l4_l7_no_causal"] = l7_summary(no_causal, base, base_cpu)
        result["l7_cpu_us_per_request_causal_over_none_median"] = med(
            [d["cpu_us"] / n["cpu_us"] for d, n in zip(default, no_causal, strict=True)]
        )
    if floor:
        result["ratio_l4_floor_median"] = med(r_floor)
        result["ratio_l4_floor_rounds"] = [round(r, 3) for r in r_floor]
        result["l4_floor_cpu_ratio_median"] = med([b / a for a, b in zip(floor_cpu, base_cpu, strict=True)])
    if close:
        result["agent_cpu_s_per_1000_connections_l4_median"] = med(cpu_conn)
    return result


def fixed_rate(port: int, rounds: int, seconds: int, rate: int, connections: int) -> dict[str, object]:
    """p99 per round and over every round's requests pooled, baseline / agent (default record rate) /
    agent with every request a record / the agent at its callers' priority (--nice 0), interleaved."""
    runs: dict[str, list[list[float]]] = {"base": [], "agent": [], "records": [], "nice0": []}
    for _ in range(rounds):
        runs["base"].append(hey_latencies(port, seconds, rate, connections))
        with AgentProc(l7=True):
            runs["agent"].append(hey_latencies(port, seconds, rate, connections))
        with AgentProc(l7=True, record_rate=0):
            runs["records"].append(hey_latencies(port, seconds, rate, connections))
        with AgentProc(l7=True, nice=0):
            runs["nice0"].append(hey_latencies(port, seconds, rate, connections))
    per_round = {k: [p99(r) for r in v] for k, v in runs.items()}
    pooled = {k: p99([x for r in v for x in r]) for k, v in runs.items()}
    return {
        "rate_rps": rate,
        "seconds_per_run": seconds,
        "requests_per_run_median": round(statistics.median(len(r) for v in runs.values() for r in v)),
        "p99_ms_baseline_pooled": round(pooled["base"], 3),
        "p99_ms_agent_pooled": round(pooled["agent"], 3),
        "p99_ratio_pooled": round(pooled["agent"] / pooled["base"], 4),
        "p99_ratio_median": med([a / b for a, b in zip(per_round["agent"], per_round["base"], strict=True)]),
        "p99_ratio_rounds": [round(a / b, 3) for a, b in zip(per_round["agent"], per_round["base"], strict=True)],
        "p99_ms_baseline_rounds": [round(x, 3) for x in per_round["base"]],
        "p99_ms_every_request_a_record_pooled": round(pooled["records"], 3),
        "p99_ratio_every_request_a_record_pooled": round(pooled["records"] / pooled["base"], 4),
        "p99_ratio_every_request_a_record_median": med(
            [a / b for a, b in zip(per_round["records"], per_round["base"], strict=True)]
        ),
        "p99_ratio_nice0_pooled": round(pooled["nice0"] / pooled["base"], 4),
        "p99_ratio_nice0_median": med([a / b for a, b in zip(per_round["nice0"], per_round["base"], strict=True)]),
        "p99_ratio_nice0_rounds": [round(a / b, 3) for a, b in zip(per_round["nice0"], per_round["base"], strict=True)],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rate", type=int, default=10_000, help="fixed-rate workload, requests/s")
    ap.add_argument("--rate-seconds", type=int, default=10, help="length of each fixed-rate run")
    ap.add_argument("--only", choices=("keepalive", "churn", "fixed_rate"), help="one workload")
    ap.add_argument("--agent-nice", type=int, default=None, help="the agent's --nice in every arm (its default)")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="keep-alive also with L4 + bench/l7_floor.bpf.c (the L7 design's cost before its own work)",
    )
    ap.add_argument(
        "--causal-ab",
        action="store_true",
        help="also L4 + L7 with --no-l7-causal --l7-trace-ratio 1 (the traces' per-request cost)",
    )
    args = ap.parse_args()
    why = missing_prerequisite(("nginx", "wrk", "hey", "taskset"))
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    if args.floor and not FLOOR_OBJECT.exists():
        print(f"bench: {FLOOR_OBJECT} not built (make bench builds it)", file=sys.stderr)
        return 2
    port = free_port()
    global NGINX_WORKER, AGENT_NICE
    AGENT_NICE = args.agent_nice
    with tempfile.TemporaryDirectory(prefix="kscope-bench-") as tmp, nginx(Path(tmp), port) as master:
        NGINX_WORKER = int(subprocess.check_output(["pgrep", "-P", str(master.pid)]).split()[0])
        wrk(port, 1, args.connections, False)  # warm up
        workloads: dict[str, Callable[[], dict[str, object]]] = {
            "keepalive": lambda: saturation(
                port, args.rounds, args.seconds, args.connections, False, args.floor, args.causal_ab
            ),
            "churn": lambda: saturation(
                port, args.rounds, args.seconds, args.connections, close=True, causal_ab=args.causal_ab
            ),
            "fixed_rate": lambda: fixed_rate(port, args.rounds, args.rate_seconds, args.rate, args.connections),
        }
        results = {name: run() for name, run in workloads.items() if args.only in (None, name)}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
