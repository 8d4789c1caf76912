"""The live map's own cost at many busy edges (``bench/local.py --view``): no agent, no terminal.

Intervals shaped as the Aggregator hands them to the map (every edge busy: HTTP at both ends on two
routes, L4 counters at both ends, one span) are made before the clock starts; then, for ``seconds``
wall seconds, ``TerminalMap.update`` folds one in each second (the agent's default interval) while
the map's own drawing thread redraws as it does in ``kscope run`` (on new data, at most ``MAX_FPS``
frames a second), into a rich Console writing to /dev/null at 200x50. A second phase also asks for a
frame ``MAX_FPS`` times a second (a key held down): the view's worst case.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import threading
import time

from rich.console import Console

from cluster_processor.aggregate import NodeReport
from cluster_processor.otlp.model import (
    HTTP_DURATION_BOUNDS_S,
    Histogram,
    Interval,
    L4Point,
    Protocol,
    RedPoint,
    SpanContext,
    SpanRecord,
)
from cluster_processor.resolved import Edge, Side, attrs
from kscope_common.runtime import tune_gc
from node_exporter.local.app import MAX_FPS, TerminalMap
from node_exporter.local.identity import Placement, process_attributes

S = 1_000_000_000


def _hist(n: int, seconds: float) -> Histogram:
    counts = [0] * (len(HTTP_DURATION_BOUNDS_S) + 1)
    counts[next(i for i, b in enumerate(HTTP_DURATION_BOUNDS_S) if seconds <= b)] = n
    return Histogram(HTTP_DURATION_BOUNDS_S, tuple(counts), n * seconds, seconds, seconds)


def edges(n: int) -> list[Edge]:
    """``n`` client -> server edges between 50 client programs and n/50 servers (as a host's many
    callers of few services would be)."""
    clients = [process_attributes(f"client{i}", f"/usr/bin/client{i}", Placement()) for i in range(50)]
    out = []
    for i in range(n):
        server = process_attributes(f"svc{i // 50}", "/usr/sbin/nginx", Placement(unit=f"svc{i // 50}.service"))
        out.append(Edge(client=clients[i % 50], server=attrs([*server, ("server.port", 8000 + i // 50)])))
    return out


def report(es: list[Edge], t: int) -> NodeReport:
    red, l4, spans = [], [], []
    for i, e in enumerate(es):
        for side, lat in ((Side.SERVER, 0.002), (Side.CLIENT, 0.003)):
            red.append(RedPoint(e, side, Protocol.HTTP, _hist(20 + i % 7, lat), "GET", "/api/items", 200))
            red.append(RedPoint(e, side, Protocol.HTTP, _hist(1 + i % 3, lat * 5), "POST", "/api/orders", 201))
            l4.append(L4Point(e, side, 4000 + i, 9000 + i, connections=1 if side is Side.CLIENT else 0))
        start = (t - 1) * S + i
        ctx = SpanContext(i.to_bytes(16, "big"), i.to_bytes(8, "big"))
        spans.append(SpanRecord(e, Side.SERVER, Protocol.HTTP, ctx, start, start + 2_000_000 + i, "GET",
                                "/api/items", 200))  # fmt: skip
    return NodeReport(Interval("bench", (t - 1) * S, t * S, red=tuple(red), l4=tuple(l4)), tuple(spans), ())


def _phase(view: TerminalMap, reports: list[NodeReport], seconds: int, ask_fps: int) -> dict[str, float]:
    """Fold one report a second for ``seconds``; with ``ask_fps``, also ask for that many frames a
    second. CPU: the whole process (this thread's updates and the view's drawing thread)."""
    frames0, cpu0, wall0 = view.frames, time.process_time(), time.monotonic()
    update_cpu = 0.0
    for s in range(seconds):
        t0 = time.thread_time()
        view.update([reports[s % len(reports)]], {"l7_kernel_rb_full": 0})
        update_cpu += time.thread_time() - t0
        next_second = wall0 + s + 1
        while (left := next_second - time.monotonic()) > 0:
            if ask_fps:
                time.sleep(min(left, 1 / ask_fps))
                view.changed()
            else:
                time.sleep(left)
    wall = time.monotonic() - wall0
    cpu = time.process_time() - cpu0
    return {
        "cpu_share_of_one_core": round(cpu / wall, 4),
        "update_cpu_ms_per_interval": round(update_cpu / seconds * 1000, 2),
        "frames_per_second": round((view.frames - frames0) / wall, 2),
        "draw_cpu_ms_per_frame": round((cpu - update_cpu) / max(1, view.frames - frames0) * 1000, 2),
    }


def view_bench(n_edges: int, seconds: int, profile: str = "") -> dict[str, object]:
    es = edges(n_edges)
    reports = [report(es, t) for t in range(1, 11)]
    tune_gc()  # as kscope run does once it has started
    stop = threading.Event()
    with open(os.devnull, "w") as null:
        console = Console(file=null, width=200, height=50, color_system="truecolor", force_terminal=True)
        view = TerminalMap(stop, console=console).start()
        try:
            for r in reports[:3]:  # the window fills, the edges exist
                view.update([r], {})
            time.sleep(0.5)
            data_only = _phase(view, reports, seconds, 0)
            held_key = _phase(view, reports, max(3, seconds // 2), MAX_FPS)
            if profile:  # the same work in this thread (cProfile sees one thread): 5 intervals, 5 frames
                prof = cProfile.Profile()
                prof.enable()
                for r in reports[:5]:
                    view.update([r], {})
                    view._draw()
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
                print(out.getvalue(), file=sys.__stderr__)  # rich.Live redirects sys.stderr
        finally:
            view.close()
    return {"edges": n_edges, "seconds": seconds, "max_fps": MAX_FPS, "redraw_on_data": data_only,
            "frames_asked_at_max_fps": held_key}  # fmt: skip
