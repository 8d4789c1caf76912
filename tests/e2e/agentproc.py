"""`kscope run` as a test starts it: a child process, returned once its probes are attached."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

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


class AgentProcess:
    """An agent (``kscope run`` or ``kscope-agent``) started with ``argv``, its stderr read all along
    (a full pipe would stall it) and kept; added to ``procs`` so a test's teardown kills it."""

    def __init__(self, argv: list[str], procs: list[subprocess.Popen[Any]], name: str = "agent") -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        procs.append(self.proc)
        self.lines: list[str] = []
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "agent_started" in line:
                self.started.set()

    def log(self) -> str:
        return "".join(self.lines)

    def wait_started(self, timeout: float = 40) -> None:
        if not self.started.wait(timeout):
            raise AssertionError(f"{self.name} did not start: exit {self.proc.poll()}: {self.log()[-4000:]}")

    def stop(self) -> str:
        """SIGTERM (a stop still runs a last interval: capture stopped, kernel drained); its stderr."""
        self.proc.terminate()
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # its threads' stacks to stderr (faulthandler): where it hangs
            time.sleep(2)
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.name} did not exit 60 s after SIGTERM: {self.log()[-8000:]}") from None
        assert rc == 0, self.log()[-4000:]
        return self.log()
