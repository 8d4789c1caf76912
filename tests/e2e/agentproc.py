"""`kscope run` as a test starts it: a child process, returned once its probes are attached."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KSCOPE = str(REPO / ".venv" / "bin" / "kscope")


def start_kscope(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """``kscope run ARGS`` with its stderr piped, once it logged ``agent_started``; also the stderr
    lines read so far (the rest is the caller's: ``communicate()``). AssertionError if it exits first."""
    agent = subprocess.Popen([KSCOPE, "run", *args], stderr=subprocess.PIPE, text=True)
    assert agent.stderr is not None
    seen: list[str] = []
    for line in agent.stderr:
        seen.append(line)
        if "agent_started" in line:
            return agent, seen
    raise AssertionError(f"agent did not start: exit {agent.wait(10)}: {''.join(seen)}")
