"""Kernel enums and wire enums must mean the same numbers; conversion keeps every field."""

from __future__ import annotations

import json
from pathlib import Path

from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import rows as l4_columns_rows
from node_exporter.bpf.abi import ConnectStatus, L4Reason, Role
from node_exporter.l4.records import Counters, L4Record
from node_exporter.l7.pipeline import ConnInfo, L7Event
from node_exporter.metadata.cgroup import ContainerIdentity
from node_exporter.metadata.proc import ProcessInfo
from node_exporter.output.convert import MonotonicClock, l4_columns, l4_flow, l7_request
from node_exporter.output.jsonl import JsonlWriter
from node_exporter.protocols import DbRecord, DnsRecord, Http2Record, HttpRecord
from node_exporter.protocols import Role as ProtoRole
from node_exporter.protocols.http1 import HttpLinkedRecord


def test_enum_numbers_agree() -> None:
    assert int(Role.KSCOPE_ROLE_CLIENT) == pb.ROLE_CLIENT
    assert int(Role.KSCOPE_ROLE_SERVER) == pb.ROLE_SERVER
    assert int(Role.KSCOPE_ROLE_LISTENER) == pb.ROLE_LISTENER
    assert int(L4Reason.KSCOPE_L4_PERIODIC) == pb.RECORD_KIND_PERIODIC
    assert int(L4Reason.KSCOPE_L4_CLOSE) == pb.RECORD_KIND_CLOSE
    for status in ConnectStatus:
        wire = "CONNECT_STATUS_" + status.name.removeprefix("KSCOPE_CONNECT_")
        if status == ConnectStatus.KSCOPE_CONNECT_NONE:
            wire = "CONNECT_STATUS_UNSPECIFIED"
        assert pb.ConnectStatus.Value(wire) == int(status)


def test_counters_and_identity_survive_conversion() -> None:
    rec = L4Record(
        reason=L4Reason.KSCOPE_L4_CLOSE, role=Role.KSCOPE_ROLE_CLIENT, connect_status=ConnectStatus.KSCOPE_CONNECT_OK,
        connect_errno=0, netns_ino=4026531840, sock_cookie=99, cgroup_id=1234, start_ns=1_000, ts_ns=2_000,
        connect_latency_ns=150_000_000, total=Counters(*range(1, 11)), delta=Counters(*range(11, 21)),
        local_ip="198.18.0.1", local_port=40000, remote_ip="198.18.0.2", remote_port=80, family=2, tgid=42, pid=43,
        srtt_us=120, segs_out=5, segs_in=6, last_drop_reason=3, ack_backlog=0, max_ack_backlog=0, sk_drops=4,
        rttvar_us=30, tcp_state=7,
        comm="curl",
    )  # fmt: skip
    proc = ProcessInfo(pid=42, comm="curl", identity=ContainerIdentity("a" * 64, "1234-5678", "containerd"))
    clock = MonotonicClock()
    flow = l4_flow(rec, proc, clock, {3: "NO_SOCKET"})
    assert [getattr(flow.total, f.name) for f in pb.L4Counters.DESCRIPTOR.fields] == list(range(1, 11))
    assert [getattr(flow.delta, f.name) for f in pb.L4Counters.DESCRIPTOR.fields] == list(range(11, 21))
    assert flow.process.container_id == "a" * 64 and flow.process.pod_uid == "1234-5678"
    assert not flow.process.host_process
    assert flow.last_drop_reason == "NO_SOCKET" and flow.tcp_state == "CLOSE"
    assert flow.time_unix_nano - flow.start_time_unix_nano == 1_000
    assert flow.connect_latency_ns == 150_000_000 and flow.ip_family == 4


def test_nat_fills_the_translated_remote_and_is_empty_without_it() -> None:
    rec = L4Record(
        reason=L4Reason.KSCOPE_L4_PERIODIC, role=Role.KSCOPE_ROLE_CLIENT,
        connect_status=ConnectStatus.KSCOPE_CONNECT_OK, connect_errno=0, netns_ino=1, sock_cookie=7, cgroup_id=1,
        start_ns=1, ts_ns=2, connect_latency_ns=0,
        total=Counters(), delta=Counters(), local_ip="198.18.1.1", local_port=40000, remote_ip="198.19.0.10",
        remote_port=80, family=2, tgid=0, pid=0, srtt_us=0, segs_out=0, segs_in=0, last_drop_reason=0, ack_backlog=0,
        max_ack_backlog=0, sk_drops=0, rttvar_us=0, tcp_state=1, comm="curl",
    )  # fmt: skip
    flow = l4_flow(rec, None, MonotonicClock(), {}, nat=("198.18.2.1", 8080))
    assert (flow.remote_ip, flow.remote_port) == ("198.19.0.10", 80)
    assert (flow.nat_remote_ip, flow.nat_remote_port) == ("198.18.2.1", 8080)
    plain = l4_flow(rec, None, MonotonicClock(), {})
    assert (plain.nat_remote_ip, plain.nat_remote_port) == ("", 0)


