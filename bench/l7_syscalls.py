#!/usr/bin/env python3
"""What the syscall-exit L7 fallback costs, and which hook it should use.

Same method as bench/overhead.py (shared/KERNEL.md): nginx `return 200`, one worker
pinned to core 0, wrk on core 1 over keep-alive loopback connections, runs interleaved
(baseline, then each variant, per round) and the median of the per-round throughput
ratios reported, because absolute figures drift a lot on these machines. Variants:

- ``raw_tp``: build/bpf/l7_syscalls.bpf.o as shipped, one raw tracepoint on every
  syscall's exit filtered on the syscall number;
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

Each reports chunks, parsed requests, drops and the consumer's CPU seconds.

Usage: .venv/bin/python bench/l7_syscalls.py [--rounds 5 --seconds 5 --connections 50]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SRC = REPO / "bpf_src" / "l7_syscalls.bpf.c"
BPF_CFLAGS = ["-target", "bpf", "-g", "-O2", "-mcpu=v3", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
              "-Wno-unused-function", f"-I{REPO / 'build'}", f"-I{REPO / 'bpf_src'}"]  # fmt: skip
DRAIN_S = 0.02  # the agent's L7 drain period

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


def wrk(port: int, seconds: int, connections: int) -> float:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    return int(m.group(1)) / seconds


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
    objects = {"raw_tp": shipped, "per_syscall": per_syscall}
    return {f"{o}_{m}": (objects[o], m) for o in objects for m in ("probe", "ignored", "drain", "parse")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--variants", default="raw_tp_probe,per_syscall_probe,raw_tp_ignored,per_syscall_ignored,"
                    "raw_tp_drain,raw_tp_parse")  # fmt: skip
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
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port))
        nginx = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
        ratios: dict[str, list[float]] = {k: [] for k in variants}
        seen: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        base: list[float] = []
        try:
            time.sleep(1.0)
            wrk(port, 1, args.connections)  # warm up
            for _ in range(args.rounds):
                b = wrk(port, args.seconds, args.connections)
                base.append(b)
                for name, (path, mode) in variants.items():
                    with Consumer(path, mode) as consumer:
                        rps = wrk(port, args.seconds, args.connections)
                        time.sleep(0.2)  # the last drains
                    ratios[name].append(rps / b)
                    r = consumer.result
                    seen[name].append({**r, "wrk_requests": rps * args.seconds})
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=10)
    result: dict[str, object] = {"baseline_rps_median": round(statistics.median(base))}
    for name in variants:
        rounds = seen[name]
        result[name] = {
            "ratio_median": round(statistics.median(ratios[name]), 4),
            "ratio_rounds": [round(r, 3) for r in ratios[name]],
            # both ends are traced: each request is two parsed records (nginx and wrk)
            "parsed_per_request_median": round(statistics.median(r["requests"] / r["wrk_requests"] for r in rounds), 3),
            "chunks_per_request_median": round(statistics.median(r["chunks"] / r["wrk_requests"] for r in rounds), 3),
            "consumer_cpu_us_per_chunk_median": round(
                statistics.median(1e6 * r["cpu_s"] / max(1, r["chunks"]) for r in rounds), 3
            ),
            # chunks the probe produced (sent or dropped) per request: 4 when both ends see every call
            "probe_chunks_per_request_median": round(
                statistics.median((r["captured"] + r["rb_full"]) / r["wrk_requests"] for r in rounds), 3
            ),
            "rb_full_per_round": [int(r["rb_full"]) for r in rounds],
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
