"""``kscope run``'s resolution cache: keyed by what a local name reads (pid, comm, cgroup id, ports).

Random batches over a /proc tree written as the kernel shows it, aggregated with the cache give exactly
what resolving every record afresh gives, also while servers appear at addresses asked about before,
a pid starts running another program, and with tiny bounds (dropped tables counted). Then the same
with real processes: one exits, another gets its pid, and is named for itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_processor.aggregate import NodeReport
from cluster_processor.otlp import model
from cluster_processor.resolved import attr
from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import to_columns
from node_exporter.local.identity import PROCESS_EXECUTABLE_PATH
from node_exporter.local.namer import LocalNamer
from node_exporter.local.pipeline import LocalPipeline, local_settings

T0 = 1_700_000_000_000_000_000
S = 1_000_000_000
HOST_IPS = ["198.18.0.1", "198.18.0.2", "127.0.0.1"]
OTHER = ["198.19.7.7", "198.19.8.8"]  # no socket of this host: external
PROGRAMS = [("nginx", "0::/system.slice/nginx.service\n", "/usr/sbin/nginx"),
            ("curl", "0::/user.slice/session-1.scope\n", "/usr/bin/curl"),
            ("redis-server", "0::/system.slice/redis.service\n", "/usr/bin/redis-server"),
            ("python3", "0::/user.slice/session-1.scope\n", "/usr/bin/python3")]  # fmt: skip


def write_process(proc: Path, pid: int, program: int, started: int) -> None:
    comm, cgroup, exe = PROGRAMS[program]
    d = proc / str(pid)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    (d / "exe").symlink_to(f"{exe}{started}")  # the start time shows in the name: a new program is seen
    # /proc/PID/stat: "pid (comm) state ppid ..." with the start time (field 22) in clock ticks
    (d / "stat").write_text(f"{pid} ({comm}) S 1 " + " ".join(["0"] * 17) + f" {started} 0 0\n")


# port -> the pid serving it; an ephemeral port's owner is one pid too: an owner that changed would
# move the namer's generation by itself and hide a cache that misses the other reasons to
SERVERS = {80: 10, 8080: 11, 6379: 12}


def record_process(r: random.Random, programs: dict[int, int], port: int = 0) -> pb.ProcessIdentity:
    if r.random() < 0.08:
        return pb.ProcessIdentity()  # a socket no process touched: named by its address's owner
    pid = SERVERS.get(port) or (10 + port % len(programs) if port else r.choice(list(programs)))
    return pb.ProcessIdentity(pid=pid, comm=PROGRAMS[programs[pid]][0], cgroup_id=100 + programs[pid])


def local_end(r: random.Random, programs: dict[int, int]) -> dict[str, object]:
    """A local address and port and the process there (an ephemeral port, 32768-33000, is also asked
    about as a remote, before and after a socket there is seen); 0.0.0.0 only for port 8080's listener."""
    port = r.choice([80, 6379, 8080, r.randint(32768, 33000), r.randint(32768, 33000)])
    ip = "0.0.0.0" if port == 8080 and r.random() < 0.5 else r.choice(HOST_IPS)
    return {"local_ip": ip, "local_port": port, "process": record_process(r, programs, port)}


def random_batch(r: random.Random, k: int, programs: dict[int, int]) -> pb.FlowBatch:
    flows = []
    for _ in range(r.randrange(20, 60)):
        remote = r.choice([*HOST_IPS, *OTHER, "::ffff:198.18.0.2"])
        role = r.choice([pb.ROLE_CLIENT, pb.ROLE_SERVER, pb.ROLE_LISTENER])
        fl = pb.L4Flow(socket_cookie=r.randrange(1, 40), role=role,
                       remote_ip=remote, remote_port=r.choice([80, 6379, 8080, r.randint(32768, 33000)]), ip_family=4,
                       time_unix_nano=T0 + k * S, **local_end(r, programs),
                       connect_status=r.choice([0, pb.CONNECT_STATUS_OK, pb.CONNECT_STATUS_REFUSED]))  # fmt: skip
        fl.delta.bytes_sent = r.randint(0, 10**5)
        if r.random() < 0.2:  # --nat: conntrack's answer (a local server, or not) names the remote
            fl.nat_remote_ip, fl.nat_remote_port = r.choice([*HOST_IPS, *OTHER]), r.choice([0, 80, 8080])
        flows.append(fl)
    b = pb.FlowBatch(schema_version=2, node_name="host", time_unix_nano=T0 + k * S, l4_columns=to_columns(flows))
    for _ in range(r.randrange(0, 30)):
        q = pb.L7Request(socket_cookie=r.randrange(1, 40), side=r.choice([pb.ROLE_CLIENT, pb.ROLE_SERVER]),
                         protocol="http1", ip_family=4, **local_end(r, programs),
                         remote_ip=r.choice([*HOST_IPS, *OTHER]),
                         remote_port=r.choice([80, 8080, r.randint(32768, 33000)]),
                         start_time_unix_nano=T0 + k * S, latency_ns=r.randint(1, 10**8))  # fmt: skip
        q.http.method, q.http.status_code = "GET", r.choice([200, 503])
        b.l7.append(q)
    return b


