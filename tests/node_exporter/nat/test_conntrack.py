"""The conntrack index on constructed entries, the ctnetlink decoders (ctnetlink.py) on constructed messages, the
degraded mode without conntrack, and malformed GET answers through the table's real socket loop."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_exporter.nat.conntrack import MALFORMED_TRIES, ConntrackTable, FlowKey
from node_exporter.nat.ctnetlink import (
    CTA_STATUS,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    NLM_F_DUMP,
    NLMSG_DONE,
    NLMSG_ERROR,
    ConntrackDumpError,
    CtEntry,
    CtTuple,
    dump_request,
    get_request,
    index_entries,
    parse_dump,
    parse_replies,
)

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


# --- the ctnetlink dump decoder, on messages built as the kernel lays them out -------------------


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def nest(kind: int, *children: bytes) -> bytes:
    return nla(kind | 0x8000, b"".join(children))  # NLA_F_NESTED, as the kernel sets it


def tuple_attr(kind: int, t: CtTuple) -> bytes:
    v6 = ":" in t.src
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    ip = nest(CTA_TUPLE_IP, nla(3 if v6 else 1, socket.inet_pton(fam, t.src)), nla(4 if v6 else 2,
              socket.inet_pton(fam, t.dst)))  # fmt: skip
    proto = nest(CTA_TUPLE_PROTO, nla(1, bytes([t.proto])), nla(2, struct.pack("!H", t.sport)),
                 nla(3, struct.pack("!H", t.dport)))  # fmt: skip
    return nest(kind, ip, proto)


def message(body: bytes, seq: int = 7, kind: int = 0x0100) -> bytes:
    """One IPCTNL_MSG_CT_NEW answer message (nfgenmsg + attributes)."""
    payload = bytes(4) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, 2, seq, 0) + payload


def entry_message(e: CtEntry, seq: int = 7) -> bytes:
    status = nla(CTA_STATUS | 0x4000, struct.pack("!I", 0x20 | 0x8))
    return message(tuple_attr(CTA_TUPLE_ORIG, e.orig) + tuple_attr(CTA_TUPLE_REPLY, e.reply) + status, seq)


DONE = struct.pack("=IHHII", 20, NLMSG_DONE, 2, 7, 0) + bytes(4)


def test_dump_request_asks_for_a_filtered_dump_of_every_family() -> None:
    req = dump_request(9)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq) == (len(req), 0x0101, 0x301, 9)
    assert req[16:20] == bytes(4)  # AF_UNSPEC, version 0, res_id 0
    assert req[20:] == nla(CTA_STATUS, struct.pack("!I", 0x20)) + nla(26, struct.pack("!I", 0x20))


def test_v4_and_v6_entries_decode_and_the_dump_ends() -> None:
    v4, v6 = dnat(40000), CtEntry(CtTuple(6, "fd00::5", 40005, "fd00:96::a", 80),
                                  CtTuple(6, "fd00:1::7", 8080, "fd00::5", 40005))  # fmt: skip
    assert parse_dump(entry_message(v4) + entry_message(v6) + DONE, seq=7) == ([v4, v6], True, 0, 0)


def icmp_message(seq: int = 7) -> bytes:
    """A DNAT'ed ping as conntrack shows it: the protocol nest holds ICMP id/type/code, no ports."""
    ip = nest(CTA_TUPLE_IP, nla(1, bytes(4)), nla(2, bytes(4)))
    icmp = nest(CTA_TUPLE_PROTO, nla(1, bytes([1])), nla(4, b"\x00\x01"), nla(5, b"\x08"), nla(6, b"\x00"))
    return message(nest(CTA_TUPLE_ORIG, ip, icmp) + nest(CTA_TUPLE_REPLY, ip, icmp), seq)


UDP = CtEntry(CtTuple(17, CLIENT, 5353, VIP, 53), CtTuple(17, BACKEND, 5353, CLIENT, 5353))
SCTP = CtEntry(CtTuple(132, CLIENT, 5000, VIP, 80), CtTuple(132, BACKEND, 8080, CLIENT, 5000))


