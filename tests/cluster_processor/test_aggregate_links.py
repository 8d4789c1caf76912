"""Both ends of one request linked by their TCP sequence numbers (docs/traces.md): two processor
replicas, each seeing one end, give the same trace id and the server span the client span as parent;
an application's traceparent wins; the matched-share counters and their bound."""

from __future__ import annotations

from typing import Any

from cluster_processor.aggregate import Aggregator, AggregatorSettings
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp.links import LINK_WINDOW_NS, linked_ids
from cluster_processor.otlp.model import SpanRecord
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor.test_aggregate import MS, T0, TRACEPARENT, batch, index, l4, l7, server_l4

__all__ = ["index"]  # the fixture
SEQS = (0xFFFFFF00, 17)


def linked(side: int, seqs: tuple[int, int] = SEQS, start: int = T0, **http: Any) -> pb.L7Request:
    info = pb.HttpInfo(method="GET", path="/items/42", route="/items/{id}", status_code=200, tcp_seqs_known=True,
                       tcp_request_seq=seqs[0], tcp_response_seq=seqs[1], **http)  # fmt: skip
    return l7(side, http=info, start_time_unix_nano=start)


def spans(agg: Aggregator, node: str) -> list[SpanRecord]:
    (report,) = [r for r in agg.flush(T0 + 10_000 * MS) if r.interval.node_name == node]
    return list(report.spans)


def test_two_replicas_link_both_ends_without_a_join(index: KubeIndex) -> None:
    one, two = Aggregator(index), Aggregator(index)  # a replica per node: nothing shared
    one.add(batch("node-1", [l4()], [linked(pb.ROLE_CLIENT)]))
    two.add(batch("node-2", [server_l4()], [linked(pb.ROLE_SERVER, start=T0 + MS)]))
    (c,) = spans(one, "node-1")
    (s,) = spans(two, "node-2")
    assert c.context.trace_id == s.context.trace_id
    assert s.context.parent_span_id == c.context.span_id != s.context.span_id
    assert c.context.parent_span_id == b"" and s.context.remote_parent and not c.context.remote_parent
    assert (c.context.trace_id, c.context.span_id, s.context.span_id) == linked_ids(*SEQS, T0)
    # each replica saw one end: linked, nothing matched
    assert one.counters()["spans_client_linked"] == two.counters()["spans_server_parent_inferred"] == 1
    assert one.counters()["spans_client_matched"] == two.counters()["spans_server_matched"] == 0


def test_other_requests_get_other_ids(index: KubeIndex) -> None:
    ids = {linked_ids(r, p, T0) for r in (0, 1, SEQS[0]) for p in (0, 1, SEQS[1])}
    assert len(ids) == 9 and len({i[0] for i in ids}) == 9
    # the time bound: the same numbers an hour later are another request (the 4 GiB wrap)
    assert linked_ids(*SEQS, T0)[0] != linked_ids(*SEQS, T0 + LINK_WINDOW_NS)[0]


def test_an_applications_traceparent_wins(index: KubeIndex) -> None:
    agg = Aggregator(index)
    agg.add(batch("node-2", [server_l4()], [linked(pb.ROLE_SERVER, traceparent=TRACEPARENT)]))
    (s,) = spans(agg, "node-2")
    assert s.context.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert s.context.parent_span_id.hex() == "00f067aa0ba902b7"
    c = agg.counters()
    assert (c["spans_server"], c["spans_server_parent_header"], c["spans_server_parent_inferred"]) == (1, 1, 0)


def test_without_seqs_nothing_is_inferred(index: KubeIndex) -> None:
    agg = Aggregator(index)
    agg.add(batch("node-2", [server_l4()], [l7(pb.ROLE_SERVER)]))
    (s,) = spans(agg, "node-2")
    assert s.context.parent_span_id == b""
    assert agg.counters()["spans_server_parent_inferred"] == 0


def test_one_processor_seeing_both_ends_counts_them_matched(index: KubeIndex) -> None:
    agg = Aggregator(index)
    agg.add(batch("node-1", [l4()], [linked(pb.ROLE_CLIENT), linked(pb.ROLE_CLIENT, (5, 6))]))
    agg.add(batch("node-2", [server_l4()], [linked(pb.ROLE_SERVER)]))
    c = agg.counters()
    assert (c["spans_client"], c["spans_client_linked"], c["spans_client_matched"]) == (2, 2, 1)
    assert (c["spans_server"], c["spans_server_parent_inferred"], c["spans_server_matched"]) == (1, 1, 1)


def test_pending_ends_are_bounded_and_evictions_counted(index: KubeIndex) -> None:
    agg = Aggregator(index, AggregatorSettings(max_link_pending=2))
    agg.add(batch("node-1", [l4()], [linked(pb.ROLE_CLIENT, (i, i)) for i in range(3)]))
    # the oldest client end (0) was forgotten: its server end finds nothing and waits in its turn
    agg.add(batch("node-2", [server_l4()], [linked(pb.ROLE_SERVER, (i, i)) for i in (2, 1, 0)]))
    c = agg.counters()
    assert (c["link_pending_evicted"], c["spans_client_matched"], c["spans_server_matched"]) == (1, 2, 2)