@pytest.mark.parametrize(("seed", "limit"), [(1, 16_384), (2, 16_384), (3, 4), (4, 1)])
def test_cached_local_names_equal_resolving_every_record(tmp_path: Path, seed: int, limit: int) -> None:
    r = random.Random(seed)
    proc = tmp_path / "proc"
    programs = {pid: pid % len(PROGRAMS) for pid in range(10, 22)}
    for pid, program in programs.items():
        write_process(proc, pid, program, started=1000)
    reference = LocalPipeline("host", LocalNamer(str(proc), str(tmp_path)), settings=local_settings(1.0, 0))
    cached = LocalPipeline("host", LocalNamer(str(proc), str(tmp_path)), settings=local_settings(1.0, limit))
    for k in range(8):
        if k == 4:  # pid 10 exits and pid 10 is given to another program of the same name and cgroup
            write_process(proc, 10, programs[10], started=2000)
        batches = [random_batch(r, k, programs) for _ in range(3)]
        want: list[NodeReport] = []
        got: list[NodeReport] = []
        for pipeline, out in ((reference, want), (cached, got)):
            model._RNG.seed(k)
            for b in batches:
                pipeline.submit(b)
            out.extend(pipeline.flush(T0 + (k + 1) * S))
        assert got == want, k
        sizes = cached.aggregator.resolutions.sizes()
        assert max(sizes["locals"], sizes["remotes"], sizes["routes"]) <= limit
    assert cached.aggregator.counters() == reference.aggregator.counters()
    assert cached.namer.counters()["pids_reused"] == 1
    counters = cached.counters()
    assert (counters["resolutions_cleared"] > 0) == (limit < 100), counters
    assert reference.aggregator.counters()["external_remote"] > 0  # the batches reach every kind of end


@contextlib.contextmanager
def at_pid(pid: int, argv: list[str]) -> Iterator[subprocess.Popen[bytes] | None]:
    """``argv`` started as ``pid`` (the kernel's next pid set through ns_last_pid, which needs root in
    the initial pid namespace); None when other processes kept taking it."""
    proc = None
    for _ in range(200):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = subprocess.Popen(argv)
        if proc.pid == pid:
            break
        proc.kill()
        proc.wait()
        proc = None
    try:
        yield proc
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def client_batch(pid: int, comm: str, k: int) -> pb.FlowBatch:
    fl = pb.L4Flow(socket_cookie=k, role=pb.ROLE_CLIENT, local_ip="198.18.0.1", local_port=40000, ip_family=4,
                   remote_ip="198.19.0.9", remote_port=80, process=pb.ProcessIdentity(pid=pid, comm=comm, cgroup_id=1),
                   time_unix_nano=T0 + k * S)  # fmt: skip
    fl.delta.bytes_sent = 100
    return pb.FlowBatch(schema_version=2, node_name="host", time_unix_nano=T0 + k * S, l4_columns=to_columns([fl]))


@pytest.mark.skipif(os.geteuid() != 0, reason="sets the next pid (ns_last_pid): root")
def test_a_pid_reused_by_another_program_is_named_for_it(tmp_path: Path) -> None:
    """Two copies of sleep named alike (same comm, same cgroup, same socket address): only the
    executable tells them apart. The first exits, the second gets its pid: the edge names the second."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy("/bin/sleep", tmp_path / d / "napper")
    first = subprocess.Popen([str(tmp_path / "a" / "napper"), "60"])
    pipeline = LocalPipeline("host", LocalNamer())  # the real /proc

    def exe_named(pid: int, k: int) -> str:
        pipeline.submit(client_batch(pid, "napper", k))
        (report,) = pipeline.flush(T0 + (k + 1) * S)
        return str(attr(report.interval.l4[0].edge.client, PROCESS_EXECUTABLE_PATH))

    try:
        assert exe_named(first.pid, 1) == str(tmp_path / "a" / "napper")
        # A start time is in clock ticks (10 ms): a pid taken again within its predecessor's tick would
        # look the same (pids cycle through tens of thousands first on a real host).
        time.sleep(0.05)
    finally:
        first.kill()
        first.wait()
    with at_pid(first.pid, [str(tmp_path / "b" / "napper"), "60"]) as second:
        if second is None:
            pytest.fail(f"pid {first.pid} was taken by other processes 200 times: cannot reuse it", pytrace=False)
        assert exe_named(first.pid, 2) == str(tmp_path / "b" / "napper")
    assert pipeline.namer.counters()["pids_reused"] == 1
