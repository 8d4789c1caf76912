"""Where ``kscope run``'s map goes: a live terminal view with keys, or JSON lines when stdout is no
terminal.

``update`` is called from the agent's thread once per interval; the terminal view draws on its own
thread, at most ``MAX_FPS`` times a second (on new data or a key), so a redraw never delays the
agent's interval and a slow terminal never holds the probes' buffers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Mapping
from typing import IO, Final

from rich.console import Console
from rich.live import Live

from cluster_processor.aggregate import NodeReport
from node_exporter.local import render
from node_exporter.local.servicemap import MapSettings, ServiceMap

MAX_FPS: Final = 4
DEFAULT_MAP: Final = MapSettings()
_KEYS: Final = {
    "\x1b[A": "up", "\x1bOA": "up", "\x1b[B": "down", "\x1bOB": "down", "\r": "enter", "\n": "enter",
    "\x1b": "esc", "q": "quit", "Q": "quit", "p": "pause", "P": "pause", "k": "up", "j": "down",
}  # fmt: skip


def keys_of(data: str) -> list[str]:
    """Key names in what one read returned: escape sequences first, then single characters (a lone
    ESC is the esc key: a terminal sends a sequence in one write)."""
    out = []
    i = 0
    while i < len(data):
        for seq in ("\x1b[A", "\x1bOA", "\x1b[B", "\x1bOB"):
            if data.startswith(seq, i):
                out.append(_KEYS[seq])
                i += len(seq)
                break
        else:
            if data[i] == "\x1b" and data.startswith("\x1b[", i):  # another sequence: skip it whole
                j = i + 2
                while j < len(data) and not data[j].isalpha() and data[j] != "~":
                    j += 1
                i = j + 1
                continue
            key = _KEYS.get(data[i])
            if key is not None:
                out.append(key)
            i += 1
    return out


class LogBuffer:
    """Where log lines go while the map holds the screen (they would tear it): the last ``limit``
    kept, the rest counted, all written out when the map closes."""

    def __init__(self, limit: int = 200) -> None:
        self.lines: deque[str] = deque(maxlen=limit)
        self.dropped = 0

    def write(self, text: str) -> int:
        if len(self.lines) == self.lines.maxlen:
            self.dropped += 1
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def replay(self, stream: IO[str]) -> None:
        if self.dropped:
            stream.write(f"kscope: {self.dropped} earlier log lines not kept while the map was shown\n")
        stream.write("".join(self.lines))
        stream.flush()


class MapOutput:
    """Folds each interval into the map; subclasses show it."""

    def __init__(self, settings: MapSettings = DEFAULT_MAP) -> None:
        self.map = ServiceMap(settings)
        self.counters: dict[str, int] = {}
        self.lock = threading.Lock()

    def update(self, reports: list[NodeReport], counters: Mapping[str, int]) -> None:
        now = time.monotonic()
        with self.lock:
            for r in reports:
                self.map.update(r.interval, r.spans, now)
            self.counters = dict(counters)
        self.changed()

    def changed(self) -> None:
        pass

    def close(self) -> None:
        pass


class JsonLines(MapOutput):
    """One JSON object per interval on ``stream``: the map's edges (problems first) and drops."""

    def __init__(self, stream: IO[str], settings: MapSettings = DEFAULT_MAP) -> None:
        super().__init__(settings)
        self.stream = stream

    def changed(self) -> None:
        with self.lock:
            doc = render.snapshot(self.map, time.monotonic(), self.counters)
        doc["time_unix"] = round(time.time(), 3)
        try:
            self.stream.write(json.dumps(doc, separators=(",", ":")) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): the agent keeps its other outputs
            pass


class TerminalMap(MapOutput):
    def __init__(
        self, stop: threading.Event, settings: MapSettings = DEFAULT_MAP, console: Console | None = None
    ) -> None:
        """``console``: where to draw (the terminal; a bench or test passes one writing elsewhere)."""
        super().__init__(settings)
        self.stop = stop  # set by q: the agent then runs its last interval and exits
        self._sized = console is None  # the terminal's console follows the terminal's size
        self.console = console or Console()
        self.frames = 0  # drawn so far
        self.paused = False
        self.selected: tuple[str, str] | None = None  # an edge's key: the selection follows the edge
        self.open: tuple[str, str] | None = None  # the edge being looked at
        self._wake = threading.Event()
        self._fd = sys.stdin.fileno() if sys.stdin.isatty() else -1
        self._saved = termios.tcgetattr(self._fd) if self._fd >= 0 else None
        self._thread = threading.Thread(target=self._loop, name="kscope-map", daemon=True)
        self._live = Live(console=self.console, screen=True, auto_refresh=False, transient=False)

    def start(self) -> TerminalMap:
        if self._fd >= 0:
            tty.setcbreak(self._fd)  # keys one at a time, no echo; Ctrl-C still stops the agent
        self._live.start()
        self._thread.start()
        return self

    def changed(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self.stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2)
        self._live.stop()
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def handle(self, key: str) -> None:
        with self.lock:
            rows = self.map.ordered(time.monotonic())
        if key == "quit":
            self.stop.set()
        elif key == "pause":
            self.paused = not self.paused
        elif key in ("up", "down") and rows:
            keys = [(r.client, r.server) for r in rows]
            at = keys.index(self.selected) if self.selected in keys else 0  # none yet: the first row is
            at = max(0, at - 1) if key == "up" else min(len(keys) - 1, at + 1)
            self.selected = keys[at]
        elif key == "enter" and rows:
            keys = [(r.client, r.server) for r in rows]
            self.open = self.selected if self.selected in keys else keys[0]
        elif key == "esc":
            self.open = None

    def _loop(self) -> None:
        last = 0.0
        drawn = False
        while not self.stop.is_set():
            keys = self._read_keys(0.25)
            for k in keys:
                self.handle(k)
            wait = 1 / MAX_FPS - (time.monotonic() - last)
            if not keys and self._wake.is_set() and wait > 0:
                time.sleep(wait)  # new data, drawn at most MAX_FPS times a second
            if not keys and not self._wake.is_set():
                continue
            self._wake.clear()
            last = time.monotonic()
            if self.paused and not keys and drawn:
                continue  # paused: the data keeps coming in (and out, with --otlp), the screen stays
            self._draw()
            drawn = True

    def _draw(self) -> None:
        # The terminal's size now (it may have been resized), over COLUMNS/LINES from the environment.
        if self._sized:
            with contextlib.suppress(OSError):
                self.console.size = os.get_terminal_size(sys.stdout.fileno())
        size = self.console.size
        now = time.monotonic()
        with self.lock:
            row = self.map.edges.get(self.open) if self.open is not None else None
            if row is not None:
                view = render.edge_view(row, now, self.map.faded(row, now))
            else:
                self.open = None
                view = render.map_view(self.map, now, size.width, size.height, self.selected, self.counters,
                                       self.paused)  # fmt: skip
        self._live.update(view, refresh=True)
        self.frames += 1

    def _read_keys(self, timeout: float) -> list[str]:
        if self._fd < 0:
            self._wake.wait(timeout)
            return []
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self._fd, 64).decode("utf-8", errors="replace")
        except OSError:
            return []
        if not data:  # stdin closed: no more keys, the view goes on
            self._fd = -1
        return keys_of(data)
