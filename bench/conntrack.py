"""The agent's conntrack reads (``--nat``): CPU per new client socket and per full dump.

A throw-away network namespace gets ``--entries`` DNAT'ed TCP entries (loaded with
``conntrack -R``, as kube-proxy's Service traffic would leave them) plus as many untranslated
ones. Timed (process CPU, medians of ``--repeats``):
- ``resolve()`` of 256 sockets the agent has not asked about (one GET each, the path of an
  interval with few new client sockets): CPU per socket;
- ``refresh()``, one dump of every DNAT'ed entry (the path of an interval with many new
  sockets; the kernel's status filter keeps the untranslated ones out): CPU per refresh and per entry.
Root; needs the conntrack tool.

    .venv/bin/python bench/conntrack.py [--entries 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from node_exporter.nat.conntrack import ConntrackTable


def entries_file(n: int, path: Path) -> None:
    lines = []
    for i in range(n):
        client = f"198.18.{i // 250 % 250}.{i % 250 + 1}"
        sport = 10000 + i // 62500
        lines.append(f"-I -p tcp -s {client} -d 198.19.0.{i % 200 + 1} --sport {sport} --dport 80 --state ESTABLISHED "
                     f"-t 600 -u ASSURED,SEEN_REPLY --dst-nat 198.18.251.{i % 250 + 1}:8080")  # fmt: skip
        lines.append(f"-I -p tcp -s {client} -d 198.18.252.{i % 250 + 1} --sport {sport} --dport 81 "
                     "--state ESTABLISHED -t 600 -u ASSURED,SEEN_REPLY")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=20_000, help="DNAT'ed entries (as many untranslated are added)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespace, conntrack)", file=sys.stderr)
        return 2
    ns = f"ks-bench-ct-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "entries"
            entries_file(args.entries, f)
            subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-R", str(f)], check=True, capture_output=True)
        table = ConntrackTable(f"/run/netns/{ns}", max_entries=2 * args.entries)
        cpu, wall = [], []
        for _ in range(args.repeats):
            c0, w0 = time.process_time(), time.monotonic()
            table.refresh()
            cpu.append(time.process_time() - c0)
            wall.append(time.monotonic() - w0)
        keys = list(table.nat)[:256]
        get_cpu = []
        for _ in range(args.repeats):
            fresh = ConntrackTable(f"/run/netns/{ns}", get_limit=len(keys))
            c0 = time.process_time()
            fresh.resolve(keys)
            get_cpu.append(time.process_time() - c0)
            if fresh.counters()["gets"] != len(keys) or any(fresh.lookup(k) != table.nat[k] for k in keys):
                print("bench: GET answers differ from the dump", file=sys.stderr)
                return 1
        result = {
            "dnat_entries": len(table.nat),
            "get_cpu_us_per_new_socket": round(statistics.median(get_cpu) / len(keys) * 1e6, 1),
            "dump_cpu_ms_per_refresh": round(statistics.median(cpu) * 1000, 1),
            "dump_wall_ms_per_refresh": round(statistics.median(wall) * 1000, 1),
            "dump_cpu_us_per_entry": round(statistics.median(cpu) / max(1, len(table.nat)) * 1e6, 2),
            "counters": table.counters(),
        }
        print(json.dumps(result, indent=2))
        return 0 if len(table.nat) == args.entries else 1
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
