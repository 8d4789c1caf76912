"""L4Record / L7Event (+ node-local identity) -> kscope.v1 protobuf (one ``L4Flow`` row, or a batch's
``L4Columns``): pure functions over data."""

from __future__ import annotations

import time
from collections.abc import Sequence

from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import StringTable, build
from node_exporter.l4.records import Counters, L4Record
from node_exporter.l7.pipeline import L7Event
from node_exporter.metadata.proc import ProcessInfo
from node_exporter.protocols import DbRecord, Http2Record, HttpRecord, Role

_COUNTER_FIELDS = Counters._fields


class MonotonicClock:
    """Turns the kernel's CLOCK_MONOTONIC stamps into Unix nanoseconds."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def unix_ns(self, monotonic_ns: int) -> int:
        return monotonic_ns + self.offset_ns if monotonic_ns else 0


def counters_fields(c: Counters) -> dict[str, int]:
    """The non-zero counters, as a dict protobuf takes for a message field: most counters of most
    sockets are zero, and each keyword protobuf parses costs (all of them: a third of l4_flow)."""
    return {name: value for name, value in zip(_COUNTER_FIELDS, c, strict=True) if value}


def process_fields(proc: ProcessInfo | None, tgid: int, comm: str, **known: int) -> dict[str, object]:
    """kscope.v1.ProcessIdentity as the dict protobuf takes for a message field; ``known``: pid-level
    facts the kernel gave (tid, cgroup_id)."""
    ident = proc.identity if proc else None
    fields: dict[str, object] = {
        "pid": tgid,
        "comm": proc.comm if proc and proc.comm else comm,
        "host_process": bool(tgid) and (ident is None or ident.is_host),
        **known,
    }
    if ident is not None:
        fields.update(container_id=ident.container_id, pod_uid=ident.pod_uid, container_runtime=ident.runtime)
    return fields


def l4_flow(
    rec: L4Record,
    proc: ProcessInfo | None,
    clock: MonotonicClock,
    drop_reasons: dict[int, str],
    nat: tuple[str, int] | None = None,
) -> pb.L4Flow:
    """``nat``: the (ip, port) that really answered when remote_ip:remote_port was DNAT'ed (conntrack)."""
    # Nested messages as dicts and enums as the IntEnums they are: protobuf builds them in C without
    # a Python message object per field (bench/RESULTS.md, hot-path choices).
    return pb.L4Flow(
        socket_cookie=rec.sock_cookie,
        netns_inode=rec.netns_ino,
        role=rec.role,  # enum values are the same on both sides (test_convert checks)
        kind=rec.reason,
        local_ip=rec.local_ip,
        local_port=rec.local_port,
        remote_ip=rec.remote_ip,
        remote_port=rec.remote_port,
        ip_family=6 if rec.family == 10 else 4,
        process=process_fields(proc, rec.tgid, rec.comm, tid=rec.pid, cgroup_id=rec.cgroup_id),
        start_time_unix_nano=clock.unix_ns(rec.start_ns),
        time_unix_nano=clock.unix_ns(rec.ts_ns),
        connect_status=rec.connect_status,
        connect_errno=rec.connect_errno,
        connect_latency_ns=rec.connect_latency_ns,
        total=counters_fields(rec.total),
        delta=counters_fields(rec.delta),
        srtt_us=rec.srtt_us,
        segs_out=rec.segs_out,
        segs_in=rec.segs_in,
        last_drop_reason=_drop_reason(rec, drop_reasons),
        accept_queue=rec.ack_backlog,
        accept_queue_max=rec.max_ack_backlog,
        tcp_state=rec.tcp_state_name,
        socket_drops=rec.sk_drops,
        rttvar_us=rec.rttvar_us,
        nat_remote_ip=nat[0] if nat else "",
        nat_remote_port=nat[1] if nat else 0,
    )


def l4_columns(
    records: Sequence[L4Record],
    procs: Sequence[ProcessInfo | None],
    clock: MonotonicClock,
    drop_reasons: dict[int, str],
    nats: Sequence[tuple[str, int] | None],
) -> pb.L4Columns:
    """``l4_flow`` of every record, as one ``L4Columns`` (what the agent ships, schema_version 2):
    a column per field, built a column at a time, strings once each in the string table."""
    table = StringTable()
    text = table.indices
    idents = [process_fields(p, r.tgid, r.comm) for r, p in zip(records, procs, strict=True)]
    columns: dict[str, Sequence[int]] = {
        "socket_cookie": [r.sock_cookie for r in records],
        "netns_inode": [r.netns_ino for r in records],
        "role": [r.role for r in records],
        "kind": [r.reason for r in records],
        "local_ip": text(r.local_ip for r in records),
        "local_port": [r.local_port for r in records],
        "remote_ip": text(r.remote_ip for r in records),
        "remote_port": [r.remote_port for r in records],
        "ip_family": [6 if r.family == 10 else 4 for r in records],
        "process_pid": [i["pid"] for i in idents],  # type: ignore[misc]
        "process_tid": [r.pid for r in records],
        "process_comm": text(i["comm"] for i in idents),  # type: ignore[misc]
        "process_cgroup_id": [r.cgroup_id for r in records],
        "process_container_id": text(i.get("container_id", "") for i in idents),  # type: ignore[misc]
        "process_pod_uid": text(i.get("pod_uid", "") for i in idents),  # type: ignore[misc]
        "process_container_runtime": text(i.get("container_runtime", "") for i in idents),  # type: ignore[misc]
        "process_host_process": [i["host_process"] for i in idents],  # type: ignore[misc]
        "start_time_unix_nano": [clock.unix_ns(r.start_ns) for r in records],
        "time_unix_nano": [clock.unix_ns(r.ts_ns) for r in records],
        "connect_status": [r.connect_status for r in records],
        "connect_errno": [r.connect_errno for r in records],
        "connect_latency_ns": [r.connect_latency_ns for r in records],
        "srtt_us": [r.srtt_us for r in records],
        "segs_out": [r.segs_out for r in records],
        "segs_in": [r.segs_in for r in records],
        "last_drop_reason": text(_drop_reason(r, drop_reasons) for r in records),
        "accept_queue": [r.ack_backlog for r in records],
        "accept_queue_max": [r.max_ack_backlog for r in records],
        "tcp_state": text(r.tcp_state_name for r in records),
        "socket_drops": [r.sk_drops for r in records],
        "rttvar_us": [r.rttvar_us for r in records],
        "nat_remote_ip": text(nat[0] if nat else "" for nat in nats),
        "nat_remote_port": [nat[1] if nat else 0 for nat in nats],
    }
    for k, name in enumerate(_COUNTER_FIELDS):
        columns[f"total_{name}"] = [r.total[k] for r in records]
        columns[f"delta_{name}"] = [r.delta[k] for r in records]
    return build(len(records), columns, table)