def test_zero_counters_still_leave_both_messages_present() -> None:
    rec = L4Record(
        reason=L4Reason.KSCOPE_L4_PERIODIC, role=Role.KSCOPE_ROLE_SERVER,
        connect_status=ConnectStatus.KSCOPE_CONNECT_NONE, connect_errno=0, netns_ino=1, sock_cookie=8, cgroup_id=1,
        start_ns=1, ts_ns=2, connect_latency_ns=0, total=Counters(bytes_sent=5), delta=Counters(),
        local_ip="198.18.1.1", local_port=80, remote_ip="198.18.1.2", remote_port=40000, family=2, tgid=0, pid=0,
        srtt_us=0, segs_out=0, segs_in=0, last_drop_reason=0, ack_backlog=0, max_ack_backlog=0, sk_drops=0,
        rttvar_us=0, tcp_state=1, comm="nginx",
    )  # fmt: skip
    flow = l4_flow(rec, None, MonotonicClock(), {})
    assert flow.HasField("total") and flow.HasField("delta") and flow.HasField("process")
    assert flow.total.bytes_sent == 5 and flow.delta == pb.L4Counters()
    assert not flow.process.host_process  # tgid 0: no process seen yet, not "the host"


def _conn(**kw: object) -> ConnInfo:
    fields: dict[str, object] = {
        "sock_cookie": 5, "netns_ino": 4026531840, "side": ProtoRole.SERVER, "protocol": "http1", "tls": True,
        "local_ip": "fd00::1", "local_port": 443, "remote_ip": "fd00::2", "remote_port": 50000, "family": 10,
        "tgid": 42, "comm": "nginx",
    }  # fmt: skip
    fields.update(kw)
    return ConnInfo(**fields)  # type: ignore[arg-type]


def test_http_request_keeps_every_field_and_the_container() -> None:
    http = HttpRecord(method="GET", path="/orders/7", route="/orders/{id}", status=503, request_bytes=80,
                      response_bytes=120, start_ns=1_000, latency_ns=2_500_000, traceparent="00-" + "1" * 32 + "-" +
                      "2" * 16 + "-01", request_id="abc")  # fmt: skip
    proc = ProcessInfo(pid=42, comm="nginx", identity=ContainerIdentity("b" * 64, "pod-uid", "cri-o"))
    clock = MonotonicClock()
    msg = l7_request(L7Event(_conn(), http), proc, clock)
    assert (msg.side, msg.protocol, msg.tls, msg.ip_family) == (pb.ROLE_SERVER, "http1", True, 6)
    assert (msg.http.method, msg.http.path, msg.http.route, msg.http.status_code) == (
        "GET", "/orders/7", "/orders/{id}", 503)  # fmt: skip
    assert msg.http.traceparent == http.traceparent and msg.http.request_id == "abc"
    assert (msg.request_bytes, msg.response_bytes, msg.latency_ns) == (80, 120, 2_500_000)
    assert msg.start_time_unix_nano == clock.unix_ns(1_000)
    assert (msg.process.pid, msg.process.container_id, msg.process.pod_uid, msg.process.container_runtime) == (
        42, "b" * 64, "pod-uid", "cri-o")  # fmt: skip
    assert not msg.process.host_process and not msg.HasField("dns")
    assert not msg.http.tcp_seqs_known  # a record without them (the chunk path's): none on the wire


def test_http_request_carries_the_tcp_seqs_that_link_its_ends() -> None:
    http = HttpLinkedRecord(method="GET", path="/a", route="/a", status=200, request_bytes=1, response_bytes=2,
                            start_ns=3, latency_ns=4, traceparent="", request_id="",
                            tcp_seqs=(0, 0xFFFFFFFF))  # fmt: skip
    msg = l7_request(L7Event(_conn(), http), None, MonotonicClock())
    assert (msg.http.tcp_seqs_known, msg.http.tcp_request_seq, msg.http.tcp_response_seq) == (True, 0, 0xFFFFFFFF)


def test_dns_timeout_from_a_host_process() -> None:
    dns = DnsRecord(id=77, name="x.fail.test", qtype="A", rcode="", answers=0, request_bytes=40, response_bytes=0,
                    start_ns=5, latency_ns=-1, timed_out=True)  # fmt: skip
    msg = l7_request(L7Event(_conn(side=ProtoRole.CLIENT, protocol="dns", tls=False, comm="dig"), dns), None,
                     MonotonicClock())  # fmt: skip
    assert msg.side == pb.ROLE_CLIENT and msg.latency_ns == 0  # never negative on the wire
    assert (msg.dns.id, msg.dns.question_name, msg.dns.question_type, msg.dns.rcode, msg.dns.timed_out) == (
        77, "x.fail.test", "A", "", True)  # fmt: skip
    assert msg.process.comm == "dig" and msg.process.host_process and not msg.HasField("http")