def test_other_protocols_and_sequences_are_skipped_broken_messages_malformed() -> None:
    no_ports = message(nest(CTA_TUPLE_ORIG, nest(CTA_TUPLE_IP, nla(1, bytes(4)), nla(2, bytes(4)))))
    bad_nla = message(struct.pack("=HH", 200, CTA_TUPLE_ORIG) + bytes(8))
    no_reply = message(tuple_attr(CTA_TUPLE_ORIG, dnat(3).orig))
    not_ours = entry_message(SCTP) + icmp_message() + entry_message(dnat(1), seq=6)
    buf = entry_message(UDP) + not_ours + no_ports + bad_nla + no_reply + entry_message(dnat(2))
    # a broken message may be an entry of ours: malformed, not skipped like the ones that are not ours
    assert parse_dump(buf, seq=7) == ([UDP, dnat(2)], False, 3, 3)  # TCP and UDP are ours


def test_a_truncated_message_stops_the_batch() -> None:
    whole = entry_message(dnat(3))
    assert parse_dump(entry_message(dnat(4)) + whole[:-5], seq=7) == ([dnat(4)], False, 0, 1)


def test_a_netlink_error_is_raised_with_its_errno() -> None:
    err = struct.pack("=IHHII", 36, NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", -errno.EPERM) + bytes(16)
    with pytest.raises(ConntrackDumpError) as info:
        parse_dump(err, seq=7)
    assert info.value.errno == errno.EPERM


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_anything_but_a_dump_error(data: bytes) -> None:
    with contextlib.suppress(ConntrackDumpError):
        part = parse_dump(data, seq=7)
        assert part.skipped >= 0 and part.malformed >= 0 and all(isinstance(e, CtEntry) for e in part.entries)


def test_get_request_names_one_entry_by_its_original_tuple() -> None:
    req = get_request(11, (6, CLIENT, 40000, VIP, 80))
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq) == (len(req), 0x0101, 0x1, 11)  # a request, no dump, no ack
    assert req[16] == socket.AF_INET
    body = tuple_attr(CTA_TUPLE_ORIG, CtTuple(6, CLIENT, 40000, VIP, 80))
    assert req[20:] == body
    v6 = get_request(12, (6, "fd00::5", 40005, "fd00:96::a", 80))
    assert v6[16] == socket.AF_INET6 and v6[20:] == tuple_attr(CTA_TUPLE_ORIG, CtTuple(6, "fd00::5", 40005,
                                                                                       "fd00:96::a", 80))  # fmt: skip


def error_message(seq: int, err: int) -> bytes:
    """NLMSG_ERROR as the kernel answers a failed request: -errno, then the request's header."""
    return struct.pack("=IHHII", 36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err) + bytes(16)


# Answers to a GET that cannot be decoded, each as it would reach the socket (one datagram).
MALFORMED: dict[str, Callable[[int], bytes]] = {
    "nest past its end": lambda seq: message(struct.pack("=HH", 200, CTA_TUPLE_ORIG) + bytes(8), seq),
    "no reply tuple": lambda seq: message(tuple_attr(CTA_TUPLE_ORIG, dnat(1).orig), seq),
    "truncated": lambda seq: entry_message(dnat(1), seq)[:-5],
    "error too short for an errno": lambda seq: struct.pack("=IHHII", 18, NLMSG_ERROR, 0, seq, 0) + bytes(2),
    "ack, no entry": lambda seq: error_message(seq, 0),
}


def test_replies_pair_with_their_requests_by_sequence() -> None:
    buf = entry_message(dnat(40000), seq=8) + error_message(9, errno.ENOENT) + entry_message(SCTP, seq=10)
    assert parse_replies(buf + entry_message(UDP, seq=12)) == [(8, dnat(40000)), (9, errno.ENOENT), (10, None),
                                                               (12, UDP)]  # fmt: skip
    # a truncated answer (its header says more than the datagram holds) still names its request
    assert parse_replies(buf + entry_message(dnat(1), seq=11)[:-3])[3:] == [(11, None)]


