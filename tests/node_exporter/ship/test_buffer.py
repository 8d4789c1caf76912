"""The drop-oldest queue and the batch split, pure."""

from __future__ import annotations

import threading

import pytest

from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import rows, to_columns
from node_exporter.ship.buffer import DropOldestQueue, record_count, split_batch
from tests.cluster_processor.ingest.harness import batch, l4


def test_queue_is_fifo_and_evicts_the_oldest_when_full() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(3)
    assert [q.put(i) for i in range(5)] == [None, None, None, 0, 1]
    assert len(q) == 3
    assert [q.get(), q.get(), q.get()] == [2, 3, 4]


def test_get_waits_for_an_item_and_close_wakes_it() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(2)
    got: list[int | None] = []
    t = threading.Thread(target=lambda: got.extend([q.get(), q.get()]))
    t.start()
    q.put(7)
    q.close()
    t.join(2)
    assert got == [7, None]


def test_items_queued_before_close_can_still_be_taken() -> None:
    q: DropOldestQueue[str] = DropOldestQueue(4)
    q.put("a")
    q.put("b")
    q.close()
    assert q.get() == "a"
    assert q.drain() == ["b"]
    assert q.get() is None


def test_queue_needs_room_for_one() -> None:
    with pytest.raises(ValueError):
        DropOldestQueue(0)


def test_a_small_batch_is_not_split() -> None:
    b = batch(3, 3)
    assert split_batch(b, 6) == [b]
    assert split_batch(b, 6)[0] is b


def test_a_large_batch_is_split_in_order_with_the_envelope_on_every_part() -> None:
    b = batch(5, 4, stats=pb.AgentStats(counters={"x": 1}))
    parts = split_batch(b, 4)
    assert [(len(p.l4), len(p.l7)) for p in parts] == [(4, 0), (1, 3), (0, 1)]
    assert all(
        (p.schema_version, p.node_name, p.time_unix_nano) == (b.schema_version, b.node_name, b.time_unix_nano)
        for p in parts
    )
    assert [p.HasField("stats") for p in parts] == [True, False, False]
    assert [r for p in parts for r in p.l4] == list(b.l4)
    assert [r for p in parts for r in p.l7] == list(b.l7)
    assert sum(record_count(p) for p in parts) == 9


def test_a_large_columnar_batch_is_split_into_column_slices() -> None:
    b = batch(0, 4, version=2, stats=pb.AgentStats(counters={"x": 1}))
    flows = [l4(i, remote_ip=f"10.0.1.{i}") for i in range(5)]
    b.l4_columns.CopyFrom(to_columns(flows))
    parts = split_batch(b, 4)
    assert [(p.l4_columns.count, len(p.l7)) for p in parts] == [(4, 0), (1, 3), (0, 1)]
    assert all(p.schema_version == 2 and not p.l4 for p in parts)
    assert [p.HasField("l4_columns") for p in parts] == [True, True, False]
    assert [r for p in parts for r in rows(p.l4_columns)] == rows(b.l4_columns)
    assert "10.0.1.0" not in parts[1].l4_columns.strings  # each part's table holds its own strings
    assert [r for p in parts for r in p.l7] == list(b.l7)
    assert sum(record_count(p) for p in parts) == record_count(b) == 9
