"""The OTel data model: each observed workload's series under a Resource describing it, the peer in
data-point attributes; the service graph, overflow streams and the agents' counters under kscope's.
Records go through the real aggregator, pipeline and encoder; what a receiver parses is read back."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from cluster_processor.aggregate import Aggregator
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import encode
from cluster_processor.otlp.cumulative import CumulativeStore
from cluster_processor.otlp.exporter import Signal
from cluster_processor.otlp.pipeline import OtlpPipeline
from cluster_processor.otlp.semconv import TCP_BYTES, Sample
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor import test_aggregate as base
from tests.cluster_processor.kube import factories as kf
from tests.cluster_processor.otlp.factories import kv
from tests.cluster_processor.otlp.test_encode import ListSink

index = base.index  # a-1 (node-1) calls b through its VIP; b-1 (node-2) answers
REPLICA = "kscope-processor-0"
# (resource, metric, data-point attributes, value) as a receiver sees them
Point = tuple[dict[str, Any], str, dict[str, Any], float]


def received(sink: ListSink) -> list[Point]:
    out: list[Point] = []
    for req in sink.metrics():
        for rm in req.resource_metrics:
            res = kv(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for dp in getattr(m, kind).data_points:
                        value = dp.count if kind == "histogram" else (dp.as_int or dp.as_double)
                        out.append((res, m.name, kv(dp.attributes), value))
    return out


def exported(index: KubeIndex, *batches: pb.FlowBatch) -> list[Point]:
    agg = Aggregator(index)
    for b in batches:
        agg.add(b)
    sink = ListSink()
    pipe = OtlpPipeline(encode.Reporter(REPLICA, "node-x"), sink)
    for rep in agg.flush(base.T0 + 10_000 * base.MS):
        pipe.export_interval(rep.interval)
    return received(sink)


def workload(res: dict[str, Any]) -> tuple[str, str]:
    return res["service.name"], res["k8s.node.name"]


def test_each_workloads_series_sit_under_its_own_resource(index: KubeIndex) -> None:
    dns = base.l7(protocol="dns", remote_ip="10.96.0.10", remote_port=53, socket_cookie=8,
                  dns=pb.DnsInfo(question_name="x.example.", question_type="A", rcode="SERVFAIL"))  # fmt: skip
    listener = base.l4(role=pb.ROLE_LISTENER, socket_cookie=50, local_ip=base.B_IP, local_port=8080, remote_ip="",
                       remote_port=0, nat_remote_ip="", accept_queue=3, accept_queue_max=128,
                       process=pb.ProcessIdentity(pod_uid="uid-b1"))  # fmt: skip
    points = exported(
        index,
        base.batch("node-1", [base.l4(delta=pb.L4Counters(bytes_sent=100))], [base.l7(), dns]),
        base.batch(
            "node-2", [base.server_l4(delta=pb.L4Counters(bytes_received=100)), listener], [base.l7(pb.ROLE_SERVER)]
        ),
    )
    by_metric: dict[str, set[tuple[str, str]]] = {}
    for res, name, _, _ in points:
        by_metric.setdefault(name, set()).add(workload(res))
    assert by_metric["http.client.request.duration"] == {("a", "node-1")}
    assert by_metric["http.server.request.duration"] == {("b", "node-2")}
    assert by_metric["dns.lookup.duration"] == {("a", "node-1")}
    assert by_metric["kscope.tcp.bytes"] == {("a", "node-1"), ("b", "node-2")}
    assert by_metric["kscope.tcp.listen.queue"] == {("b", "node-2")}
    # The service graph stays under kscope's resource of the reporting node, as the servicegraph
    # connector and Tempo emit it (an edge belongs to two workloads).
    assert by_metric["traces_service_graph_request_total"] == {("kscope", "node-1"), ("kscope", "node-2")}
    for res, name, a, _ in points:
        writer = "node-1" if res["k8s.node.name"] == "node-1" else "node-2"
        assert res["service.instance.id"] == f"{REPLICA}/{writer}"  # one writer per stream
        if res["service.name"] == "kscope":
            assert name.startswith("traces_service_graph") and res["service.version"]
            continue
        assert res == {"service.name": res["service.name"], "service.namespace": "default",
                       "k8s.namespace.name": "default", "k8s.deployment.name": res["service.name"],
                       "k8s.node.name": writer, "service.instance.id": f"{REPLICA}/{writer}"}  # fmt: skip
        # The observing workload is not repeated on its points; the peer is there, by convention.
        assert not {"service.name", "k8s.deployment.name", "k8s.namespace.name"} & set(a), (name, a)
        if name.startswith(("http.", "kscope.tcp.bytes")):
            peer = "b" if res["service.name"] == "a" else "a"
            assert (a["service.peer.name"], a["service.peer.namespace"]) == (peer, "default"), (name, a)
            assert a["peer.k8s.deployment.name"] == peer


def test_one_workload_on_two_nodes_is_two_writers(index: KubeIndex) -> None:
    """b has a second pod on node-3: each node writes b's series under its own resource."""
    owners = [kf.owner("ReplicaSet", "b-5d8f7c9b6d", "rs-b")]
    index.apply("ADDED", "Pod", kf.pod("b-2", uid="uid-b2", ip="10.1.3.3", node="node-3", owners=owners))
    other = {"local_ip": "10.1.3.3", "process": pb.ProcessIdentity(pod_uid="uid-b2"), "socket_cookie": 33}
    points = exported(
        index,
        base.batch("node-2", [], [base.l7(pb.ROLE_SERVER)]),
        base.batch("node-3", [], [base.l7(pb.ROLE_SERVER, **other), base.l7(pb.ROLE_SERVER, **other)]),
    )
    server = {(r["k8s.node.name"], r["service.instance.id"]): v for r, n, _, v in points
              if n == "http.server.request.duration"}  # fmt: skip
    assert server == {("node-2", f"{REPLICA}/node-2"): 1, ("node-3", f"{REPLICA}/node-3"): 2}


