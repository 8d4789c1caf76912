"""The live map's state and rendering, fed intervals as the aggregator makes them: order, windows,
bounds, and what fits in 80x24 and 200x50."""

from __future__ import annotations

import io
import json
import re
import tracemalloc

from rich.console import Console

from cluster_processor.otlp.model import (
    HTTP_DURATION_BOUNDS_S,
    Histogram,
    Interval,
    L4Point,
    Protocol,
    RedPoint,
    SpanContext,
    SpanRecord,
)
from cluster_processor.resolved import Attrs, Edge, Side, attrs
from node_exporter.local import render
from node_exporter.local.app import JsonLines, LogBuffer, keys_of
from node_exporter.local.identity import Placement, process_attributes
from node_exporter.local.servicemap import MapSettings, ServiceMap

S = 1_000_000_000
CURL = process_attributes("curl", "/usr/bin/curl", Placement())
NGINX = process_attributes("nginx", "/usr/sbin/nginx", Placement(unit="nginx.service"))


def edge(client: Attrs = CURL, port: int = 80, server: Attrs = NGINX) -> Edge:
    return Edge(client=client, server=attrs([*server, ("server.port", port)]))


def hist(*seconds: float) -> Histogram:
    counts = [0] * (len(HTTP_DURATION_BOUNDS_S) + 1)
    for s in seconds:
        counts[next((i for i, b in enumerate(HTTP_DURATION_BOUNDS_S) if s <= b), len(HTTP_DURATION_BOUNDS_S))] += 1
    return Histogram(HTTP_DURATION_BOUNDS_S, tuple(counts), sum(seconds), min(seconds), max(seconds))


def red(e: Edge, side: Side, status: int, *seconds: float, route: str = "/") -> RedPoint:
    return RedPoint(e, side, Protocol.HTTP, hist(*seconds), "GET", route, status)


def interval(t: int, red_points: tuple[RedPoint, ...] = (), l4: tuple[L4Point, ...] = ()) -> Interval:
    return Interval("host", (t - 1) * S, t * S, red=red_points, l4=l4)


