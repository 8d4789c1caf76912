"""Summary records (HTTP/1 exchanges the kernel summed per socket, method, route and status): decode
through the pipeline, malformed ones counted, the agent's request counters, the bucket bounds the C
header and Python share."""

from __future__ import annotations

import ctypes
import re
from bisect import bisect_left
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kscope_common.latency import LATENCY_BOUNDS_NS, LATENCY_BUCKETS
from node_exporter.agent import Agent
from node_exporter.bpf.abi import (
    L7_LATENCY_BUCKETS,
    L7_SUMMARY_HEAD,
    KscopeL7Exchange,
    KscopeL7Summary,
    L7Emit,
    L7RecordType,
    Role,
)
from node_exporter.l7.exchanges import (
    EXCHANGE_SIZE,
    SUMMARY_HEAD_OFFSET,
    SUMMARY_TAIL,
    SUMMARY_TAIL_OFFSET,
    ExchangeBatch,
)
from node_exporter.l7.pipeline import L7Event, L7Pipeline
from node_exporter.protocols import HttpRecord
from node_exporter.protocols import Role as PRole
from node_exporter.protocols.http1 import HttpSummary, HttpSummaryRecord
from tests.node_exporter.l7.test_exchanges import GET, TRACED, TRACEPARENT, exchange_bytes

REPO = Path(__file__).resolve().parents[3]
MS = 1_000_000


def buckets_of(latencies: list[int]) -> list[int]:
    """The kernel's rule: bucket i holds bound[i-1] < latency <= bound[i], the last one the rest."""
    out = [0] * LATENCY_BUCKETS
    for v in latencies:
        out[bisect_left(LATENCY_BOUNDS_NS, v)] += 1
    return out


def summary_bytes(
    head: bytes, latencies: list[int], *, cookie: int = 7, status: int = 200, start: int = 1_000,
    end: int = 9_000, req_bytes: int = 300, resp_bytes: int = 900, role: int = Role.KSCOPE_ROLE_SERVER,
    count: int | None = None, buckets: list[int] | None = None, lo: int | None = None, hi: int | None = None,
    head_len: int | None = None, latency_sum: int | None = None,
) -> bytes:  # fmt: skip
    """A struct kscope_l7_summary built with the ctypes mirror; the keywords override what the
    latencies give, to build malformed ones."""
    s = KscopeL7Summary()
    s.type, s.role, s.method, s.reason = L7RecordType.KSCOPE_REC_L7_SUMMARY, role, 1, L7Emit.KSCOPE_EMIT_SWEEP
    s.netns_ino, s.sock_cookie, s.start_ns = 4026531840, cookie, start
    s.latency_ns = sum(latencies) if latency_sum is None else latency_sum
    s.request_bytes, s.response_bytes, s.status, s.tgid, s.pid = req_bytes, resp_bytes, status, 200, 201
    s.saddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 2]
    s.daddr[10:16] = [0xFF, 0xFF, 198, 18, 0, 1]
    s.sport, s.dport, s.family = 80, 40000, 2
    s.comm[:5] = list(b"nginx")
    s.count = len(latencies) if count is None else count
    s.end_ns = end
    s.latency_min_ns = min(latencies, default=0) if lo is None else lo
    s.latency_max_ns = max(latencies, default=0) if hi is None else hi
    s.buckets[:] = buckets_of(latencies) if buckets is None else buckets
    data = head[:L7_SUMMARY_HEAD]
    s.head[: len(data)] = list(data)
    s.head_len = len(data) if head_len is None else head_len
    return bytes(s)


def http(e: L7Event) -> HttpRecord:
    assert isinstance(e.record, HttpRecord)
    return e.record


LATENCIES = [5 * MS, 5 * MS + 1, 7 * MS, 12_800 * MS, 20_000 * MS]


