"""Which HTTP/1 exchanges may be records of their own under ``--l7-trace-ratio`` (docs/traces.md):
the same choice at both ends of a connection, made from the TCP sequence numbers both read alike.
The kernel picks at the request's start (bpf_src/l7_summary.h ``link_mix``, ``sample``); the agent
applies the same rule to the records the kernel sends whatever the pick (a connection's only
request, which no summary makes cheaper)."""

from __future__ import annotations


def link_mix(req_seq: int, resp_seq: int) -> int:
    """The kernel's link pick hash (bpf_src/l7_summary.h): an exchange may be a record when this is
    below :func:`link_pick`; both ends compute it from the same TCP sequence numbers."""
    m = (1 << 64) - 1
    x = (req_seq << 32) | resp_seq
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & m
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & m
    x ^= x >> 33
    return x >> 32


def link_pick(trace_ratio: float) -> int:
    """The kernel's ``link_pick`` for a ratio: a share of 2^32, 0 for all (bpf_src/l7_summary.h)."""
    return 0 if trace_ratio >= 1 else max(1, int(trace_ratio * 2**32))


MAX_SHIFT = 20  # the smallest share auto goes down to: 2^-20 of the requests


class AutoPick:
    """``--l7-trace-ratio auto``: the share of requests that may be records, a power of two the agent
    halves while the node's requests pass half its record budget and doubles back once they would
    fit in a fifth of it (hysteresis: no flapping). Powers of two nest: every request picked at a
    share of 2^-k is picked at every larger share, so two ends that run at different shares still
    agree on every request the sparser end picks (the denser end picks it too, its budget allowing)."""

    HIGH, LOW = 0.5, 0.2

    def __init__(self, budget_per_s: float) -> None:
        """``budget_per_s``: the node's records per second (--l7-record-rate x CPUs; 0: unbounded)."""
        self.budget_per_s = budget_per_s
        self.shift = 0

    def update(self, offered: int, seconds: float) -> int:
        """``offered`` HTTP/1 exchanges started in the last ``seconds``: the kernel's new ``link_pick``."""
        if self.budget_per_s <= 0 or seconds <= 0:
            return self.pick
        rate = offered / seconds
        while self.shift < MAX_SHIFT and rate / 2**self.shift > self.HIGH * self.budget_per_s:
            self.shift += 1
        while self.shift > 0 and rate / 2 ** (self.shift - 1) < self.LOW * self.budget_per_s:
            self.shift -= 1
        return self.pick

    @property
    def pick(self) -> int:
        return 0 if self.shift == 0 else (1 << 32) >> self.shift
