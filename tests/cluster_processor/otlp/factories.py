"""Small builders for OTLP export tests: a frontend -> cart edge in namespace shop, and helpers to
read attributes back out of protobuf."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from cluster_processor.otlp import encode
from cluster_processor.otlp.cumulative import Stream
from cluster_processor.otlp.model import SpanRecord
from cluster_processor.otlp.semconv import PROTOCOLS, TCP_BYTES
from cluster_processor.resolved import Attrs, AttrValue, Edge, attrs

NODE = "node-a"
T0 = 1_700_000_000_000_000_000  # an interval start, Unix ns
STEP = 10_000_000_000  # 10 s intervals


def frontend() -> Attrs:
    a: dict[str, AttrValue] = {
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "frontend-7d4b9c8f6b-x2x9z",
        "k8s.deployment.name": "frontend",
        "k8s.node.name": NODE,
        "service.name": "frontend",
        "client.address": "10.1.0.7",
        "client.port": 51234,
    }
    return attrs(a)


def cart(pod: str = "cart-5f6d8c9b7-abcde") -> Attrs:
    a: dict[str, AttrValue] = {
        "k8s.namespace.name": "shop",
        "k8s.pod.name": pod,
        "k8s.deployment.name": "cart",
        "k8s.node.name": "node-b",
        "service.name": "cart",
        "server.address": "cart.shop.svc.cluster.local",
        "server.port": 8080,
    }
    return attrs(a)


def edge(pod: str = "cart-5f6d8c9b7-abcde") -> Edge:
    return Edge(client=frontend(), server=cart(pod))


def kv(key_values: Iterable[Any]) -> dict[str, Any]:
    """A protobuf KeyValue list as a plain dict."""
    out: dict[str, Any] = {}
    for item in key_values:
        which = item.value.WhichOneof("value")
        out[item.key] = getattr(item.value, which) if which else None
    return out


def metrics_request(points: int, tag: str = "") -> encode.EncodedRequest:
    """A metrics request of ``points`` data points whose pod names start with ``tag``."""
    streams = [Stream(TCP_BYTES, (("k8s.pod.name", f"{tag}p{i}"),), 0, i) for i in range(points)]
    return encode.metrics_requests(encode.Reporter("r", "n").metrics_resource(NODE), streams, T0)[0]


def count_points(req: ExportMetricsServiceRequest) -> int:
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                n += len(getattr(m, kind).data_points) if kind else 0
    return n


def count_spans(req: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def span_failed(s: SpanRecord) -> bool:
    """Whether a span's status is ERROR, by its protocol's rule (what the encoder writes)."""
    return PROTOCOLS[s.protocol].failed(s.side, s.status_code, s.error_type)
