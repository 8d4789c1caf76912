"""The trace join in one replica (cluster_processor/tracejoin, docs/traces.md): hand-built FlowBatches
through the aggregator, its reports through the join, as ``Processor.tick`` does. A chain of three
hops is one trace whatever order its nodes' batches arrive in; a caller never seen times out to
pairwise ids that the spans below agree with; a traceparent is kept end to end; every table is
bounded and what overflows is counted, never lost."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import defaultdict

import grpc
import pytest

from cluster_processor.aggregate import Aggregator
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp.model import RedPoint, SpanRecord
from cluster_processor.tracejoin import Held, JoinSettings, TraceJoin, owner
from cluster_processor.tracejoin.peers import GrpcTransport, PeerServer
from kscope.v1 import flow_pb2 as pb
from kscope.v1 import tracejoin_pb2 as tj
from kscope.v1 import tracejoin_pb2_grpc as tj_grpc
from tests.cluster_processor.chainscene import ROLES, Chain, chains, hour_start
from tests.cluster_processor.test_aggregate import T0, TRACEPARENT, index

__all__ = ["index"]  # the fixture
S = 1_000_000_000
KINDS = {"client": 3, "server": 2}
WAIT_5 = JoinSettings(wait_s=5)


class Replica:
    """An aggregator and a join, ticked as the processor ticks them."""

    def __init__(self, index: KubeIndex, settings: JoinSettings = WAIT_5) -> None:
        self.agg = Aggregator(index)
        self.join = TraceJoin(settings)
        self.out: dict[str, list[SpanRecord]] = defaultdict(list)
        self.red: list[RedPoint] = []  # every interval's RED points
        self.now = T0

    def tick(self, *batches: pb.FlowBatch, seconds: float = 1.0) -> None:
        self.now += int(seconds * S)
        for b in batches:
            self.agg.add(b, self.now)
        for r in self.agg.flush(self.now):
            self.red += r.interval.red
            self.join.add(r.interval.node_name, r.spans, r.held, r.resolved, self.now)
        asyncio.run(self.join.exchange(self.now))
        ready = self.join.take_ready()
        self.agg.exemplars(ready)
        for node, spans in ready.items():
            self.out[node] += spans


def tree(
    chain: Chain, out: dict[str, list[SpanRecord]]
) -> tuple[set[bytes], dict[tuple[str, int], tuple[bytes, bytes]]]:
    """(trace ids, (node, kind) -> (span id, parent id)) of a chain's exported spans."""
    traces, got = set(), {}
    for role in ROLES:
        node = chain.node(role)
        for s in out.get(node, ()):
            kind = KINDS[s.side.value]
            assert (node, kind) not in got, f"two {s.side.value} spans on {node}"
            got[node, kind] = (s.context.span_id, s.context.parent_span_id)
            traces.add(s.context.trace_id)
    return traces, got


def assert_one_trace(chain: Chain, out: dict[str, list[SpanRecord]]) -> None:
    traces, got = tree(chain, out)
    want = chain.expected()
    assert traces == {chain.trace_id}, f"{chain.name}: {len(traces)} traces"
    for k, (span_id, parent) in want.items():
        assert k in got, f"{chain.name}: no span {k}"
        assert got[k][1] == parent and (not span_id or got[k][0] == span_id), f"{chain.name}: {k}"
    assert len(got) == len(want)


def test_a_chain_is_one_trace_whatever_order_its_nodes_report_in(index: KubeIndex) -> None:
    rep = Replica(index)
    orders = list(itertools.permutations(ROLES))
    for chain, order in zip(chains(len(orders), hour_start(T0)), orders, strict=True):
        for b in chain.batches(order):  # one node per tick: a server often waits for its client
            rep.tick(b)
    rep.tick()
    for chain in chains(len(orders), hour_start(T0)):
        assert_one_trace(chain, rep.out)
    c = rep.join.counters
    assert c["trace_spans_held"] == 24 * 5 and c["trace_spans_joined"] == 24 * 5  # all but loadgen's root
    assert c["trace_spans_fallback"] == c["trace_wait_timeouts"] == 0
    assert rep.agg.counters()["spans_client_parent_inferred"] == 24 * 2


