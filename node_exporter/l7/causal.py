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
from typing import Final, Generic, TypeVar

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
)


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
        return self._waiting

    def evicted(self) -> list[E]:
        """Children over the waiting bound, oldest first: sent unlinked (counted)."""
        out: list[E] = []
        while self._waiting > self.max_pending and self._pending:
            _, (_, kids) = self._pending.popitem(last=False)
            self._waiting -= len(kids)
            self.counts["causal_pending_evicted"] += len(kids)
            out += [ev for ev, _ in kids]
        return out

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
        return out

    def counters(self) -> dict[str, int]:
        return {**self.counts, "causal_children_waiting": self._waiting, "causal_parents_kept": len(self._parents)}


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
