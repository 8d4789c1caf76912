"""ProcessIndex over a fake procfs built in tmp_path, and over the real /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_exporter.metadata.cgroup import HOST, ContainerIdentity, parse_cgroup_file
from node_exporter.metadata.proc import ProcessIndex, ProcessInfo
from tests.helpers import eventually

CID = "3f2b8c1d9e0a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
POD_UID = "8d4c2f1e-7b3a-4e9d-a1c2-5f6e7d8c9b0a"
CONTAINERD_IN_POD = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
)
HOST_CGROUP = "0::/user.slice/user-0.slice/session-1.scope\n"
IN_POD = ContainerIdentity(CID, POD_UID, "containerd")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_process(root: Path, pid: int, comm: str | None = "nginx", cgroup: str | None = CONTAINERD_IN_POD) -> Path:
    proc = root / str(pid)
    proc.mkdir(parents=True, exist_ok=True)
    if comm is not None:
        (proc / "comm").write_text(comm + "\n")
    if cgroup is not None:
        (proc / "cgroup").write_text(cgroup)
    return proc


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    return tmp_path / "proc"


def test_container_process(proc_root: Path) -> None:
    make_process(proc_root, 4242)
    index = ProcessIndex(str(proc_root))
    assert index.lookup(4242, comm_hint="ngin") == ProcessInfo(4242, "nginx", IN_POD)
    assert (index.hits, index.misses, index.reads, len(index)) == (0, 0, 1, 1)


def test_host_process(proc_root: Path) -> None:
    make_process(proc_root, 1, comm="systemd", cgroup=HOST_CGROUP)
    info = ProcessIndex(str(proc_root)).lookup(1)
    assert info == ProcessInfo(1, "systemd", HOST)
    assert info.identity.is_host


def test_second_lookup_is_a_cache_hit_without_io(proc_root: Path) -> None:
    proc = make_process(proc_root, 4242)
    index = ProcessIndex(str(proc_root))
    first = index.lookup(4242)
    shutil.rmtree(proc)  # gone from "procfs": only the cache can answer now
    assert index.lookup(4242) is first
    assert (index.hits, index.misses) == (1, 0)


def test_exited_process_returns_hint_and_counts_a_miss(proc_root: Path) -> None:
    proc_root.mkdir()
    index = ProcessIndex(str(proc_root))
    assert index.lookup(31337, comm_hint="curl") == ProcessInfo(31337, "curl", HOST)
    assert (index.hits, index.misses, index.reads, len(index)) == (0, 1, 0, 0)


def test_a_miss_is_not_cached_so_a_new_process_is_seen(proc_root: Path) -> None:
    proc_root.mkdir()
    index = ProcessIndex(str(proc_root))
    assert index.lookup(500, comm_hint="old").identity == HOST
    make_process(proc_root, 500)
    assert index.lookup(500) == ProcessInfo(500, "nginx", IN_POD)


def test_missing_proc_root_never_raises(tmp_path: Path) -> None:
    index = ProcessIndex(str(tmp_path / "no-such-dir"))
    assert index.lookup(7, comm_hint="x") == ProcessInfo(7, "x", HOST)
    assert index.misses == 1


def test_unreadable_cgroup_is_a_miss(proc_root: Path) -> None:
    proc = make_process(proc_root, 77, cgroup=None)
    (proc / "cgroup").mkdir()  # EISDIR: unreadable even for root, unlike chmod 000
    index = ProcessIndex(str(proc_root))
    assert index.lookup(77, comm_hint="hint") == ProcessInfo(77, "hint", HOST)
    assert index.misses == 1


@pytest.mark.parametrize("comm", [None, ""], ids=["comm-vanished", "comm-empty"])
def test_missing_comm_falls_back_to_the_hint_but_keeps_the_identity(proc_root: Path, comm: str | None) -> None:
    make_process(proc_root, 88, comm=comm)
    assert ProcessIndex(str(proc_root)).lookup(88, comm_hint="hint") == ProcessInfo(88, "hint", IN_POD)


def test_garbage_cgroup_file_is_a_host_identity(proc_root: Path) -> None:
    proc = make_process(proc_root, 99, cgroup=None)
    (proc / "cgroup").write_bytes(b"\xff\xfe\x00garbage:\n" * 10_000)
    assert ProcessIndex(str(proc_root)).lookup(99) == ProcessInfo(99, "nginx", HOST)


@pytest.mark.parametrize("pid", [0, -1])
def test_pid_zero_does_no_io(tmp_path: Path, pid: int) -> None:
    index = ProcessIndex(str(tmp_path / "no-such-dir"))
    assert index.lookup(pid, comm_hint="swapper/3") == ProcessInfo(pid, "swapper/3", HOST)
    assert (index.hits, index.misses, index.reads, len(index)) == (0, 0, 0, 0)


def test_entries_expire_after_ttl(proc_root: Path) -> None:
    make_process(proc_root, 10, comm="before")
    clock = FakeClock()
    index = ProcessIndex(str(proc_root), ttl=30.0, timer=clock)
    assert index.lookup(10).comm == "before"
    make_process(proc_root, 10, comm="after")  # the PID was reused
    clock.now += 29.0
    assert index.lookup(10).comm == "before"
    clock.now += 2.0
    assert len(index) == 0
    assert index.lookup(10).comm == "after"


def test_forget_drops_a_pid_at_once(proc_root: Path) -> None:
    make_process(proc_root, 10, comm="before")
    index = ProcessIndex(str(proc_root))
    index.lookup(10)
    make_process(proc_root, 10, comm="after")
    index.forget(10)
    index.forget(12345)  # unknown PIDs are fine
    assert index.lookup(10).comm == "after"


def test_size_stays_bounded(proc_root: Path) -> None:
    maxsize = 8
    for pid in range(1, 101):
        make_process(proc_root, pid, comm=f"p{pid}")
    index = ProcessIndex(str(proc_root), maxsize=maxsize)
    for pid in range(1, 101):
        assert index.lookup(pid).comm == f"p{pid}"
        assert len(index) <= maxsize
    assert len(index) == maxsize
    assert index.reads == 100


def test_maxsize_below_one_is_rejected_up_front() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        ProcessIndex(maxsize=0)


# --- the real /proc ---------------------------------------------------------------------------


def _comm_from_stat(pid: int) -> str:
    # /proc/PID/stat is a second, independent source: "pid (comm) state ..."; comm may hold ")".
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.index("(") + 1 : stat.rindex(")")]


def test_real_proc_for_this_process() -> None:
    pid = os.getpid()
    info = ProcessIndex().lookup(pid, comm_hint="not-this")
    assert info.comm == _comm_from_stat(pid)
    assert info.comm != "not-this"
    assert info.identity == parse_cgroup_file(Path(f"/proc/{pid}/cgroup").read_text())


@pytest.fixture
def named_child(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    # The kernel names a task after the file it was exec'd from, so a symlink gives a known comm.
    sleep = shutil.which("sleep")
    if sleep is None:
        pytest.skip("no sleep binary")
    link = tmp_path / "kscope-probe"
    link.symlink_to(sleep)
    child = subprocess.Popen([str(link), "30"])
    try:
        # Popen returns once the child is forked; until it has exec'd, its name is still ours
        eventually(lambda: Path(f"/proc/{child.pid}/comm").read_text().strip() == "kscope-probe", "the child's exec")
        yield child
    finally:
        child.kill()
        child.wait()


def test_real_proc_for_a_child_with_a_known_name(named_child: subprocess.Popen[bytes]) -> None:
    index = ProcessIndex()
    assert index.lookup(named_child.pid).comm == "kscope-probe"
    named_child.kill()
    named_child.wait()  # reaped: /proc/PID is gone
    index.forget(named_child.pid)
    assert index.lookup(named_child.pid, comm_hint="gone") == ProcessInfo(named_child.pid, "gone", HOST)
    assert index.misses == 1
