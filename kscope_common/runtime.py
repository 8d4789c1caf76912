"""Python runtime settings both long-running processes use."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Freeze what exists now (modules, protobuf descriptors, BTF, indexes: it lives as long as the
    process) out of the cycle collector's scans, and collect the young generation every 50,000
    allocations instead of 700: per-interval records die by reference counting, not by the cycle
    collector, so its frequent scans were pure cost (what it saves: bench/RESULTS.md, hot-path choices)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
