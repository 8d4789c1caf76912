"""What a test OTLP receiver got, read as a backend would: each metric stream's final value.

Streams are cumulative, so a stream (resource + metric + data-point attributes) is worth its
latest point. A point belongs to its resource's ``service.name`` (a resource per workload); its peer
is the data point's ``service.peer.name``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main import _kv as kv

SERVICE_NAME = "service.name"
PEER_NAME = "service.peer.name"  # the semantic conventions' key (it replaced peer.service)


@dataclass(frozen=True)
class Point:
    metric: str
    resource: dict[str, Any]
    attributes: dict[str, Any]
    value: float  # a sum's or gauge's value, a histogram's count
    total: float  # a histogram's sum (0 for the others)
    time_unix_nano: int

    @property
    def owner(self) -> Any:
        return self.resource.get(SERVICE_NAME)

    @property
    def peer(self) -> Any:
        return self.attributes.get(PEER_NAME)

    def get(self, key: str) -> Any:
        return self.attributes.get(key)


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in d.items()))


def _points(rx: OtlpReceiver) -> Iterator[Point]:
    for req in rx.received["metrics"]:
        for rm in req.resource_metrics:
            res = kv(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    which = metric.WhichOneof("data")
                    for dp in getattr(metric, which).data_points:
                        if which == "histogram":
                            value, total = float(dp.count), float(dp.sum)
                        else:
                            value, total = float(dp.as_int or dp.as_double), 0.0
                        yield Point(metric.name, res, kv(dp.attributes), value, total, dp.time_unix_nano)


class View:
    """Final points of every stream, by metric."""

    def __init__(self, rx: OtlpReceiver) -> None:
        final: dict[tuple[Any, ...], Point] = {}
        for p in _points(rx):
            key = (p.metric, _freeze(p.resource), _freeze(p.attributes))
            old = final.get(key)
            if old is None or (p.time_unix_nano, p.value) >= (old.time_unix_nano, old.value):
                final[key] = p
        self.by_metric: dict[str, list[Point]] = {}
        for p in final.values():
            self.by_metric.setdefault(p.metric, []).append(p)
        self.logs = [
            (kv(rl.resource.attributes), rec)
            for req in rx.received["logs"]
            for rl in req.resource_logs
            for sl in rl.scope_logs
            for rec in sl.log_records
        ]

    def of(self, metric: str, owner: str | None = None, **want: Any) -> list[Point]:
        """Final points of ``metric`` (owned by ``owner``, with the data-point attributes ``want``)."""
        return [
            p
            for p in self.by_metric.get(metric, [])
            if (owner is None or p.owner == owner) and all(p.get(k) == v for k, v in want.items())
        ]

    def total(self, metric: str, owner: str | None = None, **want: Any) -> float:
        return sum(p.value for p in self.of(metric, owner, **want))

    def names(self) -> list[str]:
        return sorted(self.by_metric)


def mean(points: Iterable[Point]) -> float:
    """Mean of histogram points taken together (their sums over their counts)."""
    pts = list(points)
    n = sum(p.value for p in pts)
    return sum(p.total for p in pts) / n if n else 0.0
