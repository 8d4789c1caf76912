"""Database and cache operations (kscope.v1 DbInfo) through the aggregator: db.client.operation.duration
and its server-side twin with the OTel database attributes, spans named by db.query.summary, the service
graph edge to the database workload (or to an external database's address and port), and nothing of a
query's literals beyond what the agent sanitized."""

from __future__ import annotations

from typing import Any

from cluster_processor.aggregate import Aggregator
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import encode, semconv
from cluster_processor.otlp.model import Protocol, Side, attr
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor import test_aggregate as base

index = base.index  # a-1 (node-1) calls b's VIP; b-1 (node-2) serves
EXTERNAL_DB = "203.0.113.9"


def op(operation: str, side: int = pb.ROLE_CLIENT, system: str = "redis", **db: Any) -> pb.L7Request:
    q = base.l7(side=side, protocol=system)
    q.db.CopyFrom(pb.DbInfo(system=system, operation=operation, query_summary=db.pop("query_summary", operation),
                            **db))  # fmt: skip
    assert q.WhichOneof("detail") == "db"
    return q


def redis_calls(side: int = pb.ROLE_CLIENT, **kw: Any) -> list[pb.L7Request]:
    calls = [
        op("GET", side, cache_hits=1),
        op("GET", side, cache_misses=1),
        op("GET", side, cache_hits=1),
        op("GET", side, status_code="WRONGTYPE", error_type="WRONGTYPE"),
        op("SET", side),
        op("SET", side),
    ]
    for q in calls:
        for k, v in kw.items():
            setattr(q, k, v)
    return calls  # fmt: skip


def test_client_operations_become_db_client_operation_duration(index: KubeIndex) -> None:
    agg = Aggregator(index)
    agg.add(base.batch("node-1", (), redis_calls()))
    (rep,) = agg.flush(base.T0 + 1)
    red = {(p.method, p.error_type): p.duration.count for p in rep.interval.red}
    assert red == {("GET", ""): 3, ("GET", "WRONGTYPE"): 1, ("SET", ""): 2}
    for p in rep.interval.red:
        assert p.protocol is Protocol.DB and p.side is Side.CLIENT
        sample = semconv._red_sample(p, "node-1")
        assert sample.instrument.name == "db.client.operation.duration" and sample.instrument.unit == "s"
        a = dict(sample.attributes)
        assert (a["db.system.name"], a["db.operation.name"]) == ("redis", p.method)
        assert a.get("error.type", "") == a.get("db.response.status_code", "") == p.error_type
        assert "db.query.summary" not in a and "db.query.text" not in a  # span-only: cardinality
        assert a["service.peer.name"] == "b"
    # The service graph: a -> b, counted from the client (b not observed here), one failure.
    (g,) = rep.interval.service_graph
    assert (g.client, g.server, g.requests, g.failed) == ("a", "b", 6, 1)
    names = sorted(semconv.span_name(s) for s in rep.spans)
    assert names == ["GET"] * 4 + ["SET"] * 2
    assert sum(semconv.span_failed(s) for s in rep.spans) == 1


def test_server_side_and_graph_counted_by_the_database(index: KubeIndex) -> None:
    served = {"local_ip": base.B_IP, "local_port": 6379, "remote_ip": base.A_IP, "remote_port": 40000}
    agg = Aggregator(index)
    agg.add(base.batch("node-2", (), redis_calls(pb.ROLE_SERVER, **served)))
    (rep,) = agg.flush(base.T0 + 1)
    assert {semconv._red_sample(p, "node-2").instrument.name for p in rep.interval.red} == {
        "kscope.db.server.operation.duration"}  # fmt: skip
    (g,) = rep.interval.service_graph
    assert (g.client, g.server, g.requests, g.failed) == ("a", "b", 6, 1)


def test_sql_spans_carry_sanitized_text_and_summary_metrics_the_collection(index: KubeIndex) -> None:
    text = "SELECT * FROM users WHERE id = ? AND name = ?"
    q = op("SELECT", system="postgresql", collection="users", namespace="shop", query_summary="SELECT users",
           query_text=text)  # fmt: skip
    bad = op("INSERT", system="postgresql", collection="users", query_summary="INSERT users",
             query_text="INSERT INTO users VALUES (?)", status_code="23505", error_type="23505")  # fmt: skip
    agg = Aggregator(index)
    agg.add(base.batch("node-1", (), [q, bad]))
    (rep,) = agg.flush(base.T0 + 1)
    ok = next(p for p in rep.interval.red if p.method == "SELECT")
    a = dict(semconv._red_sample(ok, "node-1").attributes)
    assert (a["db.system.name"], a["db.collection.name"], a["db.namespace"]) == ("postgresql", "users", "shop")
    spans = {semconv.span_name(s): s for s in rep.spans}
    assert set(spans) == {"SELECT users", "INSERT users"}
    sa = dict(semconv.span_attributes(spans["SELECT users"]))
    assert (sa["db.query.text"], sa["db.query.summary"], sa["db.operation.name"]) == (text, "SELECT users", "SELECT")
    fa = dict(semconv.span_attributes(spans["INSERT users"]))
    assert (fa["db.response.status_code"], fa["error.type"]) == ("23505", "23505")
    assert semconv.span_failed(spans["INSERT users"]) and not semconv.span_failed(spans["SELECT users"])
    assert encode.span(spans["SELECT users"]).name == "SELECT users"


def test_an_external_database_is_named_by_address_and_port(index: KubeIndex) -> None:
    agg = Aggregator(index)
    q = op("GET")
    q.remote_ip, q.remote_port = EXTERNAL_DB, 6379
    agg.add(base.batch("node-1", (), [q]))
    (rep,) = agg.flush(base.T0 + 1)
    (p,) = rep.interval.red
    a = dict(semconv._red_sample(p, "node-1").attributes)
    assert (a["server.address"], a["server.port"]) == (EXTERNAL_DB, 6379)
    (g,) = rep.interval.service_graph
    assert g.client == "a" and EXTERNAL_DB in g.server
    assert attr(rep.spans[0].attributes, "db.system.name") == "redis"


def test_an_unknown_protocol_is_counted_not_guessed(index: KubeIndex) -> None:
    agg = Aggregator(index)
    q = op("FIND", system="mongodb")
    q.protocol = "mongodb"
    agg.add(base.batch("node-1", (), [q]))
    (rep,) = agg.flush(base.T0 + 1)
    assert not rep.interval.red and agg.counters()["unknown_protocol"] == 1
