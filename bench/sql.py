"""pgbench -S against a real PostgreSQL, without and with the agent's --l7, interleaved rounds.

PostgreSQL in one network namespace, pgbench in another (the data directory the tests cache); the agent
traces the server's namespace only (``--netns-inode``), so the machine's other traffic stays out. Per
round and protocol mode: transactions/s without the agent, then with it; the agent's CPU (from /proc)
per 1,000 operations it recorded, operations per agent CPU second, and what it counted as dropped.
Medians of the per-round ratios. Run as root: ``.venv/bin/python bench/sql.py [--rounds 3 --seconds 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_seconds, db_operations  # noqa: E402

from tests.e2e.netns import SRV_V4, Topology  # noqa: E402
from tests.e2e.sqlpeers import pg_data, private_copy, start_postgres  # noqa: E402

KSCOPE = str(REPO / ".venv" / "bin" / "kscope")
_TPS = re.compile(r"number of transactions actually processed: (\d+)")
DROPS = ("l7_kernel_rb_full", "l7_connections_evicted", "l7_buffer_overflows", "l7_cut_responses")


def pgbench(topo: Topology, mode: str, seconds: int, clients: int) -> int:
    out = topo.cli.run("pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", "1", "-T", str(seconds),
                       "-h", SRV_V4, "-U", "postgres", "postgres", timeout=seconds + 60).stdout  # fmt: skip
    m = _TPS.search(out)
    if m is None:
        raise RuntimeError(out)
    return int(m.group(1))


def with_agent(topo: Topology, mode: str, seconds: int, clients: int, agent_args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flows.jsonl"
        agent = subprocess.Popen([KSCOPE, "run", "--no-live", "--l7", "--netns-inode", str(topo.srv.ino),
                                  "--interval", "1", "--duration", str(seconds + 3), "--jsonl", str(out),
                                  *agent_args],
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert agent.stderr is not None
        for line in agent.stderr:
            if "agent_started" in line:
                break
        cpu0 = cpu_seconds(agent.pid)  # loading the probes is not the workload's cost
        done = pgbench(topo, mode, seconds, clients)
        agent.stderr.read()
        # all of the agent's CPU to its exit: what it parsed after pgbench ended counts too
        _, _, usage = os.wait4(agent.pid, 0)
        agent.returncode = 0
        lines = out.read_text().splitlines()
    ops = db_operations(lines)
    counters = json.loads(lines[-1])["stats"]["counters"]
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    drops = {k: int(counters.get(k, 0)) for k in DROPS}
    print(mode, "drops", drops, file=sys.stderr)
    return {"tx": done, "ops": ops, "cpu": cpu, "drops": sum(drops.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--modes", default="simple,prepared")
    ap.add_argument("--agent-args", default="", help="extra flags for kscope run")
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    with Topology() as topo, private_copy(pg_data(), "postgres") as top:
        start_postgres(topo, top)
        pgbench(topo, "simple", 1, args.clients)  # warm the cache
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                base = pgbench(topo, mode, args.seconds, args.clients)
                run = with_agent(topo, mode, args.seconds, args.clients, shlex.split(args.agent_args))
                r = results.setdefault(mode, {"ratio": [], "cpu_per_1k": [], "ops_per_cpu_s": [], "drops": [],
                                              "recorded": [], "base_tps": []})  # fmt: skip
                r["ratio"].append(run["tx"] / base)
                r["cpu_per_1k"].append(1000 * run["cpu"] / max(run["ops"], 1))
                r["ops_per_cpu_s"].append(run["ops"] / max(run["cpu"], 1e-9))
                r["drops"].append(run["drops"])
                r["recorded"].append(run["ops"] / max(run["tx"], 1))  # pgbench -S: one SELECT per transaction
                r["base_tps"].append(base / args.seconds)
                time.sleep(0.5)
    for mode, r in results.items():
        print(mode, {k: round(statistics.median(v), 4) for k, v in r.items()}, "rounds:",
              {k: [round(x, 3) for x in v] for k, v in r.items() if k in ("ratio", "cpu_per_1k")})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