def test_summary_layout_matches_the_mirror() -> None:
    assert ctypes.sizeof(KscopeL7Summary) == ctypes.sizeof(KscopeL7Exchange) == EXCHANGE_SIZE == 504
    # the common prefix, field by field, is the exchange's
    prefix = [f[0] for f in KscopeL7Exchange._fields_].index("head")
    for f, xf in zip(KscopeL7Summary._fields_, KscopeL7Exchange._fields_[:prefix], strict=False):
        name = f[0]
        assert (name, f[1]) == (xf[0], xf[1])
        assert getattr(KscopeL7Summary, name).offset == getattr(KscopeL7Exchange, name).offset
    raw = summary_bytes(GET, LATENCIES, end=77)
    count, end, lo, hi, *buckets = SUMMARY_TAIL.unpack_from(raw, SUMMARY_TAIL_OFFSET)
    assert (count, end, lo, hi) == (5, 77, 5 * MS, 20_000 * MS)
    assert buckets == buckets_of(LATENCIES) == [1, 2, *[0] * 18, 1, 1]  # bounds are inclusive
    assert raw[SUMMARY_HEAD_OFFSET : SUMMARY_HEAD_OFFSET + len(GET)] == GET


def test_c_header_bounds_are_the_python_bounds() -> None:
    text = (REPO / "bpf_src/abi/l7.h").read_text()
    m = re.search(r"#define KSCOPE_L7_LATENCY_BOUNDS_NS\s*\\\s*\{(.*?)\}", text, re.S)
    assert m is not None
    bounds = tuple(int(v) for v in re.findall(r"(\d+)ULL", m[1]))
    assert bounds == LATENCY_BOUNDS_NS
    n = re.search(r"#define KSCOPE_L7_LATENCY_BOUNDS (\d+)", text)
    assert n is not None and int(n[1]) == len(LATENCY_BOUNDS_NS) == L7_LATENCY_BUCKETS - 1
    head = re.search(r"#define KSCOPE_L7_SUMMARY_HEAD (\d+)", text)
    assert head is not None and int(head[1]) == L7_SUMMARY_HEAD
    assert list(LATENCY_BOUNDS_NS) == sorted(set(LATENCY_BOUNDS_NS))


def test_a_summary_becomes_one_event_carrying_its_requests() -> None:
    pipe = L7Pipeline()
    raw = summary_bytes(TRACED, LATENCIES, start=1_000, end=9_000, req_bytes=500, resp_bytes=1500)
    (e,) = pipe.feed([ExchangeBatch.of([raw])])
    r = e.record
    assert isinstance(r, HttpSummaryRecord) and isinstance(r, HttpRecord)
    # method, path and route from the head; its trace headers are not any one request's: dropped
    assert (r.method, r.path, r.route, r.status) == ("POST", "/api/v1/items", "/api/v1/items", 200)
    assert (r.traceparent, r.request_id) == ("", "")
    assert TRACEPARENT not in repr(e)
    assert (r.start_ns, r.latency_ns, r.request_bytes, r.response_bytes) == (1_000, 0, 500, 1500)
    assert r.summary == HttpSummary(
        count=5, latency_sum_ns=sum(LATENCIES), latency_min_ns=5 * MS, latency_max_ns=20_000 * MS,
        buckets=tuple(buckets_of(LATENCIES)), end_ns=9_000,
    )  # fmt: skip
    c = e.conn
    assert (c.sock_cookie, c.side, c.protocol, c.tls, c.comm, c.tgid) == (7, PRole.SERVER, "http1", False, "nginx", 200)
    assert (c.local_ip, c.local_port, c.remote_ip, c.remote_port) == ("198.18.0.2", 80, "198.18.0.1", 40000)
    counters = pipe.counters()
    assert (counters["summaries"], counters["summarized_requests"], counters["summary_malformed"]) == (1, 5, 0)
    assert counters["exchange_records"] == 0 and counters["exchange_bad_type"] == 0


def test_summaries_and_exchanges_share_the_ring_in_order() -> None:
    pipe = L7Pipeline()
    batch = ExchangeBatch.of(
        [
            exchange_bytes(GET, role=Role.KSCOPE_ROLE_SERVER, latency=3 * MS),
            summary_bytes(GET, [1 * MS, 2 * MS]),
            exchange_bytes(TRACED, role=Role.KSCOPE_ROLE_SERVER),
            summary_bytes(b"DELETE /users/9 HTTP/1.1\r\n\r\n", [4 * MS], cookie=8, status=503),
        ]
    )
    events = pipe.feed([batch])
    assert [type(e.record) for e in events] == [HttpRecord, HttpSummaryRecord, HttpRecord, HttpSummaryRecord]
    a, b, c, d = (http(e) for e in events)
    assert a.summary is None and c.summary is None  # one request: no summary, at no cost
    assert events[0].conn is events[1].conn is events[2].conn  # one socket, one ConnInfo
    assert (b.path, b.route) == ("/users/42/orders", "/users/{id}/orders")
    assert (d.method, d.route, d.status, events[3].conn.sock_cookie) == ("DELETE", "/users/{id}", 503, 8)
    assert c.traceparent == TRACEPARENT  # the exchange keeps its trace headers
    counters = pipe.counters()
    assert (counters["exchange_records"], counters["summaries"], counters["summarized_requests"]) == (2, 2, 3)


