"""The live map's redraw rate, driven by real time: intervals arriving far faster than a terminal
needs are drawn at most ``MAX_FPS`` times a second, and nothing new is never drawn."""

from __future__ import annotations

import io
import threading
import time

from rich.console import Console

from cluster_processor.aggregate import NodeReport
from cluster_processor.resolved import Side
from node_exporter.local.app import MAX_FPS, TerminalMap
from tests.node_exporter.local.test_servicemap import edge, interval, red


def test_redraws_are_bounded_and_only_on_change() -> None:
    console = Console(file=io.StringIO(), width=120, height=30, color_system=None, force_terminal=True)
    view = TerminalMap(threading.Event(), console=console).start()
    try:
        e = edge()
        seconds = 3.0
        start = time.monotonic()
        t = 0
        while time.monotonic() - start < seconds:  # 50 intervals a second
            t += 1
            view.update([NodeReport(interval(t, (red(e, Side.SERVER, 200, 0.001),)), (), ())], {})
            time.sleep(0.02)
        busy = view.frames
        elapsed = time.monotonic() - start
        assert t > 100 and 2 <= busy <= MAX_FPS * elapsed + 2, (t, busy, elapsed)
        time.sleep(1 / MAX_FPS + 0.1)  # the last change is drawn
        drawn = view.frames
        time.sleep(1.5)
        assert view.frames == drawn  # nothing new: no frame
        assert "curl@host → nginx@nginx.service:80" in console.file.getvalue()  # type: ignore[attr-defined]
    finally:
        view.close()