def test_without_the_join_each_hop_is_its_own_trace(index: KubeIndex) -> None:
    rep = Replica(index, JoinSettings(wait_s=0))
    (chain,) = chains(1, hour_start(T0))
    rep.tick(*chain.batches())
    traces, got = tree(chain, rep.out)
    # the parent ids are right (they need no join), the trace ids are not one
    assert {k: v[1] for k, v in got.items()} == {k: v[1] for k, v in chain.expected().items()}
    # pairwise: hop 1 with productpage's call; reviews' server span with its call; ratings' span
    assert len(traces) == 3
    with pytest.raises(AssertionError):
        assert_one_trace(chain, rep.out)


def test_a_caller_never_seen_times_out_and_the_spans_below_agree(index: KubeIndex) -> None:
    rep = Replica(index, JoinSettings(wait_s=5))
    (chain,) = chains(1, hour_start(T0))
    rep.tick(*chain.batches(ROLES[1:]))  # loadgen's node never reports (an external caller)
    assert not rep.out  # everything waits for hop 1's trace
    rep.tick(seconds=4)
    assert not rep.out
    rep.tick(seconds=2)  # past the wait: hop 1 falls back to its pairwise trace, the rest follow it
    traces, got = tree(chain, rep.out)
    assert traces == {chain.ids(0)[0]} and len(got) == 5
    c = rep.join.counters
    assert (c["trace_wait_timeouts"], c["trace_spans_fallback"], c["trace_spans_joined"]) == (1, 1, 4)


def test_an_applications_traceparent_is_kept_end_to_end(index: KubeIndex) -> None:
    rep = Replica(index)
    (chain,) = chains(1, hour_start(T0), traceparent=TRACEPARENT)
    for b in reversed(chain.batches()):
        rep.tick(b)
    assert_one_trace(chain, rep.out)
    assert chain.trace_id.hex() == TRACEPARENT.split("-")[1]


def span(i: int) -> SpanRecord:
    from tests.cluster_processor.test_aggregate_links import linked, spans

    agg = Aggregator(KubeIndex())
    agg.add(pb.FlowBatch(schema_version=1, node_name="n", time_unix_nano=T0, l7=[linked(pb.ROLE_SERVER, (i, i))]))
    (s,) = spans(agg, "n")
    return s


def test_held_spans_are_bounded_the_oldest_leaves_early_counted() -> None:
    join = TraceJoin(JoinSettings(wait_s=30, max_held=2))
    ss = [span(i) for i in range(5)]
    held = [Held(i, s.context.parent_span_id, s.context.trace_id) for i, s in enumerate(ss)]
    join.add("n", ss, held, [], T0)
    c = join.counters
    assert (c["trace_spans_held"], c["trace_held_evicted"], c["trace_spans_fallback"]) == (5, 3, 3)
    assert join.sizes()["held"] == 2
    assert [s.context for s in join.take_ready()["n"]] == [s.context for s in ss[:3]]  # pairwise ids
    join.release_all(T0)  # at shutdown: nothing is lost
    assert len(join.take_ready()["n"]) == 2 and join.sizes()["held"] == 0


def test_known_hops_and_the_outbox_are_bounded() -> None:
    join = TraceJoin(JoinSettings(max_known=2))
    for i in range(3):
        join.add("n", [], [], [(bytes([i]) * 8, bytes([i + 1]) * 16)], T0 + i)
    assert join.counters["trace_known_evicted"] == 1 and join.sizes()["known"] == 2
    asyncio.run(join.exchange(T0 + 119 * S))
    assert join.sizes()["known"] == 2
    asyncio.run(join.exchange(T0 + 121 * S))  # past their time to live
    assert join.sizes()["known"] == 0
    # a hop owned by an unreachable peer waits in the outbox, bounded, counted when it cannot
    join = TraceJoin(JoinSettings(max_outbox=1), me="a", peers=("a", "b"))
    keys = [k for k in (bytes([i]) * 8 for i in range(64)) if owner(k, ("a", "b")) == "b"][:3]
    join.add("n", [], [], [(k, b"\x01" * 16) for k in keys], T0)
    assert join.counters["trace_proposals_dropped"] == 2 and join.sizes()["outbox"] == 1