def test_malformed_summaries_are_counted_not_raised() -> None:
    good = [1 * MS, 30 * MS]
    bad = [
        summary_bytes(GET, good, count=0),
        summary_bytes(GET, good, count=3),  # buckets sum to 2
        summary_bytes(GET, good, buckets=[1] * LATENCY_BUCKETS),
        summary_bytes(GET, good, lo=31 * MS, hi=30 * MS),
        summary_bytes(GET, good, status=0),  # unanswered exchanges are never summed
        summary_bytes(GET, good, head_len=L7_SUMMARY_HEAD + 1),
    ]
    pipe = L7Pipeline()
    events = pipe.feed([ExchangeBatch.of([*bad, summary_bytes(GET, good)])])
    (e,) = events
    s = http(e).summary
    assert s is not None and s.count == 2
    counters = pipe.counters()
    assert (counters["summary_malformed"], counters["summaries"], counters["summarized_requests"]) == (6, 1, 2)


def test_summaries_the_pipeline_cannot_name_are_counted() -> None:
    pipe = L7Pipeline()
    events = pipe.feed(
        [
            ExchangeBatch.of(
                [
                    summary_bytes(b"garbage\r\n\r\n", [MS]),
                    summary_bytes(GET, [MS], head_len=0),
                    summary_bytes(GET, [MS], role=0, cookie=99),
                ]
            )
        ]
    )
    assert events == []
    counters = pipe.counters()
    assert (counters["summary_bad_head"], counters["exchange_bad_role"], counters["summaries"]) == (2, 1, 0)


@given(st.binary(min_size=EXCHANGE_SIZE - 1, max_size=EXCHANGE_SIZE - 1))
def test_any_summary_bytes_never_raise(rest: bytes) -> None:
    raw = bytes([L7RecordType.KSCOPE_REC_L7_SUMMARY]) + rest
    pipe = L7Pipeline()
    events = pipe.feed([ExchangeBatch.of([raw])])
    c = pipe.counters()
    assert len(events) == c["summaries"]
    assert c["summaries"] + c["summary_malformed"] + c["summary_bad_head"] + c["exchange_bad_role"] == 1
    for e in events:
        s = http(e).summary
        assert s is not None and s.count == sum(s.buckets) > 0 and s.latency_min_ns <= s.latency_max_ns


def test_agent_counts_a_summary_as_its_requests() -> None:
    """``l7_requests`` (what bench/overhead.py reads as parsed requests) counts summarized requests;
    the step's arithmetic is driven here on a real pipeline, without probes."""
    agent = object.__new__(Agent)  # no BPF here: only the counting state the step uses
    agent.pipeline = L7Pipeline()
    agent.requests_seen = 0
    agent._summaries_counted = (0, 0)

    def step(records: list[bytes]) -> None:
        events = agent.pipeline.feed([ExchangeBatch.of(records)])
        agent.requests_seen += len(events) + agent._summarized_since_last_step()

    step([exchange_bytes(GET), summary_bytes(GET, [MS] * 40), summary_bytes(GET, [MS] * 2, cookie=9)])
    assert agent.requests_seen == 1 + 40 + 2
    step([exchange_bytes(GET), exchange_bytes(TRACED)])
    assert agent.requests_seen == 45
    step([summary_bytes(GET, [MS], count=0), summary_bytes(GET, [MS] * 7)])  # the malformed one is not a request
    assert agent.requests_seen == 52
    counters = agent.pipeline.counters()  # reported with the agent's l7_ prefix
    assert (counters["summaries"], counters["summarized_requests"], counters["summary_malformed"]) == (3, 49, 1)