def test_a_db_operation_keeps_every_db_field() -> None:
    rec = DbRecord(system="redis", operation="GET", request_bytes=30, response_bytes=5, start_ns=7, latency_ns=90_000,
                   namespace="3", status_code="WRONGTYPE", error_type="WRONGTYPE", returned_rows=1, cache_hits=2,
                   cache_misses=1, batch_size=4, collection="users", query_summary="SELECT users",
                   query_text="SELECT * FROM users WHERE id = ?")  # fmt: skip
    msg = l7_request(L7Event(_conn(side=ProtoRole.CLIENT, protocol="redis", tls=False, comm="app"), rec), None,
                     MonotonicClock())  # fmt: skip
    assert msg.WhichOneof("detail") == "db" and msg.protocol == "redis"
    got = {f.name: v for f, v in msg.db.ListFields()}
    assert got == {"system": "redis", "operation": "GET", "collection": "users", "namespace": "3",
                   "query_summary": "SELECT users", "query_text": "SELECT * FROM users WHERE id = ?",
                   "status_code": "WRONGTYPE", "error_type": "WRONGTYPE", "returned_rows": 1, "cache_hits": 2,
                   "cache_misses": 1, "batch_size": 4}  # fmt: skip
    assert (msg.request_bytes, msg.response_bytes, msg.latency_ns) == (30, 5, 90_000)


def test_a_batchs_columns_hold_exactly_its_rows() -> None:
    base = dict(
        reason=L4Reason.KSCOPE_L4_PERIODIC, role=Role.KSCOPE_ROLE_CLIENT,
        connect_status=ConnectStatus.KSCOPE_CONNECT_OK, connect_errno=0, netns_ino=4026531840, sock_cookie=1,
        cgroup_id=1234, start_ns=1_000, ts_ns=2_000,
        connect_latency_ns=150_000, total=Counters(*range(1, 11)), delta=Counters(*range(11, 21)),
        local_ip="198.18.0.1", local_port=40000, remote_ip="198.18.0.2", remote_port=80, family=2, tgid=42, pid=43,
        srtt_us=120, segs_out=5, segs_in=6, last_drop_reason=3, ack_backlog=0, max_ack_backlog=0, sk_drops=4,
        rttvar_us=30, tcp_state=7, comm="curl",
    )  # fmt: skip
    records = [
        L4Record(**base),  # type: ignore[arg-type]
        L4Record(**{**base, "sock_cookie": 2, "family": 10, "local_ip": "fd00::1", "remote_ip": "fd00::2",  # type: ignore[arg-type]
                    "reason": L4Reason.KSCOPE_L4_CLOSE, "last_drop_reason": 0, "tgid": 0, "delta": Counters()}),
        L4Record(**{**base, "sock_cookie": 3, "role": Role.KSCOPE_ROLE_LISTENER, "ack_backlog": 3,  # type: ignore[arg-type]
                    "max_ack_backlog": 128, "last_drop_reason": 9}),
    ]  # fmt: skip
    procs = [ProcessInfo(pid=42, comm="curl", identity=ContainerIdentity("a" * 64, "1234-5678", "containerd")), None,
             ProcessInfo(pid=42, comm="nginx", identity=ContainerIdentity("", "", ""))]  # fmt: skip
    nats = [("198.18.2.1", 8080), None, None]
    clock = MonotonicClock()
    drops = {3: "NO_SOCKET"}
    cols = pb.L4Columns.FromString(l4_columns(records, procs, clock, drops, nats).SerializeToString())
    want = [l4_flow(r, p, clock, drops, nat) for r, p, nat in zip(records, procs, nats, strict=True)]
    assert cols.count == 3 and l4_columns_rows(cols) == want
    assert l4_columns([], [], clock, drops, []) == pb.L4Columns()


def test_grpc_over_http2_adds_the_rpc_and_a_missing_status_stays_absent(tmp_path: Path) -> None:
    def h2(status: int) -> Http2Record:
        return Http2Record(method="POST", path="/demo.v1.Echo/Ping", route="/demo.v1.Echo/Ping", status=200,
                           request_bytes=90, response_bytes=60, start_ns=10, latency_ns=3_000, traceparent="",
                           request_id="", rpc_system="grpc", rpc_service="demo.v1.Echo", rpc_method="Ping",
                           grpc_status=status)  # fmt: skip

    info = _conn(protocol="http2", tls=False)
    ok, reset = (l7_request(L7Event(info, h2(s)), None, MonotonicClock()) for s in (5, -1))
    assert (ok.protocol, ok.http.method, ok.http.path, ok.http.status_code) == (
        "http2",
        "POST",
        "/demo.v1.Echo/Ping",
        200,
    )
    assert (ok.rpc.system, ok.rpc.service, ok.rpc.method, ok.rpc.grpc_status_code) == (
        "grpc",
        "demo.v1.Echo",
        "Ping",
        5,
    )
    assert ok.rpc.HasField("grpc_status_code") and not reset.rpc.HasField("grpc_status_code")
    plain = Http2Record("GET", "/", "/", 200, 1, 2, 3, 4, "", "")
    assert not l7_request(L7Event(info, plain), None, MonotonicClock()).HasField("rpc")
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(str(path))
    writer.write_requests([ok, reset])
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["l7"]["rpc"] == {"system": "grpc", "service": "demo.v1.Echo", "method": "Ping", "grpcStatusCode": 5}
    assert "grpcStatusCode" not in lines[1]["l7"]["rpc"]
