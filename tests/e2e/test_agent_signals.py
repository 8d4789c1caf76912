"""Signals a running agent answers: SIGUSR1 writes every thread's stack to stderr and the agent goes on
(how a stuck agent is diagnosed in place); SIGTERM then stops it cleanly."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.e2e.agentproc import KSCOPE, AgentProcess

pytestmark = pytest.mark.bpf


def test_sigusr1_dumps_every_threads_stack_and_the_agent_goes_on() -> None:
    procs: list[subprocess.Popen[str]] = []
    agent = AgentProcess([KSCOPE, "run", "--no-live", "--interval", "0.5", "--duration", "60"], procs)
    try:
        agent.wait_started()
        agent.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "agent.py" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Current thread" in agent.log() and "in run" in agent.log(), agent.log()[-3000:]
        time.sleep(1)
        assert agent.proc.poll() is None  # still running
        log = agent.stop()
        assert "Traceback" not in log
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
