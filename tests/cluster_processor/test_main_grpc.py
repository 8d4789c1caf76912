"""gRPC and HTTP/2 through the processor end to end (the test APIServer, the test OTLP receiver, the
processor's real components, FlowBatches over gRPC as the agent ships them): pod a-1 calls Service b
over HTTP/2, b-1 answers; both nodes report the same calls. A server-side error status comes out as a
failed RPC (series, span status, service-graph edge); a caller's error (NOT_FOUND) fails only the
client's view; plain HTTP/2 lands in the HTTP series with network.protocol.version 2."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cluster_processor import main as m
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main import (  # noqa: F401 (autouse fixtures)
    MS,
    TRACEPARENT,
    _no_proxy,
    _reset_logging,
    client_batch,
    cluster,
    config,
    latest,
    points,
    run,
    send,
    server_batch,
    spans,
)
from tests.cluster_processor.test_main_logs import log_records
from tests.helpers import eventually_async as eventually

PING = "/demo.v1.Echo/Ping"
# (grpc-status, or None for plain HTTP/2 GET /healthz)
CALLS: tuple[int | None, ...] = (0, 0, 5, 13, None)
STATUS_ERROR, STATUS_UNSET = 2, 0  # Span.Status.code


def _h2(base: pb.L7Request, i: int, grpc_status: int | None) -> pb.L7Request:
    q = pb.L7Request()
    q.CopyFrom(base)
    q.protocol = "http2"
    q.start_time_unix_nano += i * MS
    q.http.Clear()
    # the failing call carries the caller's trace (HTTP/2 headers are joined as HTTP/1's)
    q.http.traceparent = base.http.traceparent if grpc_status == 13 else ""
    if grpc_status is None:
        q.http.method, q.http.path, q.http.route, q.http.status_code = "GET", "/healthz", "/healthz", 200
        return q
    q.http.method, q.http.path, q.http.route, q.http.status_code = "POST", PING, PING, 200
    q.rpc.system, q.rpc.service, q.rpc.method = "grpc", "demo.v1.Echo", "Ping"
    q.rpc.grpc_status_code = grpc_status
    return q


def batches(t: int) -> tuple[pb.FlowBatch, pb.FlowBatch]:
    cli, srv = client_batch(t=t), server_batch(t=t)
    for batch in (cli, srv):
        base = batch.l7[0]
        del batch.l7[:]
        batch.l7.extend(_h2(base, i, s) for i, s in enumerate(CALLS))
    return cli, srv


def _attrs(span: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def test_grpc_error_status_is_a_failed_rpc_edge_and_http2_is_http(tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            cluster(tmp_path) as (_, kubeconfig),
            OtlpReceiver() as rx,
            m.Processor(config(kubeconfig, rx.endpoint)) as proc,
        ):
            assert proc.watcher is not None and await proc.watcher.wait_synced(5)
            await send(proc.ingest.port, *batches(time.time_ns()))
            sg, failed = "traces_service_graph_request_total", "traces_service_graph_request_failed_total"
            await eventually(lambda: latest(rx, sg, client="a", server="b") == len(CALLS), "service graph a -> b")
            await eventually(lambda: len(spans(rx)) == 2 * len(CALLS), "a span per call and side")
            # b is observed: its side counts the edge, and only INTERNAL is a server's failure
            assert latest(rx, failed, client="a", server="b") == 1

            srv, cli = {"service.name": "b"}, {"service.name": "a"}
            base = {"rpc.system.name": "grpc", "rpc.method": "demo.v1.Echo/Ping", "service.peer.name": "a"}
            dur = "rpc.server.call.duration"
            assert latest(rx, dur, srv, **base, **{"rpc.response.status_code": "OK"}) == 2
            internal = [a for r, a, _ in points(rx, dur) if a.get("rpc.response.status_code") == "INTERNAL"]
            assert internal and all(a["error.type"] == "INTERNAL" for a in internal)
            not_found = [a for r, a, _ in points(rx, dur) if a.get("rpc.response.status_code") == "NOT_FOUND"]
            assert not_found and not any("error.type" in a for a in not_found)  # the caller's mistake
            client_nf = [a for r, a, _ in points(rx, "rpc.client.call.duration")
                         if a.get("rpc.response.status_code") == "NOT_FOUND"]  # fmt: skip
            assert client_nf and all(a["error.type"] == "NOT_FOUND" for a in client_nf)
            assert latest(rx, "rpc.client.call.duration", cli, **{"service.peer.name": "b"}) == 2  # the two OK
            # no RPC in the HTTP series, and plain HTTP/2 there with its version
            http = list(points(rx, "http.server.request.duration"))
            assert [(a["http.route"], a["network.protocol.version"], v) for _, a, v in http] == [("/healthz", "2", 1)]

            by = {(s.kind, _attrs(s).get("rpc.response.status_code", "")): s for _, s in spans(rx)}
            server_internal, server_nf = by[2, "INTERNAL"], by[2, "NOT_FOUND"]  # SPAN_KIND_SERVER
            assert server_internal.name == "demo.v1.Echo/Ping" and server_internal.status.code == STATUS_ERROR
            assert server_internal.trace_id.hex() == TRACEPARENT.split("-")[1]
            assert server_nf.status.code == STATUS_UNSET and by[3, "NOT_FOUND"].status.code == STATUS_ERROR
            assert _attrs(by[2, ""])["network.protocol.version"] == "2"
            assert proc.aggregator.counters()["unknown_protocol"] == 0
            # the server's failure is an event log record from each side; the caller's mistake is none
            await eventually(lambda: len(log_records(rx)) == 2, "two event records")
            assert sorted(
                (r["service.name"], a["rpc.response.status_code"], a["log_count"])
                for r, a in log_records(rx)
                if a.get("rpc.method") == "demo.v1.Echo/Ping"
            ) == [("a", "INTERNAL", 1), ("b", "INTERNAL", 1)]

    run(body())
