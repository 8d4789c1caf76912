"""--l7-trace-ratio: the fixed share's threshold and the auto share's steps (node_exporter/l7/pick.py)."""

from __future__ import annotations

import random

from node_exporter.l7.pick import MAX_SHIFT, AutoPick, link_mix, link_pick


def test_fixed_share_threshold() -> None:
    assert link_pick(1) == 0 and link_pick(0.5) == 1 << 31 and link_pick(1e-12) == 1


def test_auto_share_halves_past_the_budget_and_comes_back_with_hysteresis() -> None:
    auto = AutoPick(budget_per_s=100)  # e.g. --l7-record-rate 50 on 2 CPUs
    assert auto.update(40, 1.0) == 0  # within half the budget: every request may be a record
    assert auto.update(1000, 1.0) == (1 << 32) >> 5 and auto.shift == 5  # 1000 / 32 <= 50 < 1000 / 16
    assert auto.update(1000, 1.0) == (1 << 32) >> 5  # steady load: no change
    assert auto.update(600, 1.0) == (1 << 32) >> 5  # 600 / 16 = 37.5 > 20: not yet back up
    assert auto.update(300, 1.0) == (1 << 32) >> 4  # 300 / 8 = 37.5 > 20 stops it at 1/16
    assert auto.update(0, 1.0) == 0  # idle: all again
    assert auto.update(10**12, 1.0) == (1 << 32) >> MAX_SHIFT  # bounded below


def test_auto_share_without_a_budget_or_time_keeps_all() -> None:
    assert AutoPick(budget_per_s=0).update(10**6, 1.0) == 0
    auto = AutoPick(budget_per_s=10)
    assert auto.update(10**6, 0.0) == 0


def test_auto_shares_nest_so_the_sparser_end_is_a_subset() -> None:
    """Two ends at different powers of two: every request the sparser one picks, the other picks."""
    rng = random.Random(7)
    seqs = [(rng.getrandbits(32), rng.getrandbits(32)) for _ in range(20000)]
    picked = {k: {s for s in seqs if link_mix(*s) < (1 << 32) >> k} for k in (3, 6)}
    assert picked[6] and picked[6] <= picked[3]
    assert abs(len(picked[3]) / len(seqs) - 1 / 8) < 0.01
