#!/usr/bin/env python3
"""What the syscall-exit L7 fallback costs, and which hook it should use.

Same method as bench/overhead.py: nginx `return 200`, one worker
pinned to core 0, wrk on core 1 over keep-alive loopback connections, runs interleaved
and the median of the per-round throughput ratios reported, because absolute figures
drift a lot on these machines. Each variant's run has its own baseline run just before
it (b, v1, b, v2, ...): on a machine other people's tests load too, a baseline taken
once per round was up to 1.5x off by the time the last variant ran. Variants:

- ``sys_exit``: build/bpf/l7_syscalls.bpf.o as shipped, one raw tracepoint (tp_btf) on
  every syscall's exit filtered on the syscall number;
- ``per_syscall``: the same source built with -DL7_SYS_PER_SYSCALL_TP, one classic
  tracepoint per captured syscall (fires only for those, registers from bpf_task_pt_regs).

With each variant a consumer process (not pinned, like the agent) loads the collector:

- ``_probe``: never drains, so once the ring is full every call does all the work (fd
  walk, state, user read, inference) but the copy into the ring (counted rb_full): the
  probe's own cost, without a Python consumer competing for the two cores;
- ``_ignored``: the netns filter set to a namespace nothing is in: the cost every syscall
  pays for traffic the probe does not capture (number filter, fd walk, socket checks);
- ``_drain``: drains every 20 ms and decodes the chunks (Chunk objects), no parsing;
- ``_parse``: also feeds L7Pipeline as the agent does (at saturation Python cannot parse
  four chunks per request: the ring overflows, counted, and the kernel then does less).

Each reports the throughput ratio and, sturdier when other load shares the machine, the
CPU nginx and wrk spend per request against the adjacent baseline (the BPF programs run
inside their syscalls and are charged to them); plus chunks, drops and the consumer's CPU.

Usage: .venv/bin/python bench/l7_syscalls.py [--rounds 5 --seconds 5 --connections 50]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import REPO, cpu_seconds, free_port, nginx, wrk_requests

sys.path.insert(0, str(REPO))
SRC = REPO / "bpf_src" / "l7_syscalls.bpf.c"
BPF_CFLAGS = ["-target", "bpf", "-g", "-O2", "-mcpu=v3", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
              "-Wno-unused-function", f"-I{REPO / 'build'}", f"-I{REPO / 'bpf_src'}"]  # fmt: skip
DRAIN_S = 0.02  # the agent's L7 drain period


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def worker_pid(master: int) -> int:
    """nginx's one worker (the pinned process that serves)."""
    for _ in range(50):
        kids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.1)
    raise RuntimeError("nginx started no worker")


@dataclass
class Run:
    rps: float
    cpu_us_per_request: float  # nginx worker + wrk, user + system (the probes run in their syscalls)


def wrk(port: int, seconds: int, connections: int, nginx_worker: int) -> Run:
    """Throughput and CPU per request. CPU time is what other load on the machine disturbs
    least: the BPF programs run in the traced tasks' syscalls and are charged to them."""
    n0, w0 = cpu_seconds(nginx_worker), children_cpu()
    requests = wrk_requests(port, seconds, connections)
    cpu = cpu_seconds(nginx_worker) - n0 + children_cpu() - w0
    return Run(requests / seconds, 1e6 * cpu / max(1, requests))


def consume(object_path: str, mode: str) -> int:
    """Child process: load the fallback, drain and parse until SIGTERM, print what it saw."""
    from node_exporter.l7.pipeline import L7Pipeline
    from node_exporter.l7.syscalls import SyscallL7Collector

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    pipe = L7Pipeline()
    chunks = events = 0
    with SyscallL7Collector(object_path, netns_ino=1 if mode == "ignored" else 0) as coll:
        print("ready", flush=True)
        cpu0 = time.process_time()
        while not stop:
            time.sleep(DRAIN_S)
            if mode in ("probe", "ignored"):
                continue
            batch = coll.poll()
            chunks += len(batch)
            if mode == "parse":
                events += len(pipe.feed(batch))
        stats = coll.kernel_stats()
        cpu = time.process_time() - cpu0
    print(json.dumps({"chunks": chunks, "requests": events, "cpu_s": cpu, "rb_full": stats["rb_full"],
                      "captured": stats["captured"], "gaps": pipe.counters()["gaps"]}), flush=True)  # fmt: skip
    return 0


