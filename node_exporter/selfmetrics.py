"""The agent's own counters, on a Prometheus endpoint and in the JSONL stream.

Every drop anywhere in the pipeline has a counter here (kernel ring/overflow,
decode errors, JSONL write failures), so nothing is lost silently.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kscope.v1 import flow_pb2 as pb
from node_exporter.errors import HostError


class SelfMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters = Gauge(
            "kscope_agent_counter",
            "Agent self-metrics: counts since start (*_lost, *_failed, *_dropped*, *rb_full are drops), sizes",
            ["name"],
            registry=self.registry,
        )
        self._capability = Gauge(
            "kscope_capability_enabled",
            "1 if a probe capability runs on this kernel, 0 if it was disabled (see the agent log)",
            ["capability"],
            registry=self.registry,
        )
        self.values: dict[str, int] = {}
        self.disabled: dict[str, str] = {}

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:  # in use, or a privileged port
            raise HostError(f"cannot serve self-metrics on {addr}:{port}: {exc.strerror or exc}") from exc

    def set_capabilities(self, enabled: set[str], disabled: dict[str, str]) -> None:
        self.disabled = dict(disabled)
        for cap in enabled:
            self._capability.labels(cap).set(1)
        for cap in disabled:
            self._capability.labels(cap).set(0)

    def update(self, values: dict[str, int]) -> None:
        self.values.update(values)
        for name, value in values.items():
            self._counters.labels(name).set(value)

    def to_proto(self, time_unix_nano: int) -> pb.AgentStats:
        return pb.AgentStats(
            time_unix_nano=time_unix_nano,
            counters=self.values,
            disabled_capabilities=[f"{k}: {v}" for k, v in sorted(self.disabled.items())],
        )