def text(renderable: object, width: int, height: int) -> str:
    console = Console(file=io.StringIO(), width=width, height=height, color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def test_problems_first_busiest_healthy_last_and_request_counted_once() -> None:
    m = ServiceMap()
    ok, err, lossy = edge(port=8080), edge(port=8081), edge(port=8082)
    for t in range(1, 4):
        m.update(interval(t, (
            # the busy healthy edge, seen by both ends: counted once (the server's side)
            red(ok, Side.SERVER, 200, *[0.001] * 50), red(ok, Side.CLIENT, 200, *[0.002] * 50),
            red(err, Side.SERVER, 500, 0.001, 0.001), red(err, Side.CLIENT, 500, 0.002, 0.002),
            red(lossy, Side.SERVER, 200, 0.001),
        ), (L4Point(lossy, Side.CLIENT, 100, 100, retransmits=3),)), (), now=float(t))  # fmt: skip
    order = [r.server for r in m.ordered(3.0)]
    assert order[-1].endswith(":8080") and set(order[:2]) == {"nginx@nginx.service:8081", "nginx@nginx.service:8082"}
    rows = {r.server[-4:]: r for r in m.edges.values()}
    assert rows["8080"].total("requests") == 150 and rows["8080"].error_pct == 0
    assert rows["8081"].error_pct == 100 and rows["8081"].problems() == ["errors"]
    assert rows["8082"].problems() == ["retrans"] and rows["8082"].total("retransmits") == 9
    assert rows["8081"].routes[("GET", "/")].statuses == {"500": 6}


def test_client_latency_well_above_the_servers_is_a_problem() -> None:
    m = ServiceMap()
    e = edge()
    m.update(interval(1, (red(e, Side.SERVER, 200, 0.002, 0.002), red(e, Side.CLIENT, 200, 0.2, 0.2))), (), 1.0)
    (row,) = m.edges.values()
    assert row.problems() == ["slow"]


def test_idle_edges_fade_then_go_and_windows_slide() -> None:
    m = ServiceMap(MapSettings(window=3, fade_s=5, forget_s=20))
    m.update(interval(1, (red(edge(), Side.SERVER, 200, 0.001),)), (), now=0.0)
    for t in range(2, 8):
        m.update(interval(t), (), now=float(t))
    (row,) = m.edges.values()
    assert m.faded(row, 7.0) and len(row.ticks) == 3 and row.total("requests") == 0
    m.update(interval(30), (), now=30.0)
    assert not m.edges and m.counters["edges_forgotten"] == 1


def test_ten_thousand_edges_bounded_in_rows_routes_and_render() -> None:
    """Past every bound: 12,000 edges, 80 routes on one edge, 30 spans on it; the map keeps 10,000
    edges (the 2,000 least recently active forgotten and counted), 50 routes (the rest counted), the
    10 slowest requests, and draws only what fits."""
    m = ServiceMap()
    clients = [
        attrs([*CURL[:1], ("service.name", f"c{i}"), ("process.executable.name", f"c{i}")]) for i in range(12_000)
    ]
    points = tuple(red(edge(client=c), Side.SERVER, 200, 0.001) for c in clients)
    hot = edge(port=9000)
    points += tuple(red(hot, Side.SERVER, 200, 0.001, route=f"/r{i}") for i in range(80))
    ctx = SpanContext(b"\x01" * 16, b"\x02" * 8)
    spans = tuple(
        SpanRecord(hot, Side.SERVER, Protocol.HTTP, ctx, 0, i * 1_000_000, "GET", "/x", 200) for i in range(30)
    )
    tracemalloc.start()
    m.update(interval(1, points), spans, now=1.0)
    for t in range(2, 12):  # a full window of intervals: every edge's window holds its 10 intervals
        m.update(interval(t), (), now=float(t) / 10)
    del points
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < 40_000_000, held  # the map's own state for 10,000 edges: ~3.2 kB each, measured
    assert len(m.edges) == 10_000 and m.counters["edges_evicted"] == 2_001  # the hot edge came last: kept
    row = m.edges[("curl@host", "nginx@nginx.service:9000")]
    assert len(row.routes) == 50 and m.counters["routes_overflowed"] == 30
    assert sorted(round(s * 1000) for s, _, _ in row.slowest) == list(range(20, 30))
    for width, height in ((80, 24), (200, 50)):
        counters = {"l7_kernel_rb_full": 3, "kernel_drops_no_socket": 9, "periodic_records": 5}
        screen = text(render.map_view(m, 1.0, width, height, None, counters, False), width, height)
        lines = screen.rstrip("\n").splitlines()
        assert len(lines) <= height and all(len(line) <= width for line in lines)
        assert "drops: l7_kernel_rb_full=3 map_edges_evicted=2001 map_routes_overflowed=30" in screen.replace("\n", " ")
        assert lines[-1].startswith("q quit")
    detail = text(render.edge_view(row, 1.0, False), 80, 24)
    # slow requests are recent ones: a minute on, a faster one replaces them all
    m.update(interval(12, (red(hot, Side.SERVER, 200, 0.001),)), spans[:1], now=70.0)
    assert [round(s * 1000) for s, _, _ in row.slowest] == [0]
    assert "/r0" in detail and "slowest recent requests" in detail and "29" in detail


def test_json_lines_when_stdout_is_no_terminal() -> None:
    out = io.StringIO()
    j = JsonLines(out)
    from cluster_processor.aggregate import NodeReport

    j.update([NodeReport(interval(1, (red(edge(), Side.SERVER, 503, 0.004),)), (), ())], {"ship_queue_full": 2})
    doc = json.loads(out.getvalue())
    (e,) = doc["edges"]
    assert (e["client"], e["server"], e["error_pct"], e["problems"]) == ("curl@host", "nginx@nginx.service:80", 100.0,
                                                                         ["errors"])  # fmt: skip
    assert doc["drops"] == {"ship_queue_full": 2}


def test_keys_and_the_log_buffer() -> None:
    assert keys_of("\x1b[A\x1b[Bq\r\x1bp\x1b[5~j") == ["up", "down", "quit", "enter", "esc", "pause", "down"]
    buf = LogBuffer(limit=3)
    for i in range(5):
        buf.write(f"line {i}\n")
    out = io.StringIO()
    buf.replay(out)
    assert out.getvalue() == "kscope: 2 earlier log lines not kept while the map was shown\nline 2\nline 3\nline 4\n"


def test_slow_requests_of_equal_duration_are_kept_without_comparing_them() -> None:
    """Spans as slow as each other at one address in two intervals (a span of the second made where
    one of the first was freed: CPython reuses memory, so id() repeats): the slowest-requests heap
    must not compare its items' records."""
    m = ServiceMap(MapSettings(max_slowest=3))
    e = edge()
    ctx = SpanContext(b"\x01" * 16, b"\x02" * 8)
    span = SpanRecord(e, Side.SERVER, Protocol.HTTP, ctx, 0, 5_000_000, "GET", "/x", 200)
    for t in (1, 2):
        m.update(interval(t, (red(e, Side.SERVER, 200, 0.005),)), (span,), now=float(t))
    (row,) = m.edges.values()
    assert sorted(x[2].at for x in row.slowest) == [1.0, 2.0]


def test_grpc_codes_by_name_and_database_operations_in_rows_and_drilldown() -> None:
    """RED points and spans as the aggregator makes them of gRPC calls (status_code: the grpc code)
    and Redis commands (no status_code; db.* extras): names, not numbers or "no_response"."""
    m = ServiceMap()
    grpc_edge, redis_edge = edge(port=50051), edge(port=6379)
    ctx = SpanContext(b"\x01" * 16, b"\x02" * 8)
    redis = (("db.system.name", "redis"),)
    points = (
        RedPoint(grpc_edge, Side.SERVER, Protocol.RPC, hist(0.001), "demo.v1.Echo/Ping", "", 0),
        RedPoint(grpc_edge, Side.SERVER, Protocol.RPC, hist(0.001, 0.001), "demo.v1.Echo/Ping", "", 5),
        RedPoint(redis_edge, Side.SERVER, Protocol.DB, hist(0.0002), "GET", "GET", None, "", redis),
        RedPoint(
            redis_edge,
            Side.SERVER,
            Protocol.DB,
            hist(0.0002),
            "INCR",
            "INCR",
            None,
            "ERR",
            (*redis, ("db.response.status_code", "ERR")),
        ),
    )
    spans = (
        SpanRecord(grpc_edge, Side.SERVER, Protocol.RPC, ctx, 0, 2_000_000, "demo.v1.Echo/Ping", "", 5),
        SpanRecord(redis_edge, Side.SERVER, Protocol.DB, ctx, 0, 300_000, "GET", "GET", None, "", redis),
    )
    m.update(interval(1, points), spans, now=1.0)
    rows = {r.server[-5:]: r for r in m.edges.values()}
    g, r = rows["50051"], rows[":6379"]
    assert g.protocol == "grpc" and r.protocol == "redis"
    assert g.routes[("demo.v1.Echo/Ping", "")].statuses == {"OK": 1, "NOT_FOUND": 2}
    assert r.routes[("GET", "")].statuses == {"OK": 1} and r.routes[("INCR", "")].statuses == {"ERR": 1}
    assert r.error_pct == 50 and g.error_pct == 0  # NOT_FOUND is the caller's mistake, not the server's
    assert [x[2].status for x in g.slowest] == ["NOT_FOUND"] and [x[2].status for x in r.slowest] == ["OK"]
    detail = text(render.edge_view(r, 1.0, False), 200, 50)
    assert re.search(r"GET\s+-\s+OK×1", detail) and re.search(r"INCR\s+-\s+ERR×1", detail), detail
    wide = text(render.map_view(m, 1.0, 200, 50, None, {}, False), 200, 50)
    assert "grpc" in wide and "redis" in wide, wide
