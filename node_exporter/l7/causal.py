"""In-process causality, the agent's half: a client call's parent is set only once confirmed.

The kernel (bpf_src/l7_causal.h) gives a client exchange started inside a server request of
the same thread a tentative parent (``KSCOPE_X_PARENT``: that server exchange's start; with
the record's process and thread ids, the server record's key), and marks a server exchange
that is its calls' parent for sure (``KSCOPE_X_PARENT_OK``: the thread that read it answered
it, nothing else started on the thread meanwhile, neither thread nor process flagged as
multiplexing). A child is linked only to a parent record that says so; either record may
come first (each leaves when its own connection's next request, close or idle sweep sends
it), so children wait here for their parent, and confirmed parents wait for their children,
both bounded in size and in time: a child waits at most ``hold_ns`` (the agent's interval: its
batch is never held back more than one interval, :meth:`CausalLinker.expire`), then leaves
without a parent, counted. A wrong parent is
worse than none: every doubt drops the link, never the record (docs/traces.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Final, Generic, TypeVar

from node_exporter.bpf.elf import ElfError, section_names
from node_exporter.protocols.db import DbRecord
from node_exporter.protocols.dns import DnsRecord
from node_exporter.protocols.http1 import HttpChildRecord, HttpRecord
from node_exporter.protocols.http2_session import Http2ChildRecord, Http2Record

# (tgid, tid, the server exchange's start in CLOCK_MONOTONIC ns): one server exchange
Key = tuple[int, int, int]
MAX_PENDING: Final = 8192  # children waiting for their parent's record
MAX_PARENTS: Final = 16384  # confirmed parents waiting for children that may still come
HOLD_NS: Final = 1_000_000_000  # how long a child waits for its parent (and a parent for children)
E = TypeVar("E")
COUNTERS: Final = (
    "causal_children_linked",  # client records sent with their parent
    "causal_children_unconfirmed",  # the parent's record came without KSCOPE_X_PARENT_OK: sent unlinked
    "causal_children_timeout",  # no parent record within an interval (e.g. the parent was summed): unlinked
    "causal_pending_evicted",  # the waiting table was full: the oldest child sent unlinked
    "causal_parents_evicted",  # a confirmed parent forgotten (table full) before all its children came
    "causal_children_refused",  # the kernel's refusal hooks are not attached, or a refused process: unlinked
    "causal_rid_linked",  # client records linked by their X-Request-ID to a server record of their process
    "causal_rid_timeout",  # a client record with an X-Request-ID found no such parent within the hold: unlinked
    "causal_rid_repeated",  # client records whose X-Request-ID the process served twice: never linked
    "causal_rid_unserved",  # ... from a process that served no request with an id yet: sent at once, unlinked
    "causal_rid_forgotten",  # ids served, or served twice, forgotten past MAX_RID_SEEN: a repeat may go unseen
)
MAX_RID_SEEN: Final = 65536  # (process, X-Request-ID) of server records remembered, to refuse repeats
RID_SEEN_NS: Final = 60_000_000_000  # ... for this long


@dataclass(frozen=True, slots=True)
class Parent:
    tcp_req_seq: int
    tcp_resp_seq: int
    start_ns: int  # CLOCK_MONOTONIC ns, like every record's start_ns


Record = HttpRecord | DnsRecord | DbRecord  # what a child may be
_CHILD_FIELDS = tuple(f.name for f in fields(HttpChildRecord) if f.name != "parent")
_H2_FIELDS = tuple(f.name for f in fields(Http2Record))


def with_parent(rec: Record, parent: Parent) -> Record:
    """``rec`` as a child of ``parent``: an exchange's record (HTTP/1 with its sequence numbers), or
    one user space paired from chunks (a database or cache call, a DNS lookup, HTTP over TLS, HTTP/2)."""
    p = (parent.tcp_req_seq, parent.tcp_resp_seq, parent.start_ns)
    if isinstance(rec, Http2Record):
        return Http2ChildRecord(**{name: getattr(rec, name) for name in _H2_FIELDS}, parent=p)
    if isinstance(rec, HttpRecord):  # tcp_seqs None for one paired from chunks (convert.py skips them)
        return HttpChildRecord(**{name: getattr(rec, name) for name in _CHILD_FIELDS}, parent=p)
    return replace(rec, parent=p)


def _evict_oldest(pending: OrderedDict[Any, tuple[int, list[tuple[E, Record]]]], excess: int) -> list[E]:
    """Entries of a waiting table, oldest first, until at least ``excess`` children left it: their events."""
    out: list[E] = []
    while len(out) < excess and pending:
        _, (_, kids) = pending.popitem(last=False)
        out += [ev for ev, _ in kids]
    return out


class CausalLinker(Generic[E]):
    """Children (any event type ``E``) wait for their parents' verdicts. ``relink(event, record)``
    makes the event that carries the linked record. ``refused(tgid)``: a process whose calls
    are never linked (e.g. a Go program: goroutines move between threads)."""

    def __init__(
        self,
        relink: Callable[[E, Record], E],
        *,
        enabled: bool = True,
        refused: Callable[[int], bool] | None = None,
        max_pending: int = MAX_PENDING,
        max_parents: int = MAX_PARENTS,
        hold_ns: int = HOLD_NS,
    ) -> None:
        self.enabled = enabled
        self._relink = relink
        self._refused = refused
        self.max_pending = max_pending
        self.max_parents = max_parents
        self.hold_ns = hold_ns
        # key -> children waiting, and when the first began waiting (CLOCK_MONOTONIC ns)
        self._pending: OrderedDict[Key, tuple[int, list[tuple[E, Record]]]] = OrderedDict()
        self._waiting = 0
        # key -> (the confirmed parent, when it came)
        self._parents: OrderedDict[Key, tuple[Parent, int]] = OrderedDict()
        self.counts = dict.fromkeys(COUNTERS, 0)
        # header links: no kernel hook needed (the agent's --no-l7-causal turns them off too)
        self.rid = RequestIdLinker[E](relink, self.counts, hold_ns, max_pending, max_parents)
        self.rid_enabled = True

    def child(self, ev: E, rec: Record, key: Key, now_ns: int) -> E | None:
        """A client record with a tentative parent: the event to send now (linked, or unlinked when
        refused), or None: it waits for its parent (:meth:`parent`, :meth:`expire` release it)."""
        if not self.enabled or (self._refused is not None and self._refused(key[0])):
            self.counts["causal_children_refused"] += 1
            return ev
        known = self._parents.get(key)
        if known is not None:
            self.counts["causal_children_linked"] += 1
            return self._relink(ev, with_parent(rec, known[0]))
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = (now_ns, [(ev, rec)])
        else:
            entry[1].append((ev, rec))
        self._waiting += 1
        return None

    def waiting(self) -> int:
        """Children held, for a kernel-named parent or by their X-Request-ID."""
        return self._waiting + self.rid.waiting()

    def rid_parent(self, key: RidKey, start: int, latency: int, parent: Parent, now_ns: int) -> list[E]:
        """A kernel-paired server record with an X-Request-ID (RequestIdLinker.parent)."""
        return self.rid.parent(key, start, latency, parent, now_ns) if self.rid_enabled else []

    def rid_child(self, ev: E, rec: Record, key: RidKey, now_ns: int) -> E | None:
        """A client record the kernel named no parent for, with an X-Request-ID (RequestIdLinker.child)."""
        return self.rid.child(ev, rec, key, now_ns) if self.rid_enabled else ev

    def evicted(self) -> list[E]:
        """Children over the waiting bound, oldest first: sent unlinked (counted)."""
        out = _evict_oldest(self._pending, self._waiting - self.max_pending)
        self._waiting -= len(out)
        self.counts["causal_pending_evicted"] += len(out)
        return out + self.rid.evicted()

    def parent(self, key: Key, parent: Parent | None, now_ns: int = 0) -> list[E]:
        """A server record that had children (``parent``: it is their parent for sure; None: it is
        not). Returns the children that waited for it."""
        entry = self._pending.pop(key, None) if self._pending else None
        kids = entry[1] if entry is not None else []
        self._waiting -= len(kids)
        if parent is None:
            self.counts["causal_children_unconfirmed"] += len(kids)
            return [ev for ev, _ in kids]
        self._parents[key] = (parent, now_ns)
        if len(self._parents) > self.max_parents:
            self._parents.popitem(last=False)
            self.counts["causal_parents_evicted"] += 1
        self.counts["causal_children_linked"] += len(kids)
        return [self._relink(ev, with_parent(rec, parent)) for ev, rec in kids]

    def unconfirmed(self, key: Key) -> list[E]:
        """A server record without the parent mark: children waiting for it leave unlinked."""
        if not self._pending or key not in self._pending:
            return []
        return self.parent(key, None)

    def expire(self, now_ns: int, final: bool = False) -> list[E]:
        """Children that waited ``hold_ns`` (``final``: all of them, the agent is stopping) leave
        unlinked, counted; parents are kept as long."""
        out: list[E] = []
        while self._pending:
            key, (since, kids) = next(iter(self._pending.items()))
            if not final and now_ns - since < self.hold_ns:
                break
            del self._pending[key]
            self._waiting -= len(kids)
            self.counts["causal_children_timeout"] += len(kids)
            out += [ev for ev, _ in kids]
        while self._parents:
            key, (_, since) = next(iter(self._parents.items()))
            if now_ns - since < self.hold_ns:
                break
            del self._parents[key]
        return out + self.rid.expire(now_ns, final)

    def counters(self) -> dict[str, int]:
        return {**self.counts, "causal_children_waiting": self._waiting, "causal_parents_kept": len(self._parents),
                "causal_rid_waiting": self.rid.waiting(), "causal_rid_parents_kept": self.rid.kept()}  # fmt: skip


RidKey = tuple[int, str]  # (tgid, X-Request-ID)
K = TypeVar("K")


def _forget_older(table: OrderedDict[K, int], cutoff_ns: int) -> None:
    """Drop the entries (oldest first, by when they were last seen) seen before ``cutoff_ns``."""
    while table:
        key, since = next(iter(table.items()))
        if since >= cutoff_ns:
            break
        del table[key]


class _RidParent:
    __slots__ = ("end", "parent", "since", "start")

    def __init__(self, start: int, end: int, parent: Parent, since: int) -> None:
        self.start, self.end, self.parent, self.since = start, end, parent, since


class RequestIdLinker(Generic[E]):
    """Header linking where threads tell nothing (event loops: nginx, Node.js, asyncio, Go): a client
    request that carries the same ``X-Request-ID`` as a server request of the same process, started
    after it and answered before it answered, is its child (a proxy passing the header on, an app
    propagating it). A wrong parent is worse than none: an id the process served twice (within
    RID_SEEN_NS, bounded) is never linked again (so no call ever has two candidates), and a call
    waits for its parent's record at most ``hold_ns``; each counted. Only kernel-paired server
    records can be parents (their TCP numbers name the span)."""

    def __init__(self, relink: Callable[[E, Record], E], counts: dict[str, int], hold_ns: int,
                 max_pending: int, max_parents: int) -> None:  # fmt: skip
        self._relink = relink
        self.counts = counts
        self.hold_ns = hold_ns
        self.max_pending = max_pending
        self.max_parents = max_parents
        self._parents: OrderedDict[RidKey, _RidParent] = OrderedDict()
        self._pending: OrderedDict[RidKey, tuple[int, list[tuple[E, Record]]]] = OrderedDict()
        self._waiting = 0
        self._seen: OrderedDict[RidKey, int] = OrderedDict()  # key -> when a server record last had it
        # processes that served a request with an id (tgid -> when): only their calls wait for a parent
        # (a plain client sending ids, curl or a load generator, is not held back for nothing)
        self._serving: OrderedDict[int, int] = OrderedDict()
        self._repeated: OrderedDict[RidKey, int] = OrderedDict()
        self.max_seen = MAX_RID_SEEN

    def waiting(self) -> int:
        return self._waiting

    def _bound(self, table: OrderedDict[Any, int]) -> None:
        while len(table) > self.max_seen:
            table.popitem(last=False)
            self.counts["causal_rid_forgotten"] += 1

    def parent(self, key: RidKey, start: int, latency: int, parent: Parent, now_ns: int) -> list[E]:
        """A kernel-paired server record with an X-Request-ID. Its children leave linked only once it
        has been kept ``hold_ns`` with no other server request of that id (:meth:`expire`); an id
        served twice sends the children waiting on it now, unlinked."""
        if key in self._seen or key in self._repeated:  # nothing with this id is linked any more
            self._repeated[key] = now_ns
            self._repeated.move_to_end(key)
            self._bound(self._repeated)
            self._parents.pop(key, None)
            entry = self._pending.pop(key, None)
            if entry is None:
                return []
            self._waiting -= len(entry[1])
            self.counts["causal_rid_repeated"] += len(entry[1])
            return [ev for ev, _ in entry[1]]
        self._seen[key] = now_ns
        self._bound(self._seen)
        self._serving[key[0]] = now_ns
        self._serving.move_to_end(key[0])
        while len(self._serving) > self.max_seen:  # a process forgotten: its calls are sent at once
            self._serving.popitem(last=False)
        self._parents[key] = _RidParent(start, start + latency, parent, now_ns)
        if len(self._parents) > self.max_parents:
            old, _ = self._parents.popitem(last=False)
            self.counts["causal_parents_evicted"] += 1
            return self._release(old, None)
        return []

    def child(self, ev: E, rec: Record, key: RidKey, now_ns: int) -> E | None:
        """A client record (no parent from the kernel) with an X-Request-ID: ``ev`` to send now (its
        process served no request with an id in RID_SEEN_NS, or this id twice), or None: it waits
        (:meth:`expire` sends it)."""
        if key[0] not in self._serving:  # this process serves no request with an id: nothing to wait for
            self.counts["causal_rid_unserved"] += 1
            return ev
        if key in self._repeated:
            self.counts["causal_rid_repeated"] += 1
            return ev
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = (now_ns, [(ev, rec)])
        else:
            entry[1].append((ev, rec))
        self._waiting += 1
        return None

    def _release(self, key: RidKey, parent: _RidParent | None) -> list[E]:
        """The children waiting on ``key``: linked to ``parent`` where it contains them in time (a
        proxy's call starts after the request came and is answered before it is), else unlinked."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return []
        self._waiting -= len(entry[1])
        out: list[E] = []
        for ev, rec in entry[1]:
            if parent is not None and parent.start <= rec.start_ns <= rec.start_ns + rec.latency_ns <= parent.end:
                self.counts["causal_rid_linked"] += 1
                out.append(self._relink(ev, with_parent(rec, parent.parent)))
            else:
                self.counts["causal_rid_timeout"] += 1
                out.append(ev)
        return out

    def evicted(self) -> list[E]:
        out = _evict_oldest(self._pending, self._waiting - self.max_pending)
        self._waiting -= len(out)
        self.counts["causal_pending_evicted"] += len(out)
        return out

    def expire(self, now_ns: int, final: bool = False) -> list[E]:
        """Parents kept ``hold_ns`` with no repeat send their children linked; children that waited
        two holds with no parent leave unlinked (``final``: all now, the agent is stopping)."""
        out: list[E] = []
        while self._parents:
            key, p = next(iter(self._parents.items()))
            if not final and now_ns - p.since < self.hold_ns:
                break
            del self._parents[key]
            out += self._release(key, p)
        late = [k for k, (since, _) in self._pending.items()
                if final or (now_ns - since >= 2 * self.hold_ns and k not in self._parents)]  # fmt: skip
        for key in late:
            out += self._release(key, None)
        for table in (self._seen, self._repeated):
            _forget_older(table, now_ns - RID_SEEN_NS)
        _forget_older(self._serving, now_ns - RID_SEEN_NS)
        return out

    def kept(self) -> int:
        return len(self._parents)


GO_SECTIONS: Final = frozenset({".go.buildinfo", ".note.go.buildid", ".gopclntab"})
MAX_PROGRAMS: Final = 4096  # processes whose verdict is remembered (the table is emptied when full)
PROGRAM_TTL_NS: Final = 60_000_000_000  # a verdict is asked again after this (a pid may be reused)


class GoPrograms:
    """``(tgid) -> bool``: the process runs a Go executable. Go's scheduler moves goroutines between
    threads at any blocking point, so a thread's calls are not its current request's: never
    linked, whatever the kernel's flags say (a Go server multiplexes on epoll, and is refused
    there too, but a Go thread that has not waited in epoll yet would not be)."""

    def __init__(self, proc_root: str = "/proc", clock: Callable[[], int] | None = None) -> None:
        self.proc_root = proc_root
        self._clock = clock or _monotonic_ns
        self._seen: dict[int, tuple[bool, int]] = {}
        self.unreadable = 0  # executables that could not be read: refused (a wrong parent is worse)

    def __call__(self, tgid: int) -> bool:
        now = self._clock()
        hit = self._seen.get(tgid)
        if hit is not None and now - hit[1] < PROGRAM_TTL_NS:
            return hit[0]
        try:
            go = not GO_SECTIONS.isdisjoint(section_names(f"{self.proc_root}/{tgid}/exe"))
        except ElfError:
            go = True
            self.unreadable += 1
        if len(self._seen) >= MAX_PROGRAMS:
            self._seen.clear()
        self._seen[tgid] = (go, now)
        return go


def _monotonic_ns() -> int:
    return time.monotonic_ns()
