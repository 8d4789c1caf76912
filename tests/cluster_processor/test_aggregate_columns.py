"""The columnar form of L4 records (``L4Columns``, schema_version 2) aggregates to exactly what the row
form (``L4Flow``) gives for the same records: the same ``NodeReport``s, the same counters, the same
OTLP requests byte for byte, on random records, with every resolution-cache bound, and with a socket
table so small that it evicts."""

from __future__ import annotations

import random

import pytest

from cluster_processor.aggregate import Aggregator, AggregatorSettings, NodeReport
from cluster_processor.otlp import encode, model
from cluster_processor.otlp.encode import EncodedRequest
from cluster_processor.otlp.exporter import Signal
from cluster_processor.otlp.pipeline import OtlpPipeline
from kscope.v1 import flow_pb2 as pb
from kscope_common.l4_columns import to_columns
from tests.cluster_processor.test_aggregate_cache import T0, S, build_index, random_batch


class Serialized:
    """What the gRPC stub would send: every request, serialized, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[Signal, bytes]] = []

    def submit(self, signal: Signal, request: EncodedRequest) -> bool:
        self.sent.append((signal, request.data))
        return True


def columnar(batch: pb.FlowBatch) -> pb.FlowBatch:
    out = pb.FlowBatch()
    out.CopyFrom(batch)
    out.schema_version = 2
    del out.l4[:]
    if batch.l4:
        out.l4_columns.CopyFrom(to_columns(batch.l4))
    return out


def random_flows_batch(r: random.Random, node: str, k: int) -> pb.FlowBatch:
    """``random_batch`` plus the counters it leaves at zero, so every sparse column is exercised."""
    b = random_batch(r, node, k)
    for fl in b.l4:
        if r.random() < 0.2:
            fl.delta.retransmits, fl.delta.syn_retransmits = r.randint(0, 3), r.randint(0, 2)
        if r.random() < 0.1:
            fl.delta.drops, fl.delta.resets_sent = r.randint(1, 4), int(r.random() < 0.3)
        if r.random() < 0.1:
            fl.connect_status = r.choice([pb.CONNECT_STATUS_TIMEOUT, pb.CONNECT_STATUS_OTHER, 99])
        if fl.role == pb.ROLE_LISTENER:
            fl.socket_drops, fl.accept_queue, fl.accept_queue_max = r.randint(0, 50), r.randint(0, 9), 128
            fl.delta.listen_overflows = r.randint(0, 3)
    return b


def run(
    batches: list[list[pb.FlowBatch]], settings: AggregatorSettings, form: str
) -> tuple[list[NodeReport], dict[str, int], list[tuple[Signal, bytes]]]:
    agg = Aggregator(build_index(), settings)
    sink = Serialized()
    pipe = OtlpPipeline(encode.Reporter("test-0", "node-1"), sink, start_unix_nano=T0)
    reports = []
    for k, interval in enumerate(batches):
        model._RNG.seed(k)
        for j, b in enumerate(interval):
            # mixed: an old agent's rows and a new agent's columns on the same sockets, batch by batch
            as_columns = form == "columns" or (form == "mixed" and (j + k) % 2 == 0)
            agg.add(columnar(b) if as_columns else b, T0 + k * S)
        for rep in agg.flush(T0 + (k + 1) * S):
            reports.append(rep)
            pipe.export_interval(rep.interval)
            pipe.export_logs(rep.interval.node_name, rep.logs)
    return reports, agg.counters(), sink.sent


@pytest.mark.parametrize(
    ("seed", "settings"),
    [
        (1, AggregatorSettings()),
        (2, AggregatorSettings()),
        (3, AggregatorSettings(max_resolutions=0)),  # the reference path: every record resolved afresh
        (4, AggregatorSettings(max_resolutions=3)),
        (5, AggregatorSettings(max_resolutions=1)),
        (6, AggregatorSettings(max_sockets=7, max_edges=5, max_logs=4, max_listeners=2)),
    ],
)
def test_columns_aggregate_exactly_as_rows(seed: int, settings: AggregatorSettings) -> None:
    r = random.Random(seed)
    batches = [[random_flows_batch(r, n, k) for n in ("node-1", "node-2", "node-1")] for k in range(4)]
    rows_reports, rows_counters, rows_sent = run(batches, settings, "rows")
    cols_reports, cols_counters, cols_sent = run(batches, settings, "columns")
    assert cols_reports == rows_reports
    assert cols_counters == rows_counters
    assert cols_sent == rows_sent
    assert run(batches, settings, "mixed") == (rows_reports, rows_counters, rows_sent)
    # The data reached every path being compared: edges, logs, listeners, NAT, and the OTLP requests.
    assert any(rep.interval.l4 for rep in rows_reports) and any(rep.logs for rep in rows_reports)
    assert any(rep.interval.listeners for rep in rows_reports)
    assert rows_counters["l4_records"] > 300 and rows_counters["listener_records"] > 0
    assert {signal for signal, _ in rows_sent} == {Signal.METRICS, Signal.LOGS}
    if settings.max_sockets < 100:
        assert rows_counters["sockets_evicted"] > 0 and rows_counters["edges_overflowed"] > 0


def test_an_l7_record_joins_the_nat_answer_a_columnar_l4_record_carried() -> None:
    b = pb.FlowBatch(schema_version=1, node_name="node-1", time_unix_nano=T0)
    b.l4.append(pb.L4Flow(socket_cookie=5, netns_inode=7, role=pb.ROLE_CLIENT, ip_family=4, local_ip="10.1.0.2",
                          local_port=40000, remote_ip="10.96.0.1", remote_port=80, nat_remote_ip="10.1.0.3",
                          nat_remote_port=8080, process=pb.ProcessIdentity(pod_uid="uid-p0")))  # fmt: skip
    b.l7.append(pb.L7Request(socket_cookie=5, netns_inode=7, side=pb.ROLE_CLIENT, protocol="http1", ip_family=4,
                             local_ip="10.1.0.2", local_port=40000, remote_ip="10.96.0.1", remote_port=80,
                             process=pb.ProcessIdentity(pod_uid="uid-p0"), latency_ns=10**6,
                             http=pb.HttpInfo(method="GET", status_code=200)))  # fmt: skip
    reports = {}
    for form in ("rows", "columns"):
        agg = Aggregator(build_index())
        agg.add(columnar(b) if form == "columns" else b, T0)
        (rep,) = agg.flush(T0 + S)
        reports[form] = rep
    (red,) = reports["columns"].interval.red
    # The backend that answered (pod p1 of d1), not the Service VIP (svc0) the client dialled.
    assert ("k8s.deployment.name", "d1") in red.edge.server and ("k8s.service.name", "svc0") not in red.edge.server
    assert reports["columns"].interval.red == reports["rows"].interval.red
