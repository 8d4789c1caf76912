"""NetnsWalker: every network namespace found, each iterator created inside its own, the thread
always back home. Real namespaces (``ip netns add``, a process unshared into its own); needs root."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from node_exporter.netns import NetnsWalker
from tests.e2e.netns import Topology
from tests.helpers import eventually

pytestmark = pytest.mark.bpf  # root: namespaces and setns


def _here() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology() as t:
        yield t


@pytest.fixture
def unshared() -> Iterator[subprocess.Popen[bytes]]:
    """A process in a namespace of its own that no bind mount names: found through /proc only."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        eventually(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino != _here(), "unshare entering its namespace")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_every_namespace_once_each_created_inside_it(topo: Topology, unshared: subprocess.Popen[bytes]) -> None:
    home = _here()
    walker = NetnsWalker()
    found = walker.namespaces()
    hidden = os.stat(f"/proc/{unshared.pid}/ns/net").st_ino
    assert {home, topo.cli.ino, topo.srv.ino, hidden} <= set(found)
    assert {home, topo.cli.ino, topo.srv.ino, hidden} <= set(NetnsWalker(full_s=0).namespaces())  # a full listing too

    fds = walker.create_all(lambda: os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    try:
        seen = [os.fstat(fd).st_ino for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)
    assert sorted(seen) == sorted(found), "one create() per namespace, run inside it"
    assert _here() == home, "the thread is back in its own namespace"


def test_only_one_namespace(topo: Topology) -> None:
    walker = NetnsWalker(only_ino=topo.srv.ino)
    assert list(walker.namespaces()) == [topo.srv.ino]
    fds = walker.create_all(lambda: os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    try:
        assert [os.fstat(fd).st_ino for fd in fds] == [topo.srv.ino]
    finally:
        for fd in fds:
            os.close(fd)


def test_a_namespace_made_after_the_first_pass_is_walked_at_the_next(topo: Topology) -> None:
    walker = NetnsWalker(full_s=3600)  # only the incremental listing can find it
    before = set(walker.namespaces())
    with Topology() as later:
        assert {later.cli.ino, later.srv.ino} <= set(walker.namespaces()) - before


def test_a_namespace_gone_before_it_is_entered_is_counted_and_the_rest_walked(
    topo: Topology, unshared: subprocess.Popen[bytes]
) -> None:
    """The only process of a namespace exits between the listing and the pass (a race the agent
    meets whenever a pod ends): that namespace is counted as vanished, the others are walked."""
    home = _here()
    walker = NetnsWalker()
    hidden = os.stat(f"/proc/{unshared.pid}/ns/net").st_ino
    listing = walker.namespaces()
    assert hidden in listing
    unshared.kill()
    unshared.wait()
    fds = walker.create_all(lambda: os.open("/proc/thread-self/ns/net", os.O_RDONLY), listing)
    try:
        entered = {os.fstat(fd).st_ino for fd in fds}
    finally:
        for fd in fds:
            os.close(fd)
    assert hidden not in entered and {topo.cli.ino, topo.srv.ino, home} <= entered
    assert walker.vanished == 1 and walker.enter_failed == 0
    assert _here() == home
