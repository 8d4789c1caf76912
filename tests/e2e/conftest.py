"""End-to-end fixtures: one L4 collector per module, throw-away namespaces per test.

The kernel-availability gate (``bpf`` marker) lives in ``tests/conftest.py`` and runs
before these fixtures are set up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
def cgroups() -> Iterator[PodCgroups]:
    """Kubelet-style pod cgroups and systemd-style service cgroups, removed after the test."""
    c = PodCgroups()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def pod_cgroup(cgroups: PodCgroups) -> tuple[Path, str, str]:
    """A systemd-driver kubelet cgroup for one containerd container: (scope dir, pod uid, container id)."""
    return cgroups.add()


@pytest.fixture
def tracing(topo: Topology) -> Iterator[Callable[..., Any]]:
    """``tracing(**L7Collector kw)`` starts tracing both namespaces now; closed after the test.

    Without the OpenSSL uprobes unless asked (``tls=True``): only the tests about TLS (and the first,
    plain one) need them (on kernels < 6.6 detaching them takes ~0.9 s per collector).
    """
    from tests.e2e.l7trace import L7Trace

    made: list[L7Trace] = []

    def start(**kw: Any) -> Any:
        kw.setdefault("tls", False)
        t = L7Trace((topo.cli, topo.srv), **kw)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()
