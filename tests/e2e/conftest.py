"""End-to-end fixtures: one L4 collector per module, throw-away namespaces per test.

The kernel-availability gate (``bpf`` marker) lives in ``tests/conftest.py`` and runs
before these fixtures are set up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.netns import PodCgroups, Recorder, Topology


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


@pytest.fixture
def pod_cgroup() -> Iterator[tuple[Path, str, str]]:
    """A systemd-driver kubelet cgroup for one containerd container: (scope dir, pod uid, container id)."""
    cgroups = PodCgroups()
    try:
        yield cgroups.add()
    finally:
        cgroups.close()
