"""In-process causality, the agent's half (node_exporter/l7/causal.py) through the pipeline's decoder:
a client record's tentative parent becomes L7Request.parent only with its parent's confirmation."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from node_exporter.bpf.abi import KscopeL7Exchange, L7Direction, L7ExchangeFlags, L7Protocol, L7RecordType, Role
from node_exporter.l7.causal import GoPrograms, Parent, with_parent
from node_exporter.l7.chunks import Chunk, decode_chunk
from node_exporter.l7.exchanges import ExchangeBatch
from node_exporter.l7.pipeline import L7Event, L7Pipeline
from node_exporter.output.convert import MonotonicClock, l7_request
from node_exporter.protocols import DbRecord, DnsRecord, HttpRecord
from node_exporter.protocols.http2_session import Http2Record
from tests.node_exporter.l7.test_pipeline import chunk_bytes

INGRESS = L7Direction.KSCOPE_DIR_INGRESS

SEQ = L7ExchangeFlags.KSCOPE_X_TCP_SEQ
TGID, TID = 4242, 4250
SERVER_START = 5_000_000


def record(role: int, path: str, *, start: int, flags: int, seqs: tuple[int, int], parent: int = 0,
           tid: int = TID, tgid: int = TGID, cookie: int = 1, rid: str = "", latency: int = 100) -> bytes:  # fmt: skip
    x = KscopeL7Exchange()
    x.type, x.role, x.method, x.reason = L7RecordType.KSCOPE_REC_L7_EXCHANGE, role, 1, 1
    extra = f"X-Request-ID: {rid}\r\n" if rid else ""
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()
    x.head[: len(head)] = list(head)
    x.head_len = len(head)
    x.sock_cookie, x.start_ns, x.latency_ns, x.status = cookie, start, latency, 200
    x.tgid, x.pid, x.sport, x.dport, x.family = tgid, tid, 40000, 80, 2
    x.saddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 1]
    x.daddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 2]
    x.flags = flags
    x.tcp_req_seq, x.tcp_resp_seq = seqs
    x.parent_start_ns = parent
    return bytes(x)


def server(ok: bool = True, start: int = SERVER_START, tid: int = TID) -> bytes:
    flags = SEQ | (L7ExchangeFlags.KSCOPE_X_PARENT_OK if ok else 0)
    return record(Role.KSCOPE_ROLE_SERVER, "/in", start=start, flags=flags, seqs=(111, 222), tid=tid, cookie=2)


def child(path: str = "/out", parent: int = SERVER_START, tid: int = TID) -> bytes:
    flags = SEQ | L7ExchangeFlags.KSCOPE_X_PARENT
    return record(Role.KSCOPE_ROLE_CLIENT, path, start=parent + 10, flags=flags, seqs=(7, 8), parent=parent, tid=tid)


def feed(pipe: L7Pipeline, *records: bytes) -> list[L7Event]:
    return pipe.feed([ExchangeBatch.of(list(records))])


def rec(ev: L7Event) -> HttpRecord:
    assert isinstance(ev.record, HttpRecord)
    return ev.record


def paths(events: list[L7Event]) -> list[str]:
    return [rec(e).path for e in events]


def test_child_after_its_confirmed_parent_is_linked_to_it() -> None:
    pipe = L7Pipeline()
    out = feed(pipe, server(), child())
    assert paths(out) == ["/in", "/out"]
    assert rec(out[0]).parent is None
    assert rec(out[1]).parent == (111, 222, SERVER_START)
    assert rec(out[1]).tcp_seqs == (7, 8)  # its own numbers stay
    # on the wire: the parent's numbers and its start, converted like the parent record's own start
    clock = MonotonicClock()
    msgs = [l7_request(e, None, clock) for e in out]
    assert msgs[1].HasField("parent") and not msgs[0].HasField("parent")
    assert (msgs[1].parent.tcp_request_seq, msgs[1].parent.tcp_response_seq) == (
        msgs[0].http.tcp_request_seq,
        msgs[0].http.tcp_response_seq,
    )
    assert msgs[1].parent.start_time_unix_nano == msgs[0].start_time_unix_nano
    assert pipe.counters()["causal_children_linked"] == 1


def test_child_waits_for_its_parent_then_is_linked() -> None:
    pipe = L7Pipeline()
    assert feed(pipe, child()) == []  # held: its parent's verdict is not known yet
    assert pipe.counters()["causal_children_waiting"] == 1
    out = {rec(e).path: rec(e) for e in feed(pipe, server())}
    assert sorted(out) == ["/in", "/out"]
    assert out["/out"].parent == (111, 222, SERVER_START)
    assert pipe.counters()["causal_children_waiting"] == 0


def test_unconfirmed_parent_releases_its_children_unlinked() -> None:
    pipe = L7Pipeline()
    assert feed(pipe, child()) == []
    out = feed(pipe, server(ok=False))
    assert sorted(paths(out)) == ["/in", "/out"]
    assert all(rec(e).parent is None for e in out)
    assert pipe.counters()["causal_children_unconfirmed"] == 1


def test_other_thread_or_other_start_is_not_the_parent() -> None:
    pipe = L7Pipeline(causal_hold_ns=0)
    # a confirmed server exchange of another thread, and one of this thread but another start
    out = feed(pipe, server(tid=TID + 1), server(start=SERVER_START + 1), child())
    assert paths(out) == ["/in", "/in"]
    out = pipe.expire(time.monotonic_ns())
    assert paths(out) == ["/out"] and rec(out[0]).parent is None
    assert pipe.counters()["causal_children_timeout"] == 1


def test_child_waits_at_most_the_hold_then_leaves_unlinked() -> None:
    pipe = L7Pipeline(causal_hold_ns=10**12)
    assert feed(pipe, child()) == []
    assert pipe.expire(time.monotonic_ns()) == []  # not a whole hold yet
    assert paths(pipe.expire(time.monotonic_ns() + 10**12)) == ["/out"]
    # a parent confirmed after its children left links nobody
    assert paths(feed(pipe, server())) == ["/in"]
    assert pipe.counters()["causal_children_timeout"] == 1


def test_agent_stop_flushes_waiting_children() -> None:
    pipe = L7Pipeline(causal_hold_ns=10**12)
    assert feed(pipe, child("/a"), child("/b", parent=SERVER_START + 5)) == []
    assert sorted(paths(pipe.flush_causal())) == ["/a", "/b"]
    assert pipe.counters()["causal_children_waiting"] == 0


def test_waiting_children_are_bounded_and_evictions_counted() -> None:
    pipe = L7Pipeline()
    pipe.causal.max_pending = 3
    out = feed(pipe, *(child(f"/c{i}", parent=SERVER_START + i) for i in range(5)))
    assert paths(out) == ["/c0", "/c1"]  # the oldest leave unlinked
    assert all(rec(e).parent is None for e in out)
    c = pipe.counters()
    assert (c["causal_pending_evicted"], c["causal_children_waiting"]) == (2, 3)


def test_confirmed_parents_are_bounded() -> None:
    pipe = L7Pipeline()
    pipe.causal.max_parents = 2
    feed(pipe, *(server(start=SERVER_START + i) for i in range(3)))
    assert pipe.counters()["causal_parents_evicted"] == 1
    out = feed(pipe, child(parent=SERVER_START))  # its parent was forgotten: it waits, never guesses
    assert out == []


@pytest.mark.parametrize("why", ["disabled", "refused"])
def test_disabled_or_refused_process_sends_children_unlinked(why: str) -> None:
    pipe = L7Pipeline(causal=why != "disabled", causal_refused=lambda tgid: tgid == TGID)
    out = feed(pipe, server(), child())
    assert paths(out) == ["/in", "/out"] and rec(out[1]).parent is None
    assert pipe.counters()["causal_children_refused"] == 1


def test_go_programs_detected_from_their_executable(tmp_path: Path) -> None:
    # a fake /proc: one process runs Debian's prometheus (a Go program), one python3, one is gone
    for pid, exe in ((10, "/usr/bin/prometheus"), (11, "/usr/bin/python3")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "exe").symlink_to(exe)
    go = GoPrograms(str(tmp_path))
    assert go(10) is True
    assert go(11) is False
    assert go(12) is True and go.unreadable == 1  # unreadable: refused (a wrong parent is worse)


def _chunks(*raws: bytes) -> list[Chunk]:
    out = [decode_chunk(r) for r in raws]
    assert all(c is not None for c in out)
    return [c for c in out if c is not None]


def _redis(parent: int, tid: int = TID, cookie: int = 9, ts: int = SERVER_START + 20) -> list[Chunk]:
    """Two pipelined commands in one send (made inside the server request ``parent`` of ``tid``), their
    replies in one read: records user space pairs from chunks, both starting at that send."""
    req = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*2\r\n$3\r\nGET\r\n$1\r\nj\r\n"
    redis = L7Protocol.KSCOPE_PROTO_REDIS
    return _chunks(chunk_bytes(req, ts=ts, parent_ns=parent, tid=tid, tgid=TGID, cookie=cookie, protocol=redis,
                               dport=6379),
                   chunk_bytes(b"$1\r\nv\r\n$-1\r\n", direction=INGRESS, ts=ts + 50, tid=tid, tgid=TGID, cookie=cookie,
                               protocol=redis, dport=6379))  # fmt: skip


def test_a_call_paired_from_chunks_is_linked_like_an_exchange() -> None:
    """A database call (pipelined: two records from one send) sent inside a confirmed server request
    of its thread takes that request as parent, whichever of them comes first; on the wire too."""
    for parent_first in (True, False):
        pipe = L7Pipeline()
        out = feed(pipe, server()) if parent_first else []
        out += pipe.feed(_redis(SERVER_START))
        out += [] if parent_first else feed(pipe, server())
        calls = [e for e in out if isinstance(e.record, DbRecord)]
        assert [e.record.operation for e in calls] == ["GET", "GET"], out  # type: ignore[union-attr]
        assert all(e.record.parent == (111, 222, SERVER_START) for e in calls), calls
        msg = l7_request(calls[0], None, MonotonicClock())
        assert msg.HasField("parent") and msg.parent.tcp_request_seq == 111
        assert pipe.counters()["causal_children_linked"] == 2


def test_a_call_from_chunks_of_another_thread_or_request_stays_unlinked() -> None:
    pipe = L7Pipeline(causal_hold_ns=0)
    out = feed(pipe, server())
    out += pipe.feed(_redis(SERVER_START, tid=TID + 1, cookie=10))  # another thread's call: waits for its own
    out += pipe.feed(_redis(SERVER_START + 1, cookie=11, ts=SERVER_START + 500))  # another request of the thread
    out += pipe.feed(_redis(0, cookie=12, ts=SERVER_START + 900))  # no server request open: no parent at all
    out += pipe.causal.expire(time.monotonic_ns())
    calls = [e for e in out if isinstance(e.record, DbRecord)]
    assert len(calls) == 6 and all(e.record.parent is None for e in calls), calls
    assert pipe.counters()["causal_children_timeout"] == 4


def test_http2_and_dns_children_keep_their_own_fields() -> None:
    parent = Parent(1, 2, 3)
    h2 = Http2Record("POST", "/a.B/C", "/a.B/C", 200, 10, 20, 5, 6, "", "", "grpc", "a.B", "C", 0)
    linked = with_parent(h2, parent)
    assert isinstance(linked, Http2Record) and linked.parent == (1, 2, 3) and linked.rpc_method == "C"
    dns = DnsRecord(7, "b.default.svc.cluster.local", "A", "NOERROR", 1, 40, 56, 5, 6, False)
    assert with_parent(dns, parent) == replace(dns, parent=(1, 2, 3))
    assert dns.parent is None and h2.parent is None


# -- X-Request-ID: an event loop's calls (no kernel parent) ------------------------------------------


def proxied(rid: str, *, start: int = SERVER_START, latency: int = 1000, tgid: int = TGID, cookie: int = 2,
            seqs: tuple[int, int] = (111, 222)) -> bytes:  # fmt: skip
    """A server request into an event-loop proxy (no verdict), with an X-Request-ID."""
    return record(Role.KSCOPE_ROLE_SERVER, "/in", start=start, flags=SEQ, seqs=seqs, tgid=tgid, cookie=cookie,
                  rid=rid, latency=latency)  # fmt: skip


def upstream(rid: str, *, start: int = SERVER_START + 100, latency: int = 500, tgid: int = TGID) -> bytes:
    """The proxy's call for it (no tentative parent: the kernel refused the thread)."""
    return record(Role.KSCOPE_ROLE_CLIENT, "/out", start=start, flags=SEQ, seqs=(7, 8), tgid=tgid, rid=rid,
                  latency=latency)  # fmt: skip


