"""`kscope run` as a test starts it: a child process, returned once its probes are attached."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KSCOPE = str(REPO / ".venv" / "bin" / "kscope")

# The agent's counters of L7 requests it could not make records of (every drop is counted): a request
# missing from the export is acceptable only if one of these counted it.
AGENT_LOSS_COUNTERS = ("l7_kernel_rb_full", "l7_kernel_read_failed", "l7_kernel_no_buffer", "l7_kernel_summary_lost",
                       "l7_exchange_unanswered", "l7_expired_requests", "l7_unanswered_requests", "l7_evicted_requests",
                       "l7_connections_evicted", "l7_gaps", "l7_buffer_overflows",
                       # a response still in flight (e.g. retransmitted on a lossy edge) when the agent stops
                       "l7_kernel_stop_pending", "l7_requests_pending")  # fmt: skip
AGENT_STAT, AGENT_STAT_NAME = "kscope.agent.stat", "kscope.agent.stat.name"  # the agents' own counters, exported


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
