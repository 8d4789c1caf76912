"""The Prometheus view of the cumulative streams: names by the OpenTelemetry compatibility rules,
resources as job/instance/target_info, the store's cardinality cap, served over HTTP and parsed
back with prometheus-client's own parser."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample as PromSample

from cluster_processor.otlp import encode, semconv
from cluster_processor.otlp.cumulative import CumulativeStore
from cluster_processor.otlp.model import (
    HTTP_DURATION_BOUNDS_S,
    SERVICE_GRAPH_BOUNDS_S,
    Histogram,
    Interval,
    L4Point,
    ListenerPoint,
    Protocol,
    RedPoint,
    ServiceGraphPoint,
)
from cluster_processor.otlp.prometheus import (
    IntervalCollector,
    StoreCollector,
    label_name,
    labels,
    metric_name,
    serve,
    unit_word,
)
from cluster_processor.otlp.semconv import Instrument, Kind
from cluster_processor.resolved import Attrs, Edge, Side, attrs
from tests.cluster_processor.otlp.factories import NODE, STEP, T0, cart, edge, frontend

REPORTER = encode.Reporter("proc-0", "node-p")

# Every instrument kscope exports and the name Prometheus must see (the spec's rules, and Tempo's
# service-graph names as the servicegraph connector writes them).
EXPECTED_NAMES = {
    "http.server.request.duration": "http_server_request_duration_seconds",
    "http.client.request.duration": "http_client_request_duration_seconds",
    "rpc.server.call.duration": "rpc_server_call_duration_seconds",
    "rpc.client.call.duration": "rpc_client_call_duration_seconds",
    "dns.lookup.duration": "dns_lookup_duration_seconds",
    "db.client.operation.duration": "db_client_operation_duration_seconds",
    "kscope.db.server.operation.duration": "kscope_db_server_operation_duration_seconds",
    "kscope.dns.server.request.duration": "kscope_dns_server_request_duration_seconds",
    "kscope.tcp.bytes": "kscope_tcp_bytes",  # + _total
    "kscope.tcp.connections": "kscope_tcp_connections",
    "kscope.tcp.connect.duration": "kscope_tcp_connect_duration_seconds",
    "kscope.tcp.retransmits": "kscope_tcp_retransmits",
    "kscope.tcp.resets": "kscope_tcp_resets",
    "kscope.tcp.drops": "kscope_tcp_drops",
    "kscope.tcp.rtt": "kscope_tcp_rtt_seconds",
    "kscope.tcp.listen.overflows": "kscope_tcp_listen_overflows",
    "kscope.tcp.listen.drops": "kscope_tcp_listen_drops",
    "kscope.tcp.listen.queue": "kscope_tcp_listen_queue",
    "kscope.tcp.listen.queue.limit": "kscope_tcp_listen_queue_limit",
    "traces_service_graph_request_total": "traces_service_graph_request",
    "traces_service_graph_request_failed_total": "traces_service_graph_request_failed",
    "traces_service_graph_request_server_seconds": "traces_service_graph_request_server_seconds",
    "traces_service_graph_request_client_seconds": "traces_service_graph_request_client_seconds",
}


def instruments() -> list[Instrument]:
    return [v for v in vars(semconv).values() if isinstance(v, Instrument)]


def workload(name: str) -> Attrs:
    """A server end named as the aggregator names metric ends: by workload, no pod."""
    own = {k: v for k, v in cart() if k != "k8s.pod.name"}
    return attrs({**own, "service.name": name, "k8s.deployment.name": name})


def interval(start: int = T0, e: Edge | None = None, rtt: float | None = 0.002) -> Interval:
    e = e or edge()
    http = Histogram.of(HTTP_DURATION_BOUNDS_S, [0.003, 0.02, 0.3])
    return Interval(
        NODE,
        start,
        start + STEP,
        red=(
            RedPoint(e, Side.SERVER, Protocol.HTTP, http, "GET", "/cart/{id}", 200),
            RedPoint(e, Side.CLIENT, Protocol.HTTP, http, "GET", "", 503),
        ),
        l4=(
            L4Point(
                e,
                Side.CLIENT,
                bytes_sent=100,
                bytes_received=2000,
                connections=3,
                retransmits=2,
                connect_failures=(("connection_refused", 1),),
                rtt_s=rtt,
            ),
        ),
        service_graph=(
            ServiceGraphPoint(
                "frontend",
                "cart",
                3,
                1,
                server_duration=Histogram.of(SERVICE_GRAPH_BOUNDS_S, [0.15]),
                client_namespace="shop",
                server_namespace="shop",
            ),
        ),
        listeners=(ListenerPoint(e.server, 8080, overflows=4, queue=1, queue_limit=128),),
    )


def families(collector: StoreCollector) -> dict[str, list[PromSample]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    out: dict[str, list[PromSample]] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, []).extend(fam.samples)
    return out


def one(samples: list[PromSample], **want: str) -> PromSample:
    found = [s for s in samples if all(s.labels.get(k) == v for k, v in want.items())]
    assert len(found) == 1, (want, [s.labels for s in samples])
    return found[0]


def test_every_instrument_has_the_spec_name() -> None:
    got = {i.name: metric_name(i) for i in instruments()}
    assert got == EXPECTED_NAMES
    assert len(set(got.values())) == len(got)  # no two instruments share a family


@pytest.mark.parametrize(
    ("unit", "kind", "word"),
    [("s", Kind.HISTOGRAM, "seconds"), ("By", Kind.COUNTER, "bytes"), ("{request}", Kind.COUNTER, ""),
     ("By/s", Kind.GAUGE, "bytes_per_second"), ("1", Kind.GAUGE, "ratio"), ("1", Kind.COUNTER, ""),
     ("ms", Kind.HISTOGRAM, "milliseconds"), ("packets", Kind.COUNTER, "packets")],
)  # fmt: skip
def test_unit_words(unit: str, kind: Kind, word: str) -> None:
    assert unit_word(unit, kind) == word


def test_names_are_sanitised_and_suffixed_once() -> None:
    assert metric_name(Instrument("a.b-c..d", "By", "", Kind.COUNTER)) == "a_b_c_d_bytes"
    assert metric_name(Instrument("x.bytes", "By", "", Kind.GAUGE)) == "x_bytes"  # not x_bytes_bytes
    assert metric_name(Instrument("2xx.count", "{request}", "", Kind.COUNTER)) == "_2xx_count"
    assert label_name("http.request.method") == "http_request_method"
    assert label_name("1st.key") == "key_1st_key"
    assert label_name("_hidden") == "key_hidden"
    # Two keys one label: values joined with ';' in key order.
    assert labels(attrs({"a.b": "x", "a_b": "y", "n": 3, "ok": True})) == (("a_b", "x;y"), ("n", "3"), ("ok", "true"))


def test_exposition_names_labels_and_values() -> None:
    c = IntervalCollector(REPORTER)
    c.add(interval())
    c.add(interval(T0 + STEP))
    fams = families(c)
    # Histograms: cumulative le buckets, count, sum; two intervals added up.
    server = fams["http_server_request_duration_seconds"]
    labels_ = {
        "job": "shop/cart",
        "instance": f"proc-0/{NODE}",
        "http_request_method": "GET",
        "http_route": "/cart/{id}",
        "http_response_status_code": "200",
        "service_peer_name": "frontend",
    }
    assert one(server, le="0.005", **labels_).value == 2
    assert one(server, le="0.025", **labels_).value == 4
    assert one(server, le="+Inf", **labels_).value == 6
    count = [s for s in server if s.name.endswith("_count")]
    assert len(count) == 1 and count[0].value == 6
    assert one(server, le="+Inf").labels["otel_scope_name"] == "kscope"
    # A client's 503 is a failure with error.type.
    client = fams["http_client_request_duration_seconds"]
    assert one(client, le="+Inf", job="shop/frontend", error_type="503").value == 6
    # Counters: _total, the series' own job, no client port (ephemeral) on a client's metric.
    tcp = fams["kscope_tcp_bytes"]
    assert {s.name for s in tcp} == {"kscope_tcp_bytes_total"}
    assert one(tcp, network_io_direction="receive", job="shop/frontend").value == 4000
    assert "client_port" not in one(tcp, network_io_direction="receive").labels
    assert one(fams["kscope_tcp_connections"], error_type="connection_refused").value == 2
    assert one(fams["kscope_tcp_retransmits"]).value == 4
    assert one(fams["kscope_tcp_rtt_seconds"]).value == 0.002
    assert one(fams["kscope_tcp_listen_overflows"], server_port="8080", job="shop/cart").value == 8
    # The service graph, as Tempo and the servicegraph connector name it, under kscope's job.
    sg = one(fams["traces_service_graph_request"], client="frontend", server="cart")
    assert sg.name == "traces_service_graph_request_total" and sg.value == 6
    assert sg.labels["job"] == "kscope" and sg.labels["connection_type"] == ""
    assert one(fams["traces_service_graph_request_failed"]).value == 2
    assert one(fams["traces_service_graph_request_server_seconds"], le="0.2").value == 2
    # One target_info per resource, joined by job and instance, the rest of the resource in it.
    info = {s.labels["job"]: s.labels for s in fams["target_info"]}
    assert set(info) == {"shop/cart", "shop/frontend", "kscope"}
    assert info["shop/cart"]["k8s_deployment_name"] == "cart"
    assert info["shop/cart"]["instance"] == f"proc-0/{NODE}"
    assert "service_name" not in info["shop/cart"] and "service_instance_id" not in info["shop/cart"]
    assert info["kscope"]["service_version"] == REPORTER.version


def test_a_gauge_is_served_until_its_node_has_not_reported_it_for_its_max_age() -> None:
    c = IntervalCollector(REPORTER, gauge_max_age_ns=2 * STEP)
    c.add(interval())
    assert one(families(c)["kscope_tcp_rtt_seconds"]).value == 0.002
    c.add(interval(T0 + STEP, rtt=None))
    c.add(interval(T0 + 2 * STEP, rtt=None))
    assert one(families(c)["kscope_tcp_rtt_seconds"]).value == 0.002  # the last value, 2 intervals old
    c.add(interval(T0 + 3 * STEP, rtt=None))
    fams = families(c)
    assert "kscope_tcp_rtt_seconds" not in fams
    assert "kscope_tcp_listen_queue" in fams  # reported again: still there


def test_the_store_cardinality_cap_holds_and_the_overflow_is_served() -> None:
    """Past ``max_series`` streams of a metric, samples go to one overflow series under kscope's job,
    counted by the store: the endpoint serves the same bounded set the OTLP export sends."""
    store = CumulativeStore(max_series=5)
    c = IntervalCollector(REPORTER, store)
    for i in range(12):
        c.add(interval(T0 + i * STEP, Edge(frontend(), workload(f"cart-{i}")), rtt=None))
    fams = families(c)
    sg = fams["traces_service_graph_request"]  # one graph edge: under the cap
    assert len(sg) == 1
    for name in ("kscope_tcp_retransmits", "http_server_request_duration_seconds"):
        series = {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in fams[name]}
        assert len(series) == 5, name
        over = [s for s in fams[name] if s.labels.get("otel_metric_overflow") == "true"]
        assert over and all(s.labels["job"] == "kscope" for s in over)
    overflow = one(fams["kscope_tcp_retransmits"], otel_metric_overflow="true")
    assert overflow.value == (12 - 4) * 2  # the eight edges past the cap, 2 retransmits each
    assert store.stats().overflowed["kscope.tcp.retransmits"] == 8


def test_served_over_http_and_a_busy_port_is_an_oserror() -> None:
    c = IntervalCollector(REPORTER)
    c.add(interval())
    server, _ = serve(c, 0, "127.0.0.1")
    port = server.server_port  # type: ignore[attr-defined]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"http_server_request_duration_seconds", "traces_service_graph_request", "target_info"} <= names
        with pytest.raises(OSError):
            serve(c, port, "127.0.0.1")
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]


def test_scrapes_while_intervals_are_added_never_fail() -> None:
    """Scrapes run on the HTTP server's thread while the aggregator updates the store on its own:
    every scrape must parse, whatever it interleaves with."""
    store = CumulativeStore(max_series=50, stale_after_ns=3 * STEP)
    c = IntervalCollector(REPORTER, store)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                e = Edge(frontend(), workload(f"cart-{i % 80}"))
                c.add(interval(T0 + i * STEP, e, rtt=None if i % 3 else 0.1))
                c.expire(T0 + i * STEP)
                i += 1
        except BaseException as exc:  # reported to the test's thread
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(100):
            fams = families(c)
            for samples in fams.values():
                assert all(s.value >= 0 for s in samples)
    finally:
        stop.set()
        t.join(10)
    assert not errors


@pytest.fixture
def two_stores() -> Iterator[tuple[CumulativeStore, CumulativeStore]]:
    yield CumulativeStore(), CumulativeStore()


def test_one_family_from_several_stores(two_stores: tuple[CumulativeStore, CumulativeStore]) -> None:
    a, b = two_stores
    a.update_series(NODE, T0, T0 + STEP, semconv.interval_samples(interval()))
    b.update_series("node-b", T0, T0 + STEP, semconv.interval_samples(interval()))
    fams = families(StoreCollector(REPORTER, a, b))
    instances = {s.labels["instance"] for s in fams["kscope_tcp_bytes"]}
    assert instances == {f"proc-0/{NODE}", "proc-0/node-b"}


def test_two_resources_one_job_and_instance_are_served_once_and_counted() -> None:
    """Two pods of one workload as two resources (job and instance alike): Prometheus would reject
    the second sample of one series, so it is left out and counted."""
    c = IntervalCollector(REPORTER)
    c.add(interval(T0, Edge(frontend(), cart("cart-a"))))
    c.add(interval(T0 + STEP, Edge(frontend(), cart("cart-b"))))
    fams = families(c)
    assert len(fams["kscope_tcp_listen_overflows"]) == 1
    dropped = one(fams["kscope_prometheus_series_dropped"]).value
    assert dropped > 0 and dropped == c.duplicates
