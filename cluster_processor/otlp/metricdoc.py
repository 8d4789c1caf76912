"""docs/metrics.md, generated from the code: ``python -m cluster_processor.otlp.metricdoc > docs/metrics.md``.

Each metric's attributes are not listed by hand: one example interval (an HTTP (1 and 2), a gRPC and
a DNS edge, both sides, failures, L4 counters, a listener, the service graph) goes through the same
``semconv.interval_samples`` the exporters use, and the keys its samples carry are what the table
shows; the Prometheus names and labels come from ``prometheus``. A test checks that the committed
file is this output.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Final

from cluster_processor.otlp import pipeline, semconv
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
from cluster_processor.otlp.prometheus import label_name, metric_name
from cluster_processor.otlp.semconv import Instrument, Kind, Sample
from cluster_processor.resolved import Edge, Side, attrs

_SUFFIXES: Final = {
    Kind.COUNTER: ("_total",),
    Kind.OBSERVED_COUNTER: ("_total",),
    Kind.GAUGE: ("",),
    Kind.HISTOGRAM: ("_bucket", "_sum", "_count"),
}
_TYPES: Final = {Kind.COUNTER: "counter", Kind.OBSERVED_COUNTER: "counter", Kind.GAUGE: "gauge",
                 Kind.HISTOGRAM: "histogram"}  # fmt: skip

HEADER: Final = """\
# Metrics kscope exports

Generated from the code by `python -m cluster_processor.otlp.metricdoc > docs/metrics.md` (a test
checks it is current). The same streams leave as OTLP (cumulative; names, resources and rules in
[otel-mapping.md](otel-mapping.md)) and, with `kscope-processor --prometheus-port` (chart:
`prometheus.enabled`), for Prometheus, named by the OpenTelemetry Prometheus compatibility rules:
unit suffixes (`s` -> `_seconds`, `By` -> `_bytes`, `{...}` dropped), `_total` on counters,
attribute keys with `.` -> `_`. Every Prometheus series also has `job` (`service.namespace/service.name`
of its resource), `instance` (`service.instance.id`: processor replica/node), `otel_scope_name` and
`otel_scope_version`; the other resource attributes (`k8s.namespace.name`, `k8s.deployment.name`...,
`k8s.node.name`) are in `target_info{job, instance}`. Scrape with `honor_labels: true`.

Resource "workload": the observing workload's own (its series are its view: the peer is in
`service.peer.name` and `peer.*`); "kscope": kscope's resource of the reporting node. Attributes are
those of a typical edge between two Kubernetes workloads; `peer.k8s.*` follow the peer's kind
(`peer.k8s.statefulset.name`...), an external peer has `server.address`/`client.address` instead.
Past 2,000 streams of one metric per node, samples go to one `otel.metric.overflow="true"` stream
under kscope's resource (counted by `kscope.otlp.cardinality.overflowed`).
"""


def example_interval() -> Interval:
    """One of every kind of point, with the failures that add attributes."""
    # Workload-level ends, as the aggregator makes them for metrics (no pod, no client port).
    client = attrs({"k8s.namespace.name": "shop", "k8s.deployment.name": "checkout", "service.name": "checkout"})
    server = attrs(
        {"k8s.namespace.name": "shop", "k8s.deployment.name": "cart", "service.name": "cart", "server.port": 8080}
    )
    dns = attrs({"k8s.namespace.name": "kube-system", "k8s.deployment.name": "coredns", "service.name": "kube-dns",
                 "server.port": 53})  # fmt: skip
    http, to_dns = Edge(client, server), Edge(client, dns)
    h = Histogram.of(HTTP_DURATION_BOUNDS_S, [0.01])
    red = [
        RedPoint(http, side, Protocol.HTTP, h, "GET", "/cart/{id}", status) for side in Side for status in (200, 503)
    ]
    h2 = (("network.protocol.version", "2"),)
    red += [RedPoint(http, side, Protocol.HTTP, h, "GET", "/cart/{id}", 200, "", h2) for side in Side]
    red += [RedPoint(http, side, Protocol.RPC, h, "shop.Cart/Get", "", code) for side in Side for code in (0, 13)]
    redis = Edge(client, attrs({"k8s.namespace.name": "shop", "k8s.statefulset.name": "redis", "service.name": "redis",
                                "server.port": 6379}))  # fmt: skip
    db = (("db.response.status_code", "WRONGTYPE"), ("db.system.name", "redis"))
    red += [RedPoint(redis, side, Protocol.DB, h, "GET", "GET", None, "WRONGTYPE", db) for side in Side]
    rcode = (("dns.response_code", "SERVFAIL"),)
    red += [RedPoint(to_dns, side, Protocol.DNS, h, "A", "", None, "servfail", rcode) for side in Side]
    l4 = [L4Point(http, side, 1, 1, 1, (("connection_refused", 1),), 1, 1, 1, h, 0.001) for side in Side]
    graph = ServiceGraphPoint("checkout", "cart", 2, 1, server_duration=Histogram.of(SERVICE_GRAPH_BOUNDS_S, [0.1]),
                              client_duration=Histogram.of(SERVICE_GRAPH_BOUNDS_S, [0.1]), client_namespace="shop",
                              server_namespace="shop")  # fmt: skip
    listener = ListenerPoint(server, 8080, 1, 1, 1, 128)
    return Interval("node-1", 0, 1, tuple(red), tuple(l4), (graph,), (listener,))


def _row(inst: Instrument, samples: Iterable[Sample]) -> str:
    keys = sorted({k for s in samples for k, _ in s.attributes})
    resource = "workload" if any(s.resource for s in samples) else "kscope"
    prom = ", ".join(f"`{metric_name(inst)}{suffix}`" for suffix in _SUFFIXES[inst.kind])
    attributes = ", ".join(f"`{k}`" if label_name(k) == k else f"`{k}` (`{label_name(k)}`)" for k in keys)
    return (f"| `{inst.name}` | {prom} | {_TYPES[inst.kind]} | `{inst.unit}` | {resource} | {attributes} "
            f"| {inst.description} |")  # fmt: skip


def render() -> str:
    by_inst: dict[Instrument, list[Sample]] = {}
    for s in semconv.interval_samples(example_interval()):
        by_inst.setdefault(s.instrument, []).append(s)
    agent = Sample(pipeline.AGENT_STAT, ((pipeline.AGENT_STAT_NAME, "ring_lost"),), 0)
    by_inst[pipeline.AGENT_STAT] = [agent]
    head = "| OTLP | Prometheus | Type | Unit | Resource | Attributes (label) | Description |\n" + "|---" * 7 + "|"
    sections = {
        "RED (requests)": ("http.", "rpc.", "dns.", "kscope.dns.", "db.", "kscope.db."),
        "L4 (TCP per edge) and accept queues": ("kscope.tcp.",),
        "Service graph (as Tempo and the OpenTelemetry servicegraph connector name it)": ("traces_service_graph",),
        "kscope's own": ("kscope.agent.",),
    }
    out = [HEADER]
    for title, prefixes in sections.items():
        rows = [_row(i, s) for i, s in by_inst.items() if i.name.startswith(prefixes)]
        out += [f"## {title}\n", head, *rows, ""]
    out.append(
        "On the Prometheus endpoint only: `target_info` (above) and `kscope_prometheus_series_dropped_total` "
        "(series left out of a scrape: two resources with one job and instance). The processor's own counters "
        "(ingest, Kubernetes watch, OTLP outcomes, drops) are on `--metrics-port` as `kscope_processor_*`.\n"
    )
    return "\n".join(out)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
