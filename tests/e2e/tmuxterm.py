"""A program in a real terminal: tmux on a private server socket, driven by send-keys and read by
capture-pane, as a person at a terminal of that size would see it."""

from __future__ import annotations

import contextlib
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class Tmux:
    def __init__(self, width: int, height: int) -> None:
        self.socket = f"kscope-test-{secrets.token_hex(3)}"
        self.size = (width, height)

    def _tmux(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10)
        if check and proc.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def start(self, argv: list[str], rc_file: Path, stderr: Path, env: dict[str, str] | None = None) -> None:
        """Run ``argv`` in a new session, its stderr to a file; its exit status goes to ``rc_file``
        (the pane then closes)."""
        cmd = " ".join(shlex.quote(a) for a in argv)
        cmd += f" 2>{shlex.quote(str(stderr))}; echo $? > {shlex.quote(str(rc_file))}"
        width, height = self.size
        extra = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                   *extra, cmd)  # fmt: skip

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(width), "-y", str(height))
        self.size = (width, height)

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t", check=False)

    def wait(self, pred: Callable[[str], bool], what: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if pred(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"{what}: not on screen within {timeout} s; the screen:\n{text}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._tmux("kill-server", check=False)
