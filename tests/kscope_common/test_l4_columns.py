"""``L4Columns`` <-> ``L4Flow``: every field has exactly one column, and rows survive the trip."""

from __future__ import annotations

import random

from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import COLUMNS, STRING_COLUMNS, row, rows, take, to_columns
from tests.cluster_processor.test_aggregate_cache import random_batch


def full(fl: pb.L4Flow) -> pb.L4Flow:
    """``fl`` with its sub-messages present, as the agent's rows (and ``row``) have them."""
    out = pb.L4Flow(process={}, total={}, delta={})
    out.MergeFrom(fl)
    return out


def test_every_field_of_a_row_has_one_column_and_every_column_one_field() -> None:
    fields = set()
    for f in pb.L4Flow.DESCRIPTOR.fields:
        if f.message_type is None:
            fields.add(("", f.name))
        else:
            fields |= {(f.name, sub.name) for sub in f.message_type.fields}
    assert set(COLUMNS.values()) == fields and len(COLUMNS) == len(fields)
    column_fields = {f.name for f in pb.L4Columns.DESCRIPTOR.fields} - {"count", "strings"}
    assert set(COLUMNS) == column_fields
    for name, (sub, fname) in COLUMNS.items():
        msg = getattr(pb.L4Flow(), sub) if sub else pb.L4Flow()
        is_string = msg.DESCRIPTOR.fields_by_name[fname].type == msg.DESCRIPTOR.fields_by_name[fname].TYPE_STRING
        assert (name in STRING_COLUMNS) == is_string, name


def test_rows_survive_columns() -> None:
    r = random.Random(7)
    flows = [fl for k in range(5) for fl in random_batch(r, "n", k).l4]
    for i, fl in enumerate(flows):  # every kind of field set somewhere
        fl.process.comm, fl.process.container_runtime, fl.tcp_state = f"c{i % 3}", "containerd", "ESTABLISHED"
        fl.total.bytes_sent, fl.delta.listen_overflows, fl.last_drop_reason = i, i % 2, "TCP_OFO_DROP" * (i % 2)
        fl.start_time_unix_nano, fl.segs_out, fl.process.cgroup_id = 2**63 + i, i, 2**40
    cols = pb.L4Columns.FromString(to_columns(flows).SerializeToString())
    assert cols.count == len(flows)
    assert rows(cols) == [full(fl) for fl in flows]
    assert cols.strings[0] == "" and len(set(cols.strings)) == len(cols.strings)  # each string once


def test_an_all_zero_column_is_left_empty() -> None:
    cols = to_columns([pb.L4Flow(socket_cookie=1, local_port=80), pb.L4Flow(socket_cookie=2, local_port=80)])
    assert list(cols.socket_cookie) == [1, 2] and list(cols.local_port) == [80, 80]
    assert not cols.delta_bytes_sent and not cols.local_ip and not cols.strings
    assert row(cols, 1) == full(pb.L4Flow(socket_cookie=2, local_port=80))
    assert to_columns([]) == pb.L4Columns()


def test_take_keeps_the_chosen_records_and_only_their_strings() -> None:
    flows = [pb.L4Flow(socket_cookie=i, local_ip=f"10.0.0.{i}", remote_ip="10.0.1.1") for i in range(1, 6)]
    part = take(to_columns(flows), [3, 1])
    assert rows(part) == [full(flows[3]), full(flows[1])]
    assert sorted(part.strings) == ["", "10.0.0.2", "10.0.0.4", "10.0.1.1"]
