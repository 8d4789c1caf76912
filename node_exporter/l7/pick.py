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
