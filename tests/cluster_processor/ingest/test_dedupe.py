"""Which batches the processor already took, per agent run, within a bounded window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster_processor.ingest.dedupe import SeenBatches
from kscope.v1 import flow_pb2 as pb


def fb(seq: int, node: str = "n1", start: int = 100) -> pb.FlowBatch:
    return pb.FlowBatch(schema_version=1, node_name=node, agent_start_time_unix_nano=start, batch_seq=seq)


def test_a_copy_is_seen_and_other_numbers_runs_and_nodes_are_not() -> None:
    s = SeenBatches(window=8)
    s.taken(fb(5))
    assert s.seen(fb(5))
    assert not s.seen(fb(4)) and not s.seen(fb(6))
    assert not s.seen(fb(5, start=101))  # the agent restarted: numbers start over
    assert not s.seen(fb(5, node="n2"))


def test_unnumbered_batches_are_never_deduplicated() -> None:
    s = SeenBatches()
    s.taken(fb(0))
    assert not s.seen(fb(0))
    assert len(s) == 0


def test_out_of_order_within_the_window_and_unverifiable_beyond_it() -> None:
    s = SeenBatches(window=8)
    for seq in (10, 7, 12):
        s.taken(fb(seq))
    assert [seq for seq in range(1, 14) if s.seen(fb(seq))] == [7, 10, 12]
    s.taken(fb(19))  # the window is the 8 numbers 12..19: 12 is still in it, 10 and 7 no longer
    assert s.seen(fb(12)) and s.seen(fb(19))
    assert not s.seen(fb(10))  # too old to tell: taken again rather than lost
    s.taken(fb(3))
    assert s.unverifiable == 1


def test_agent_runs_are_bounded_least_recent_first() -> None:
    s = SeenBatches(window=4, max_agents=3)
    for node in ("a", "b", "c"):
        s.taken(fb(1, node=node))
    s.seen(fb(1, node="a"))  # heard from a again: b is now the oldest
    s.taken(fb(1, node="d"))
    assert len(s) == 3
    assert s.seen(fb(1, node="a")) and s.seen(fb(1, node="d"))
    assert not s.seen(fb(1, node="b"))


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        SeenBatches(window=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200), max_size=300))
def test_matches_a_set_within_the_window(seqs: list[int]) -> None:
    s, taken = SeenBatches(window=32), set[int]()
    for seq in seqs:
        assert s.seen(fb(seq)) == (seq in taken and max(taken) - seq < 32)
        s.taken(fb(seq))
        taken.add(seq)