def test_the_cardinality_cap_spans_a_nodes_resources_and_overflows_under_kscope() -> None:
    """max_series per (node, metric) bounds all the node's workloads together; past it, one overflow
    stream under kscope's resource of the node, counted."""
    sink = ListSink()
    pipe = OtlpPipeline(encode.Reporter(REPLICA, "node-x"), sink, store=CumulativeStore(max_series=4))
    samples = [Sample(TCP_BYTES, (("service.peer.name", "p"),), 1, (("service.name", f"w{i}"),)) for i in range(6)]
    groups = pipe.store.update_series("node-1", base.T0, base.T0 + 1, samples)
    for req in encode.series_requests(pipe._reporter.metrics_resource("node-1"), groups, base.T0 + 1,
                                      resource_of=lambda r: pipe._reporter.workload_resource(r, "node-1")):  # fmt: skip
        sink.submit(Signal.METRICS, req)
    points = received(sink)
    assert sorted(r["service.name"] for r, _, a, _ in points if not a.get("otel.metric.overflow")) == [
        "w0", "w1", "w2"]  # fmt: skip
    ((res, _, _, value),) = [p for p in points if p[2].get("otel.metric.overflow")]
    assert (res["service.name"], res["k8s.node.name"], value) == ("kscope", "node-1", 3)
    assert pipe.store.stats().overflowed == {"kscope.tcp.bytes": 3}


@pytest.mark.parametrize("max_points", [1, 3, 7, 1000])
def test_requests_split_across_resources_stay_bounded_and_lose_nothing(max_points: int) -> None:
    r = random.Random(max_points)
    store = CumulativeStore()
    workloads: list[tuple[tuple[str, Any], ...]] = [(("service.name", f"w{i}"),) for i in range(5)]
    samples = [Sample(TCP_BYTES, (("i", i),), r.randint(1, 9), r.choice([(), *workloads])) for i in range(40)]
    groups = store.update_series("n", base.T0, base.T0 + 1, samples)
    kscope = (("service.name", "kscope"),)
    reqs = encode.series_requests(kscope, groups, base.T0 + 1, max_points=max_points,
                                  resource_of=lambda res: (*res, ("service.instance.id", "r/n")))  # fmt: skip
    got: Counter[tuple[Any, ...]] = Counter()
    for req in reqs:
        parsed = ExportMetricsServiceRequest.FromString(req.data)
        assert req.items == encode.count_points(parsed) <= max_points
        assert len({rm.resource.SerializeToString() for rm in parsed.resource_metrics}) == len(parsed.resource_metrics)
        for rm in parsed.resource_metrics:
            res = kv(rm.resource.attributes)
            for m in rm.scope_metrics[0].metrics:
                for dp in m.sum.data_points:
                    got[res["service.name"], kv(dp.attributes)["i"], dp.as_int] += 1
    want = Counter((s.resource[0][1] if s.resource else "kscope", s.attributes[0][1], s.value) for s in samples)
    assert got == want
