"""Dropping the copies of a batch that an agent sent twice.

Delivery from the agents is at least once: when a call's deadline passes after the processor had already
queued the batch, the agent retries and the batch arrives again. Agents number their batches
(``agent_start_time_unix_nano``, ``batch_seq``), so the processor remembers, per agent run, which of the
last ``window`` sequence numbers it has taken, as a bit set below the highest one seen. Bounded: at most
``max_agents`` agent runs (least recently heard from forgotten first) of one int each.

A number older than the window, or from a forgotten run, cannot be told apart from a new batch; it is
taken (duplicates are possible, losses are not) and counted as ``unverifiable``.
"""

from __future__ import annotations

from cachetools import LRUCache

from kscope.v1 import flow_pb2 as pb

_Run = tuple[str, int]  # node name, agent start time


class SeenBatches:
    def __init__(self, window: int = 4096, max_agents: int = 16384) -> None:
        if window < 1 or max_agents < 1:
            raise ValueError("window and max_agents must be at least 1")
        self.window = window
        # run -> (highest seq, bit i set = seq highest - i taken)
        self._runs: LRUCache[_Run, tuple[int, int]] = LRUCache(maxsize=max_agents)
        self.unverifiable = 0

    def __len__(self) -> int:
        return len(self._runs)

    def seen(self, batch: pb.FlowBatch) -> bool:
        """True if this batch was taken before (a copy to drop)."""
        seq = batch.batch_seq
        if seq == 0:
            return False  # an agent that does not number its batches
        state = self._runs.get((batch.node_name, batch.agent_start_time_unix_nano))
        if state is None:
            return False
        high, bits = state
        if seq > high:
            return False
        age = high - seq
        if age >= self.window:
            return False
        return bool(bits >> age & 1)

    def taken(self, batch: pb.FlowBatch) -> None:
        """Remember that this batch was taken (queued for the sink)."""
        seq = batch.batch_seq
        if seq == 0:
            return
        run = (batch.node_name, batch.agent_start_time_unix_nano)
        state = self._runs.get(run)
        if state is None:
            self._runs[run] = (seq, 1)
            return
        high, bits = state
        mask = (1 << self.window) - 1
        if seq > high:
            self._runs[run] = (seq, ((bits << (seq - high)) | 1) & mask)
        elif high - seq < self.window:
            self._runs[run] = (high, bits | 1 << (high - seq))
        else:
            self.unverifiable += 1  # too old to remember; a later copy of it would be taken again
