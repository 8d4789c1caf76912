"""The shared waiting helper: it returns as soon as the predicate holds, and a miss names what it waited for."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from tests.helpers import eventually, eventually_async


def test_returns_once_the_predicate_holds() -> None:
    calls = itertools.count(1)
    t0 = time.monotonic()
    eventually(lambda: next(calls) >= 3, "the third call", interval_s=0.001)
    assert next(calls) == 4 and time.monotonic() - t0 < 1


def test_a_miss_names_what_and_shows_the_diagnosis() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0.05 s waiting for: the sky to fall\nsky: up"):
        eventually(lambda: False, "the sky to fall", 0.05, diag=lambda: "sky: up")


def test_the_async_form_lets_the_loop_run_while_it_waits() -> None:
    async def body() -> None:
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.02, done.set)  # only runs if the wait yields
        await eventually_async(done.is_set, "the timer", 2)
        with pytest.raises(AssertionError, match="waiting for: never"):
            await eventually_async(lambda: False, "never", 0.02)

    asyncio.run(body())
