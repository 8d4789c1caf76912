"""L4 records in columns (``L4Columns``, schema_version 2: what agents ship), the aggregator's one L4
path: the counters most records leave at zero are summed per edge side from their sparse columns; an
L7 record joins the NAT answer its socket's columnar L4 record carried; an older agent's rows
(schema_version 1) are read as the same columns, not dropped."""

from __future__ import annotations

import random

from cluster_processor.aggregate import Aggregator, AggregatorSettings
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp import model
from cluster_processor.resolved import Side, graph_node_name
from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import to_columns
from tests.cluster_processor import test_aggregate as base
from tests.cluster_processor.test_aggregate_cache import T0, S, build_index, random_batch

index = base.index  # a-1 (node-1) calls b through its VIP; b-1 (node-2) answers


def columnar(batch: pb.FlowBatch) -> pb.FlowBatch:
    out = pb.FlowBatch()
    out.CopyFrom(batch)
    out.schema_version = 2
    del out.l4[:]
    if batch.l4:
        out.l4_columns.CopyFrom(to_columns(batch.l4))
    return out


def test_sparse_counters_sum_per_edge_side(index: KubeIndex) -> None:
    """Retransmits, resets and drops live in columns most records leave empty: each is summed into its
    record's edge side; a listener's drops and a record whose edge did not fit add nothing."""
    agg = Aggregator(index, AggregatorSettings(max_edges=1))
    listener = {"role": pb.ROLE_LISTENER, "local_port": 8080, "remote_ip": "", "remote_port": 0}
    external = {"remote_ip": "203.0.113.9", "remote_port": 443}  # a second edge: past max_edges
    no_nat = {"nat_remote_ip": "", "nat_remote_port": 0}
    flows = [
        base.l4(socket_cookie=1, delta=pb.L4Counters(bytes_sent=1, retransmits=2, syn_retransmits=1, drops=3)),
        base.l4(socket_cookie=2, delta=pb.L4Counters(resets_sent=1, resets_received=1)),
        base.l4(socket_cookie=3, delta=pb.L4Counters(bytes_sent=5)),
        base.l4(socket_cookie=4, **listener, **no_nat, delta=pb.L4Counters(drops=40)),
        base.l4(socket_cookie=5, **external, **no_nat, delta=pb.L4Counters(retransmits=50, drops=60, resets_sent=1)),
    ]
    agg.add(columnar(base.batch("node-1", flows)), T0)
    (rep,) = agg.flush(T0 + S)
    (point,) = rep.interval.l4
    assert point.side is Side.CLIENT and graph_node_name(point.edge.server) == "b"
    assert (point.bytes_sent, point.retransmits, point.resets, point.drops) == (6, 3, 2, 3)
    assert agg.counters()["edges_overflowed"] == 1 and agg.counters()["listener_records"] == 1


def test_an_l7_record_joins_the_nat_answer_a_columnar_l4_record_carried() -> None:
    b = pb.FlowBatch(schema_version=1, node_name="node-1", time_unix_nano=T0)
    b.l4.append(pb.L4Flow(socket_cookie=5, netns_inode=7, role=pb.ROLE_CLIENT, ip_family=4, local_ip="10.1.0.2",
                          local_port=40000, remote_ip="10.96.0.1", remote_port=80, nat_remote_ip="10.1.0.3",
                          nat_remote_port=8080, process=pb.ProcessIdentity(pod_uid="uid-p0")))  # fmt: skip
    b.l7.append(pb.L7Request(socket_cookie=5, netns_inode=7, side=pb.ROLE_CLIENT, protocol="http1", ip_family=4,
                             local_ip="10.1.0.2", local_port=40000, remote_ip="10.96.0.1", remote_port=80,
                             process=pb.ProcessIdentity(pod_uid="uid-p0"), latency_ns=10**6,
                             http=pb.HttpInfo(method="GET", status_code=200)))  # fmt: skip
    agg = Aggregator(build_index())
    agg.add(columnar(b), T0)
    (rep,) = agg.flush(T0 + S)
    (red,) = rep.interval.red
    # The backend that answered (pod p1 of d1), not the Service VIP (svc0) the client dialled.
    assert ("k8s.deployment.name", "d1") in red.edge.server and ("k8s.service.name", "svc0") not in red.edge.server


def test_an_older_agents_rows_aggregate_as_their_columns() -> None:
    r = random.Random(7)
    batches = [random_batch(r, "node-1", 0), random_batch(r, "node-2", 0)]
    results = []
    for form in ("rows", "columns"):
        agg = Aggregator(build_index())
        model._RNG.seed(0)
        for b in batches:
            agg.add(columnar(b) if form == "columns" else b, T0)
        results.append((agg.flush(T0 + S), agg.counters()))
    (rows, rows_counters), (cols, cols_counters) = results
    assert rows == cols and rows_counters == cols_counters
    assert any(rep.interval.l4 for rep in rows) and rows_counters["l4_records"] == sum(len(b.l4) for b in batches)
