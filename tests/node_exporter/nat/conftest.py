from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.node_exporter.nat.test_conntrack import FakeConntrack, Script


@pytest.fixture
def fake_conntrack() -> Iterator[Callable[[Script], FakeConntrack]]:
    """Conntrack's side of the table's socket (FakeConntrack), joined at the end of the test."""
    fakes: list[FakeConntrack] = []

    def make(script: Script) -> FakeConntrack:
        fakes.append(FakeConntrack(script))
        return fakes[-1]

    yield make
    for f in fakes:
        f.join()
