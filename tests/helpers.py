"""Helpers every test folder shares.

``eventually``: poll a predicate until it holds or a deadline passes, then fail saying what was
awaited and for how long (plus ``diag()``, what the test can show of the state it saw). Tests wait
on events this way, never on a fixed sleep: the machine may be slow, the assertion stays strict.
``eventually_async`` is the same inside an event loop (it sleeps with ``asyncio.sleep``, so the
code under test keeps running on that loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def _timed_out(what: str, timeout_s: float, diag: Callable[[], str] | None) -> AssertionError:
    detail = f"\n{diag()}" if diag is not None else ""
    return AssertionError(f"timed out after {timeout_s:g} s waiting for: {what}{detail}")


def eventually(
    pred: Callable[[], object],
    what: str,
    timeout_s: float = 10.0,
    *,
    interval_s: float = 0.01,
    diag: Callable[[], str] | None = None,
) -> None:
    """Return once ``pred()`` is true; AssertionError naming ``what`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s, diag)
        time.sleep(interval_s)


async def eventually_async(
    pred: Callable[[], object],
    what: str,
    timeout_s: float = 10.0,
    *,
    interval_s: float = 0.01,
    diag: Callable[[], str] | None = None,
) -> None:
    """:func:`eventually` for a test running in an event loop."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s, diag)
        await asyncio.sleep(interval_s)