def _drop_reason(rec: L4Record, drop_reasons: dict[int, str]) -> str:
    return drop_reasons.get(rec.last_drop_reason, str(rec.last_drop_reason)) if rec.last_drop_reason else ""


def l7_request(
    ev: L7Event, proc: ProcessInfo | None, clock: MonotonicClock, nat: tuple[str, int] | None = None
) -> pb.L7Request:
    """``nat``: for a client-side UDP record, the (ip, port) that really answered (conntrack)."""
    c, r = ev.conn, ev.record
    detail: dict[str, object]
    if isinstance(r, HttpRecord):
        http: dict[str, object] = {
            "method": r.method,
            "path": r.path,
            "route": r.route,
            "status_code": r.status,
            "traceparent": r.traceparent,
            "request_id": r.request_id,
        }
        seqs = r.tcp_seqs
        if seqs is not None:
            http.update(tcp_seqs_known=True, tcp_request_seq=seqs[0], tcp_response_seq=seqs[1])
        detail = {"http": http}
        if isinstance(r, Http2Record) and r.rpc_system:
            rpc: dict[str, object] = {"system": r.rpc_system, "service": r.rpc_service, "method": r.rpc_method}
            if r.grpc_status >= 0:
                rpc["grpc_status_code"] = r.grpc_status
            detail["rpc"] = rpc
    elif isinstance(r, DbRecord):
        detail = {"db": db_fields(r)}
    else:
        detail = {
            "dns": {
                "id": r.id,
                "question_name": r.name,
                "question_type": r.qtype,
                "rcode": r.rcode,
                "answer_count": r.answers,
                "timed_out": r.timed_out,
            }
        }
    summary = getattr(r, "summary", None)  # HTTP: summed in the kernel; others: in the agent (l7/agentsum.py)
    if summary is not None:
        # many requests in one message; latency_ns stays 0 (the record's), the sum is latency_sum_ns
        detail["summary"] = {
            "count": summary.count,
            "latency_sum_ns": summary.latency_sum_ns,
            "latency_min_ns": summary.latency_min_ns,
            "latency_max_ns": summary.latency_max_ns,
            "latency_bucket_counts": summary.buckets,
            "end_time_unix_nano": clock.unix_ns(summary.end_ns),
        }
    parent = r.parent
    if parent is not None:  # converted like the parent's own record's start (same clock)
        detail["parent"] = {"tcp_request_seq": parent[0], "tcp_response_seq": parent[1],
                            "start_time_unix_nano": clock.unix_ns(parent[2])}  # fmt: skip
    return pb.L7Request(
        socket_cookie=c.sock_cookie,
        netns_inode=c.netns_ino,
        side=pb.ROLE_CLIENT if c.side is Role.CLIENT else pb.ROLE_SERVER,
        protocol=c.protocol,
        tls=c.tls,
        local_ip=c.local_ip,
        local_port=c.local_port,
        remote_ip=c.remote_ip,
        remote_port=c.remote_port,
        ip_family=6 if c.family == 10 else 4,
        process=process_fields(proc, c.tgid, c.comm),
        start_time_unix_nano=clock.unix_ns(r.start_ns),
        latency_ns=max(0, r.latency_ns),
        request_bytes=r.request_bytes,
        response_bytes=r.response_bytes,
        nat_remote_ip=nat[0] if nat else "",
        nat_remote_port=nat[1] if nat else 0,
        **detail,
    )


def db_fields(r: DbRecord) -> dict[str, object]:
    """kscope.v1.DbInfo as the dict protobuf takes for a message field."""
    return {
        "system": r.system,
        "operation": r.operation,
        "collection": r.collection,
        "namespace": r.namespace,
        "query_summary": r.query_summary,
        "query_text": r.query_text,
        "status_code": r.status_code,
        "error_type": r.error_type,
        "returned_rows": r.returned_rows,
        "cache_hits": r.cache_hits,
        "cache_misses": r.cache_misses,
        "batch_size": r.batch_size,
    }