@pytest.mark.parametrize("kind", MALFORMED)
def test_each_malformed_answer_is_none_for_its_sequence(kind: str) -> None:
    assert parse_replies(MALFORMED[kind](21)) == [(21, None)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_answers_never_raise(data: bytes) -> None:
    for _seq, reply in parse_replies(data):
        assert reply is None or isinstance(reply, CtEntry) or (isinstance(reply, int) and reply > 0)


def test_answers_are_bounded_and_evictions_counted() -> None:
    table = ConntrackTable("/nonexistent", max_entries=2)
    keys = [(6, CLIENT, 40000 + i, VIP, 80) for i in range(3)]
    table._remember([(k, (BACKEND, 8080)) for k in keys])  # what resolve() does with its answers
    c = table.counters()
    assert (c["answers"], c["evicted"]) == (2, 1)
    assert table.lookup(keys[0]) is None and table.lookup(keys[2]) == (BACKEND, 8080)
    table._remember([(keys[2], None)])  # a known key again: no eviction
    assert table.counters()["evicted"] == 1


# --- malformed GET answers through resolve(): the table's socket loop, a local peer in the kernel's place ---


Script = dict[FlowKey | str, list[Callable[[int], bytes]]]  # a key's (or "dump"'s) answers, by seq


class FakeConntrack:
    """Conntrack's side of the table's socket, over a local SOCK_SEQPACKET pair (one datagram per
    message, as netlink): each GET, recognised by the bytes get_request builds for its key, and each
    dump gets the next of its scripted answers (the last one repeats). The table's own send/recv loop,
    pairing and decoder read what it sends; nothing of ours is replaced."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.asked: list[list[FlowKey | str]] = []  # the keys asked ("dump"), per socket the table opened
        # a GET's body does not hold its seq
        self._keys = {get_request(0, k)[16:]: k for k in script if not isinstance(k, str)}
        self._threads: list[threading.Thread] = []

    def open(self, netns: str | None) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        asked: list[FlowKey | str] = []
        self.asked.append(asked)
        t = threading.Thread(target=self._serve, args=(theirs, asked), daemon=True)
        t.start()
        self._threads.append(t)
        return ours

    def _serve(self, sock: socket.socket, asked: list[FlowKey | str]) -> None:
        with sock:
            while request := sock.recv(65536):  # b"": the table closed its socket
                flags, seq = struct.unpack_from("=HI", request, 6)
                key = "dump" if flags & NLM_F_DUMP else self._keys[request[16:]]
                answers, before = self.script[key], sum(r.count(key) for r in self.asked)
                asked.append(key)  # before the answer: the table may return as soon as it has it
                sock.send(answers[min(before, len(answers) - 1)](seq))

    def join(self) -> None:
        for t in self._threads:
            t.join(5)
            assert not t.is_alive()


def dnat_answer(key: FlowKey, backend: tuple[str, int]) -> Callable[[int], bytes]:
    proto, src, sport, dst, dport = key
    orig, reply = CtTuple(proto, src, sport, dst, dport), CtTuple(proto, *backend, src, sport)
    return lambda seq: entry_message(CtEntry(orig, reply), seq)


def plain_answer(key: FlowKey) -> Callable[[int], bytes]:
    _, src, sport, dst, dport = key
    return lambda seq: entry_message(
        CtEntry(CtTuple(6, src, sport, dst, dport), CtTuple(6, dst, dport, src, sport)), seq
    )


def done(seq: int) -> bytes:
    return struct.pack("=IHHII", 20, NLMSG_DONE, 2, seq, 0) + bytes(4)


def test_malformed_answers_are_asked_again_then_given_up_on(fake_conntrack: Callable[[Script], FakeConntrack]) -> None:
    key = [(6, CLIENT, 43000 + i, VIP, 80) for i in range(3 + len(MALFORMED))]
    ok, missing, flaky, bad = key[0], key[1], key[2], key[3:]
    fake = fake_conntrack(
        {
            ok: [dnat_answer(ok, (BACKEND, 8080))],
            missing: [lambda seq: error_message(seq, errno.ENOENT)],
            flaky: [MALFORMED["nest past its end"], dnat_answer(flaky, ("10.244.3.9", 8443))],  # transient
            **{k: [m] for k, m in zip(bad, MALFORMED.values(), strict=True)},  # every time
        }
    )
    table = ConntrackTable(None, open_socket=fake.open)
    table.timeout_s = 2.0  # an answer left unpaired would fail the round: errors == 0 below says none was

    table.resolve(key)
    assert fake.asked[0] == key
    assert table.lookup(ok) == (BACKEND, 8080) and table.lookup(missing) is None
    c = table.counters()
    assert (c["answers"], c["malformed"], c["malformed_given_up"], c["gets_missing"], c["errors"]) == (2, 6, 0, 1, 0)

    table.resolve(key)  # the next interval: the malformed ones are asked again, the answered ones are not
    assert fake.asked[1] == [flaky, *bad]
    assert table.lookup(flaky) == ("10.244.3.9", 8443)  # a transient failure pinned nothing
    c = table.counters()
    assert (c["answers"], c["malformed"], c["malformed_given_up"], c["errors"]) == (3, 11, 0, 0)

    for _ in range(MALFORMED_TRIES - 2):
        table.resolve(key)
    assert fake.asked[-1] == bad
    c = table.counters()
    assert (c["answers"], c["malformed"], c["malformed_given_up"]) == (
        3 + len(bad),
        1 + MALFORMED_TRIES * len(bad),
        len(bad),
    )
    assert all(table.lookup(k) is None for k in bad)  # unknown: no NAT fields

    opened = len(fake.asked)
    table.resolve(key)  # every key has its answer now: no socket, no GET
    assert len(fake.asked) == opened
    assert table.counters()["gets"] == 2 + 2 + MALFORMED_TRIES * len(bad)  # ok, missing once; flaky twice

    table.forget(bad[0])  # the socket closed; its tuple comes back as a new connection: a fresh budget
    table.resolve([bad[0]])
    c = table.counters()
    assert fake.asked[-1] == [bad[0]] and (c["answers"], c["malformed_given_up"]) == (2 + len(bad), len(bad))


def test_a_dump_with_a_malformed_message_answers_only_the_keys_it_holds(
    fake_conntrack: Callable[[Script], FakeConntrack],
) -> None:
    """Many new sockets at once (a dump): one of its messages cannot be read, so a key the dump lacks
    may be DNAT'ed all the same; those keys are asked again (GETs, now that they are few)."""
    ok, hidden, plain = [(6, CLIENT, 44000 + i, VIP, 80) for i in range(3)]
    fake = fake_conntrack(
        {
            "dump": [lambda seq: dnat_answer(ok, (BACKEND, 8080))(seq) + MALFORMED["no reply tuple"](seq) + done(seq)],
            hidden: [dnat_answer(hidden, ("10.244.3.9", 8443))],  # the entry the broken message was
            plain: [plain_answer(plain)],  # untranslated: the kernel's filter kept it out of the dump
        }
    )
    table = ConntrackTable(None, get_limit=2, open_socket=fake.open)
    table.resolve([ok, hidden, plain])
    assert fake.asked == [["dump"]] and table.lookup(ok) == (BACKEND, 8080)
    c = table.counters()
    assert (c["dumps"], c["answers"], c["malformed"], c["malformed_given_up"], c["skipped"]) == (1, 1, 1, 0, 0)
    table.resolve([ok, hidden, plain])
    assert fake.asked[1] == [hidden, plain]
    assert (table.lookup(hidden), table.lookup(plain)) == (("10.244.3.9", 8443), None)  # nothing was pinned
    assert table.counters()["answers"] == 3

    always_dump = ConntrackTable(None, get_limit=0, open_socket=fake.open)  # a malformed dump every time
    for _ in range(MALFORMED_TRIES + 1):
        always_dump.resolve([ok, hidden, plain])
    assert fake.asked[2:] == [["dump"]] * MALFORMED_TRIES  # then every key had its answer: no more dumps
    c = always_dump.counters()
    assert (c["answers"], c["malformed"], c["malformed_given_up"]) == (3, MALFORMED_TRIES, 2)
    assert (always_dump.lookup(ok), always_dump.lookup(hidden)) == ((BACKEND, 8080), None)  # unknown, given up
