"""The retry rules as pure functions, the RetryInfo trailer, and the worker behind a test transport."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster_processor.otlp.exporter import (
    ExporterSettings,
    ExportResponse,
    OtlpExporter,
    RetryPolicy,
    RpcFailure,
    Signal,
)
from kscope_common.grpc_retry import STATUS_DETAILS_KEY, server_retry_delay, status_details
from tests.cluster_processor.otlp.factories import metrics_request

POLICY = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=8.0, jitter=0.5)
RETRYABLE = ["CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"]
FINAL = ["INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED", "INTERNAL"]


@pytest.mark.parametrize("name", RETRYABLE)
def test_transient_codes_retry(name: str) -> None:
    assert POLICY.delay_s(grpc.StatusCode[name], None, 0, lambda: 0.0) == 1.0


@pytest.mark.parametrize("name", FINAL)
def test_other_codes_are_final_even_with_a_delay(name: str) -> None:
    assert POLICY.delay_s(grpc.StatusCode[name], 2.0, 0, lambda: 0.0) is None


def test_resource_exhausted_needs_retry_info() -> None:
    assert POLICY.delay_s(grpc.StatusCode.RESOURCE_EXHAUSTED, None, 0, lambda: 0.0) is None
    assert POLICY.delay_s(grpc.StatusCode.RESOURCE_EXHAUSTED, 2.5, 0, lambda: 0.0) == 2.5


def test_backoff_doubles_to_a_cap_with_jitter_below_the_ceiling() -> None:
    assert [POLICY.delay_s(grpc.StatusCode.UNAVAILABLE, None, n, lambda: 0.0) for n in range(6)] == [
        1.0,
        2.0,
        4.0,
        8.0,
        8.0,
        8.0,
    ]
    assert POLICY.delay_s(grpc.StatusCode.UNAVAILABLE, None, 2, lambda: 1.0) == 2.0  # half of the 4 s ceiling
    assert POLICY.delay_s(grpc.StatusCode.UNAVAILABLE, None, 10_000, lambda: 0.0) == 8.0  # no overflow


def test_server_delay_wins_over_backoff() -> None:
    assert POLICY.delay_s(grpc.StatusCode.UNAVAILABLE, 0.25, 5, lambda: 0.0) == 0.25


def test_retry_info_round_trip_and_garbage() -> None:
    trailer = status_details(14, "later", 1.5)
    assert server_retry_delay([("other", "x"), (STATUS_DETAILS_KEY, trailer)]) == 1.5
    assert server_retry_delay([(STATUS_DETAILS_KEY, status_details(14, "x"))]) is None
    assert server_retry_delay([(STATUS_DETAILS_KEY, b"\xff\xff\xff")]) is None
    assert server_retry_delay(None) is None


class ScriptedTransport:
    """Raises the scripted outcomes in turn, then succeeds."""

    def __init__(self, *outcomes: BaseException) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.timeouts: list[float] = []

    async def export(self, signal: Signal, request: bytes, timeout_s: float) -> ExportResponse:
        self.calls += 1
        self.timeouts.append(timeout_s)
        if self.outcomes:
            raise self.outcomes.pop(0)
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

        return ExportMetricsServiceResponse()

    async def close(self) -> None:
        pass


def _run_with(transport: ScriptedTransport, timeout_s: float = 10.0, max_elapsed_s: float = 60.0) -> OtlpExporter:
    async def body() -> OtlpExporter:
        fast = RetryPolicy(0.001, 0.01)
        settings = ExporterSettings("unused:0", timeout_s=timeout_s, max_elapsed_s=max_elapsed_s, retry=fast)
        ex = OtlpExporter(settings, transport=transport)
        ex.start()
        ex.submit(Signal.METRICS, metrics_request(2))
        ex.submit(Signal.METRICS, metrics_request(1))
        assert await ex.flush(5)
        await ex.stop()
        return ex

    return asyncio.run(asyncio.wait_for(body(), 10))


def test_a_crashing_transport_costs_one_request_not_the_worker() -> None:
    ex = _run_with(ScriptedTransport(RuntimeError("bug")))
    st = ex.stats()[Signal.METRICS]
    assert (st.dropped_non_retryable, st.exported) == (2, 1)


def test_attempt_timeout_never_outlives_the_overall_deadline() -> None:
    t = ScriptedTransport(*[RpcFailure(grpc.StatusCode.UNAVAILABLE)] * 1000)
    ex = _run_with(t, timeout_s=10.0, max_elapsed_s=0.3)
    assert all(x <= 0.3 for x in t.timeouts)
    st = ex.stats()[Signal.METRICS]
    assert st.dropped_retry_exhausted == 3 and st.retries > 2
