"""The latency buckets of L7 summaries, shared by the kernel ABI mirror, the agent and the processor.

A summary (``kscope.v1.L7Summary``, from the kernel's ``struct kscope_l7_summary``) counts
latencies in buckets: bucket i holds BOUND[i-1] < latency <= BOUND[i] (ns), the last bucket
everything above the last bound. The bounds are the union of the processor's HTTP duration
(OpenTelemetry's recommended) and service-graph (Tempo's default) histogram bounds, so the
processor re-buckets a summary into either exactly. Mirrors ``KSCOPE_L7_LATENCY_BOUNDS_NS`` in
bpf_src/abi/l7.h (a test compares the two).
"""

from __future__ import annotations

from typing import Final

LATENCY_BOUNDS_NS: Final[tuple[int, ...]] = (
    5_000_000, 10_000_000, 25_000_000, 50_000_000, 75_000_000, 100_000_000, 200_000_000, 250_000_000,
    400_000_000, 500_000_000, 750_000_000, 800_000_000, 1_000_000_000, 1_600_000_000, 2_500_000_000,
    3_200_000_000, 5_000_000_000, 6_400_000_000, 7_500_000_000, 10_000_000_000, 12_800_000_000,
)  # fmt: skip
LATENCY_BUCKETS: Final = len(LATENCY_BOUNDS_NS) + 1


def rebucket_map(bounds_s: tuple[float, ...]) -> tuple[int, ...]:
    """For each summary bucket, the index of the bucket of a histogram with ``bounds_s`` (seconds)
    that holds all of it. Every bound of ``bounds_s`` must be one of ours, else a summary bucket
    would straddle two of its buckets: ValueError."""
    ours = {b: i for i, b in enumerate(LATENCY_BOUNDS_NS)}
    cuts = []
    for b in bounds_s:
        ns = round(b * 1e9)
        if ns not in ours or abs(ns / 1e9 - b) > 1e-12:
            raise ValueError(f"histogram bound {b} s is not a summary bucket bound")
        cuts.append(ours[ns])
    out, j = [], 0
    for i in range(LATENCY_BUCKETS):
        while j < len(cuts) and cuts[j] < i:
            j += 1
        out.append(j)
    return tuple(out)
