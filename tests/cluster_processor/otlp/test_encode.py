"""Encoding: records -> cumulative streams -> OTLP protobuf, read back after a wire round trip."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from cluster_processor.otlp import encode
from cluster_processor.otlp.encode import EncodedRequest
from cluster_processor.otlp.exporter import Signal
from cluster_processor.otlp.model import (
    EVENT_TCP_RESET,
    HTTP_DURATION_BOUNDS_S,
    SERVICE_GRAPH_BOUNDS_S,
    ConnectionType,
    Edge,
    Histogram,
    Interval,
    L4Point,
    LogEvent,
    Protocol,
    RedPoint,
    ServiceGraphPoint,
    Severity,
    Side,
    SpanRecord,
    attrs,
    span_context,
)
from cluster_processor.otlp.pipeline import MAX_AGENT_STATS, OtlpPipeline, PipelineSettings
from kscope.v1 import flow_pb2
from tests.cluster_processor.otlp import factories as f

CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE


class ListSink:
    def __init__(self) -> None:
        self.requests: list[tuple[Signal, EncodedRequest]] = []

    def submit(self, signal: Signal, request: EncodedRequest) -> bool:
        self.requests.append((signal, request))
        return True

    def metrics(self) -> list[ExportMetricsServiceRequest]:
        # What a receiver parses: the bytes as sent.
        return [ExportMetricsServiceRequest.FromString(r.data) for s, r in self.requests if s is Signal.METRICS]


def by_name(req: ExportMetricsServiceRequest) -> dict[str, metrics_pb2.Metric]:
    return {m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def red(edge: Edge, side: Side, values: list[float], status: int | None = 200, **kw: Any) -> RedPoint:
    return RedPoint(
        edge, side, Protocol.HTTP, Histogram.of(HTTP_DURATION_BOUNDS_S, values), "GET", "/cart/{id}", status, **kw
    )


def interval(
    n: int, *red_points: RedPoint, l4: tuple[L4Point, ...] = (), sg: tuple[ServiceGraphPoint, ...] = ()
) -> Interval:
    return Interval(f.NODE, f.T0 + n * f.STEP, f.T0 + (n + 1) * f.STEP, red_points, l4, sg)


def pipeline() -> tuple[OtlpPipeline, ListSink]:
    sink = ListSink()
    return OtlpPipeline(encode.Reporter(replica="kscope-processor-0", node_name="node-x"), sink), sink


def test_red_round_trip_is_cumulative_with_stable_start_times() -> None:
    p, sink = pipeline()
    p.export_interval(interval(0, red(f.edge(), Side.SERVER, [0.004, 0.02, 0.3])))
    p.export_interval(interval(1, red(f.edge(), Side.SERVER, [0.02])))
    first, second = sink.metrics()

    # The server's series under the server's own resource (the workload, its node, the writer's
    # instance id: the reporting node's), not kscope's. (This edge is pod-level, as a span's: the
    # aggregator's metric edges name workloads, and the node is then the reporting node's.)
    (rm,) = second.resource_metrics
    resource = f.kv(rm.resource.attributes)
    assert resource == {
        "service.name": "cart", "service.namespace": "shop", "k8s.namespace.name": "shop",
        "k8s.deployment.name": "cart", "k8s.pod.name": "cart-5f6d8c9b7-abcde", "k8s.node.name": "node-b",
        "service.instance.id": f"kscope-processor-0/{f.NODE}"}  # fmt: skip
    assert rm.scope_metrics[0].scope.name == "kscope"

    m = by_name(second)["http.server.request.duration"]
    assert (m.unit, m.WhichOneof("data")) == ("s", "histogram")
    assert m.histogram.aggregation_temporality == CUMULATIVE
    (dp,) = m.histogram.data_points
    assert list(dp.explicit_bounds) == list(HTTP_DURATION_BOUNDS_S)
    expected = Histogram.of(HTTP_DURATION_BOUNDS_S, [0.004, 0.02, 0.3, 0.02])
    assert tuple(dp.bucket_counts) == expected.bucket_counts
    assert (dp.count, dp.min, dp.max) == (4, 0.004, 0.3)
    assert dp.sum == pytest.approx(0.344)
    # Cumulative: the stream keeps the start of its first interval; time moves on.
    first_dp = by_name(first)["http.server.request.duration"].histogram.data_points[0]
    assert dp.start_time_unix_nano == first_dp.start_time_unix_nano == f.T0
    assert (first_dp.time_unix_nano, dp.time_unix_nano) == (f.T0 + f.STEP, f.T0 + 2 * f.STEP)

    a = f.kv(dp.attributes)
    assert a["http.request.method"] == "GET"
    assert a["http.route"] == "/cart/{id}"
    assert a["http.response.status_code"] == 200
    assert "error.type" not in a
    # Self (the server) is the resource, its listening port kept; the client is the peer.
    assert "k8s.deployment.name" not in a and "k8s.pod.name" not in a and "service.name" not in a
    assert a["server.port"] == 8080
    assert a["peer.k8s.deployment.name"] == "frontend" and a["service.peer.name"] == "frontend"
    assert a["service.peer.namespace"] == "shop" and "peer.service.name" not in a
    assert a["client.address"] == "10.1.0.7"


def test_client_side_names_the_server_by_convention_and_drops_its_own_port() -> None:
    p, sink = pipeline()
    p.export_interval(interval(0, red(f.edge(), Side.CLIENT, [0.1], status=503)))
    m = by_name(sink.metrics()[0])["http.client.request.duration"]
    a = f.kv(m.histogram.data_points[0].attributes)
    assert a["server.address"] == "cart.shop.svc.cluster.local" and a["server.port"] == 8080
    assert a["peer.k8s.deployment.name"] == "cart" and a["service.peer.name"] == "cart"
    (rm,) = sink.metrics()[0].resource_metrics
    assert f.kv(rm.resource.attributes)["k8s.deployment.name"] == "frontend"
    assert "client.port" not in a  # ephemeral: one series per connection otherwise
    assert a["error.type"] == "503"


@pytest.mark.parametrize(
    ("side", "status", "error_type", "expected"),
    [
        (Side.SERVER, 404, "", None),  # the client's fault: not a server error
        (Side.SERVER, 500, "", "500"),
        (Side.CLIENT, 404, "", "404"),
        (Side.CLIENT, None, "timeout", "timeout"),
    ],
)
def test_error_type_follows_http_conventions(
    side: Side, status: int | None, error_type: str, expected: str | None
) -> None:
    p, sink = pipeline()
    p.export_interval(interval(0, red(f.edge(), side, [0.1], status=status, error_type=error_type)))
    dp = next(iter(by_name(sink.metrics()[0]).values())).histogram.data_points[0]
    assert f.kv(dp.attributes).get("error.type") == expected


def test_unknown_http_method_is_other() -> None:
    p, sink = pipeline()
    point = RedPoint(f.edge(), Side.SERVER, Protocol.HTTP, Histogram.of((1.0,), [0.1]), "PROPFIND")
    p.export_interval(interval(0, point))
    dp = by_name(sink.metrics()[0])["http.server.request.duration"].histogram.data_points[0]
    assert f.kv(dp.attributes)["http.request.method"] == "_OTHER"


def test_dns_lookup_duration() -> None:
    p, sink = pipeline()
    dns = Edge(f.frontend(), attrs({"server.address": "10.96.0.10", "server.port": 53, "service.name": "kube-dns"}))
    point = RedPoint(
        dns,
        Side.CLIENT,
        Protocol.DNS,
        Histogram.of((0.001, 0.01), [0.002]),
        error_type="servfail",
        attributes=(("dns.response_code", "SERVFAIL"),),
    )
    p.export_interval(interval(0, point))
    m = by_name(sink.metrics()[0])["dns.lookup.duration"]
    a = f.kv(m.histogram.data_points[0].attributes)
    assert (m.unit, a["error.type"], a["dns.response_code"]) == ("s", "servfail", "SERVFAIL")


def test_l4_metrics() -> None:
    p, sink = pipeline()
    l4 = L4Point(
        f.edge(),
        Side.CLIENT,
        bytes_sent=1000,
        bytes_received=5000,
        connections=3,
        connect_failures=(("connection_refused", 2),),
        retransmits=4,
        resets=1,
        drops=0,
        connect_duration=Histogram.of((0.001, 0.01), [0.0005, 0.002, 0.02]),
        rtt_s=0.00025,
    )
    p.export_interval(interval(0, l4=(l4,)))
    p.export_interval(interval(1, l4=(L4Point(f.edge(), Side.CLIENT, bytes_sent=1),)))
    ms = by_name(sink.metrics()[1])

    def sums(name: str) -> dict[tuple[tuple[str, Any], ...], int]:
        m = ms[name]
        assert m.sum.aggregation_temporality == CUMULATIVE and m.sum.is_monotonic
        keep = ("network.io.direction", "error.type")
        return {
            tuple((k, v) for k, v in f.kv(dp.attributes).items() if k in keep): dp.as_int for dp in m.sum.data_points
        }

    assert ms["kscope.tcp.bytes"].unit == "By"
    assert sums("kscope.tcp.bytes") == {
        (("network.io.direction", "transmit"),): 1001,
        (("network.io.direction", "receive"),): 5000,
    }
    assert sums("kscope.tcp.connections") == {(): 3, (("error.type", "connection_refused"),): 2}
    assert sums("kscope.tcp.retransmits") == {(): 4}
    assert sums("kscope.tcp.resets") == {(): 1}
    assert "kscope.tcp.drops" not in ms  # a zero never spends a stream
    assert tuple(ms["kscope.tcp.connect.duration"].histogram.data_points[0].bucket_counts) == (1, 1, 1)
    # The RTT gauge was not refreshed in the second interval, so it is not repeated.
    assert "kscope.tcp.rtt" not in ms
    rtt = by_name(sink.metrics()[0])["kscope.tcp.rtt"]
    assert (rtt.unit, rtt.WhichOneof("data"), rtt.gauge.data_points[0].as_double) == ("s", "gauge", 0.00025)


def test_service_graph_metrics_match_tempo() -> None:
    p, sink = pipeline()
    sg = ServiceGraphPoint(
        "frontend",
        "cart",
        requests=10,
        failed=2,
        server_duration=Histogram.of(SERVICE_GRAPH_BOUNDS_S, [0.05] * 10),
        client_duration=Histogram.of(SERVICE_GRAPH_BOUNDS_S, [0.15] * 10),
    )
    ext = ServiceGraphPoint("frontend", "api.stripe.com", requests=1, connection_type=ConnectionType.VIRTUAL_NODE)
    p.export_interval(interval(0, sg=(sg, ext)))
    ms = by_name(sink.metrics()[0])
    total = ms["traces_service_graph_request_total"]
    assert total.sum.is_monotonic and total.sum.aggregation_temporality == CUMULATIVE
    points = {f.kv(dp.attributes)["server"]: (f.kv(dp.attributes), dp.as_int) for dp in total.sum.data_points}
    assert points["cart"] == ({"client": "frontend", "server": "cart", "connection_type": ""}, 10)
    assert points["api.stripe.com"][0]["connection_type"] == "virtual_node"
    (failed,) = ms["traces_service_graph_request_failed_total"].sum.data_points
    assert (f.kv(failed.attributes)["server"], failed.as_int) == ("cart", 2)
    for name in ("traces_service_graph_request_server_seconds", "traces_service_graph_request_client_seconds"):
        m = ms[name]
        (dp,) = m.histogram.data_points
        assert (m.unit, dp.count, list(dp.explicit_bounds)) == ("s", 10, list(SERVICE_GRAPH_BOUNDS_S))
        assert set(f.kv(dp.attributes)) == {"client", "server", "connection_type"}


def test_metric_requests_are_bounded_in_points() -> None:
    p = OtlpPipeline(encode.Reporter("r", "n"), sink := ListSink(), settings=PipelineSettings(max_points_per_request=3))
    points = [red(f.edge(f"cart-{i}"), Side.SERVER, [0.1]) for i in range(7)]
    assert p.export_interval(interval(0, *points)) == 3
    assert [encode.count_points(r) for r in sink.metrics()] == [3, 3, 1]


# ---- spans --------------------------------------------------------------------------------------

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def spans_of(sink: ListSink) -> tuple[ExportTraceServiceRequest, ...]:
    return tuple(ExportTraceServiceRequest.FromString(r.data) for s, r in sink.requests if s is Signal.TRACES)


def record(side: Side, status: int | None, traceparent: str | None = None, **kw: Any) -> SpanRecord:
    return SpanRecord(
        f.edge(),
        side,
        Protocol.HTTP,
        span_context(traceparent),
        f.T0,
        f.T0 + 25_000_000,
        "GET",
        "/cart/{id}",
        status,
        **kw,
    )


def test_server_span_joins_the_trace_of_its_traceparent() -> None:
    p, sink = pipeline()
    p.export_spans(f.NODE, [record(Side.SERVER, 200, TRACEPARENT, attributes=(("url.path", "/cart/42"),))])
    (req,) = spans_of(sink)
    (rs,) = req.resource_spans
    res = f.kv(rs.resource.attributes)
    # The resource is the observed workload, so trace backends name the span after it.
    assert (res["service.name"], res["k8s.pod.name"], res["k8s.node.name"]) == (
        "cart",
        "cart-5f6d8c9b7-abcde",
        "node-b",
    )
    (s,) = rs.scope_spans[0].spans
    assert s.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert s.parent_span_id.hex() == "00f067aa0ba902b7"
    assert len(s.span_id) == 8 and s.span_id != s.parent_span_id
    assert s.flags & 0xFF == 1 and s.flags & 0x300 == 0x300  # sampled; parent known to be remote
    assert (s.kind, s.name) == (trace_pb2.Span.SPAN_KIND_SERVER, "GET /cart/{id}")
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (f.T0, f.T0 + 25_000_000)
    assert s.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    a = f.kv(s.attributes)
    assert a["http.response.status_code"] == 200 and a["url.path"] == "/cart/42"
    assert a["service.peer.name"] == "frontend" and a["client.port"] == 51234


def test_span_without_traceparent_is_a_root() -> None:
    p, sink = pipeline()
    p.export_spans(f.NODE, [record(Side.CLIENT, 200)])
    s = spans_of(sink)[0].resource_spans[0].scope_spans[0].spans[0]
    assert s.parent_span_id == b"" and len(s.trace_id) == 16 and s.flags & 0x300 == 0
    assert (s.kind, s.name) == (trace_pb2.Span.SPAN_KIND_CLIENT, "GET")  # a client name stays low-cardinality


@pytest.mark.parametrize(
    ("side", "status", "error_type", "error"),
    [
        (Side.SERVER, 404, "", False),
        (Side.SERVER, 503, "", True),
        (Side.CLIENT, 404, "", True),
        (Side.CLIENT, 302, "", False),
        (Side.SERVER, None, "connection_reset", True),
    ],
)
def test_span_status_follows_http_conventions(side: Side, status: int | None, error_type: str, error: bool) -> None:
    p, sink = pipeline()
    p.export_spans(f.NODE, [record(side, status, error_type=error_type)])
    s = spans_of(sink)[0].resource_spans[0].scope_spans[0].spans[0]
    assert (s.status.code == trace_pb2.Status.STATUS_CODE_ERROR) is error


def test_spans_group_by_workload_and_chunk() -> None:
    sink = ListSink()
    p = OtlpPipeline(encode.Reporter("r", "n"), sink, settings=PipelineSettings(max_spans_per_request=2))
    recs = [record(Side.SERVER, 200), record(Side.CLIENT, 200), record(Side.SERVER, 200)]
    assert p.export_spans(f.NODE, recs) == 2
    first, second = spans_of(sink)
    assert sorted(f.kv(rs.resource.attributes)["service.name"] for rs in first.resource_spans) == ["cart", "frontend"]
    assert encode.count_spans(first) == 2 and encode.count_spans(second) == 1


# ---- logs ---------------------------------------------------------------------------------------


def test_log_event() -> None:
    p, sink = pipeline()
    event = LogEvent(
        f.edge(),
        Side.CLIENT,
        f.T0,
        EVENT_TCP_RESET,
        Severity.WARN,
        "connection reset by peer",
        attributes=(("kscope.tcp.state", "ESTABLISHED"),),
    )
    p.export_logs(f.NODE, [event])
    ((_, raw),) = sink.requests
    req = ExportLogsServiceRequest.FromString(raw.data)
    rl = req.resource_logs[0]
    assert f.kv(rl.resource.attributes)["service.name"] == "frontend"
    (lr,) = rl.scope_logs[0].log_records
    assert (lr.severity_number, lr.severity_text, lr.body.string_value) == (13, "WARN", "connection reset by peer")
    assert (lr.event_name, lr.time_unix_nano) == (EVENT_TCP_RESET, f.T0)
    a = f.kv(lr.attributes)
    assert a["event.name"] == EVENT_TCP_RESET and a["kscope.tcp.state"] == "ESTABLISHED"
    assert a["server.address"] == "cart.shop.svc.cluster.local" and a["peer.k8s.pod.name"] == "cart-5f6d8c9b7-abcde"


def test_agent_stats_are_gauges_per_name_under_the_agents_node_and_bounded() -> None:
    sink = ListSink()
    p = OtlpPipeline(encode.Reporter("r", "n"), sink)
    stats = flow_pb2.AgentStats(counters={f"c{i:03d}": i for i in range(MAX_AGENT_STATS + 88)})
    p.export_agent_stats("node-7", stats, 5_000)
    assert p.agent_stats_cut == 88
    points = []
    for req in sink.metrics():
        for rm in req.resource_metrics:
            res = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    assert m.name == "kscope.agent.stat" and m.WhichOneof("data") == "gauge"
                    points += [(res["k8s.node.name"], dp.attributes[0].value.string_value, dp.as_int)
                               for dp in m.gauge.data_points]  # fmt: skip
    assert len(points) == MAX_AGENT_STATS and points[0] == ("node-7", "c000", 0) and points[-1][2] == 511


def test_agent_stats_of_a_node_that_stopped_reporting_are_forgotten() -> None:
    """A node that goes away (scaled down) must not hold its agent's streams forever: the periodic
    sweep in export_self forgets them once stale, as it does the node's other streams."""
    p = OtlpPipeline(encode.Reporter("r", "n"), ListSink())
    p.export_agent_stats("node-gone", flow_pb2.AgentStats(counters={"a": 1, "b": 2}), 5_000)
    p.export_self({}, 6_000)
    assert p.agent_store.stats().series == 2  # fresh: kept
    p.export_self({}, 5_000 + p.agent_store.stale_after_ns + 1)
    assert (p.agent_store.stats().series, p.agent_store.stats().expired) == (0, 2)
