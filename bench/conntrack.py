"""The agent's conntrack read (``--nat``): CPU per refresh with many DNAT'ed entries.

A throw-away network namespace gets ``--entries`` DNAT'ed TCP entries (loaded with
``conntrack -R``, as kube-proxy's Service traffic would leave them) plus as many untranslated
ones, which the kernel's status filter must keep out; ``ConntrackTable.refresh()`` is timed
(process CPU and wall, medians of ``--repeats``). Root; needs the conntrack tool.

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
        result = {
            "dnat_entries": len(table.nat),
            "cpu_ms_per_refresh": round(statistics.median(cpu) * 1000, 1),
            "wall_ms_per_refresh": round(statistics.median(wall) * 1000, 1),
            "cpu_us_per_entry": round(statistics.median(cpu) / max(1, len(table.nat)) * 1e6, 2),
            "counters": table.counters(),
        }
        print(json.dumps(result, indent=2))
        return 0 if len(table.nat) == args.entries else 1
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
