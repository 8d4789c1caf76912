"""redis-benchmark at saturation against a real redis-server, without and with the agent's --l7, interleaved.

redis-server (pinned to core 0) in one network namespace, redis-benchmark (core 1) in another; the agent
traces the server's namespace only (``--netns-inode``), unpinned at its default nice, so every cycle it
spends is taken from the two. Per round and workload (GET and SET, ``-P 1`` and ``-P 16``): requests/s
without the agent, then with it; the agent's CPU from its ``agent_started`` to its exit (what it parsed
after the load ended included) per 1,000 operations it accounted for (a summary counts as its
operations), operations per agent CPU second, the share of the server's operations accounted for, and
every drop the agent counted. Medians of the per-round figures.

Run as root, holding the bench lock: ``flock /tmp/kscope-bench.lock .venv/bin/python bench/kv.py``.
``--agent-args`` passes extra flags to ``kscope run``. ``--profile DIR``: one round, the agent under
cProfile (DIR/agent-<test>-P<n>.prof; its overhead inflates the agent's CPU, so no figures) and the
kernel's run time per L7 program (``kernel.bpf_stats_enabled``, DIR/bpf-<test>-P<n>.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_seconds, db_operations  # noqa: E402

from tests.e2e.netns import SRV_V4, Topology  # noqa: E402

KSCOPE = str(REPO / ".venv" / "bin" / "kscope")
PORT = 6379
# what the agent counts as lost or degraded (kernel and user space); non-zero ones are printed per run
DROP = re.compile(r"rb_full|lost|dropped|overflow|evicted|gaps|invalid|orphan|cut_|full")


def commandstats(topo: Topology) -> dict[str, int]:
    out = topo.cli.run("redis-cli", "-h", SRV_V4, "-p", str(PORT), "INFO", "commandstats").stdout
    return {m[1].upper(): int(m[2]) for m in re.finditer(r"cmdstat_([a-z|]+):calls=(\d+)", out)}


def benchmark(topo: Topology, test: str, pipeline: int, requests: int, clients: int) -> float:
    """requests/s redis-benchmark reports for one test (its own clock: start to last reply)."""
    out = topo.cli.run("taskset", "-c", "1", "redis-benchmark", "-h", SRV_V4, "-p", str(PORT), "-t", test,
                       "-n", str(requests), "-c", str(clients), "-P", str(pipeline), "--csv",
                       timeout=300).stdout  # fmt: skip
    m = re.search(rf'^"{test.upper()}","([0-9.]+)"', out, re.M)
    if m is None:
        raise RuntimeError(out)
    return float(m.group(1))


def bpf_run_times() -> str:
    """run_cnt and run_time_ns of the loaded L7 programs (kernel.bpf_stats_enabled must be 1)."""
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout)
    lines = []
    for p in progs:
        if p.get("name", "").startswith("l7_") and p.get("run_cnt"):
            cnt, ns = p["run_cnt"], p.get("run_time_ns", 0)
            lines.append(f"{p['name']} run_cnt {cnt} run_time_ns {ns} ns/run {ns / cnt:.0f}")
    return "\n".join(lines)


def with_agent(
    topo: Topology, run: dict[str, Any], agent_args: list[str], profile: Path | None = None
) -> dict[str, float]:
    tag = f"{run['test']}-P{run['pipeline']}"
    prof = [sys.executable, "-m", "cProfile", "-o", str(profile / f"agent-{tag}.prof")] if profile else []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flows.jsonl"
        agent = subprocess.Popen([*prof, KSCOPE, "run", "--no-live", "--l7", "--netns-inode", str(topo.srv.ino),
                                  "--interval", "1", "--jsonl", str(out), *agent_args],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert agent.stderr is not None
        for line in agent.stderr:
            if "agent_started" in line:
                break
        cpu0 = cpu_seconds(agent.pid)  # loading the probes is not the workload's cost
        t0 = time.monotonic()
        before = commandstats(topo)
        rps = benchmark(topo, run["test"], run["pipeline"], run["requests"], run["clients"])
        served = commandstats(topo)[run["test"].upper()] - before.get(run["test"].upper(), 0)
        t1 = time.monotonic()
        if profile:
            (profile / f"bpf-{tag}.txt").write_text(bpf_run_times() + "\n")
        agent.send_signal(signal.SIGTERM)
        agent.stderr.read()
        print(f"  load {t1 - t0:.1f} s, agent exit {time.monotonic() - t1:.1f} s", file=sys.stderr)
        # all of the agent's CPU to its exit: what it parsed after the load ended counts too
        _, status, usage = os.wait4(agent.pid, 0)
        agent.returncode = os.waitstatus_to_exitcode(status)
        if agent.returncode:
            raise RuntimeError(f"agent exit {agent.returncode}")
        lines = out.read_text().splitlines()
    ops = db_operations(lines)
    counters = json.loads(lines[-1])["stats"]["counters"]
    drops = {k: int(v) for k, v in counters.items() if DROP.search(k) and int(v)}
    print(f"  {run['test']} -P {run['pipeline']}: {rps:.0f}/s, {ops} of {served} accounted, drops {drops}",
          file=sys.stderr)  # fmt: skip
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    return {"rps": rps, "ops": ops, "served": served, "cpu": cpu,
            "drops": sum(v for k, v in drops.items() if "rb_full" in k or "lost" in k)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5, help="each run's length, at the baseline's rate")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--tests", default="get,set")
    ap.add_argument("--pipelines", default="1,16")
    ap.add_argument("--agent-args", default="", help="extra flags for kscope run")
    ap.add_argument("--profile", type=Path, help="one round with the agent under cProfile, files into this directory")
    args = ap.parse_args()
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = stats.read_text()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.rounds = 1
        stats.write_text("1\n")  # its clock reads cost every program run: put back at the end
    try:
        return measure(args)
    finally:
        stats.write_text(before)


def measure(args: argparse.Namespace) -> int:
    agent_args = shlex.split(args.agent_args)
    with Topology() as topo:
        topo.spawn(topo.srv, "taskset", "-c", "0", "redis-server", "--bind", SRV_V4, "--port", str(PORT),
                   "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
                   "--logfile", "")  # fmt: skip
        topo.wait_listening(topo.srv, PORT)
        runs: list[dict[str, Any]] = []
        for test in args.tests.split(","):
            for p in (int(x) for x in args.pipelines.split(",")):
                # sized so a baseline run lasts about --seconds
                rate = benchmark(topo, test, p, 20000 * p, args.clients)
                runs.append({"test": test, "pipeline": p, "clients": args.clients,
                             "requests": int(rate * args.seconds)})  # fmt: skip
        results: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.rounds):
            for run in runs:
                base = benchmark(topo, run["test"], run["pipeline"], run["requests"], run["clients"])
                got = with_agent(topo, run, agent_args, args.profile)
                r = results.setdefault(f"{run['test']} -P {run['pipeline']}", {})
                for k, v in (("ratio", got["rps"] / base), ("cpu_ms_per_1k", 1e6 * got["cpu"] / max(got["ops"], 1)),
                             ("ops_per_cpu_s", got["ops"] / max(got["cpu"], 1e-9)),
                             ("accounted", got["ops"] / max(got["served"], 1)), ("drops", got["drops"]),
                             ("base_rps", base)):  # fmt: skip
                    r.setdefault(k, []).append(v)
                time.sleep(0.5)
    print(f"redis-benchmark -c {args.clients}, {args.rounds} rounds, agent args {agent_args or 'none'}")
    for name, r in results.items():
        med = {k: round(statistics.median(v), 3) for k, v in r.items()}
        print(name, med, "ratio rounds:", [round(x, 3) for x in r["ratio"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
