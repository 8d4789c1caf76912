"""When "not found" is final, and how long UDP answers live: the table's real socket loop and decoder,
FakeConntrack in the kernel's place (see test_conntrack.py)."""

from __future__ import annotations

import errno
from collections.abc import Callable

from node_exporter.nat.conntrack import MISSING_TRIES, UDP_ANSWER_TTL_S, ConntrackTable, FlowKey
from tests.node_exporter.nat.test_conntrack import (
    BACKEND,
    CLIENT,
    VIP,
    FakeConntrack,
    Script,
    dnat_answer,
    done,
    error_message,
)

Fake = Callable[[Script], FakeConntrack]


def enoent(seq: int) -> bytes:
    return error_message(seq, errno.ENOENT)


def test_a_connecting_socket_not_found_yet_is_asked_again_until_its_entry_is_there(fake_conntrack: Fake) -> None:
    """The SYN was dropped before conntrack confirmed the entry: not found twice, then DNAT'ed."""
    key: FlowKey = (6, CLIENT, 45000, VIP, 80)
    fake = fake_conntrack({key: [enoent, enoent, dnat_answer(key, (BACKEND, 8080))]})
    table = ConntrackTable(None, open_socket=fake.open)
    for _ in range(2):
        table.resolve([key], connecting={key})
        assert table.lookup(key) is None
    table.resolve([key], connecting={key})
    assert table.lookup(key) == (BACKEND, 8080)
    table.resolve([key])  # known now
    assert fake.asked == [[key]] * 3
    c = table.counters()
    assert (c["gets_missing"], c["missing_pending"], c["retries"], c["missing_given_up"]) == (2, 2, 2, 0)


def test_not_found_is_final_once_the_socket_has_connected(fake_conntrack: Fake) -> None:
    key: FlowKey = (6, CLIENT, 45001, VIP, 80)
    fake = fake_conntrack({key: [enoent]})
    table = ConntrackTable(None, open_socket=fake.open)
    table.resolve([key], connecting={key})  # still connecting: not kept
    table.resolve([key])  # connected (its SYN passed the node) and still not found: untracked
    table.resolve([key])
    assert fake.asked == [[key], [key]] and table.lookup(key) is None
    c = table.counters()
    assert (c["missing_pending"], c["retries"], c["missing_given_up"], c["answers"]) == (1, 1, 0, 1)


def test_a_socket_connecting_forever_is_given_up_on_after_missing_tries(fake_conntrack: Fake) -> None:
    key: FlowKey = (6, CLIENT, 45002, VIP, 80)
    fake = fake_conntrack({key: [enoent]})
    table = ConntrackTable(None, open_socket=fake.open)
    for _ in range(MISSING_TRIES + 2):
        table.resolve([key], connecting={key})
    assert len(fake.asked) == MISSING_TRIES  # then kept as untranslated: not asked again
    c = table.counters()
    assert (c["missing_pending"], c["missing_given_up"], c["retries"]) == (MISSING_TRIES - 1, 1, MISSING_TRIES - 1)
    table.forget(key)  # closed; the tuple may come back: a fresh budget
    table.resolve([key], connecting={key})
    assert len(fake.asked) == MISSING_TRIES + 1 and table.counters()["missing_pending"] == MISSING_TRIES


def test_a_dump_that_lacks_a_connecting_socket_does_not_settle_it(fake_conntrack: Fake) -> None:
    """Many new sockets at once: the DNAT-filtered dump lacks the one whose entry is not confirmed yet."""
    ok, young, plain = [(6, CLIENT, 46000 + i, VIP, 80) for i in range(3)]
    fake = fake_conntrack(
        {
            "dump": [lambda seq: dnat_answer(ok, (BACKEND, 8080))(seq) + done(seq)],
            young: [dnat_answer(young, ("10.244.3.9", 8443))],
        }
    )
    table = ConntrackTable(None, get_limit=2, open_socket=fake.open)
    table.resolve([ok, young, plain], connecting={young})
    assert fake.asked == [["dump"]]
    assert table.lookup(ok) == (BACKEND, 8080) and table.counters()["answers"] == 2  # ok, plain (untranslated)
    table.resolve([ok, young, plain], connecting={young})
    assert fake.asked[1] == [young] and table.lookup(young) == ("10.244.3.9", 8443)
    c = table.counters()
    assert (c["missing_pending"], c["retries"], c["answers"]) == (1, 1, 3)


