"""The records the aggregator hands over: histogram invariants, W3C traceparent, node names."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_processor.otlp.errors import InvalidAggregateError
from cluster_processor.otlp.model import (
    FLAG_SAMPLED,
    Histogram,
    SpanContext,
    _parse_traceparent,
    parse_traceparent,
    span_context,
)
from cluster_processor.resolved import Edge, attrs, graph_node_name

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def test_histogram_buckets_are_upper_inclusive() -> None:
    h = Histogram.of((0.1, 0.5, 1.0), [0.05, 0.1, 0.2, 0.5, 0.7, 1.0, 3.0])
    assert h.bucket_counts == (2, 2, 2, 1)  # (..0.1] (0.1..0.5] (0.5..1] (1..)
    assert h.count == 7
    assert h.sum == pytest.approx(5.55)
    assert (h.min, h.max) == (0.05, 3.0)


def test_histogram_merge_adds_buckets_and_keeps_extremes() -> None:
    a = Histogram.of((1.0,), [0.5])
    b = Histogram.of((1.0,), [2.0, 3.0])
    m = a.merge(b)
    assert (m.bucket_counts, m.count, m.sum, m.min, m.max) == ((1, 2), 3, 5.5, 0.5, 3.0)
    assert a.merge(Histogram((1.0,), (0, 0), 0.0)).min == 0.5  # an empty side has no min


def test_merge_takes_min_and_max_from_either_side() -> None:
    empty = Histogram((1.0,), (0, 0), 0.0)
    a = Histogram.of((1.0,), [0.5, 2.0])
    b = Histogram.of((1.0,), [0.25, 3.0])
    assert [(h.min, h.max) for h in (empty.merge(a), a.merge(empty), empty.merge(empty))] == [
        (0.5, 2.0),
        (0.5, 2.0),
        (None, None),
    ]
    assert (a.merge(b).min, a.merge(b).max) == (0.25, 3.0) == (b.merge(a).min, b.merge(a).max)


@pytest.mark.parametrize(
    ("bounds", "counts"),
    [((1.0, 2.0), (1, 1)), ((2.0, 1.0), (0, 0, 0)), ((1.0, 1.0), (0, 0, 0)), ((1.0,), (1, -1))],
)
def test_histogram_rejects_broken_shapes(bounds: tuple[float, ...], counts: tuple[int, ...]) -> None:
    with pytest.raises(InvalidAggregateError):
        Histogram(bounds, counts, 0.0)


def test_merge_refuses_other_bounds() -> None:
    with pytest.raises(InvalidAggregateError):
        Histogram.of((1.0,), [1.0]).merge(Histogram.of((2.0,), [1.0]))


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_histogram_of_counts_every_value(values: list[float]) -> None:
    h = Histogram.of((0.5, 1.0, 10.0), values)
    assert h.count == len(values)
    assert h.sum == pytest.approx(sum(values))


def test_attrs_are_canonical() -> None:
    assert attrs({"b": 1, "a": "x"}) == attrs([("a", "x"), ("b", 2), ("b", 1)]) == (("a", "x"), ("b", 1))


_PAIRS = st.lists(
    st.tuples(st.sampled_from(["a", "b", "k8s.pod.name", "é", ""]), st.one_of(st.text(max_size=3), st.integers()))
)


@given(_PAIRS)
def test_attrs_sort_by_key_and_the_last_value_wins_whatever_the_input(pairs: list[tuple[str, str | int]]) -> None:
    want = tuple(sorted(dict(pairs).items()))
    assert attrs(pairs) == attrs(tuple(pairs)) == attrs(iter(pairs)) == attrs(dict(pairs)) == want


def test_graph_node_name_prefers_service_then_workload_then_pod_then_address() -> None:
    assert graph_node_name(attrs({"service.name": "cart", "k8s.deployment.name": "cart-v2"})) == "cart"
    assert graph_node_name(attrs({"k8s.replicaset.name": "web-1", "k8s.deployment.name": "web"})) == "web"
    assert graph_node_name(attrs({"k8s.pod.name": "p", "server.address": "10.0.0.1"})) == "p"
    assert graph_node_name(attrs({"server.address": "api.example.com"})) == "api.example.com"
    assert graph_node_name(()) == "unknown"


def test_traceparent_parses() -> None:
    assert parse_traceparent(TRACEPARENT) == (bytes.fromhex(TRACE_ID), bytes.fromhex(PARENT_ID), 1)
    # A future version may append fields; version 00 may not.
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_ID}-00-extra") is not None
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-01-extra") is None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # uppercase hex is invalid
        f"00-{TRACE_ID}-{PARENT_ID}",
        # The shape of version 00 with what bytes.fromhex would take but the format does not:
        f"00-{TRACE_ID}-{PARENT_ID}-0A",
        f"00-4bf92f3577b34da6a3ce929d0e0e47 6-{PARENT_ID}-01",
        f"00-{TRACE_ID}-00f067aa 0ba902b7-01",
        f"00-{TRACE_ID}-{PARENT_ID}- 1",
        f"00-{TRACE_ID[:-1]}\u0663-{PARENT_ID}-01",  # a non-ASCII digit
        f"00-{TRACE_ID}-{PARENT_ID}-0g",
    ],
)
def test_invalid_traceparent_is_ignored(header: str) -> None:
    assert parse_traceparent(header) is None


_HEADER_CHARS = "0123456789abcdefABCDEF- \t\u0663x"


def _field(n: int) -> st.SearchStrategy[str]:
    """``n`` characters: lowercase hex (valid) half the time, else anything near it."""
    return st.text(alphabet="0123456789abcdef", min_size=n, max_size=n) | st.text(
        alphabet=_HEADER_CHARS, min_size=n, max_size=n
    )


@given(
    st.text(alphabet=_HEADER_CHARS, min_size=50, max_size=60)
    | st.builds(
        lambda pre, t, p, f, post: f"{pre}00-{t}-{p}-{f}{post}",
        st.sampled_from(["", " ", "\t"]),
        _field(32),
        _field(16),
        _field(2),
        st.sampled_from(["", " ", "-x"]),
    )
)
def test_traceparent_fast_path_agrees_with_the_regular_expression(header: str) -> None:
    assert parse_traceparent(header) == _parse_traceparent(header.strip())


def test_span_context_joins_the_captured_trace() -> None:
    ctx = span_context(TRACEPARENT, "vendor=1", rng=random.Random(1))
    assert ctx.trace_id == bytes.fromhex(TRACE_ID)
    assert ctx.parent_span_id == bytes.fromhex(PARENT_ID)
    assert ctx.span_id not in (bytes.fromhex(PARENT_ID), b"\0" * 8) and len(ctx.span_id) == 8
    assert (ctx.trace_flags, ctx.trace_state, ctx.remote_parent) == (1, "vendor=1", True)


def test_span_context_without_header_starts_a_trace() -> None:
    a = span_context(None, rng=random.Random(1))
    b = span_context("not a traceparent", rng=random.Random(2))
    for ctx in (a, b):
        assert len(ctx.trace_id) == 16 and any(ctx.trace_id)
        assert ctx.parent_span_id == b"" and not ctx.remote_parent
    assert a.trace_id != b.trace_id
    # Built without the constructor (tuple.__new__): still the record the constructor makes.
    assert a == SpanContext(a.trace_id, a.span_id) and a.trace_flags == FLAG_SAMPLED and a.trace_state == ""


def test_edges_hash_and_compare_by_their_attributes() -> None:
    client = attrs({"k8s.pod.name": "a", "client.port": 5})
    server = attrs({"k8s.pod.name": "b", "server.port": 80})
    e = Edge(client, server)
    same = Edge(tuple(list(client)), tuple(list(server)))  # equal tuples, other objects
    assert e == same and hash(e) == hash(same) and {e: 1}[same] == 1
    assert e != Edge(server, client) and Edge(client, attrs({"k8s.pod.name": "b", "server.port": 81})) not in {e}
    assert repr(e) == f"Edge(client={client!r}, server={server!r})"