def test_rendezvous_owner_same_everywhere_and_moves_only_a_leavers_keys() -> None:
    keys = [i.to_bytes(8, "big") for i in range(2000)]
    three = ("10.0.0.1:9441", "10.0.0.2:9441", "10.0.0.3:9441")
    before = {k: owner(k, three) for k in keys}
    assert before == {k: owner(k, tuple(reversed(three))) for k in keys}
    assert all(200 < sum(1 for v in before.values() if v == p) < 1000 for p in three)  # spread
    after = {k: owner(k, three[:2]) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != three[2])


def test_a_peer_refuses_malformed_entries_with_a_count() -> None:
    async def body() -> None:
        join = TraceJoin(JoinSettings())
        server = PeerServer(join, "127.0.0.1:0")
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = tj_grpc.TraceJoinStub(ch)
                good = tj.HopTrace(hop=b"k" * 8, trace_id=b"t" * 16)
                bad = [tj.HopTrace(hop=b"k" * 7, trace_id=b"t" * 16), tj.HopTrace(hop=b"j" * 8, trace_id=bytes(16)),
                       tj.HopTrace(hop=b"i" * 8, trace_id=b"t" * 15)]  # fmt: skip
                resp = await stub.ExchangeTraces(
                    tj.ExchangeTracesRequest(propose=[good, *bad], lookup=[b"x", b"k" * 8])
                )
                assert resp.invalid == 4
                assert [(h.hop, h.trace_id) for h in resp.known] == [(b"k" * 8, b"t" * 16)] * 2
                # the first proposal wins; a later one is answered with it
                other = tj.HopTrace(hop=b"k" * 8, trace_id=b"u" * 16)
                resp = await stub.ExchangeTraces(tj.ExchangeTracesRequest(propose=[other]))
                assert [h.trace_id for h in resp.known] == [b"t" * 16]
        finally:
            await server.stop()
        assert join.counters["trace_served_invalid"] == 4

    asyncio.run(body())


def test_exchanges_are_split_past_max_per_request_and_teach_both_sides() -> None:
    async def body() -> None:
        owner_join = TraceJoin(JoinSettings())
        server = PeerServer(owner_join, "127.0.0.1:0")
        port = await server.start()
        b = f"127.0.0.1:{port}"
        owner_join.me = b
        transport = GrpcTransport("a")
        join = TraceJoin(JoinSettings(max_per_request=3), me="a", peers=("a", b), transport=transport)
        try:
            keys = [k for k in (i.to_bytes(8, "big") for i in range(1, 200)) if owner(k, ("a", b)) == b][:11]
            join.add("n", [], [], [(k, k * 2) for k in keys[:10]], T0)  # ten hops learnt here
            ss = [span(i) for i in range(2)]
            held = [Held(0, keys[0], ss[0].context.trace_id), Held(1, keys[10], ss[1].context.trace_id)]
            join.add("n", ss, held, [], T0)
            await join.exchange(T0 + S)
            assert join.counters["trace_peer_exchanges"] == 4  # 10 proposals + 1 lookup, 3 per call
            assert owner_join.sizes()["known"] == 10 and join.sizes()["outbox"] == 0
            # the span waiting on a hop the owner now knows left with its trace; the other still waits
            (got,) = join.take_ready()["n"]
            assert got.context.trace_id == keys[0] * 2 and join.sizes()["held"] == 1
        finally:
            await transport.close()
            await server.stop()

    asyncio.run(body())


def test_red_exemplars_carry_the_final_trace_of_spans_that_left(index: KubeIndex) -> None:
    """Item 3: a RED series' point carries one of its requests that left as a span, with the trace id
    it left with (after the join: the chain's, not the hop's own pairwise one), the slowest of them;
    a series' first interval has none yet (its spans leave after that interval's flush)."""
    rep = Replica(index)
    (first,) = chains(1, hour_start(T0))
    # the same services on the same nodes (so the same series), other requests
    second = dataclasses.replace(first, seqs=tuple((a + 1000, b + 1000) for a, b in first.seqs))
    rep.tick(*first.batches())  # the chain joins within this tick: its spans leave after the flush
    assert all(p.exemplar is None for p in rep.red)
    rep.red.clear()
    rep.tick(*second.batches())  # the same series again: their points carry the first chain's requests
    exported = {s.context.span_id: s for spans in rep.out.values() for s in spans}
    with_ex = [p for p in rep.red if p.exemplar is not None]
    # each series is one side of one hop: 6 here (3 hops, client and server), each with an exemplar
    assert len(with_ex) == len(rep.red) == 6
    for p in with_ex:
        e = p.exemplar
        assert e is not None
        s = exported[e.span_id]
        assert e.trace_id == s.context.trace_id == first.trace_id  # the final trace, not a pairwise one
        assert (s.side, s.method, s.route, s.status_code) == (p.side, p.method, p.route, p.status_code)
        assert e.value == (s.end_unix_nano - s.start_unix_nano) / S and e.time_unix_nano == s.end_unix_nano
    assert rep.agg.counters()["exemplar_spans_evicted"] == 0


