#!/usr/bin/env python3
"""ID-bearing paths: what summing in the kernel relieves when every path carries an id.

nginx `return 200` under wrk at saturation on loopback (bench/common.py), wrk making each request's
path from a few routes and fresh numeric, hex (24 characters) and UUID ids (a Lua script: nearly
every request a path not seen before). Per round, interleaved: no agent; the agent with --l7 at
its default record rate, summing by route template (bpf_src/l7_route.h); the same with
--l7-summary-raw-paths (summing by raw path, as before templating in the kernel).

Per arm: throughput ratio to the no-agent run of the round, the share of requests the kernel
summed (its summarized counter over the requests the agent accounted for: a summary counts as its
requests), the share the summaries relieved (requests that cost no ring record of their own: 1 -
(exchange records + summary records) / requests), requests per summary, the agent's CPU per 1,000
requests, and the counters that say what did not fit (slots_full, unsummable, rb_full, lost).

bpf_stats are on during the run (restored after): l7_send/l7_recv ns per call say what the key costs.

Usage: flock /tmp/kscope-bench.lock .venv/bin/python bench/idpaths.py --rounds 5 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_seconds, free_port, missing_prerequisite, nginx, wrk_requests
from overhead import AgentProc

ROUTES = ["/api/users/%s", "/api/users/%s/orders", "/api/orders/%s/items/%s", "/v1/blobs/%s",
          "/shop/products/%s/reviews"]  # fmt: skip
WRK_IDS = """
local routes = {%s}
local hex = "0123456789abcdef"
local function hexid(n)
  local t = {}
  for i = 1, n do
    local k = math.random(16)
    t[i] = hex:sub(k, k)
  end
  return table.concat(t)
end
local function id()
  local k = math.random(3)
  if k == 1 then return tostring(math.random(1, 99999999)) end
  if k == 2 then return hexid(24) end
  return hexid(8) .. "-" .. hexid(4) .. "-" .. hexid(4) .. "-" .. hexid(4) .. "-" .. hexid(12)
end
init = function(args) math.randomseed(17) end
request = function()
  return wrk.format("GET", string.format(routes[math.random(#routes)], id(), id()))
end
"""
COUNTERS = ("l7_requests", "l7_kernel_summarized", "l7_kernel_exchanges", "l7_kernel_summaries",
            "l7_kernel_slots_full", "l7_kernel_unsummable", "l7_kernel_rb_full", "l7_kernel_exchange_rb_full",
            "l7_kernel_summary_rb_full", "l7_kernel_summary_lost")  # fmt: skip


PROFILED = ("l7_send", "l7_recv")  # where the key is computed: the exchange path of each call


def bpf_run_times() -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per profiled program (kernel.bpf_stats_enabled=1), summed over loads."""
    out: dict[str, tuple[int, int]] = {}
    for p in json.loads(subprocess.check_output(["bpftool", "-j", "prog", "show"])):
        if p.get("name") in PROFILED:
            t, n = out.get(p["name"], (0, 0))
            out[p["name"]] = (t + p.get("run_time_ns", 0), n + p.get("run_cnt", 0))
    return out


def agent_round(port: int, seconds: int, connections: int, script: Path, raw: bool) -> dict[str, float]:
    extra = ("--l7-summary-raw-paths",) if raw else ()
    with AgentProc(l7=True, extra=extra) as agent:
        before = bpf_run_times()
        rps = wrk_requests(port, seconds, connections, script=script) / seconds
        after = bpf_run_times()
        time.sleep(1.5)  # let the agent finish the interval that saw the run
        ns = {
            f"{name}_ns_per_call": (after[name][0] - before.get(name, (0, 0))[0])
            / max(1, after[name][1] - before.get(name, (0, 0))[1])
            for name in after
        }
        return {"rps": rps, "cpu": agent.cpu(), **ns, **{name: agent.delta(name) for name in COUNTERS}}


def arm(runs: list[dict[str, float]], base: list[float]) -> dict[str, object]:
    def share(f: str) -> list[float]:
        return [r[f] / r["l7_requests"] for r in runs if r["l7_requests"]]

    def med(values: list[float], digits: int) -> float | None:  # None: no round had any
        return round(statistics.median(values), digits) if values else None

    return {
        "ratio_median": med([r["rps"] / b for r, b in zip(runs, base, strict=True)], 4),
        "ratio_rounds": [round(r["rps"] / b, 3) for r, b in zip(runs, base, strict=True)],
        "summed_share_median": med(share("l7_kernel_summarized"), 4),
        "relieved_share_median": med(
            [
                1 - (r["l7_kernel_exchanges"] + r["l7_kernel_summaries"]) / r["l7_requests"]
                for r in runs
                if r["l7_requests"]
            ],
            4,
        ),
        "requests_per_summary_median": med(
            [r["l7_kernel_summarized"] / r["l7_kernel_summaries"] for r in runs if r["l7_kernel_summaries"]], 1
        ),
        "agent_cpu_ms_per_1000_requests_median": med(
            [r["cpu"] / r["l7_requests"] * 1e6 for r in runs if r["l7_requests"]], 2
        ),
        **{
            f"{p}_ns_per_call_median": med([r[f"{p}_ns_per_call"] for r in runs if f"{p}_ns_per_call" in r], 0)
            for p in PROFILED
        },
        "counters_per_round": {name: [round(r[name]) for r in runs] for name in COUNTERS},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args()
    why = missing_prerequisite(("nginx", "wrk", "taskset"))
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return 2
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_were = stats.read_text().strip()
    stats.write_text("1")  # run_time_ns per program: where the time of each arm goes
    try:
        return run(args)
    finally:
        stats.write_text(stats_were)


def run(args: argparse.Namespace) -> int:
    port = free_port()
    base: list[float] = []
    routes: list[dict[str, float]] = []
    raw: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="kscope-bench-") as tmp, nginx(Path(tmp), port) as master:
        worker = int(subprocess.check_output(["pgrep", "-P", str(master.pid)]).split()[0])
        script = Path(tmp) / "ids.lua"
        script.write_text(WRK_IDS % ", ".join(f'"{r}"' for r in ROUTES))
        wrk_requests(port, 1, args.connections, script=script)  # warm up
        cpu0 = cpu_seconds(worker)
        for _ in range(args.rounds):
            base.append(wrk_requests(port, args.seconds, args.connections, script=script) / args.seconds)
            routes.append(agent_round(port, args.seconds, args.connections, script, raw=False))
            raw.append(agent_round(port, args.seconds, args.connections, script, raw=True))
        nginx_cpu = cpu_seconds(worker) - cpu0
    result = {
        "baseline_rps_median": round(statistics.median(base)),
        "baseline_rps_rounds": [round(b) for b in base],
        "nginx_worker_cpu_s": round(nginx_cpu, 1),
        "routes": arm(routes, base),
        "raw_paths": arm(raw, base),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
