"""The aggregator over a KubeIndex filled with raw API objects: Deployment A's pod a-1 (node-1) calls
the Service VIP of Deployment B, whose pod b-1 (node-2) answers; both nodes report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from cluster_processor.aggregate import Aggregator, AggregatorSettings, NodeReport
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import encode, semconv
from cluster_processor.otlp.encode import EncodedRequest
from cluster_processor.otlp.exporter import Signal
from cluster_processor.otlp.model import EVENT_CONNECT_REFUSED, EVENT_DNS_ERROR, EVENT_TCP_RESET, Protocol
from cluster_processor.otlp.pipeline import OtlpPipeline
from cluster_processor.resolved import ConnectionType, Side, attr, graph_node_name
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor.kube import factories as f

A_IP, B_IP, VIP = "10.1.0.5", "10.1.1.7", "10.96.0.20"
T0 = 1_700_000_000_000_000_000
MS = 1_000_000
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def index() -> KubeIndex:
    ix = KubeIndex()
    for name in ("a", "b"):
        ix.apply("ADDED", "Deployment", f.workload(name, uid=f"dep-{name}"))
        rs = f.workload(f"{name}-5d8f7c9b6d", uid=f"rs-{name}", owners=[f.owner("Deployment", name, f"dep-{name}")])
        ix.apply("ADDED", "ReplicaSet", rs)
    owners_a = [f.owner("ReplicaSet", "a-5d8f7c9b6d", "rs-a")]
    owners_b = [f.owner("ReplicaSet", "b-5d8f7c9b6d", "rs-b")]
    ix.apply("ADDED", "Pod", f.pod("a-1", uid="uid-a1", ip=A_IP, node="node-1", owners=owners_a))
    ix.apply("ADDED", "Pod", f.pod("b-1", uid="uid-b1", ip=B_IP, node="node-2", owners=owners_b))
    ix.apply("ADDED", "Service", f.service("b", cluster_ips=[VIP]))
    return ix


def l4(**kw: Any) -> pb.L4Flow:
    fields: dict[str, Any] = {
        "socket_cookie": 7,
        "netns_inode": 4026531840,
        "role": pb.ROLE_CLIENT,
        "kind": pb.RECORD_KIND_PERIODIC,
        "local_ip": A_IP,
        "local_port": 40000,
        "remote_ip": VIP,
        "remote_port": 80,
        "nat_remote_ip": B_IP,
        "nat_remote_port": 8080,
        "ip_family": 4,
        "process": pb.ProcessIdentity(pid=10, pod_uid="uid-a1"),
        "time_unix_nano": T0,
    }
    fields.update(kw)
    return pb.L4Flow(**fields)


def server_l4(**kw: Any) -> pb.L4Flow:
    base: dict[str, Any] = {
        "socket_cookie": 9,
        "role": pb.ROLE_SERVER,
        "local_ip": B_IP,
        "local_port": 8080,
        "remote_ip": A_IP,
        "remote_port": 40000,
        "nat_remote_ip": "",
        "nat_remote_port": 0,
        "process": pb.ProcessIdentity(pid=20, pod_uid="uid-b1"),
    }
    return l4(**(base | kw))


def l7(side: int = pb.ROLE_CLIENT, **kw: Any) -> pb.L7Request:
    client = side == pb.ROLE_CLIENT
    fields: dict[str, Any] = {
        "socket_cookie": 7 if client else 9,
        "netns_inode": 4026531840,
        "side": side,
        "protocol": "http1",
        "local_ip": A_IP if client else B_IP,
        "local_port": 40000 if client else 8080,
        "remote_ip": VIP if client else A_IP,
        "remote_port": 80 if client else 40000,
        "ip_family": 4,
        "process": pb.ProcessIdentity(pod_uid="uid-a1" if client else "uid-b1"),
        "start_time_unix_nano": T0,
        "latency_ns": (3 if client else 2) * MS,
        "http": pb.HttpInfo(method="GET", path="/items/42", route="/items/{id}", status_code=200),
    }
    fields.update(kw)
    return pb.L7Request(**fields)


def batch(node: str, l4s: Sequence[pb.L4Flow] = (), l7s: Sequence[pb.L7Request] = ()) -> pb.FlowBatch:
    return pb.FlowBatch(schema_version=1, node_name=node, time_unix_nano=T0, l4=list(l4s), l7=list(l7s))


def by_node(reports: list[NodeReport]) -> dict[str, NodeReport]:
    return {r.interval.node_name: r for r in reports}


def test_vip_call_is_edge_a_to_b_with_exact_counts(index: KubeIndex) -> None:
    agg = Aggregator(index)
    counters = pb.L4Counters
    agg.add(
        batch(
            "node-1",
            [
                l4(
                    delta=counters(bytes_sent=100, bytes_received=200, retransmits=1),
                    connect_status=pb.CONNECT_STATUS_OK,
                    connect_latency_ns=2 * MS,
                    srtt_us=400,
                ),
            ],
            [l7(http=pb.HttpInfo(method="GET", route="/items/{id}", status_code=200, traceparent=TRACEPARENT))],
        )
    )
    agg.add(
        batch(
            "node-1",
            [
                l4(
                    kind=pb.RECORD_KIND_CLOSE,
                    delta=counters(bytes_sent=10, bytes_received=20, resets_received=1),
                    connect_status=pb.CONNECT_STATUS_OK,
                    connect_latency_ns=2 * MS,
                    srtt_us=600,
                )
            ],
        )
    )
    agg.add(
        batch(
            "node-2",
            [server_l4(kind=pb.RECORD_KIND_CLOSE, delta=counters(bytes_sent=220, bytes_received=110))],
            [l7(pb.ROLE_SERVER, http=pb.HttpInfo(method="GET", route="/items/{id}", status_code=200))],
        )
    )
    reports = by_node(agg.flush(T0 + 10_000 * MS))
    n1, n2 = reports["node-1"], reports["node-2"]

    # L4, client side (node-1): both records of socket 7 summed; one connection; the VIP never appears.
    (c,) = n1.interval.l4
    assert (graph_node_name(c.edge.client), graph_node_name(c.edge.server), c.side) == ("a", "b", Side.CLIENT)
    assert attr(c.edge.server, "k8s.deployment.name") == "b"
    assert VIP not in str(c.edge)
    assert (c.bytes_sent, c.bytes_received, c.connections, c.retransmits, c.resets) == (110, 220, 1, 1, 1)
    assert c.connect_duration is not None and c.connect_duration.count == 1  # once per socket
    assert c.rtt_s == pytest.approx(0.0005)
    # Server side (node-2): same edge, its own bytes, no connection count (counted once, by the client).
    (s,) = n2.interval.l4
    assert s.edge == c.edge and s.side is Side.SERVER
    assert (s.bytes_sent, s.bytes_received, s.connections) == (220, 110, 0)

    # RED: one point per side, the L7 client record joined with its socket's NAT answer.
    (rc,) = n1.interval.red
    (rs,) = n2.interval.red
    assert rc.edge == rs.edge == c.edge
    assert (rc.side, rc.protocol, rc.method, rc.route, rc.status_code) == (
        Side.CLIENT,
        Protocol.HTTP,
        "GET",
        "/items/{id}",
        200,
    )
    assert (rc.duration.count, rs.duration.count, rs.side) == (1, 1, Side.SERVER)
    assert rs.duration.sum == pytest.approx(0.002)

    # Service graph: the request counts once, from the server; the client adds its duration only.
    (gc,) = n1.interval.service_graph
    (gs,) = n2.interval.service_graph
    assert (gs.client, gs.server, gs.requests, gs.failed, gs.connection_type) == ("a", "b", 1, 0, ConnectionType.NONE)
    assert gs.server_duration is not None and gs.server_duration.count == 1 and gs.client_duration is None
    assert (gc.client, gc.server, gc.requests) == ("a", "b", 0)
    assert gc.client_duration is not None and gc.client_duration.count == 1

    # Spans: one per record, the client one joining the captured trace.
    (sc,) = n1.spans
    (ss,) = n2.spans
    assert (sc.side, ss.side) == (Side.CLIENT, Side.SERVER)
    assert sc.context.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736" and sc.context.remote_parent
    assert sc.end_unix_nano - sc.start_unix_nano == 3 * MS
    assert attr(sc.edge.server, "k8s.pod.name") == "b-1" and attr(sc.edge.client, "client.port") == 40000

    # Logs: the reset.
    assert [e.name for e in n1.logs] == [EVENT_TCP_RESET] and n2.logs == ()

    # The next interval starts where this one ended, and is empty.
    agg.add(batch("node-1"))
    (again,) = agg.flush(T0 + 20_000 * MS)
    assert again.interval.start_unix_nano == T0 + 10_000 * MS and again.interval.l4 == ()


def test_vip_without_nat_counts_from_the_client_as_virtual_node(index: KubeIndex) -> None:
    agg = Aggregator(index)
    flow = l4(nat_remote_ip="", nat_remote_port=0)
    agg.add(batch("node-1", [flow], [l7(http=pb.HttpInfo(method="POST", status_code=503))]))
    (rep,) = agg.flush(T0 + 1)
    (g,) = rep.interval.service_graph
    assert (g.client, g.server, g.requests, g.failed) == ("a", "b", 1, 1)
    assert g.connection_type is ConnectionType.VIRTUAL_NODE
    (red,) = rep.interval.red
    assert attr(red.edge.server, "k8s.service.name") == "b"


def test_connect_failures_and_dns_errors(index: KubeIndex) -> None:
    agg = Aggregator(index)
    refused = l4(socket_cookie=1, connect_status=pb.CONNECT_STATUS_REFUSED, connect_errno=111)
    timeout = l4(socket_cookie=2, kind=pb.RECORD_KIND_CLOSE, connect_status=pb.CONNECT_STATUS_TIMEOUT)
    # The refused socket reported again (PERIODIC, then CLOSE): still one failure, no connection.
    refused_close = l4(socket_cookie=1, kind=pb.RECORD_KIND_CLOSE, connect_status=pb.CONNECT_STATUS_REFUSED)
    dns = l7(
        protocol="dns",
        remote_ip="10.96.0.10",
        remote_port=53,
        dns=pb.DnsInfo(id=1, question_name="nope.example.", question_type="A", rcode="NXDOMAIN"),
    )
    dns_timeout = l7(protocol="dns", remote_ip="10.96.0.10", dns=pb.DnsInfo(question_type="AAAA", timed_out=True))
    agg.add(batch("node-1", [refused, timeout, refused_close], [dns, dns_timeout, l7(protocol="kafka")]))
    (rep,) = agg.flush(T0 + 1)
    (p,) = rep.interval.l4
    assert p.connections == 0
    assert p.connect_failures == (("connection_refused", 1), ("timeout", 1))
    names = [e.name for e in rep.logs]
    # An NXDOMAIN is an answer, not an error (test_aggregate_dns): only the timeout is logged.
    assert names.count(EVENT_CONNECT_REFUSED) == 1 and names.count(EVENT_DNS_ERROR) == 1
    dns_points = {r.error_type: r for r in rep.interval.red if r.protocol is Protocol.DNS}
    assert set(dns_points) == {"", "timeout"}
    assert agg.counters()["unknown_protocol"] == 1
    # Encodes through the real pipeline.
    sent: list[tuple[Signal, EncodedRequest]] = []

    class Sink:
        def submit(self, signal: Signal, request: EncodedRequest) -> bool:
            sent.append((signal, request))
            return True

    pipe = OtlpPipeline(encode.Reporter("r", "n"), Sink())
    assert pipe.export_interval(rep.interval) >= 1
    assert pipe.export_spans("node-1", rep.spans) == 1 and pipe.export_logs("node-1", rep.logs) == 1


def test_state_is_bounded_and_overflow_counted(index: KubeIndex) -> None:
    agg = Aggregator(index, AggregatorSettings(max_edges=2, max_spans=1, max_logs=1, max_sockets=2))
    flows = [l4(socket_cookie=i, nat_remote_ip="", remote_ip=f"203.0.113.{i}") for i in range(5)]
    reqs = [l7(remote_ip=f"203.0.113.{i}") for i in range(3)]
    resets = [l4(socket_cookie=10 + i, delta=pb.L4Counters(resets_sent=1)) for i in range(3)]
    agg.add(batch("node-1", flows + resets, reqs))
    (rep,) = agg.flush(T0 + 1)
    c = agg.counters()
    assert len({p.edge for p in rep.interval.l4}) == 2
    # Flows 2-4, the three reset records (a -> b is a third edge), the request to .2.
    assert c["edges_overflowed"] == 3 + 3 + 1
    assert (len(rep.spans), c["spans_overflowed"]) == (1, 2)
    # The three resets of one edge are one log record (test_aggregate_logs pushes past max_logs).
    assert (len(rep.logs), rep.logs[0].count, c["logs_overflowed"]) == (1, 3, 0)
    assert agg.sockets_tracked == 2 and c["sockets_evicted"] == 6
    assert c["external_remote"] == 8


def test_spans_are_bounded_over_every_node_and_the_bound_resets_each_interval(index: KubeIndex) -> None:
    agg = Aggregator(index, AggregatorSettings(max_spans=10, max_spans_total=3))
    agg.add(batch("node-1", [], [l7(remote_ip=f"203.0.113.{i}") for i in range(2)]))
    agg.add(batch("node-2", [], [l7(remote_ip=f"203.0.113.{i}") for i in range(2)]))
    reports = agg.flush(T0 + 1)
    assert sum(len(r.spans) for r in reports) == 3 and agg.counters()["spans_overflowed"] == 1
    agg.add(batch("node-2", [], [l7(remote_ip=f"203.0.113.{i}") for i in range(3)]))
    (rep,) = agg.flush(T0 + 2)
    assert len(rep.spans) == 3 and agg.counters()["spans_overflowed"] == 1


def test_listener_records_and_unknown_local_are_counted(index: KubeIndex) -> None:
    agg = Aggregator(index)
    agg.add(
        batch(
            "node-1",
            [l4(role=pb.ROLE_LISTENER), l4(local_ip="10.9.9.9", process=pb.ProcessIdentity(container_id="ab" * 32))],
        )
    )
    c = agg.counters()
    assert (c["listener_records"], c["unresolved_local"]) == (1, 1)


def test_one_name_in_two_namespaces_is_two_graph_nodes(index: KubeIndex) -> None:
    """Deployment "b" exists in "default" and in "blog": a's calls to each are two service-graph edges
    (told apart by server_service_namespace), and span resources carry service.namespace."""
    blog_ip = "10.1.2.9"
    index.apply("ADDED", "Deployment", f.workload("b", namespace="blog", uid="dep-blog-b"))
    index.apply("ADDED", "ReplicaSet", f.workload("b-77f9c6d5b8", namespace="blog", uid="rs-blog-b",
                                                  owners=[f.owner("Deployment", "b", "dep-blog-b")]))  # fmt: skip
    index.apply("ADDED", "Pod", f.pod("b-9", namespace="blog", uid="uid-blog-b9", ip=blog_ip, node="node-2",
                                      owners=[f.owner("ReplicaSet", "b-77f9c6d5b8", "rs-blog-b")]))  # fmt: skip
    agg = Aggregator(index)
    to_blog = {"local_ip": blog_ip, "process": pb.ProcessIdentity(pod_uid="uid-blog-b9"), "socket_cookie": 11,
               "remote_port": 40001}  # fmt: skip
    agg.add(
        batch(
            "node-2",
            [server_l4(), server_l4(**to_blog)],
            [l7(pb.ROLE_SERVER), l7(pb.ROLE_SERVER), l7(pb.ROLE_SERVER, **to_blog)],
        )
    )
    (report,) = agg.flush(T0 + 10_000 * MS)
    graph = {(g.server, g.server_namespace): g for g in report.interval.service_graph}
    assert {k: g.requests for k, g in graph.items()} == {("b", "default"): 2, ("b", "blog"): 1}
    assert {g.client_namespace for g in graph.values()} == {"default"}
    labels = [dict(s.attributes) for g in graph.values() for s in semconv.service_graph_samples(g)]
    assert {(d["server"], d["server_service_namespace"], d["client_service_namespace"]) for d in labels} == {
        ("b", "default", "default"), ("b", "blog", "default")}  # fmt: skip
    resources = {dict(semconv.span_resource(s.edge.of(s.side), "node-2")).get("service.namespace") for s in
                 report.spans}  # fmt: skip
    assert resources == {"default", "blog"}


def test_a_listeners_accept_queue_becomes_metrics_of_its_workload(index: KubeIndex) -> None:
    """b's listener on 8080: overflows are deltas, the socket's drop counter a running total (its first
    record only sets the base), the queue a gauge (deepest seen); exported with b's identity and port."""
    agg = Aggregator(index)

    def listener(drops: int, overflows: int, queue: int, cookie: int = 50) -> pb.L4Flow:
        return l4(role=pb.ROLE_LISTENER, socket_cookie=cookie, local_ip=B_IP, local_port=8080, remote_ip="",
                  remote_port=0, nat_remote_ip="", nat_remote_port=0, socket_drops=drops, accept_queue=queue,
                  accept_queue_max=128, delta=pb.L4Counters(listen_overflows=overflows),
                  process=pb.ProcessIdentity(pid=20, pod_uid="uid-b1"))  # fmt: skip

    agg.add(batch("node-2", [listener(drops=7, overflows=0, queue=3), listener(drops=12, overflows=2, queue=128)]))
    agg.add(batch("node-2", [listener(drops=15, overflows=1, queue=5)]))
    (report,) = agg.flush(T0 + 10_000 * MS)
    (lp,) = report.interval.listeners
    assert (lp.port, lp.overflows, lp.drops, lp.queue, lp.queue_limit) == (8080, 3, 8, 128, 128)
    assert attr(lp.owner, "k8s.deployment.name") == "b" and attr(lp.owner, "k8s.pod.name") is None
    samples = {s.instrument.name: s for s in semconv.listener_samples(lp, "node-2")}
    assert {n: s.value for n, s in samples.items()} == {
        "kscope.tcp.listen.overflows": 3, "kscope.tcp.listen.drops": 8, "kscope.tcp.listen.queue": 128,
        "kscope.tcp.listen.queue.limit": 128}  # fmt: skip
    # b's own series: b is the resource, the port the one data-point attribute.
    s = samples["kscope.tcp.listen.overflows"]
    assert s.attributes == (("server.port", 8080),)
    assert (attr(s.resource, "k8s.deployment.name"), attr(s.resource, "k8s.node.name")) == ("b", "node-2")
    assert agg.counters()["listener_records"] == 3
    # the next interval goes on from the socket's last drop count
    agg.add(batch("node-2", [listener(drops=16, overflows=0, queue=0)]))
    (again,) = agg.flush(T0 + 20_000 * MS)
    assert [(p.drops, p.queue) for p in again.interval.listeners] == [(1, 0)]


def test_listeners_are_bounded_per_interval(index: KubeIndex) -> None:
    agg = Aggregator(index, AggregatorSettings(max_listeners=2))
    flows = [l4(role=pb.ROLE_LISTENER, socket_cookie=60 + p, local_ip=B_IP, local_port=p, remote_ip="", remote_port=0,
                process=pb.ProcessIdentity(pod_uid="uid-b1")) for p in (8080, 8081, 8082)]  # fmt: skip
    agg.add(batch("node-2", flows))
    (report,) = agg.flush(T0 + 10_000 * MS)
    assert sorted(p.port for p in report.interval.listeners) == [8080, 8081]
    assert agg.counters()["listeners_overflowed"] == 1
