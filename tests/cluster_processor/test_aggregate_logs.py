"""Event logs are aggregated per interval: one record per (workload edge, side, kind, what tells
occurrences apart) with a count and the first and last time, bounded per node and interval, every
occurrence past the bound counted. The number of records does not grow with the traffic."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from cluster_processor.aggregate import Aggregator, AggregatorSettings, NodeReport
from cluster_processor.events import EventLog
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import encode
from cluster_processor.otlp.model import (
    EVENT_CONNECT_REFUSED,
    EVENT_DNS_ERROR,
    EVENT_HTTP_SERVER_ERROR,
    EVENT_TCP_RESET,
    Edge,
    Severity,
    Side,
    attr,
)
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor import test_aggregate as base
from tests.cluster_processor.otlp.factories import kv

index = base.index  # a-1 (node-1) calls b through its VIP; b-1 (node-2) answers
MS = base.MS
END = base.T0 + 10_000 * MS


def lookup(name: str, rcode: str, i: int) -> pb.L7Request:
    info = pb.DnsInfo(id=i, question_name=name, question_type="A", rcode=rcode)
    return base.l7(protocol="dns", remote_ip="10.96.0.10", remote_port=53, socket_cookie=1000 + i,
                   start_time_unix_nano=base.T0 + i * MS, dns=info)  # fmt: skip


def flush(agg: Aggregator, node: str = "node-1") -> NodeReport:
    return {r.interval.node_name: r for r in agg.flush(END)}[node]


@pytest.mark.parametrize("lookups", [10, 1000])
def test_failed_lookups_are_one_record_per_caller_server_name_and_code(index: KubeIndex, lookups: int) -> None:
    agg = Aggregator(index)
    reqs = [lookup("ext.example.", "SERVFAIL", i) for i in range(lookups)]
    reqs += [lookup("ext.example.", "REFUSED", i) for i in range(3)]
    reqs += [lookup("other.example.", "SERVFAIL", i) for i in range(2)]
    reqs += [lookup("ext.example.svc.cluster.local.", "NXDOMAIN", i) for i in range(lookups)]  # no failure
    agg.add(base.batch("node-1", (), reqs))
    rep = flush(agg)
    got = {(attr(e.attributes, "dns.question.name"), attr(e.attributes, "dns.response_code")): e for e in rep.logs}
    # Three records whatever the traffic: the count carries the volume.
    assert {k: e.count for k, e in got.items()} == {
        ("ext.example.", "SERVFAIL"): lookups,
        ("ext.example.", "REFUSED"): 3,
        ("other.example.", "SERVFAIL"): 2,
    }
    e = got["ext.example.", "SERVFAIL"]
    assert (e.name, e.side, attr(e.attributes, "error.type")) == (EVENT_DNS_ERROR, Side.CLIENT, "servfail")
    assert (e.time_unix_nano, e.last_unix_nano, e.observed_unix_nano) == (
        base.T0, base.T0 + (lookups - 1) * MS, END)  # fmt: skip
    # Workload level: the caller and the DNS server, no pod, no client port.
    assert attr(e.edge.client, "k8s.deployment.name") == "a" and attr(e.edge.client, "k8s.pod.name") is None
    assert attr(e.edge.client, "client.port") is None
    assert e.trace_id and e.span_id  # the first occurrence's span: a way into one example
    assert agg.counters()["log_events"] == lookups + 5


def test_records_are_bounded_per_interval_and_what_does_not_fit_is_counted(index: KubeIndex) -> None:
    agg = Aggregator(index, AggregatorSettings(max_logs=3))
    # Ten failing names, twice each: three records fit; the other seven names' 14 lookups are counted.
    agg.add(base.batch("node-1", (), [lookup(f"n{k}.example.", "SERVFAIL", 2 * k + j) for k in range(10)
                                      for j in range(2)]))  # fmt: skip
    rep = flush(agg)
    assert len(rep.logs) == 3 and all(e.count == 2 for e in rep.logs)
    c = agg.counters()
    assert (c["logs_overflowed"], c["log_events"]) == (14, 6)
    # A new interval has room again (in arrival order); past it, again counted: n9's lookup.
    agg.add(base.batch("node-1", (), [lookup("n0.example.", "SERVFAIL", i) for i in range(5)]
                       + [lookup(f"n{k}.example.", "SERVFAIL", 1) for k in (1, 2, 9)]))  # fmt: skip
    assert [e.count for e in flush(agg).logs] == [5, 1, 1]
    assert agg.counters()["logs_overflowed"] == 14 + 1


def test_resets_and_refused_connects_aggregate_per_edge(index: KubeIndex) -> None:
    agg = Aggregator(index)
    resets = [base.l4(socket_cookie=10 + i, local_port=41000 + i, time_unix_nano=base.T0 + i * MS,
                      delta=pb.L4Counters(resets_sent=1, resets_received=i % 2), tcp_state="ESTABLISHED")
              for i in range(6)]  # fmt: skip
    refused = [base.l4(socket_cookie=30 + i, local_port=42000 + i, connect_status=pb.CONNECT_STATUS_REFUSED,
                       connect_errno=111) for i in range(4)]  # fmt: skip
    agg.add(base.batch("node-1", resets + refused))
    rep = flush(agg)
    by_name = {e.name: e for e in rep.logs}
    assert len(rep.logs) == 2
    r = by_name[EVENT_TCP_RESET]
    sums = (attr(r.attributes, "kscope.tcp.resets_sent"), attr(r.attributes, "kscope.tcp.resets_received"))
    assert (r.count, sums) == (6, (6, 3))
    assert (r.time_unix_nano, r.last_unix_nano) == (base.T0, base.T0 + 5 * MS)
    f = by_name[EVENT_CONNECT_REFUSED]
    assert (f.count, attr(f.attributes, "error.type")) == (4, "connection_refused")
    assert "connect to b:8080 failed" in f.body


def test_5xx_answers_aggregate_per_route_and_status_on_each_side(index: KubeIndex) -> None:
    agg = Aggregator(index)

    def answers(side: int, status: int, n: int, path: str = "/items/42") -> list[pb.L7Request]:
        http = pb.HttpInfo(method="GET", path=path, route="/items/{id}", status_code=status)
        return [base.l7(side, http=http) for _ in range(n)]

    client = answers(pb.ROLE_CLIENT, 503, 20) + answers(pb.ROLE_CLIENT, 500, 3) + answers(pb.ROLE_CLIENT, 200, 50)
    server = answers(pb.ROLE_SERVER, 503, 20, "/items/7") + answers(pb.ROLE_SERVER, 404, 5)
    agg.add(base.batch("node-1", [base.l4()], client))
    agg.add(base.batch("node-2", [base.server_l4()], server))
    reports = {r.interval.node_name: r for r in agg.flush(END)}

    def summary(rep: NodeReport) -> dict[tuple[Any, ...], int]:
        return {(e.side, e.name, attr(e.attributes, "http.response.status_code"), attr(e.attributes, "http.route")):
                e.count for e in rep.logs}  # fmt: skip

    assert summary(reports["node-1"]) == {
        (Side.CLIENT, EVENT_HTTP_SERVER_ERROR, 503, "/items/{id}"): 20,
        (Side.CLIENT, EVENT_HTTP_SERVER_ERROR, 500, "/items/{id}"): 3}  # fmt: skip
    assert summary(reports["node-2"]) == {(Side.SERVER, EVENT_HTTP_SERVER_ERROR, 503, "/items/{id}"): 20}
    # The route template, never the path.
    assert not [e for r in reports.values() for e in r.logs if "/items/4" in str(e) or "/items/7" in str(e)]


def test_an_aggregated_record_on_the_wire(index: KubeIndex) -> None:
    agg = Aggregator(index)
    agg.add(base.batch("node-1", (), [lookup("ext.example.", "SERVFAIL", i) for i in range(7)]))
    (req,) = encode.logs_requests("node-1", flush(agg).logs)
    parsed = ExportLogsServiceRequest.FromString(req.data)
    (rl,) = parsed.resource_logs
    res = kv(rl.resource.attributes)
    assert (res["service.name"], res["k8s.deployment.name"], res["k8s.node.name"]) == ("a", "a", "node-1")
    (lr,) = rl.scope_logs[0].log_records
    a = kv(lr.attributes)
    assert (lr.time_unix_nano, lr.observed_time_unix_nano) == (base.T0, END)
    assert (a["log_count"], a["first_observed_timestamp"], a["last_observed_timestamp"]) == (
        7, "2023-11-14T22:13:20.000000000Z", "2023-11-14T22:13:20.006000000Z")  # fmt: skip
    assert (a["event.name"], a["dns.question.name"], a["error.type"]) == (EVENT_DNS_ERROR, "ext.example.", "servfail")
    assert lr.body.string_value == "DNS A ext.example.: servfail"


def test_event_log_takes_occurrences_in_any_order() -> None:
    """Batches of one node may arrive out of order: the record's time is the earliest occurrence
    (with its trace), its last time the latest; counters sum; a full log refuses a new record."""
    e = Edge((("service.name", "a"),), (("service.name", "b"),))
    counters = {"logs_overflowed": 0, "log_events": 0}
    log = EventLog(1, counters)
    for t, trace in ((5, b"5"), (2, b"2"), (9, b"9")):
        assert log.add(e, Side.CLIENT, t, EVENT_TCP_RESET, Severity.WARN, "reset", (), (trace, b""),
                       sums=(("kscope.tcp.resets_sent", t),))  # fmt: skip
    assert not log.add(e, Side.SERVER, 1, EVENT_TCP_RESET, Severity.WARN, "reset", ())
    (rec,) = log.records(100)
    assert (rec.count, rec.time_unix_nano, rec.last_unix_nano, rec.observed_unix_nano, rec.trace_id) == (
        3, 2, 9, 100, b"2")  # fmt: skip
    assert rec.attributes == (("kscope.tcp.resets_sent", 16),)
    assert counters == {"logs_overflowed": 1, "log_events": 3}
