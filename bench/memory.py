#!/usr/bin/env python3
"""Memory of the agent and the processor under realistic load, and over a soak at churn (issue 17, item 5).

Goals: agent RSS <= 150 MB with 10,000 live connections and --l7; processor RSS <= 300 MB with 10,000 pods
and 50 nodes reporting; a soak at churn shows no growth past warm-up. Parts (``--only``, default all three):

- ``agent``: nginx in a throw-away server namespace, ``memclient.py`` in a client namespace (a veth pair,
  198.18.40.0/24) holding ``--connections`` keep-alive connections, ``--before`` of them opened before the
  agent starts, one GET on each as it opens and then ``--rate`` GETs/s over all of them (one in ten sent in
  two writes 1 s apart). The real ``kscope-agent --l7`` ships to the real processor. Reported: the agent's
  VmRSS/VmHWM sampled over ``--agent-seconds`` (and RssAnon/RssFile/RssShmem), its BPF maps' memlock (kernel
  memory, not in RSS), and from a second run under tracemalloc (``memtrace.py``) the Python heap's top lines.
- ``processor``: the real ``kscope-processor`` with the test APIServer (the real list/watch protocol) holding
  ``processor.py``'s cluster (``--pods`` pods, 50 nodes) and a counting OTLP receiver; 50 simulated nodes
  send what ``processor.py``'s generator makes (per node per interval ``--l4`` L4 records and ``--l7`` HTTP
  requests, fresh sockets and ids every interval) over gRPC, gzip, as agents do, for ``--intervals`` export
  intervals; then ``--bound-intervals`` intervals at the processor's span bound (10,000 per node: every node
  sends that many). VmRSS/VmHWM per interval.
- ``soak``: nginx on loopback under wrk, one connection per request (``overhead.py``'s churn), for
  ``--soak-seconds``; ``kscope-agent --l7`` (shipping to the processor) and ``kscope run --no-live`` side by
  side; every process's VmRSS every ``--sample-seconds``. Reported: start (after ``--warmup-seconds``), end,
  max, and the slope of a line fitted past warm-up.

Not part of ``make bench`` (the soak alone is 10 minutes):

    flock /tmp/kscope-bench.lock .venv/bin/python bench/memory.py [--only agent|processor|soak] [--soak-seconds 600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import processor as pbench  # bench/processor.py: the simulated cluster and its batches
from common import REPO, free_port, missing_prerequisite, nginx, nginx_conf

from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer
from tests.cluster_processor.otlp.receiver import SIGNALS, OtlpReceiver
from tests.e2e.netns import Netns, run

VENV = REPO / ".venv" / "bin"
MIB = 2**20
T = TypeVar("T")
# No proxy for the children: gRPC honours http_proxy, and every peer here is on 127.0.0.1.
ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


# ---- reading a process's memory -----------------------------------------------------------------


def status_mem(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (the peak RSS), RssAnon/RssFile/RssShmem in bytes, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def rss_by_mapping(pid: int) -> dict[str, int]:
    """RSS in bytes of the BPF maps the process has mmap'ed (ring buffers: kernel pages the agent reads in
    place, counted in its RssFile, their data area mapped twice) and of the rest, from /proc/PID/smaps."""
    out = {"bpf_map_mmaps": 0, "other": 0}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=6)
        if first and "-" in first[0] and not first[0].endswith(":"):
            name = first[5] if len(first) > 5 else ""
        elif first and first[0] == "Rss:":
            out["bpf_map_mmaps" if "bpf-map" in name else "other"] += int(first[1]) * 1024
    return out


def mib(n: float) -> float:
    return round(n / MIB, 1)


def bpf_memory(pid: int) -> dict[str, Any]:
    """The BPF maps and programs the process holds, by their fdinfo ``memlock`` (kernel memory, charged
    to the memory cgroup, not part of the process's RSS; a ring buffer's pages the process has mmap'ed
    do count in RssShmem/RssFile as well)."""
    maps: dict[int, dict[str, Any]] = {}
    progs: dict[int, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(fd_dir / fd)
            if link not in ("anon_inode:bpf-map", "anon_inode:bpf-prog"):
                continue
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            info = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        except OSError:
            continue
        if link.endswith("map"):
            maps[int(info["map_id"])] = {"type": int(info["map_type"]), "max_entries": int(info["max_entries"]),
                                         "memlock": int(info["memlock"])}  # fmt: skip
        else:
            progs[int(info["prog_id"])] = int(info["memlock"])
    names = {}
    with contextlib.suppress(Exception):
        listed = json.loads(run(["bpftool", "-j", "map", "list"], check=False).stdout or "[]")
        names = {m["id"]: f"{m.get('name', '?')} ({m.get('type', '?')})" for m in listed}
    top = sorted(maps.items(), key=lambda kv: kv[1]["memlock"], reverse=True)[:8]
    return {
        "maps": len(maps),
        "maps_memlock_mib": mib(sum(m["memlock"] for m in maps.values())),
        "programs": len(progs),
        "programs_memlock_mib": mib(sum(progs.values())),
        "largest_maps_mib": {names.get(i, str(i)): mib(m["memlock"]) for i, m in top},
    }


def fitted_slope(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) in MiB per minute."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60 / MIB, 3) if den else 0.0


# ---- processes ---------------------------------------------------------------------------------


class Proc:
    """A kscope program with its stderr in a file (a long run must never block on a full pipe), started
    once a log line shows up; stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], tmp: Path, ready: str, env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.ready = name, cmd, ready
        self.log = tmp / f"{name}.log"
        self.env = env or ENV
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Proc:
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err, env=self.env)
        self.wait_log(self.ready, 60)
        return self

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {text!r} (exit {self.proc.poll()}):\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def mem(self) -> dict[str, int]:
        return status_mem(self.pid)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Sampler:
    """VmRSS of one process every ``every`` seconds, in a thread: (seconds since start, bytes)."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid, self.every = pid, every
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.points.append((self.elapsed(), status_mem(self.pid)["VmRSS"]))
            self._stop.wait(self.every)

    def windows(self, seconds: float) -> list[float]:
        """The largest sample of each ``seconds``-long window, in MiB."""
        out: dict[int, int] = {}
        for t, v in self.points:
            out[int(t // seconds)] = max(out.get(int(t // seconds), 0), v)
        return [mib(v) for _, v in sorted(out.items())]

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def agent_counters(port: int) -> dict[str, float]:
    text = scrape(port)
    return {m[1]: float(m[2]) for m in re.finditer(r'^kscope_agent_counter\{name="([^"]+)"\} ([\d.e+]+)$', text, re.M)}


def processor_metrics(port: int) -> dict[str, float]:
    """The processor's self-metrics as ``name{labels}`` -> value (counters' ``_total`` kept)."""
    out = {}
    for line in scrape(port).splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def agent_cmd(metrics_port: int, processor: int, *extra: str) -> list[str]:
    return ["--l7", "--interval", "1", "--metrics-port", str(metrics_port), "--processor",
            f"127.0.0.1:{processor}", "--node-name", "node-000", *extra]  # fmt: skip


# ---- the processor's peers: test APIServer and OTLP receiver, in a thread of this process ----------


class CountingReceiver(OtlpReceiver):
    """The test OTLP receiver, counting items and forgetting the requests (a long run would keep GBs)."""

    def __init__(self) -> None:
        super().__init__()
        self.totals = dict.fromkeys(SIGNALS, 0)
        self.series = 0  # the processor's own kscope.otlp.series gauge, last seen
        self.series_max = 0
        self.overflowed: dict[str, int] = {}  # kscope.otlp.cardinality.overflowed per metric, last seen

    async def handle(self, signal: str, request: Any, context: grpc.aio.ServicerContext, response: Any) -> Any:
        out = await super().handle(signal, request, context, response)
        self.totals[signal] += self.items(signal)
        if signal == "metrics":
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name == "kscope.otlp.series" and m.gauge.data_points:
                            self.series = int(m.gauge.data_points[-1].as_int)
                            self.series_max = max(self.series_max, self.series)
                        elif m.name == "kscope.otlp.cardinality.overflowed":
                            for dp in m.sum.data_points:
                                key = next((a.value.string_value for a in dp.attributes), "")
                                self.overflowed[key] = int(dp.as_int)
        self.received[signal].clear()
        self.calls.clear()
        return out


class Backend:
    """The test APIServer holding ``cluster`` and the counting OTLP receiver, on an event loop of their own."""

    def __init__(self, cluster: pbench.Cluster, tmp: Path) -> None:
        self.cluster, self.tmp = cluster, tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="backend", daemon=True)
        self.api = FakeApiServer()
        self.rx = CountingReceiver()
        self.kubeconfig = tmp / "kubeconfig"

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    async def _start(self) -> None:
        await self.api.start()
        for kind, raw in self.cluster.iter_raw():
            self.api.put(kind, raw)
        self.api.write_kubeconfig(self.kubeconfig)
        await self.rx.start()

    async def _stop(self) -> None:
        await self.rx.stop()
        await self.api.close()

    def __enter__(self) -> Backend:
        self.thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def processor(self, interval_s: float, trace: Path | None = None) -> ProcessorProc:
        return ProcessorProc(self, interval_s, trace)


class ProcessorProc(Proc):
    def __init__(self, backend: Backend, interval_s: float, trace: Path | None = None) -> None:
        """``trace``: run it under ``memtrace.py`` with this snapshot prefix."""
        self.port, self.metrics_port = free_port(), free_port()
        env = ENV | {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{backend.rx.endpoint}", "NODE_NAME": "node-000"}
        cmd = [str(VENV / "kscope-processor"), "--listen", f"127.0.0.1:{self.port}",
               "--kubeconfig", str(backend.kubeconfig), "--interval", str(interval_s),
               "--metrics-port", str(self.metrics_port)]  # fmt: skip
        if trace is not None:
            cmd = [str(VENV / "python"), str(Path(__file__).with_name("memtrace.py")), str(trace), "1",
                   "kscope-processor", *cmd[1:]]  # fmt: skip
        super().__init__("processor", cmd, backend.tmp, "processor_started", env)
        self.pods = backend.cluster.pods

    def __enter__(self) -> ProcessorProc:
        super().__enter__()
        deadline = time.monotonic() + 120
        while processor_metrics(self.metrics_port).get('kscope_processor_kube_index_size{table="pods"}') != self.pods:
            if time.monotonic() > deadline:
                raise RuntimeError(f"processor: index not filled with {self.pods} pods:\n{self.tail()}")
            time.sleep(0.5)
        return self

    def counters(self) -> dict[str, float]:
        """Ingest, aggregator and OTLP counters that are not zero."""
        keep = ("kscope_processor_ingest_total", "kscope_processor_aggregator_total", "kscope_processor_otlp_items")
        return {k: v for k, v in processor_metrics(self.metrics_port).items() if v and k.startswith(keep)}


# ---- part 1: the agent with 10,000 live connections ---------------------------------------------------

CLI_IP, SRV_IP, SRV_PORT = "198.18.40.1", "198.18.40.2", 8080


@contextlib.contextmanager
def netns_pair(tmp: Path) -> Iterator[tuple[Netns, Netns, list[subprocess.Popen[Any]]]]:
    """Client and server namespaces joined by a veth pair (198.18.40.0/24); every process started in
    them is in the list, killed (and the namespaces deleted) whatever happens."""
    tag = os.urandom(3).hex()
    cli, srv = Netns(f"ks-{tag}-mcli"), Netns(f"ks-{tag}-msrv")
    procs: list[subprocess.Popen[Any]] = []
    made: list[Netns] = []
    try:
        for ns in (cli, srv):
            run(["ip", "netns", "add", ns.name])
            made.append(ns)
            ns.ip("link", "set", "lo", "up")
        run(["ip", "-n", cli.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", srv.name])
        for ns, ip in ((cli, CLI_IP), (srv, SRV_IP)):
            ns.ip("link", "set", "eth0", "up")
            ns.ip("addr", "add", f"{ip}/24", "dev", "eth0")
        yield cli, srv, procs
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(10)
        for ns in made:
            for pid in run(["ip", "netns", "pids", ns.name], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns.name], check=False)


class MemClient:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def say(self, line: str, expect: str, timeout: float = 300) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.proc.stdout.readline().split()
            if got and got[0] == expect:
                return got
            if not got and self.proc.poll() is not None:
                break
        raise RuntimeError(f"memclient: no {expect!r} after {line!r} (exit {self.proc.poll()})")

    def stats(self) -> dict[str, int]:
        live, requests, responses, errors = map(int, self.say("stats", "stats")[1:])
        return {"live": live, "requests": requests, "responses": responses, "errors": errors}


def established(ns: Netns) -> int:
    return len(ns.run("ss", "-Htn", "state", "established", f"dst {SRV_IP}").stdout.splitlines())


def heap_top(snapshots: list[Path], top: int = 12) -> dict[str, Any]:
    """The Python heap from tracemalloc snapshots: total, top lines, and (two snapshots) the growth."""
    snaps = [tracemalloc.Snapshot.load(str(p)).filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
             for p in snapshots]  # fmt: skip
    last = snaps[-1]

    def where(stat: tracemalloc.Statistic | tracemalloc.StatisticDiff) -> str:
        frame = stat.traceback[0]
        name = frame.filename.replace(str(REPO) + "/", "")
        name = re.sub(r".*/site-packages/", "", name)
        return f"{name}:{frame.lineno}"

    out: dict[str, Any] = {
        "traced_mib": mib(sum(s.size for s in last.statistics("filename"))),
        "top_lines_mib": {where(s): mib(s.size) for s in last.statistics("lineno")[:top]},
        "top_files_mib": {
            re.sub(r".*/site-packages/", "", s.traceback[0].filename.replace(str(REPO) + "/", "")): mib(s.size)
            for s in last.statistics("filename")[:top]
        },
    }
    if len(snaps) > 1:
        diff = last.compare_to(snaps[0], "lineno")
        out["growth_first_to_last_mib"] = mib(sum(d.size_diff for d in diff))
        out["top_growth_kib"] = {where(d): round(d.size_diff / 1024, 1) for d in diff[:top] if d.size_diff > 0}
    return out


def traced(prefix: Path, command: str, args: list[str], tmp: Path, name: str) -> Proc:
    """``command args`` under ``memtrace.py`` (one frame per trace: cheap, enough for the top lines)."""
    cmd = [str(VENV / "python"), str(Path(__file__).with_name("memtrace.py")), str(prefix), "1", command, *args]
    return Proc(name, cmd, tmp, "agent_started")


def snapshot(p: Proc, prefix: Path, k: int) -> Path:
    os.kill(p.pid, signal.SIGUSR1)
    path = Path(f"{prefix}.{k}")
    p.wait_log(f"memtrace_snapshot {path}", 120)
    return path


def agent_part(a: argparse.Namespace, tmp: Path, backend: Backend) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with netns_pair(tmp) as (cli, srv, procs), backend.processor(10.0) as proc:
        conf = tmp / "nginx-ns.conf"
        # holds every connection for the run (16,000 of them, an hour's keep-alive), unpinned
        conf.write_text(
            nginx_conf(
                tmp,
                f"{SRV_IP}:{SRV_PORT}",
                pinned=False,
                connections=16000,
                keepalive_timeout="3600s",
                log_level="warn",
            )
        )
        procs.append(subprocess.Popen(srv.cmd("nginx", "-c", str(conf), "-p", str(tmp)), stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        client_cmd = [str(VENV / "python"), str(Path(__file__).with_name("memclient.py")), SRV_IP, str(SRV_PORT),
                      "--rate", str(a.rate)]  # fmt: skip
        cp = subprocess.Popen(cli.cmd(*client_cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(cp)
        client = MemClient(cp)
        client.say(f"open {a.before}", "open")  # before the agent: found by its walk, not by their connect
        metrics_port = free_port()
        agent = Proc("agent", [str(VENV / "kscope-agent"), *agent_cmd(metrics_port, proc.port)], tmp, "agent_started")
        with agent, Sampler(agent.pid, 1.0) as sampler:
            mem0 = agent.mem()
            client.say(f"open {a.connections}", "open")
            all_open = sampler.elapsed()
            time.sleep(a.agent_seconds)
            end = agent.mem()
            maps = rss_by_mapping(agent.pid)
            counters = agent_counters(metrics_port)
            peak_t, peak = max(sampler.points, key=lambda p: p[1])
            out["agent"] = {
                "established_connections_at_end": established(cli),
                "client": client.stats(),
                "rss_at_start_mib": mib(mem0["VmRSS"]),
                "seconds_to_open_the_rest": round(all_open, 1),
                "rss_max_per_5s_mib": sampler.windows(5.0),
                "rss_end_mib": mib(end["VmRSS"]),
                "hwm_mib": mib(end["VmHWM"]),
                "sampled_peak_mib_at_second": [mib(peak), round(peak_t, 1)],
                "rss_split_end_mib": {k: mib(end[k]) for k in ("RssAnon", "RssFile", "RssShmem")}
                | {f"of_which_{k}": mib(v) for k, v in maps.items()},
                "rss_end_without_bpf_map_mmaps_mib": mib(end["VmRSS"] - maps["bpf_map_mmaps"]),
                "bpf_kernel_memory": bpf_memory(agent.pid),
                "goal_150_mb_met_by_hwm": end["VmHWM"] <= 150e6,
                "goal_150_mb_met_by_steady_rss": max(p[1] for p in sampler.points if p[0] > all_open + 10) <= 150e6,
                "agent_counters": {k: v for k, v in counters.items() if v and k.startswith(("l7_", "l4_", "ship"))},
            }
        if a.tracemalloc:
            prefix = tmp / "agent-heap"
            args = agent_cmd(free_port(), proc.port)
            with traced(prefix, "kscope-agent", args, tmp, "agent-traced") as tp:
                time.sleep(min(a.agent_seconds, 30))
                first = snapshot(tp, prefix, 0)
                time.sleep(min(a.agent_seconds, 30))
                out["agent_heap_tracemalloc"] = {"rss_traced_mib": mib(tp.mem()["VmRSS"]),
                                                 **heap_top([first, snapshot(tp, prefix, 1)])}  # fmt: skip
        out["processor_fed_by_the_agent"] = {"rss_mib": mib(proc.mem()["VmRSS"]), "hwm_mib": mib(proc.mem()["VmHWM"])}
    return out


# ---- part 2: the processor with 10,000 pods and 50 nodes ----------------------------------------------


class Nodes:
    """50 simulated agents: each interval's batches from ``processor.py``'s generators, sent as agents do
    (unary ExportFlows, gzip), a batch refused with UNAVAILABLE (the queue full) retried after a pause."""

    def __init__(self, cluster: pbench.Cluster, port: int) -> None:
        self.flows = pbench.Generator(cluster, seed=1)
        self.requests = pbench.Generator(cluster, seed=2)
        for g in self.requests.nodes:  # the two generators' sockets must not share cookies
            g.next_cookie = 1 << 40
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.unary_unary(
            "/kscope.v1.FlowIngest/ExportFlows", response_deserializer=pb.ExportFlowsResponse.FromString
        )
        self.sent = self.retried = self.records = 0

    def interval(self, l4: int, l7: int) -> list[bytes]:
        pbench.T0 = time.time_ns() - pbench.INTERVAL_NS  # the generator stamps records from T0: make them now
        out = self.flows.flows(1, 1, l4, max(l4 // 3, 1)).intervals[0] if l4 else []
        out += self.requests.requests(1, 1, l7, max(l7 // 5, 1)).intervals[0] if l7 else []
        self.records += 50 * (l4 + l7)
        return out

    def send(self, batches: list[bytes]) -> None:
        for data in batches:
            for _ in range(50):
                try:
                    self.call(data, timeout=30, compression=grpc.Compression.Gzip)
                    self.sent += 1
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    self.retried += 1
                    time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()


def bound_batches(cluster: pbench.Cluster, spans: int) -> list[bytes]:
    """One interval at the processor's span bound: each node's batch of ``spans`` requests (one node's
    generated batch, relabelled per node: generating 50 x 10,000 records takes minutes)."""
    pbench.T0 = time.time_ns() - pbench.INTERVAL_NS
    one = pb.FlowBatch.FromString(pbench.Generator(pbench.Cluster(1, cluster.pods, cluster.deployments), 3)
                                      .requests(1, 1, spans, spans // 5).intervals[0][0])  # fmt: skip
    out = []
    for n in range(cluster.nodes):
        one.node_name = f"node-{n:03d}"
        out.append(one.SerializeToString())
    return out


def processor_part(a: argparse.Namespace, tmp: Path, backend: Backend) -> dict[str, Any]:
    cluster = backend.cluster
    interval = a.processor_interval
    prefix = tmp / "processor-heap" if a.processor_tracemalloc else None
    snaps: list[Path] = []
    with backend.processor(interval, prefix) as proc:
        rss_synced = proc.mem()
        nodes = Nodes(cluster, proc.port)
        per_interval: list[dict[str, float]] = []
        t_next = time.monotonic()
        try:
            for k in range(a.intervals + a.bound_intervals):
                batches = (nodes.interval(a.l4, a.l7) if k < a.intervals
                           else bound_batches(cluster, a.bound_spans))  # fmt: skip
                nodes.send(batches)
                t_next += interval
                time.sleep(max(0.0, t_next - time.monotonic()))
                m = proc.mem()
                per_interval.append(
                    {"rss_mib": mib(m["VmRSS"]), "hwm_mib": mib(m["VmHWM"]), "series": backend.rx.series}
                )
                if prefix is not None and k + 1 in (a.intervals, a.intervals + a.bound_intervals):
                    snaps.append(snapshot(proc, prefix, len(snaps)))
            time.sleep(interval + 1)  # the last interval exported
            end = proc.mem()
            counters = proc.counters()
        finally:
            nodes.close()
    normal, bound = per_interval[: a.intervals], per_interval[a.intervals :]
    heap = {"heap_tracemalloc_realistic_then_bound": heap_top(snaps)} if snaps else {}
    return heap | {
        "cluster": {"pods": cluster.pods, "nodes": cluster.nodes, "deployments": cluster.deployments},
        "load_per_node_per_interval": {"l4_records": a.l4, "l7_requests": a.l7, "interval_s": interval},
        "rss_after_index_sync_mib": mib(rss_synced["VmRSS"]),
        "rss_per_interval_mib": [p["rss_mib"] for p in normal],
        "rss_at_span_bound_per_interval_mib": [p["rss_mib"] for p in bound],
        "metric_series_per_interval": [p["series"] for p in per_interval],
        "hwm_realistic_mib": max((p["hwm_mib"] for p in normal), default=0),
        "hwm_end_mib": mib(end["VmHWM"]),
        "rss_end_mib": mib(end["VmRSS"]),
        "goal_300_mib_met_realistic": max((p["hwm_mib"] for p in normal), default=0) <= 300,
        "goal_300_mib_met_at_span_bound": end["VmHWM"] <= 300 * MIB,
        "batches_sent": nodes.sent,
        "batches_retried_queue_full": nodes.retried,
        "otlp_items_received": dict(backend.rx.totals),
        "metric_series_in_store_last_max": [backend.rx.series, backend.rx.series_max],
        "metric_samples_overflowed": dict(backend.rx.overflowed),
        "processor_counters": counters,
    }


# ---- part 3: the soak at churn ---------------------------------------------------------------------


def soak_part(a: argparse.Namespace, tmp: Path, backend: Backend) -> dict[str, Any]:
    port = free_port()
    procs: dict[str, Proc] = {}
    series: dict[str, list[tuple[float, int]]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(nginx(tmp, port))
        proc = stack.enter_context(backend.processor(10.0))
        procs["processor"] = proc
        metrics_port = free_port()
        agent_args = agent_cmd(metrics_port, proc.port)
        prefix = tmp / "soak-heap"
        if a.soak_trace == "agent":
            procs["agent"] = stack.enter_context(traced(prefix, "kscope-agent", agent_args, tmp, "agent"))
        else:
            procs["agent"] = stack.enter_context(Proc("agent", [str(VENV / "kscope-agent"), *agent_args], tmp,
                                                      "agent_started"))  # fmt: skip
        if a.soak_run:
            run_port = free_port()
            run_cmd = [str(VENV / "kscope"), "run", "--no-live", "--metrics-port", str(run_port)]
            if a.soak_trace == "run":
                procs["kscope_run"] = stack.enter_context(traced(prefix, "kscope", run_cmd[1:], tmp, "kscope-run"))
            else:
                procs["kscope_run"] = stack.enter_context(Proc("kscope-run", run_cmd, tmp, "agent_started"))
        traced_name = {"agent": "agent", "run": "kscope_run"}.get(a.soak_trace or "", "")
        wrk = subprocess.Popen(
            ["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{a.soak_seconds}s", "-H", "Connection: close",
             f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        t0 = time.monotonic()
        snaps: list[tuple[int, Path]] = []  # (RSS when taken, snapshot)
        while wrk.poll() is None:
            now = time.monotonic() - t0
            for name, p in procs.items():
                series.setdefault(name, []).append((now, p.mem()["VmRSS"]))
            if traced_name in procs and now >= a.warmup_seconds:
                snaps.append((series[traced_name][-1][1], snapshot(procs[traced_name], prefix, len(snaps))))
            time.sleep(a.sample_seconds)
        wrk_out = wrk.communicate()[0]
        m = re.search(r"(\d+) requests in", wrk_out)
        agent_c = agent_counters(metrics_port)
        run_c = agent_counters(run_port) if a.soak_run else {}
        hwm = {name: p.mem()["VmHWM"] for name, p in procs.items()}
    out: dict[str, Any] = {
        "seconds": a.soak_seconds,
        "connections_made": int(m.group(1)) if m else None,
        "sample_seconds": a.sample_seconds,
        "warmup_seconds": a.warmup_seconds,
        "agent_counters": {k: v for k, v in agent_c.items() if v},
        "kscope_run_counters": {k: v for k, v in run_c.items() if v},
    }
    for name, pts in series.items():
        warm = [(t, v) for t, v in pts if t >= a.warmup_seconds] or pts
        out[name] = {
            "rss_start_mib": mib(warm[0][1]),
            "rss_end_mib": mib(warm[-1][1]),
            "rss_max_mib": mib(max(v for _, v in pts)),
            "hwm_mib": mib(hwm[name]),
            "growth_after_warmup_mib": mib(warm[-1][1] - warm[0][1]),
            "slope_after_warmup_mib_per_min": fitted_slope(warm),
            "rss_curve_mib": [mib(v) for _, v in pts],
        }
    if len(snaps) >= 2:  # the first against the one taken at the largest RSS
        largest = max(snaps[1:], key=lambda x: x[0])
        out[f"{traced_name}_heap_tracemalloc_first_vs_largest_rss"] = {
            "rss_mib_at_snapshots": [mib(r) for r, _ in snaps],
            **heap_top([snaps[0][1], largest[1]]),
        }
    return out


# ---- CLI ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("agent", "processor", "soak"), action="append")
    ap.add_argument("--connections", type=int, default=10_000, help="agent: live connections (10000)")
    ap.add_argument("--before", type=int, default=5_000, help="agent: of them opened before the agent (5000)")
    ap.add_argument("--rate", type=float, default=300.0, help="agent: GETs/s over the live connections (300)")
    ap.add_argument("--agent-seconds", type=float, default=60.0, help="agent: sampled this long once all are open")
    ap.add_argument("--no-tracemalloc", dest="tracemalloc", action="store_false", help="agent: no heap split run")
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--deployments", type=int, default=500)
    ap.add_argument("--processor-interval", type=float, default=10.0, help="processor --interval (10, its default)")
    ap.add_argument("--intervals", type=int, default=12, help="processor: intervals at the realistic load (12)")
    ap.add_argument("--l4", type=int, default=1000, help="processor: L4 records per node per interval (1000)")
    ap.add_argument("--l7", type=int, default=1000, help="processor: HTTP requests per node per interval (1000)")
    ap.add_argument("--bound-intervals", type=int, default=3, help="processor: intervals at the span bound (3)")
    ap.add_argument("--bound-spans", type=int, default=10_000, help="processor: spans per node then (10000)")
    ap.add_argument("--processor-tracemalloc", action="store_true", help="processor: under tracemalloc (slower)")
    ap.add_argument("--soak-seconds", type=int, default=600, help="soak: how long (600)")
    ap.add_argument("--sample-seconds", type=float, default=10.0)
    ap.add_argument("--warmup-seconds", type=float, default=60.0, help="soak: growth is measured from here (60)")
    ap.add_argument("--no-soak-run", dest="soak_run", action="store_false", help="soak: the agent alone")
    ap.add_argument(
        "--soak-trace", choices=("agent", "run"), help="soak: this one under tracemalloc (a snapshot a sample)"
    )
    a = ap.parse_args()
    why = missing_prerequisite(("nginx", "wrk", "taskset", "bpftool"), "the agent loads BPF programs; namespaces")
    if why:
        print(f"memory: {why}", file=sys.stderr)
        return 2
    only = a.only or ["agent", "processor", "soak"]
    out: dict[str, Any] = {"note": "2 cores shared with other engineers' work: memory figures, not CPU"}
    parts: dict[str, Callable[[argparse.Namespace, Path, Backend], dict[str, Any]]] = {
        "agent": agent_part, "processor": processor_part, "soak": soak_part}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kscope-mem-") as d, \
            Backend(pbench.Cluster(a.nodes, a.pods, a.deployments), Path(d)) as backend:  # fmt: skip
        for name in only:
            t0 = time.monotonic()
            out[name] = parts[name](a, Path(d), backend)
            out[name]["wall_seconds"] = round(time.monotonic() - t0)
            print(json.dumps({name: out[name]}, indent=1), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
