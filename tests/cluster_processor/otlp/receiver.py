"""A test OTLP/gRPC receiver: the real grpc.aio server and opentelemetry-proto's service
definitions on 127.0.0.1, standing in for an OpenTelemetry Collector.

It stores every accepted request per signal and can be told to misbehave:

* ``fail_next(n, code, retry_delay_s=...)``: the next ``n`` calls fail with ``code``, with a
  ``google.rpc.Status`` + ``RetryInfo`` trailer when a delay is given (as the collector sends);
* ``partial_next(n, rejected, message)``: the next ``n`` calls succeed with a partial success;
* ``hold()`` / ``release()``: calls wait until released (a slow or stuck backend);
* ``stop()`` then ``start()`` again on the same port: a real outage;
* ``reject_gzip``: a server with gzip disabled refuses compressed requests, which proves they were.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc

from kscope_common.grpc_retry import STATUS_DETAILS_KEY, status_details

SIGNALS = ("metrics", "traces", "logs")


@dataclass
class _Fault:
    remaining: int
    code: grpc.StatusCode | None = None  # None: a partial success instead of a failure
    message: str = ""
    retry_delay_s: float | None = None
    rejected: int = 0
    signal: str | None = None  # None: any signal


@dataclass
class CallRecord:
    signal: str
    outcome: str  # "ok", "partial" or the status code's name
    metadata: dict[str, str] = field(default_factory=dict)


class OtlpReceiver:
    def __init__(self, *, reject_gzip: bool = False) -> None:
        self.received: dict[str, list[Any]] = {s: [] for s in SIGNALS}
        self.calls: list[CallRecord] = []
        self.port = 0
        self._reject_gzip = reject_gzip
        self._faults: list[_Fault] = []
        self._open = asyncio.Event()
        self._open.set()
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> int:
        options = [("grpc.compression_enabled_algorithms_bitset", 1)] if self._reject_gzip else []  # identity only
        server = grpc.aio.server(options=options)
        # The generated registration functions are untyped.
        metrics_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), server)  # type: ignore[no-untyped-call]
        trace_grpc.add_TraceServiceServicer_to_server(_Trace(self), server)  # type: ignore[no-untyped-call]
        logs_grpc.add_LogsServiceServicer_to_server(_Logs(self), server)  # type: ignore[no-untyped-call]
        # Port 0 the first time; the same port after a stop(), as a restarted collector would.
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        self._open.set()  # release held calls so the server can shut down
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- controls -------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int,
        code: grpc.StatusCode,
        *,
        retry_delay_s: float | None = None,
        message: str = "injected failure",
        signal: str | None = None,
    ) -> None:
        self._faults.append(_Fault(n, code, message, retry_delay_s, signal=signal))

    def partial_next(self, n: int, rejected: int, message: str = "", *, signal: str | None = None) -> None:
        self._faults.append(_Fault(n, None, message, rejected=rejected, signal=signal))

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def items(self, signal: str) -> int:
        """Data points, spans or log records received so far."""
        return sum(_count(signal, r) for r in self.received[signal])

    def outcomes(self, signal: str) -> list[str]:
        return [c.outcome for c in self.calls if c.signal == signal]

    # ---- handling -------------------------------------------------------------------------------

    def _take_fault(self, signal: str) -> _Fault | None:
        for fault in self._faults:
            if fault.remaining > 0 and fault.signal in (None, signal):
                fault.remaining -= 1
                return fault
        return None

    async def handle(self, signal: str, request: Any, context: grpc.aio.ServicerContext, response: Any) -> Any:
        metadata = {m.key: m.value for m in context.invocation_metadata() or () if isinstance(m.value, str)}
        await self._open.wait()
        fault = self._take_fault(signal)
        if fault is not None and fault.code is not None:
            self.calls.append(CallRecord(signal, fault.code.name, metadata))
            trailer = status_details(fault.code.value[0], fault.message, fault.retry_delay_s)
            await context.abort(fault.code, fault.message, trailing_metadata=((STATUS_DETAILS_KEY, trailer),))
        self.received[signal].append(request)
        if fault is not None:
            self.calls.append(CallRecord(signal, "partial", metadata))
            _set_rejected(signal, response, fault.rejected)
            response.partial_success.error_message = fault.message
        else:
            self.calls.append(CallRecord(signal, "ok", metadata))
        return response


def _count(signal: str, request: Any) -> int:
    if signal == "metrics":
        return sum(
            len(getattr(m, m.WhichOneof("data")).data_points)
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        )
    if signal == "traces":
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)


def _set_rejected(signal: str, response: Any, n: int) -> None:
    field_name = {"metrics": "rejected_data_points", "traces": "rejected_spans", "logs": "rejected_log_records"}[signal]
    setattr(response.partial_success, field_name, n)


class _Metrics(metrics_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._r = receiver

    async def Export(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # the generated method name
        return await self._r.handle("metrics", request, context, metrics.ExportMetricsServiceResponse())


class _Trace(trace_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._r = receiver

    async def Export(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._r.handle("traces", request, context, trace.ExportTraceServiceResponse())


class _Logs(logs_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._r = receiver

    async def Export(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._r.handle("logs", request, context, logs.ExportLogsServiceResponse())