def settle(pipe: L7Pipeline, out: list[L7Event]) -> list[L7Event]:
    """What leaves once the hold passed (the parents' quiet time, then the orphans')."""
    now = time.monotonic_ns()
    return out + pipe.causal.expire(now + 1) + pipe.causal.expire(now + 3)


def test_a_shared_request_id_links_an_event_loops_call_either_order() -> None:
    for parent_first in (True, False):
        pipe = L7Pipeline(causal_hold_ns=1)
        feed(pipe, proxied("r-0", start=1000, cookie=5))  # the proxy served a request with an id before
        order = [proxied("r-1"), upstream("r-1")] if parent_first else [upstream("r-1"), proxied("r-1")]
        out = settle(pipe, feed(pipe, *order))
        calls = [rec(e) for e in out if e.conn.side.value == "client"]
        assert [c.parent for c in calls] == [(111, 222, SERVER_START)], out
        assert pipe.counters()["causal_rid_linked"] == 1


def test_a_process_that_serves_no_request_id_sends_its_calls_at_once() -> None:
    """curl or a load generator sending ids: not held back (the first call of a proxy neither)."""
    pipe = L7Pipeline(causal_hold_ns=10**12)
    (ev,) = feed(pipe, upstream("r-1"))
    assert rec(ev).parent is None and pipe.counters()["causal_rid_waiting"] == 0
    assert pipe.counters()["causal_rid_unserved"] == 1


