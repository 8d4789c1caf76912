"""The OTLP/gRPC exporter against a real grpc.aio receiver on 127.0.0.1: delivery, retries,
deadlines, partial success, the queue bound, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from cluster_processor.otlp import encode
from cluster_processor.otlp.exporter import ExporterSettings, OtlpExporter, RetryPolicy, Signal
from cluster_processor.otlp.model import EVENT_CONNECT_REFUSED, LogEvent, Protocol, Severity, SpanRecord
from cluster_processor.otlp.model import span_context as new_context
from cluster_processor.otlp.pipeline import OtlpPipeline
from cluster_processor.resolved import Side
from tests.cluster_processor.otlp import factories as f
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.helpers import eventually_async as eventually

FAST = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.1)


def settings(receiver: OtlpReceiver, **kw: Any) -> ExporterSettings:
    base: dict[str, Any] = {"timeout_s": 1.0, "max_elapsed_s": 3.0, "retry": FAST, "reconnect_backoff_max_s": 0.1}
    return ExporterSettings(receiver.endpoint, **(base | kw))


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


@contextlib.asynccontextmanager
async def exporting(receiver: OtlpReceiver, **kw: Any) -> AsyncIterator[OtlpExporter]:
    exporter = OtlpExporter(settings(receiver, **kw))
    exporter.start()
    try:
        yield exporter
    finally:
        await exporter.stop(timeout_s=1.0)


def tag_of(req: ExportMetricsServiceRequest) -> str:
    dp = req.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0]
    return str(f.kv(dp.attributes)["k8s.pod.name"]).split("p")[0]


def test_happy_path_delivers_every_signal_with_headers() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx, headers=(("authorization", "Bearer t0k"),)) as ex:
            p = OtlpPipeline(encode.Reporter("kscope-0", "node-x"), ex)
            span = SpanRecord(f.edge(), Side.SERVER, Protocol.HTTP, new_context(), f.T0, f.T0 + 1, "GET", "/", 200)
            event = LogEvent(f.edge(), Side.CLIENT, f.T0, EVENT_CONNECT_REFUSED, Severity.WARN, "connection refused")
            metrics = f.metrics_request(3)
            assert ex.submit(Signal.METRICS, metrics)
            assert p.export_spans(f.NODE, [span, span]) == 1
            assert p.export_logs(f.NODE, [event]) == 1
            assert await ex.flush(5)
            assert (rx.items("metrics"), rx.items("traces"), rx.items("logs")) == (3, 2, 1)
            # The encoded bytes went out as they are: what the receiver parsed serializes back to them.
            (traces,) = encode.traces_requests(f.NODE, [span, span])
            (logs,) = encode.logs_requests(f.NODE, [event])
            assert [rx.received[s][0].SerializeToString() for s in ("metrics", "traces", "logs")] == [
                metrics.data,
                traces.data,
                logs.data,
            ]
            assert all(c.metadata.get("authorization") == "Bearer t0k" for c in rx.calls)
            stats = ex.stats()
            assert [(stats[s].submitted, stats[s].exported, stats[s].dropped) for s in Signal] == [
                (3, 3, 0),
                (2, 2, 0),
                (1, 1, 0),
            ]
            assert all(stats[s].retries == 0 and stats[s].attempts == 1 for s in Signal)

    run(body())


@pytest.mark.parametrize("gzip", [True, False])
def test_requests_are_gzip_compressed(gzip: bool) -> None:
    # A receiver with gzip disabled refuses a compressed request (UNIMPLEMENTED, not retried):
    # refusal proves the exporter compressed, acceptance proves the switch works.
    async def body() -> None:
        async with OtlpReceiver(reject_gzip=True) as rx, exporting(rx, gzip=gzip) as ex:
            ex.submit(Signal.METRICS, f.metrics_request(1))
            assert await ex.flush(5)
            st = ex.stats()[Signal.METRICS]
            assert (st.exported, st.dropped_non_retryable) == ((0, 1) if gzip else (1, 0))

    run(body())


def test_transient_failures_are_retried_until_they_pass() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx) as ex:
            rx.fail_next(2, grpc.StatusCode.UNAVAILABLE)
            rx.fail_next(1, grpc.StatusCode.DEADLINE_EXCEEDED)
            ex.submit(Signal.METRICS, f.metrics_request(4))
            assert await ex.flush(5)
            assert rx.outcomes("metrics") == ["UNAVAILABLE", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ok"]
            st = ex.stats()[Signal.METRICS]
            assert (st.exported, st.retries, st.attempts, st.dropped) == (4, 3, 4, 0)

    run(body())


def test_outage_then_recovery_loses_nothing_within_the_deadline_and_counts_drops_after() -> None:
    async def body() -> None:
        rx = OtlpReceiver()
        await rx.start()
        async with exporting(rx, max_elapsed_s=2.0) as ex:
            ex.submit(Signal.METRICS, f.metrics_request(2, "a"))
            assert await ex.flush(5)
            # The collector goes away for 0.6 s (less than the deadline) while data keeps coming.
            await rx.stop()
            for tag in "bcd":
                ex.submit(Signal.METRICS, f.metrics_request(2, tag))
            await asyncio.sleep(0.6)
            await rx.start()  # same port
            assert await ex.flush(5)
            assert [tag_of(r) for r in rx.received["metrics"]] == ["a", "b", "c", "d"]
            st = ex.stats()[Signal.METRICS]
            assert st.retries > 0 and st.dropped == 0 and st.exported == 8
            # Now an outage longer than the deadline: that request is dropped, and counted.
            await rx.stop()
            ex.submit(Signal.METRICS, f.metrics_request(5, "e"))
            t0 = time.monotonic()
            assert await ex.flush(5)
            assert 1.5 < time.monotonic() - t0 < 4.0  # retried until (nearly) the 2 s deadline
            st = ex.stats()[Signal.METRICS]
            assert (st.exported, st.dropped_retry_exhausted) == (8, 5)
            await rx.start()
            ex.submit(Signal.METRICS, f.metrics_request(1, "f"))
            assert await ex.flush(5)
            assert [tag_of(r) for r in rx.received["metrics"]][-1] == "f"
        await rx.stop()

    run(body())


def test_non_retryable_error_drops_at_once_and_counts() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx) as ex:
            rx.fail_next(1, grpc.StatusCode.INVALID_ARGUMENT, message="bad data")
            ex.submit(Signal.TRACES, _traces(3))
            ex.submit(Signal.TRACES, _traces(1))
            assert await ex.flush(5)
            assert rx.outcomes("traces") == ["INVALID_ARGUMENT", "ok"]
            st = ex.stats()[Signal.TRACES]
            assert (st.dropped_non_retryable, st.exported, st.retries) == (3, 1, 0)

    run(body())


def test_resource_exhausted_is_retried_only_with_retry_info() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx) as ex:
            rx.fail_next(1, grpc.StatusCode.RESOURCE_EXHAUSTED)  # a quota: final
            ex.submit(Signal.LOGS, _logs(2))
            assert await ex.flush(5)
            assert ex.stats()[Signal.LOGS].dropped_non_retryable == 2
            rx.fail_next(1, grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=0.3)  # "come back in 0.3 s"
            t0 = time.monotonic()
            ex.submit(Signal.LOGS, _logs(2))
            assert await ex.flush(5)
            assert time.monotonic() - t0 >= 0.3  # the server's delay, not our 20 ms backoff
            st = ex.stats()[Signal.LOGS]
            assert (st.exported, st.retries) == (2, 1)

    run(body())


def test_server_delay_beyond_the_deadline_drops_without_waiting() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx, max_elapsed_s=1.0) as ex:
            rx.fail_next(1, grpc.StatusCode.UNAVAILABLE, retry_delay_s=30)
            t0 = time.monotonic()
            ex.submit(Signal.METRICS, f.metrics_request(2))
            assert await ex.flush(5)
            assert time.monotonic() - t0 < 0.5
            assert ex.stats()[Signal.METRICS].dropped_retry_exhausted == 2

    run(body())


def test_attempt_deadline_exceeded_is_retried() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx, timeout_s=0.2) as ex:
            rx.hold()
            ex.submit(Signal.METRICS, f.metrics_request(1))
            await eventually(lambda: ex.stats()[Signal.METRICS].retries >= 1, "a retry after the attempt deadline")
            rx.release()
            assert await ex.flush(5)
            st = ex.stats()[Signal.METRICS]
            assert st.exported == 1 and st.dropped == 0

    run(body())


def test_partial_success_is_counted_and_not_retried() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx) as ex:
            rx.partial_next(1, rejected=2, message="2 points out of order")
            ex.submit(Signal.METRICS, f.metrics_request(5))
            assert await ex.flush(5)
            st = ex.stats()[Signal.METRICS]
            assert (st.exported, st.rejected, st.retries, st.dropped) == (3, 2, 0, 0)
            assert rx.outcomes("metrics") == ["partial"]

    run(body())


def test_queue_is_bounded_and_drops_the_oldest() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx, queue_size=2) as ex:
            rx.hold()
            ex.submit(Signal.METRICS, f.metrics_request(1, "a"))
            await eventually(lambda: ex.stats()[Signal.METRICS].attempts == 1, "a in flight")
            for tag in "bcde":
                ex.submit(Signal.METRICS, f.metrics_request(1, tag))
            st = ex.stats()[Signal.METRICS]
            assert (st.queued, st.dropped_queue_full) == (2, 2)  # b and c made room for d and e
            rx.release()
            assert await ex.flush(5)
            assert [tag_of(r) for r in rx.received["metrics"]] == ["a", "d", "e"]
            st = ex.stats()[Signal.METRICS]
            assert (st.submitted, st.exported, st.dropped) == (5, 3, 2)

    run(body())


def test_stop_drops_what_is_left_and_refuses_more() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx:
            ex = OtlpExporter(settings(rx))
            ex.start()
            rx.hold()
            ex.submit(Signal.METRICS, f.metrics_request(2))
            ex.submit(Signal.METRICS, f.metrics_request(3))
            await eventually(lambda: ex.stats()[Signal.METRICS].attempts == 1, "first in flight")
            await ex.stop(timeout_s=0.2)
            assert not ex.submit(Signal.METRICS, f.metrics_request(4))
            st = ex.stats()[Signal.METRICS]
            assert (st.submitted, st.exported, st.dropped_shutdown) == (9, 0, 9)
            rx.release()

    run(body())


def test_self_metrics_report_the_exporter_outcomes() -> None:
    async def body() -> None:
        async with OtlpReceiver() as rx, exporting(rx) as ex:
            p = OtlpPipeline(encode.Reporter("kscope-0", "node-x"), ex)
            rx.fail_next(1, grpc.StatusCode.PERMISSION_DENIED, signal="traces")
            ex.submit(Signal.TRACES, _traces(4))
            ex.submit(Signal.METRICS, f.metrics_request(3))
            assert await ex.flush(5)
            p.export_self(ex.stats(), f.T0)
            assert await ex.flush(5)
            req = rx.received["metrics"][-1]
            rm = req.resource_metrics[0]
            assert f.kv(rm.resource.attributes)["service.instance.id"] == "kscope-0"
            points = {
                (m.name, tuple(sorted(f.kv(dp.attributes).items()))): dp.as_int
                for m in rm.scope_metrics[0].metrics
                if m.WhichOneof("data") == "sum"
                for dp in m.sum.data_points
            }
            span_type = ("otel.component.type", "otlp_grpc_span_exporter")
            metric_type = ("otel.component.type", "otlp_grpc_metric_exporter")
            assert points[("otel.sdk.exporter.span.exported", (("error.type", "non_retryable"), span_type))] == 4
            assert points[("otel.sdk.exporter.metric_data_point.exported", (metric_type,))] == 3

    run(body())


def _traces(n: int) -> Any:
    span = SpanRecord(f.edge(), Side.CLIENT, Protocol.HTTP, new_context(), f.T0, f.T0 + 1, "GET")
    return encode.traces_requests(f.NODE, [span] * n)[0]


def _logs(n: int) -> Any:
    event = LogEvent(f.edge(), Side.CLIENT, f.T0, EVENT_CONNECT_REFUSED, Severity.WARN, "refused")
    return encode.logs_requests(f.NODE, [event] * n)[0]