def test_udp_answers_live_for_conntracks_udp_timeout(fake_conntrack: Fake) -> None:
    """A UDP flow has no close: its answer is kept for UDP_ANSWER_TTL_S, then asked again (the same
    5-tuple may have been DNAT'ed to another backend since)."""
    key: FlowKey = (17, CLIENT, 53000, VIP, 53)
    fake = fake_conntrack({key: [dnat_answer(key, (BACKEND, 5353)), dnat_answer(key, ("10.244.3.9", 5353))]})
    now = [100.0]
    table = ConntrackTable(None, open_socket=fake.open, clock=lambda: now[0])
    table.resolve([key])
    now[0] += UDP_ANSWER_TTL_S - 1
    table.resolve([key])
    assert table.lookup(key) == (BACKEND, 5353) and fake.asked == [[key]]
    now[0] += 2
    table.resolve([key])
    assert table.lookup(key) == ("10.244.3.9", 5353) and fake.asked == [[key], [key]]
    assert table.counters()["evicted"] == 0  # an expired answer is not an eviction


def test_udp_answers_are_bounded_and_evictions_counted(fake_conntrack: Fake) -> None:
    keys: list[FlowKey] = [(17, CLIENT, 53100 + i, VIP, 53) for i in range(5)]
    fake = fake_conntrack({k: [dnat_answer(k, (BACKEND, 5353))] for k in keys})
    table = ConntrackTable(None, max_entries=3, open_socket=fake.open)
    table.resolve(keys)
    c = table.counters()
    assert (c["answers"], c["evicted"]) == (3, 2)
    assert [table.lookup(k) for k in keys] == [None, None] + [(BACKEND, 5353)] * 3  # the newest kept


def test_not_found_counts_are_bounded_and_evictions_counted(fake_conntrack: Fake) -> None:
    keys: list[FlowKey] = [(6, CLIENT, 47000 + i, VIP, 80) for i in range(3)]
    fake = fake_conntrack({k: [enoent] for k in keys})
    table = ConntrackTable(None, max_entries=2, open_socket=fake.open)
    table.resolve(keys, connecting=set(keys))
    c = table.counters()
    assert (c["missing_pending"], c["missing_evicted"], c["answers"]) == (3, 1, 0)
    table.resolve(keys, connecting=set(keys))  # all three asked again; in turn each evicts the next
    assert fake.asked[1] == keys and table.counters()["missing_evicted"] == 4


def test_a_tuple_that_cannot_be_asked_about_is_counted_and_the_rest_answered(fake_conntrack: Fake) -> None:
    """An unconnected socket's unspecified "::" with an IPv4 peer, a port past 16 bits: no GET is built
    for them (one failed GET would fail the whole interval's round as if conntrack were unavailable)."""
    good: FlowKey = (17, CLIENT, 53200, VIP, 53)
    bad: list[FlowKey] = [(17, "::", 53201, VIP, 53), (6, CLIENT, 70000, VIP, 80), (6, "not an ip", 1, VIP, 80)]
    fake = fake_conntrack({good: [dnat_answer(good, (BACKEND, 5353))]})
    table = ConntrackTable(None, open_socket=fake.open)
    table.resolve([*bad, good])
    table.resolve([*bad, good])  # kept as untranslated: not counted again
    assert fake.asked == [[good]] and table.lookup(good) == (BACKEND, 5353)
    assert all(table.lookup(k) is None for k in bad)
    c = table.counters()
    assert (c["bad_keys"], c["errors"], c["answers"]) == (3, 0, 4) and table.available