def test_a_request_id_links_nothing_it_cannot_be_sure_of() -> None:
    pipe = L7Pipeline(causal_hold_ns=1)
    out = feed(pipe, proxied("late"), upstream("late", start=SERVER_START + 900, latency=500))  # answered after
    out += feed(pipe, proxied("pid", tgid=TGID + 1), upstream("pid"))  # another process's id
    out += feed(pipe, upstream("orphan"))  # its server request was summed, or never seen
    # served twice (a client sending a constant id): its calls are never linked, whenever they come
    out += feed(pipe, proxied("same"), upstream("same"), proxied("same", start=SERVER_START + 5000, cookie=3),
                upstream("same", start=SERVER_START + 5100))  # fmt: skip
    out = settle(pipe, out)
    calls = [rec(e) for e in out if e.conn.side.value == "client"]
    assert len(calls) == 5 and all(c.parent is None for c in calls), calls
    counts = pipe.counters()
    assert counts["causal_rid_linked"] == 0
    assert counts["causal_rid_repeated"] == 2 and counts["causal_rid_timeout"] == 3, counts


def test_request_id_links_are_off_with_causality() -> None:
    pipe = L7Pipeline(causal_hold_ns=1)
    pipe.causal.rid_enabled = False
    out = settle(pipe, feed(pipe, proxied("r-1"), upstream("r-1")))
    assert all(rec(e).parent is None for e in out) and len(out) == 2


