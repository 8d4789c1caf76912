"""``kscope.v1.L4Columns``, the columnar form of a batch's L4 records: rows -> columns, one record back
out of its columns, a subset of the records. Pure functions over protobuf messages.

The agent ships columns (``schema_version`` 2) because the processor reads a column as one array
instead of one message object per record; the row form (``L4Flow``) stays for ``--jsonl`` output,
older agents (the processor turns their rows into columns with ``to_columns``: one L4 path), and rare
per-record paths (a listener, a reset's log) where the processor rebuilds one row with ``row``.
``COLUMNS`` is the one place that says which ``L4Flow`` field each column holds; a test checks it
names every field of both messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from kscope.v1 import flow_pb2 as pb

_COUNTERS: Final = tuple(f.name for f in pb.L4Counters.DESCRIPTOR.fields)
_PROCESS_STRINGS: Final = ("comm", "container_id", "pod_uid", "container_runtime")
_PROCESS_NUMBERS: Final = ("pid", "tid", "cgroup_id", "host_process")

# Row fields read straight into a column of the same name.
NUMBER_FIELDS: Final = (
    "socket_cookie", "netns_inode", "role", "kind", "local_port", "remote_port", "ip_family",
    "start_time_unix_nano", "time_unix_nano", "connect_status", "connect_errno", "connect_latency_ns", "srtt_us",
    "segs_out", "segs_in", "accept_queue", "accept_queue_max", "socket_drops", "rttvar_us", "nat_remote_port",
)  # fmt: skip
# Row string fields: the column holds indices into ``strings``.
STRING_FIELDS: Final = ("local_ip", "remote_ip", "last_drop_reason", "tcp_state", "nat_remote_ip")

# column name -> (sub-message of L4Flow or "", field name); string columns hold string-table indices
COLUMNS: Final[dict[str, tuple[str, str]]] = {
    **{name: ("", name) for name in NUMBER_FIELDS + STRING_FIELDS},
    **{f"process_{name}": ("process", name) for name in _PROCESS_NUMBERS + _PROCESS_STRINGS},
    **{f"total_{name}": ("total", name) for name in _COUNTERS},
    **{f"delta_{name}": ("delta", name) for name in _COUNTERS},
}
STRING_COLUMNS: Final = frozenset([*STRING_FIELDS, *(f"process_{n}" for n in _PROCESS_STRINGS)])


class StringTable:
    """Interns strings into a ``strings`` list whose element 0 is ""."""

    __slots__ = ("index", "strings")

    def __init__(self) -> None:
        self.strings: list[str] = [""]
        self.index: dict[str, int] = {"": 0}

    def indices(self, values: Iterable[str]) -> list[int]:
        index, strings = self.index, self.strings
        out = []
        for v in values:
            i = index.get(v)
            if i is None:
                i = index[v] = len(strings)
                strings.append(v)
            out.append(i)
        return out


def build(count: int, columns: dict[str, Sequence[int]], table: StringTable) -> pb.L4Columns:
    """An ``L4Columns`` of ``count`` records from full-length columns (string columns already indices
    into ``table``). An all-zero column is left empty: most counters of most sockets are zero."""
    out = pb.L4Columns(count=count)
    for name, values in columns.items():
        if any(values):
            getattr(out, name).extend(values)
    if len(table.strings) > 1:
        out.strings.extend(table.strings)
    return out


def to_columns(flows: Iterable[pb.L4Flow]) -> pb.L4Columns:
    rows = list(flows)
    table = StringTable()
    columns: dict[str, Sequence[int]] = {}
    for name, (sub, fname) in COLUMNS.items():
        values = [getattr(getattr(r, sub), fname) for r in rows] if sub else [getattr(r, fname) for r in rows]
        columns[name] = table.indices(values) if name in STRING_COLUMNS else values
    return build(len(rows), columns, table)


def row(cols: pb.L4Columns, i: int) -> pb.L4Flow:
    """Record ``i`` as an ``L4Flow`` (``cols`` must have passed ``ingest.validate``'s shape checks)."""
    strings = cols.strings
    top: dict[str, object] = {}
    subs: dict[str, dict[str, object]] = {"process": {}, "total": {}, "delta": {}}
    for name, (sub, fname) in COLUMNS.items():
        column = getattr(cols, name)
        if not column:
            continue
        v: object = column[i]
        if name in STRING_COLUMNS:
            v = strings[v] if v else ""
        if v:
            (subs[sub] if sub else top)[fname] = v
    # The sub-messages are always present, as the agent's own rows have them.
    return pb.L4Flow(**top, **subs)


def rows(cols: pb.L4Columns) -> list[pb.L4Flow]:
    return [row(cols, i) for i in range(cols.count)]


def take(cols: pb.L4Columns, keep: Sequence[int]) -> pb.L4Columns:
    """The records at ``keep`` (in that order), with a string table of only the strings they use."""
    table = StringTable()
    strings = cols.strings
    columns: dict[str, Sequence[int]] = {}
    for name in COLUMNS:
        column = getattr(cols, name)
        if not column:
            continue
        values = [column[i] for i in keep]
        if name in STRING_COLUMNS:
            values = table.indices(strings[v] if v else "" for v in values)
        columns[name] = values
    return build(len(keep), columns, table)