def test_spans_remembered_for_exemplars_are_bounded_counted(index: KubeIndex) -> None:
    """Past ``max_exemplar_spans`` the oldest span is forgotten (its series gets no exemplar from it),
    counted; the newest still give their series an exemplar."""
    from cluster_processor.aggregate import AggregatorSettings

    rep = Replica(index)
    rep.agg = Aggregator(index, AggregatorSettings(max_exemplar_spans=2))
    (chain,) = chains(1, hour_start(T0))
    rep.tick(*chain.batches())
    made = sum(len(v) for v in rep.out.values())
    assert made == 6 and rep.agg.counters()["exemplar_spans_evicted"] == made - 2
    rep.red.clear()
    rep.tick(*dataclasses.replace(chain, seqs=tuple((a + 1000, b + 1000) for a, b in chain.seqs)).batches())
    assert sum(p.exemplar is not None for p in rep.red) == 2


def test_a_proposal_replaced_while_its_exchange_was_out_is_still_sent() -> None:
    """The processor ticks (``add``) and exchanges on one event loop: while an exchange awaits its
    owner, a tick may learn the real trace of a hop whose *pending* announcement is in flight. That
    trace must stay in the outbox for the next exchange, not be dropped with the announcement."""
    sent: list[list[tuple[bytes, bytes, int]]] = []

    class SlowOwner:
        def __init__(self) -> None:
            self.answering = asyncio.Event()
            self.release = asyncio.Event()

        async def exchange(self, peer: str, propose, lookup):  # type: ignore[no-untyped-def]
            sent.append(list(propose))
            self.answering.set()
            await self.release.wait()
            return [(key, b"") for key, _, kind in propose if kind == 1]  # PENDING: "coming"

    async def body() -> None:
        owner_of = SlowOwner()
        join = TraceJoin(JoinSettings(), me="a", peers=("a", "b"), transport=owner_of)
        hop = next(k for k in (i.to_bytes(8, "big") for i in range(1, 200)) if owner(k, ("a", "b")) == "b")
        s = span(0)
        # a client span made inside a server request: its own hop is announced as pending
        join.add("n", [s], [Held(0, b"p" * 8, s.context.trace_id, publish=hop)], [], T0)
        call = asyncio.create_task(join.exchange(T0 + S))
        await owner_of.answering.wait()
        join.add("n", [], [], [(hop, b"r" * 16)], T0 + S)  # a tick learns the hop's real trace meanwhile
        owner_of.release.set()
        await call
        owner_of.answering.clear()
        await join.exchange(T0 + 2 * S)
        assert (hop, b"", 1) in sent[0] and (hop, b"r" * 16, 0) in sent[1], sent

    asyncio.run(body())


def test_an_owners_malformed_answers_are_refused_counted() -> None:
    """A peer answering with a hop key or trace id of the wrong size (or the zero trace) teaches nothing:
    the span waiting on the hop keeps its wait (then its fallback), never a malformed trace id."""

    class BadOwner:
        async def exchange(self, peer: str, propose, lookup):  # type: ignore[no-untyped-def]
            return [(key, b"t" * 15) for key in lookup] + [(b"k" * 7, b"t" * 16)] + [(key, bytes(16)) for key in lookup]

    join = TraceJoin(JoinSettings(wait_s=5), me="a", peers=("a", "b"), transport=BadOwner())
    hop = next(k for k in (i.to_bytes(8, "big") for i in range(1, 200)) if owner(k, ("a", "b")) == "b")
    s = span(0)
    join.add("n", [s], [Held(0, hop, s.context.trace_id)], [], T0)
    asyncio.run(join.exchange(T0 + S))
    assert join.counters["trace_peer_invalid"] == 3 and join.sizes()["held"] == 1 and not join.take_ready()