def test_waiting_request_id_calls_are_bounded() -> None:
    pipe = L7Pipeline(causal_hold_ns=10**12)
    feed(pipe, proxied("r-x"))
    pipe.causal.rid.max_pending = 3
    out = feed(pipe, *(upstream(f"r-{i}") for i in range(5)))
    assert len(out) == 2 and pipe.counters()["causal_pending_evicted"] == 2
    assert pipe.counters()["causal_rid_waiting"] == 3


def test_request_id_parents_and_memory_are_bounded_and_counted() -> None:
    """Past the kept parents' bound the oldest goes and its waiting calls leave unlinked; past the
    ids' memory the oldest id is forgotten (counted: a repeat of it would no longer be seen)."""
    pipe = L7Pipeline(causal_hold_ns=10**12)
    pipe.causal.rid.max_parents = 2
    pipe.causal.rid.max_seen = 3
    out = feed(pipe, proxied("r-0", start=1000, cookie=9))  # the proxy serves ids
    out += feed(pipe, upstream("r-1"))  # waits for r-1's request
    out += feed(pipe, *(proxied(f"r-{i}", cookie=10 + i) for i in (1, 2, 3)))  # r-0 then r-1 evicted
    calls = [rec(e) for e in out if e.conn.side.value == "client"]
    assert [c.parent for c in calls] == [None], out  # r-1's call left with its evicted parent, unlinked
    counts = pipe.counters()
    assert counts["causal_parents_evicted"] == 2 and counts["causal_rid_timeout"] == 1, counts
    assert counts["causal_rid_parents_kept"] == 2 and counts["causal_rid_waiting"] == 0
    assert counts["causal_rid_forgotten"] == 1, counts  # four ids seen, three remembered


def test_sends_remembered_for_their_records_are_bounded_and_counted() -> None:
    """A connection's sends inside a server request wait for the record they start; past the bound
    the oldest is forgotten (counted), and a record starting there later goes unlinked."""
    from node_exporter.l7.pipeline import MAX_SENDS_WITH_PARENT

    pipe = L7Pipeline(causal_hold_ns=0)
    extra = 5
    head = b"*1\r\n$4\r\nPING\r\n"
    for i in range(MAX_SENDS_WITH_PARENT + extra):  # sends whose replies have not come yet
        pipe.feed(_chunks(chunk_bytes(head, ts=SERVER_START + 10 + i, seq=i * len(head), parent_ns=SERVER_START,
                                      tid=TID, tgid=TGID, cookie=9, protocol=L7Protocol.KSCOPE_PROTO_REDIS,
                                      dport=6379)))  # fmt: skip
    assert pipe.counters()["causal_sends_forgotten"] == extra
