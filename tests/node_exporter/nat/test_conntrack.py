"""The conntrack index on constructed entries, and the degraded mode without conntrack."""

from __future__ import annotations

import pytest

from node_exporter.nat.conntrack import ConntrackTable, CtEntry, CtTuple, index_entries

CLIENT, VIP, BACKEND, NODE = "10.244.1.5", "10.96.0.10", "10.244.2.7", "192.168.1.4"


def dnat(sport: int, vip: str = VIP, backend: str = BACKEND) -> CtEntry:
    """Client -> VIP:80 DNAT'ed to backend:8080, as conntrack shows it."""
    return CtEntry(CtTuple(6, CLIENT, sport, vip, 80), CtTuple(6, backend, 8080, CLIENT, sport))


def test_dnat_entry_maps_the_original_tuple_to_the_backend() -> None:
    idx = index_entries([dnat(40000)])
    assert idx.nat == {(6, CLIENT, 40000, VIP, 80): (BACKEND, 8080)}
    assert idx.dropped == 0


def test_untranslated_entry_is_left_out() -> None:
    plain = CtEntry(CtTuple(6, CLIENT, 40001, BACKEND, 8080), CtTuple(6, BACKEND, 8080, CLIENT, 40001))
    assert index_entries([plain]).nat == {}


def test_snat_only_entry_is_left_out() -> None:
    # Masquerade to the node's address: the reply's destination changes, its source does not.
    snat = CtEntry(CtTuple(6, CLIENT, 40002, "203.0.113.9", 443), CtTuple(6, "203.0.113.9", 443, NODE, 61000))
    assert index_entries([snat]).nat == {}


def test_port_only_dnat_is_kept() -> None:
    e = CtEntry(CtTuple(6, CLIENT, 40003, BACKEND, 80), CtTuple(6, BACKEND, 8080, CLIENT, 40003))
    assert index_entries([e]).nat == {(6, CLIENT, 40003, BACKEND, 80): (BACKEND, 8080)}


def test_dnat_plus_snat_keeps_the_backend() -> None:
    # NodePort with externalTrafficPolicy=Cluster: DNAT to the backend and SNAT to the node.
    e = CtEntry(CtTuple(6, CLIENT, 40004, NODE, 30080), CtTuple(6, BACKEND, 8080, NODE, 40004))
    assert index_entries([e]).nat == {(6, CLIENT, 40004, NODE, 30080): (BACKEND, 8080)}


def test_ipv6_entries_index_like_ipv4() -> None:
    e = CtEntry(CtTuple(6, "fd00::5", 40005, "fd00:96::a", 80), CtTuple(6, "fd00:1::7", 8080, "fd00::5", 40005))
    assert index_entries([e]).nat == {(6, "fd00::5", 40005, "fd00:96::a", 80): ("fd00:1::7", 8080)}


def test_index_is_bounded_and_counts_what_it_dropped() -> None:
    idx = index_entries([dnat(p) for p in range(41000, 41010)], max_entries=4)
    assert len(idx.nat) == 4
    assert idx.dropped == 6


def test_untranslated_entries_do_not_use_the_bound() -> None:
    plain = [CtEntry(CtTuple(6, CLIENT, p, BACKEND, 8080), CtTuple(6, BACKEND, 8080, CLIENT, p)) for p in range(5)]
    idx = index_entries([*plain, dnat(42000)], max_entries=1)
    assert len(idx.nat) == 1 and idx.dropped == 0


def test_missing_namespace_is_a_degraded_mode(capsys: pytest.CaptureFixture[str]) -> None:
    t = ConntrackTable("/nonexistent/netns/kscope-test")
    t.nat = {(6, CLIENT, 1, VIP, 80): (BACKEND, 8080)}
    for _ in range(3):
        t.refresh()
    assert t.available is False
    assert t.counters()["errors"] == 3 and t.counters()["dumps"] == 0
    assert t.lookup((6, CLIENT, 1, VIP, 80)) is None  # a stale lookup is worse than none
    out = capsys.readouterr()
    assert (out.out + out.err).count("conntrack_unavailable") == 1  # one line, not one per interval
