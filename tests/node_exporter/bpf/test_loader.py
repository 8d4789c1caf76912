"""The loader against this kernel: every attach kind we use, and every bad input."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_exporter.bpf import libbpf as lb
from node_exporter.bpf.loader import BpfObject
from node_exporter.errors import HookUnavailableError, ObjectFileError

pytestmark = pytest.mark.bpf

CAPS = {
    "ok_prog": "ok",
    "sockops_prog": "sockops",
    "uprobe_prog": "uprobe",
    "missing_prog": "missing",
    "fentry_prog": "fentry",
    "task_iter_prog": "iter",
    "missing_iter_prog": "missing_iter",
}


def _hits(obj: BpfObject) -> list[int]:
    fd = obj.map_fd("hits")
    out = []
    for i in range(5):
        key, value = ctypes.c_uint32(i), ctypes.c_uint64()
        lb.check_int(lb.lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)), "lookup")
        out.append(value.value)
    return out


@pytest.fixture
def fixture_obj(bpf_dir: Path) -> Path:
    return bpf_dir / "fixtures" / "degrade.bpf.o"


@pytest.fixture
def degraded(fixture_obj: Path) -> Iterator[BpfObject]:
    obj = BpfObject(fixture_obj, capabilities=CAPS, required=frozenset({"ok"}), knobs={"knob_increment": 7})
    yield obj
    obj.close()


def test_missing_and_refused_hooks_disable_only_their_capability(degraded: BpfObject) -> None:
    assert set(degraded.report.disabled) == {"missing", "fentry", "missing_iter"}
    assert "no tracepoint kscope_no_such_tracepoint" in degraded.report.disabled["missing"]
    assert "refused" in degraded.report.disabled["fentry"]
    assert "no BPF iterator kscope_no_such_iterator" in degraded.report.disabled["missing_iter"]
    assert degraded.report.enabled == {"ok", "sockops", "uprobe", "iter"}


def test_an_iterator_without_a_map_runs_and_detaches(degraded: BpfObject) -> None:
    link = degraded.attach_iter("task_iter_prog")
    assert BpfObject.run_iter(link) == b""  # it writes nothing, it counts
    tasks = _hits(degraded)[4]
    assert tasks >= 7 * len(os.listdir("/proc/self/task"))  # at least our own threads, 7 per hit (the knob)
    degraded.detach(link)
    degraded.detach(link)  # twice is harmless
    assert _hits(degraded)[4] == tasks


def test_tp_btf_sockops_uprobe_and_knob_all_work(degraded: BpfObject) -> None:
    libc = ctypes.util.find_library("c")
    assert libc
    libc_path = next(p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                                 "/lib/aarch64-linux-gnu/libc.so.6") if os.path.exists(p))  # fmt: skip
    degraded.attach_uprobe("uprobe_prog", libc_path, "getpid", pid=os.getpid())
    before = _hits(degraded)
    os.getpid()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()) as cli:
            cli.sendall(b"x")
    after = _hits(degraded)
    # every hit adds the knob's value (7): the const volatile global was set before load
    assert after[0] - before[0] >= 7 and (after[0] - before[0]) % 7 == 0  # tp_btf send
    assert after[1] - before[1] >= 7  # sockops on the cgroup v2 root saw our connect
    assert after[2] - before[2] >= 7  # uprobe on libc getpid
    assert after[3] == 0  # the disabled programs never ran


def test_required_capability_missing_is_a_clear_error(fixture_obj: Path) -> None:
    caps = dict(CAPS)
    with pytest.raises(HookUnavailableError, match="required capability missing unavailable"):
        BpfObject(fixture_obj, capabilities=caps, required=frozenset({"missing"}))


def test_uprobe_on_missing_symbol_is_a_clear_error(degraded: BpfObject) -> None:
    with pytest.raises(HookUnavailableError, match="uprobe"):
        degraded.attach_uprobe("uprobe_prog", "/bin/true", "kscope_no_such_symbol")


def test_missing_object_file(tmp_path: Path) -> None:
    with pytest.raises(ObjectFileError, match="does not exist"):
        BpfObject(tmp_path / "nope.bpf.o")


def test_garbage_object_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bpf.o"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ObjectFileError, match="not an ELF"):
        BpfObject(junk)


def test_elf_for_another_machine(tmp_path: Path) -> None:
    exe = tmp_path / "true.o"
    shutil.copy("/bin/true", exe)
    with pytest.raises(ObjectFileError, match="not BPF"):
        BpfObject(exe)


def test_truncated_bpf_object(tmp_path: Path, bpf_dir: Path) -> None:
    whole = (bpf_dir / "l4.bpf.o").read_bytes()
    cut = tmp_path / "cut.bpf.o"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(ObjectFileError, match="not a valid BPF object"):
        BpfObject(cut)


def test_unknown_knob_is_a_clear_error(fixture_obj: Path) -> None:
    with pytest.raises(ObjectFileError, match="no knob nonexistent"):
        BpfObject(fixture_obj, capabilities=CAPS, required=frozenset({"ok"}), knobs={"nonexistent": 1})


def test_close_detaches_everything(fixture_obj: Path) -> None:
    obj = BpfObject(fixture_obj, capabilities=CAPS, required=frozenset({"ok"}))
    fd = obj.map_fd("hits")
    obj.close()
    obj.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)


def test_capability_turned_off_is_neither_loaded_nor_attached(fixture_obj: Path) -> None:
    obj = BpfObject(fixture_obj, capabilities=CAPS, required=frozenset({"ok"}), off={"sockops": "turned off (flag)"})
    try:
        assert obj.report.disabled["sockops"] == "turned off (flag)"
        assert "sockops" not in obj.report.enabled and "ok" in obj.report.enabled
        assert all(cap != "sockops" for cap, _ in obj._links)
    finally:
        obj.close()
