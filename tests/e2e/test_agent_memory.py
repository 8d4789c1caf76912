"""The agent's memory bound between two steps: a starved agent leaves the L7 rings to the kernel instead of
parsing ring after ring into memory (``AgentOptions.max_pending_l7_events``, bench/memory.py), and loses
nothing by it while the rings have room: the next steps take the rest."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node_exporter.agent import Agent, AgentOptions
from tests.e2e.netns import SRV_V4, Topology, start_nginx
from tests.helpers import eventually

pytestmark = pytest.mark.bpf

PORT = 8080
BOUND = 5


def curl(topo: Topology, n: int) -> None:
    for _ in range(n):
        r = topo.cli.run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{SRV_V4}:{PORT}/")
        assert r.stdout == "200", r.stdout + r.stderr


def test_drains_wait_past_the_bound_and_later_steps_take_the_rest(topo: Topology, tmp_path: Path) -> None:
    start_nginx(topo, tmp_path, PORT)
    agent = Agent(AgentOptions(l7=True, netns_inode=topo.srv.ino, max_pending_l7_events=BOUND))
    try:
        curl(topo, 8)

        def drained() -> bool:
            agent.drain_l7()
            return len(agent._pending_events) >= BOUND

        eventually(drained, "the first requests parsed")
        held, deferred = len(agent._pending_events), agent.l7_drains_deferred
        curl(topo, 8)
        time.sleep(0.3)  # their exchange records are in the ring by now
        agent.drain_l7()
        assert len(agent._pending_events) == held  # put off, not parsed
        assert agent.l7_drains_deferred == deferred + 1
        _, first = agent.step()  # its own drain is put off too: the first requests only
        assert len(first) == held
        seen = len(first)
        deadline = time.monotonic() + 10
        while seen < 16 and time.monotonic() < deadline:
            seen += len(agent.step()[1])
        assert seen == 16  # all 16 requests, the server's side of each, nothing lost
        assert agent.metrics.values["l7_drains_deferred"] >= deferred + 2
    finally:
        agent.close()
