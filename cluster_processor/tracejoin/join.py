"""The trace join: one trace id along a whole chain of services (issue 18 item 2, docs/traces.md).

Every hop (one request from a client to a server) has a key both its ends derive alone: the client
span id of ``links.linked_ids`` over the request's TCP sequence numbers. The hop's trace is its client
span's trace: its own pairwise trace when the client span is a root, else the trace of the server
span the client call was made inside of (``L7Request.parent``), which is that parent hop's trace. So
a server span, and a client span made inside a server request, wait here (``Held``) until the trace
of the hop they follow is known, for at most ``wait_s``; a span whose hop never becomes known (an
external caller, an unsampled end) leaves with its pairwise ids then, and that fallback is written
as the hop's trace, so everything below it agrees (a missing link, never a wrong one: the span and
parent ids never change, only which trace they are filed under).

With replicas, a hop's trace lives at one owner, picked by rendezvous hashing over the peer list:
the first trace proposed for a hop wins there and every replica that asks gets that one. Replicas
talk through ``Transport`` (``peers.GrpcTransport``; a test may pass anything): ``exchange`` sends
each owner what this replica learnt and asks it for what spans here wait on. ``serve`` is the owner
side. Everything runs on the processor's one event loop: no locks.

A span cannot tell a caller that will never be seen from one whose trace is still on its way down
a chain (its own caller's caller timing out first): so a client span that is held for its parent's
trace announces its own hop as *pending* to that hop's owner, and a span waiting for a pending hop
keeps waiting past ``wait_s`` (up to ``max_wait_s``) instead of falling back; a fallback proposed
for a pending hop does not win there. Without it, spans down a chain time out in a race with the
root's own timeout, and a three-hop chain split over replicas became two traces.

Bounded: held spans (``max_held``: the oldest leaves early with its fallback), known hop traces
(``max_known`` and a time to live), proposals waiting for an unreachable owner (``max_outbox``); each
eviction, timeout and peer failure is counted.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from cluster_processor.otlp.model import SpanContext, SpanRecord

NS_PER_S: Final = 1_000_000_000
KEY_BYTES: Final = 8
TRACE_BYTES: Final = 16
_ZERO_TRACE: Final = bytes(TRACE_BYTES)
_new_tuple: Final = tuple.__new__
# What a proposal says (``HopTrace.pending``/``fallback`` on the wire): the hop's real trace; that it
# is coming (a client span waiting for its parent); the pairwise guess of an end whose wait ran out.
REAL, PENDING, FALLBACK = 0, 1, 2
Proposal = tuple[bytes, bytes, int]  # (hop, trace, REAL | PENDING | FALLBACK); trace b"" when PENDING


class Held(NamedTuple):
    """A span of a ``NodeReport`` whose trace id is the trace of another hop (docs/traces.md)."""

    position: int  # its place in NodeReport.spans
    wait: bytes  # the hop whose trace it takes (8-byte key)
    fallback: bytes  # its trace id if that never becomes known: the pairwise one it carries already
    publish: bytes = b""  # its own hop (a client span with a parent): the same trace becomes that hop's


@dataclass(frozen=True, slots=True)
class JoinSettings:
    wait_s: float = 30.0  # how long a span waits for its hop's trace (0: no join, pairwise ids at once)
    exchange_interval_s: float = 1.0  # how often replicas exchange (and timeouts are checked)
    max_held: int = 100_000  # spans waiting, all nodes together
    max_known: int = 262_144  # hop traces remembered
    known_ttl_s: float = 120.0  # past every wait: an end that arrives later takes its fallback
    max_outbox: int = 100_000  # proposals waiting for their owner
    max_rounds: int = 8  # exchanges in a row while they teach something (a chain inside this replica)
    max_per_request: int = 10_000  # entries per ExchangeTraces request
    max_wait_s: float = 0.0  # a span whose hop is pending waits at most this long (0: 3 x wait_s)


COUNTERS: Final = (
    "trace_spans_held",  # spans that waited for the trace of the hop they follow
    "trace_spans_joined",  # ... and left with it
    "trace_spans_fallback",  # ... and left with their pairwise ids (wait ran out, evicted, peer down, stop)
    "trace_wait_timeouts",  # held spans whose wait ran out
    "trace_pending_waits",  # held spans that waited past wait_s: their hop's trace was on its way
    "trace_pending_evicted",  # pending hops forgotten before their time: max_known reached
    "trace_held_evicted",  # held spans sent early with their fallback: max_held reached
    "trace_known_evicted",  # hop traces forgotten before their time: max_known reached
    "trace_proposals_dropped",  # proposals that never reached their owner (outbox full, owner down past the wait)
    "trace_peer_exchanges",  # ExchangeTraces calls made
    "trace_peer_failures",  # ... that failed (the peer down or slow): its hops fall back to pairwise ids
    "trace_peer_degraded",  # held spans sent with their fallback because their hop's owner could not be reached
    "trace_served_requests",  # ExchangeTraces calls answered as an owner
    "trace_served_invalid",  # entries refused in them (a key not 8 bytes, a trace id not 16 or zero)
    "trace_peer_invalid",  # entries refused in an owner's answers (the same checks): as if unanswered
)


class PeerError(Exception):
    """An exchange with a peer failed; the join degrades to pairwise ids for that peer's hops."""


