"""End-to-end fixtures: one L4 collector per module, throw-away namespaces per test.

The kernel-availability gate (``bpf`` marker) lives in ``tests/conftest.py`` and runs
before these fixtures are set up.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.netns import Recorder, Topology


@pytest.fixture(scope="module")
def collector() -> Iterator[Any]:
    """The L4 probe, every namespace (tests keep only their own records)."""
    from node_exporter.l4.collector import L4Collector

    c = L4Collector()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def topo() -> Iterator[Topology]:
    """Client and server namespaces on a veth pair; deleted (with their processes) whatever happens."""
    t = Topology()
    try:
        t.create()
        yield t
    finally:
        t.close()


@pytest.fixture
def rec(collector: Any, topo: Topology) -> Recorder:
    """Records of this test's namespaces only; what the collector held before is dropped."""
    inos = {topo.cli.ino, topo.srv.ino}
    r = Recorder(collector, lambda rec: rec.netns_ino in inos)
    r.drain()
    return r


CGROUP2 = Path("/sys/fs/cgroup/unified")


@pytest.fixture
def pod_cgroup() -> Iterator[tuple[Path, str, str]]:
    """A systemd-driver kubelet cgroup for one containerd container: (scope dir, pod uid, container id)."""
    root = CGROUP2 if (CGROUP2 / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
    pod_uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    slice_ = f"kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice"
    dirs = [root / "kubepods.slice", root / "kubepods.slice/kubepods-burstable.slice"]
    dirs += [dirs[-1] / slice_, dirs[-1] / slice_ / f"cri-containerd-{cid}.scope"]
    created = []
    try:
        for d in dirs:
            if not d.exists():
                d.mkdir()
                created.append(d)
        yield dirs[-1], pod_uid, cid
    finally:
        for d in reversed(created):
            for _ in range(50):  # the processes in it are being killed by the topology teardown
                with contextlib.suppress(OSError):
                    d.rmdir()
                    break
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        (root / "cgroup.procs").write_text(pid)
                time.sleep(0.05)