class Consumer:
    def __init__(self, object_path: Path, mode: str) -> None:
        self.object_path = object_path
        self.mode = mode

    def __enter__(self) -> Consumer:
        cmd = [sys.executable, __file__, "--consume", str(self.object_path), "--mode", self.mode]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"consumer for {self.object_path} exited: {self.proc.wait()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        self.result = json.loads(out.strip().splitlines()[-1])


def build_variants(tmp: Path) -> dict[str, tuple[Path, str]]:
    shipped = REPO / "build" / "bpf" / "l7_syscalls.bpf.o"
    if not shipped.exists():
        raise SystemExit("bench: build/bpf/l7_syscalls.bpf.o missing (run make setup)")
    per_syscall = tmp / "l7_syscalls_per_tp.bpf.o"
    subprocess.run(["clang-19", *BPF_CFLAGS, "-DL7_SYS_PER_SYSCALL_TP", "-c", str(SRC), "-o", str(per_syscall)],
                   check=True)  # fmt: skip
    objects = {"sys_exit": shipped, "per_syscall": per_syscall}
    return {f"{o}_{m}": (objects[o], m) for o in objects for m in ("probe", "ignored", "drain", "parse")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--variants", default="sys_exit_probe,per_syscall_probe,sys_exit_ignored,per_syscall_ignored,"
                    "sys_exit_drain")  # fmt: skip
    ap.add_argument("--consume", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="drain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.consume:
        return consume(args.consume, args.mode)
    if os.geteuid() != 0:
        print("bench: needs root (loads BPF programs)", file=sys.stderr)
        return 2
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kscope-bench-l7sys-") as tmpdir:
        tmp = Path(tmpdir)
        built = build_variants(tmp)
        variants = {k: built[k] for k in args.variants.split(",")}
        runs: dict[str, list[tuple[Run, Run, dict[str, float]]]] = {k: [] for k in variants}
        with nginx(tmp, port) as server:
            worker = worker_pid(server.pid)
            wrk(port, 1, args.connections, worker)  # warm up
            for _ in range(args.rounds):
                for name, (path, mode) in variants.items():
                    b = wrk(port, args.seconds, args.connections, worker)
                    with Consumer(path, mode) as consumer:
                        v = wrk(port, args.seconds, args.connections, worker)
                        time.sleep(0.2)  # the last drains
                    runs[name].append((b, v, {**consumer.result, "wrk_requests": v.rps * args.seconds}))
    result: dict[str, object] = {
        "baseline_rps_median": round(statistics.median(b.rps for r in runs.values() for b, _, _ in r)),
        "baseline_cpu_us_per_request_median": round(
            statistics.median(b.cpu_us_per_request for r in runs.values() for b, _, _ in r), 3
        ),
    }
    for name, (_, mode) in variants.items():
        rounds = runs[name]
        seen = [c for _, _, c in rounds]
        entry: dict[str, object] = {
            "ratio_median": round(statistics.median(v.rps / b.rps for b, v, _ in rounds), 4),
            "ratio_rounds": [round(v.rps / b.rps, 3) for b, v, _ in rounds],
            # nginx + wrk CPU per request with the probe minus the adjacent baseline's
            "added_cpu_us_per_request_median": round(
                statistics.median(v.cpu_us_per_request - b.cpu_us_per_request for b, v, _ in rounds), 3
            ),
            "cpu_ratio_median": round(
                statistics.median(v.cpu_us_per_request / b.cpu_us_per_request for b, v, _ in rounds), 4
            ),
            # chunks the probe produced (sent or dropped) per request: 4 when both ends see every call
            "probe_chunks_per_request_median": round(
                statistics.median((c["captured"] + c["rb_full"]) / c["wrk_requests"] for c in seen), 3
            ),
            "rb_full_per_round": [int(c["rb_full"]) for c in seen],
        }
        if mode in ("drain", "parse"):
            entry["delivered_chunks_per_request_median"] = round(
                statistics.median(c["chunks"] / c["wrk_requests"] for c in seen), 3
            )
            entry["consumer_cpu_us_per_chunk_median"] = round(
                statistics.median(1e6 * c["cpu_s"] / max(1, c["chunks"]) for c in seen), 3
            )
        if mode == "parse":
            # both ends are traced: each request is two parsed records (nginx and wrk)
            entry["parsed_per_request_median"] = round(
                statistics.median(c["requests"] / c["wrk_requests"] for c in seen), 3
            )
        result[name] = entry
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