class Transport(Protocol):
    async def exchange(
        self, peer: str, propose: Sequence[Proposal], lookup: Sequence[bytes]
    ) -> list[tuple[bytes, bytes]]:
        """The owner's trace for every proposed hop and every known looked-up one (b"": pending);
        raises PeerError."""
        ...


def owner(key: bytes, peers: Sequence[str]) -> str:
    """Rendezvous (highest random weight) hashing: every replica with the same peer list picks the
    same owner, and a peer joining or leaving moves only the keys it wins or held."""
    best, best_score = "", b""
    for p in peers:
        score = hashlib.blake2b(key, digest_size=8, key=p.encode()[:64]).digest()
        if score > best_score:
            best, best_score = p, score
    return best


class _Wait:
    __slots__ = ("expired", "extended", "fallback", "node", "publish", "since", "span", "wait")

    def __init__(self, node: str, span: SpanRecord, held: Held, since: int) -> None:
        self.node, self.span, self.since = node, span, since
        self.wait, self.fallback, self.publish = held.wait, held.fallback, held.publish
        self.expired = False
        self.extended = False  # waited past wait_s for a pending hop


class TraceJoin:
    def __init__(
        self,
        settings: JoinSettings = JoinSettings(),
        *,
        me: str = "",
        peers: Sequence[str] = (),
        transport: Transport | None = None,
    ) -> None:
        self.settings = settings
        self.me = me
        self._peers: tuple[str, ...] = ()
        self.set_peers(peers)
        self._transport = transport
        self._wait_ns = int(settings.wait_s * NS_PER_S)
        self._max_wait_ns = int((settings.max_wait_s or 3 * settings.wait_s) * NS_PER_S)
        # a hop's trace outlives every wait for it, whatever --trace-wait says
        self._ttl_ns = max(int(settings.known_ttl_s * NS_PER_S), self._max_wait_ns + self._wait_ns)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._next = 0
        self._held: OrderedDict[int, _Wait] = OrderedDict()  # in arrival order: the oldest times out first
        self._waiting: dict[bytes, list[int]] = {}  # hop -> held ids waiting for it
        self._known: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()  # hop -> (trace, when learnt)
        self._outbox: OrderedDict[bytes, tuple[bytes, int, int]] = OrderedDict()  # hop -> (trace, since, kind)
        self._pending: OrderedDict[bytes, int] = OrderedDict()  # hop -> when last known to be coming
        self._ready: dict[str, list[SpanRecord]] = {}

    @property
    def enabled(self) -> bool:
        return self._wait_ns > 0

    @property
    def peers(self) -> tuple[str, ...]:
        return self._peers

    def set_peers(self, peers: Sequence[str]) -> None:
        """The replicas that own hops. Empty or only ``me``: everything is local. A replica not
        listed (starting, or leaving its Service) owns nothing: it asks the listed ones, whose
        view of who owns what it then shares."""
        ps = tuple(sorted(set(peers)))
        self._peers = () if ps in ((), (self.me,)) else ps

    def sizes(self) -> dict[str, int]:
        return {"held": len(self._held), "known": len(self._known), "outbox": len(self._outbox),
                "pending": len(self._pending), "peers": len(self._peers)}  # fmt: skip

    def _owner(self, key: bytes) -> str:
        return owner(key, self._peers) if self._peers else self.me

    # ---- spans in, spans out -----------------------------------------------------------------

    def add(
        self,
        node: str,
        spans: Sequence[SpanRecord],
        held: Sequence[Held],
        resolved: Sequence[tuple[bytes, bytes]],
        now_ns: int,
    ) -> None:
        """One node's interval of spans: ``held`` ones wait, the rest are ready (``take_ready``).
        ``resolved``: hops whose trace the interval taught (client spans that are roots, traceparents)."""
        ready = self._ready.setdefault(node, [])
        if not self.enabled:
            ready.extend(spans)  # pairwise ids as the aggregator made them
            return
        skip = {h.position for h in held}
        ready.extend(s for i, s in enumerate(spans) if i not in skip)
        for key, trace in resolved:
            self._propose(key, trace, now_ns)
        c = self.counters
        for h in held:
            c["trace_spans_held"] += 1
            w = _Wait(node, spans[h.position], h, now_ns)
            known = self._known.get(w.wait)
            if known is not None:
                self._release(w, known[0], now_ns, joined=True)
                continue
            if len(self._held) >= self.settings.max_held:
                _, oldest = self._held.popitem(last=False)
                self._unwait(oldest)
                c["trace_held_evicted"] += 1
                self._give_up(oldest, now_ns)
            i = self._next
            self._next += 1
            self._held[i] = w
            self._waiting.setdefault(w.wait, []).append(i)
            if w.publish:  # its own hop's trace is coming: the server end of that hop should wait for it
                self._propose(w.publish, b"", now_ns, PENDING)

    def take_ready(self) -> dict[str, list[SpanRecord]]:
        """Spans to export now, per node (their trace ids final)."""
        ready, self._ready = self._ready, {}
        return {n: s for n, s in ready.items() if s}

    def release_all(self, now_ns: int) -> None:
        """At shutdown: every held span leaves (counted), none is lost. Those whose hop nobody here
        announced as coming give up first: their fallback becomes their hop's trace and flows down
        to the spans below them, which then leave in it rather than with fallbacks of their own."""
        for i, w in list(self._held.items()):
            if i in self._held and not self._is_pending(w.wait, now_ns):
                del self._held[i]
                self._unwait(w)
                self._give_up(w, now_ns)
        while self._held:
            _, w = self._held.popitem(last=False)
            self._unwait(w)
            self._give_up(w, now_ns)

    # ---- the state machine -------------------------------------------------------------------

    def _release(self, w: _Wait, trace: bytes, now_ns: int, *, joined: bool) -> None:
        s = w.span
        ctx = s.context
        if ctx.trace_id != trace:  # as _replace() twice, without its Python-level keyword handling
            s = _new_tuple(SpanRecord, (*s[:3], _new_tuple(SpanContext, (trace, *ctx[1:])), *s[4:]))
        self._ready.setdefault(w.node, []).append(s)
        self.counters["trace_spans_joined" if joined else "trace_spans_fallback"] += 1
        if w.publish:
            self._propose(w.publish, trace, now_ns)

    def _give_up(self, w: _Wait, now_ns: int) -> None:
        """Leave with the fallback, and offer it as the hop's trace (the first offer wins at the
        owner), so the spans below this one agree with it."""
        if self._owner(w.wait) == self.me:
            trace = self._learn(w.wait, w.fallback, now_ns, first_wins=True)
        else:
            trace = self._known.get(w.wait, (w.fallback, 0))[0]
            self._propose(w.wait, w.fallback, now_ns, FALLBACK)
        self._release(w, trace, now_ns, joined=False)

    def _unwait(self, w: _Wait) -> None:
        ids = self._waiting.get(w.wait)
        if ids is not None:
            ids[:] = [i for i in ids if i in self._held]
            if not ids:
                del self._waiting[w.wait]

    def _propose(self, key: bytes, trace: bytes, now_ns: int, kind: int = REAL) -> None:
        if self._owner(key) == self.me:
            if kind == PENDING:
                if key not in self._known:
                    self._mark_pending(key, now_ns)
            elif kind == REAL or not self._is_pending(key, now_ns):
                self._learn(key, trace, now_ns, first_wins=True)
            return
        have = self._outbox.get(key)
        if have is not None and not (have[2] == PENDING and kind != PENDING):  # a trace replaces "coming"
            return
        if have is None and len(self._outbox) >= self.settings.max_outbox:
            self.counters["trace_proposals_dropped"] += 1
            return
        self._outbox[key] = (trace, now_ns, kind)

    def _mark_pending(self, key: bytes, now_ns: int) -> None:
        pending = self._pending
        pending[key] = now_ns
        pending.move_to_end(key)
        if len(pending) > self.settings.max_known:
            pending.popitem(last=False)
            self.counters["trace_pending_evicted"] += 1

    def _is_pending(self, key: bytes, now_ns: int) -> bool:
        t = self._pending.get(key)
        return t is not None and now_ns - t <= self._max_wait_ns

    def _learn(self, key: bytes, trace: bytes, now_ns: int, *, first_wins: bool) -> bytes:
        """Record a hop's trace (as its owner: the first one stays; from the owner: its answer) and
        release what waited for it. Returns the hop's trace."""
        known = self._known
        self._pending.pop(key, None)
        have = known.get(key)
        if have is not None and (first_wins or have[0] == trace):
            trace = have[0]
        else:
            known[key] = (trace, now_ns)
            known.move_to_end(key)
            if len(known) > self.settings.max_known:
                known.popitem(last=False)
                self.counters["trace_known_evicted"] += 1
        ids = self._waiting.pop(key, None)
        for i in ids or ():
            w = self._held.pop(i, None)
            if w is not None:
                # an end whose wait ran out may still get the real trace from the owner: joined
                self._release(w, trace, now_ns, joined=not w.expired or trace != w.fallback)
        return trace

    def _expire(self, now_ns: int) -> None:
        known, cutoff = self._known, now_ns - self._ttl_ns
        while known:
            key, (_, t) = next(iter(known.items()))
            if t > cutoff:
                break
            del known[key]
        pending, p_cutoff = self._pending, now_ns - self._max_wait_ns
        while pending:
            key, t = next(iter(pending.items()))
            if t > p_cutoff:
                break
            del pending[key]
        cutoff = now_ns - self._wait_ns
        for i, w in list(self._held.items()):
            if w.since > cutoff:
                break
            if w.expired or i not in self._held:  # released meanwhile by a fallback just written
                continue
            capped = now_ns - w.since >= self._max_wait_ns
            if not capped and self._is_pending(w.wait, now_ns):
                self.counters["trace_pending_waits"] += not w.extended
                w.extended = True  # its hop's trace is on its way down the chain: keep waiting
                continue
            w.expired = True
            self.counters["trace_wait_timeouts"] += 1
            # the hop's owner decides (it may have learnt the real trace meanwhile, or know it is
            # coming: then it waits on); past max_wait_s its fallback is offered as the hop's trace
            self._propose(w.wait, w.fallback, now_ns, REAL if capped else FALLBACK)
        for key, (_, t, _) in list(self._outbox.items()):
            if t > cutoff - self._wait_ns:
                break
            del self._outbox[key]  # its owner stayed unreachable for two waits: nobody still waits on it
            self.counters["trace_proposals_dropped"] += 1

    def expire(self, now_ns: int) -> None:
        """Timeouts alone: what a join without peers (``kscope run``, one process) does each interval."""
        self._expire(now_ns)

    async def exchange(self, now_ns: int) -> None:
        """Check timeouts, then tell each owner what this replica learnt and ask it for what waits
        here (lookups once; then, while answers release spans that teach further hops, those)."""
        self._expire(now_ns)
        if not self._peers or self._transport is None:
            return
        down: set[str] = set()
        for round_ in range(self.settings.max_rounds):
            work: dict[str, tuple[list[Proposal], list[bytes]]] = {}
            for key, (trace, _, kind) in self._outbox.items():
                p = self._owner(key)
                if p not in down:
                    work.setdefault(p, ([], []))[0].append((key, trace, kind))
            if round_ == 0:
                for key in self._waiting:
                    if key not in self._outbox:
                        p = self._owner(key)
                        if p != self.me:
                            work.setdefault(p, ([], []))[1].append(key)
            if not work:
                return
            peers = list(work)
            answers = await asyncio.gather(*(self._call(p, *work[p]) for p in peers))
            for p, got in zip(peers, answers, strict=True):
                if got is None:
                    down.add(p)
                    self._degrade(p, now_ns)
                    continue
                outbox = self._outbox
                for key, trace, kind in work[p][0]:
                    # only what was sent: a tick may have replaced it while the call was out (a
                    # pending hop's real trace), and that one still has to go
                    have = outbox.get(key)
                    if have is not None and have[0] == trace and have[2] == kind:
                        del outbox[key]
                for key, trace in got:
                    if len(key) != KEY_BYTES or (trace and (len(trace) != TRACE_BYTES or trace == _ZERO_TRACE)):
                        self.counters["trace_peer_invalid"] += 1  # a span never takes a malformed trace id
                        continue
                    if trace:
                        self._learn(key, trace, now_ns, first_wins=False)
                    else:
                        self._coming(key, now_ns)

    def _coming(self, key: bytes, now_ns: int) -> None:
        """The owner says the hop's trace is on its way: what waits for it here keeps waiting (a
        fallback proposed meanwhile lost to that)."""
        self._mark_pending(key, now_ns)
        for i in self._waiting.get(key, ()):
            w = self._held.get(i)
            if w is not None and w.expired and now_ns - w.since < self._max_wait_ns:
                w.expired = False  # its wait ran out (counted once, counters only grow): it waits on

    async def _call(self, peer: str, propose: list[Proposal], lookup: list[bytes]) -> list[tuple[bytes, bytes]] | None:
        assert self._transport is not None
        n, out = self.settings.max_per_request, []
        try:
            for i in range(0, max(len(propose), len(lookup)), n):
                self.counters["trace_peer_exchanges"] += 1
                out += await self._transport.exchange(peer, propose[i : i + n], lookup[i : i + n])
        except PeerError:
            self.counters["trace_peer_failures"] += 1
            return None
        return out

    def _degrade(self, peer: str, now_ns: int) -> None:
        """``peer`` did not answer: spans whose wait ran out on one of its hops leave with their fallback."""
        for i, w in list(self._held.items()):
            if w.expired and self._owner(w.wait) == peer:
                del self._held[i]
                self._unwait(w)
                self.counters["trace_peer_degraded"] += 1
                self._release(w, w.fallback, now_ns, joined=False)

    # ---- the owner's side --------------------------------------------------------------------

    def serve(
        self, propose: Sequence[Proposal], lookup: Sequence[bytes], now_ns: int
    ) -> tuple[list[tuple[bytes, bytes]], int]:
        """Answer a peer: proposals first (the first trace of a hop wins; a fallback does not win
        over a hop whose trace is coming), then lookups. Returns the (hop, trace) pairs it knows, b""
        for a hop whose trace is coming, and how many entries were refused."""
        self.counters["trace_served_requests"] += 1
        out: list[tuple[bytes, bytes]] = []
        invalid = 0
        for key, trace, kind in propose:
            if len(key) != KEY_BYTES:
                invalid += 1
                continue
            if kind == PENDING:
                if key not in self._known:
                    self._mark_pending(key, now_ns)
                continue
            if len(trace) != TRACE_BYTES or trace == _ZERO_TRACE:
                invalid += 1
                continue
            if kind == FALLBACK and key not in self._known and self._is_pending(key, now_ns):
                out.append((key, b""))
                continue
            out.append((key, self._learn(key, trace, now_ns, first_wins=True)))
        for key in lookup:
            if len(key) != KEY_BYTES:
                invalid += 1
                continue
            known = self._known.get(key)
            if known is not None:
                out.append((key, known[0]))
            elif self._is_pending(key, now_ns):
                out.append((key, b""))
        self.counters["trace_served_invalid"] += invalid
        return out, invalid
