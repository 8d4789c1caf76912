"""The OTLP retry rules, the server-delay parsing and the backoff, pure (shared by the agent's shipper,
the processor's OTLP exporter and its Kubernetes watcher)."""

from __future__ import annotations

import math

import grpc
import pytest

from kscope_common.grpc_retry import (
    DO_NOT_RETRY,
    RETRYABLE,
    Backoff,
    backoff_delay,
    retry_delay_from_details,
    server_retry_delay,
    should_retry,
    status_details,
)

SC = grpc.StatusCode


def test_the_retryable_set_is_the_otlp_one() -> None:
    assert {c.name for c in RETRYABLE} == {
        "CANCELLED",
        "DEADLINE_EXCEEDED",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNAVAILABLE",
        "DATA_LOSS",
    }


@pytest.mark.parametrize(
    ("code", "delay", "retry"),
    [
        (SC.UNAVAILABLE, None, True),
        (SC.DEADLINE_EXCEEDED, None, True),
        (SC.CANCELLED, None, True),
        (SC.ABORTED, 0.5, True),
        (SC.RESOURCE_EXHAUSTED, None, False),  # a hard limit: the same batch fails the same way
        (SC.RESOURCE_EXHAUSTED, 1.0, True),  # throttling: the server says when to come back
        (SC.INVALID_ARGUMENT, None, False),
        (SC.INVALID_ARGUMENT, 1.0, False),
        (SC.UNAUTHENTICATED, None, False),
        (SC.PERMISSION_DENIED, None, False),
        (SC.UNIMPLEMENTED, None, False),
        (SC.INTERNAL, None, False),
        (SC.UNKNOWN, None, False),
        (SC.UNAVAILABLE, DO_NOT_RETRY, False),  # a negative pushback refuses retries
        (None, None, False),
    ],
)
def test_should_retry(code: grpc.StatusCode | None, delay: float | None, retry: bool) -> None:
    assert should_retry(code, delay) is retry


def test_retry_info_from_the_server_encoder_is_read_back() -> None:
    details = status_details(SC.UNAVAILABLE.value[0], "queue full", 2.5)
    assert retry_delay_from_details(details) == pytest.approx(2.5)
    assert server_retry_delay([("grpc-status-details-bin", details)]) == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("metadata", "delay"),
    [
        (None, None),
        ((), None),
        ([("other", "1")], None),
        ([("grpc-retry-pushback-ms", "1500")], 1.5),
        ([("grpc-retry-pushback-ms", "-1")], math.inf),
        ([("grpc-retry-pushback-ms", "soon")], math.inf),
        ([("grpc-status-details-bin", b"\xff\xff garbage")], None),
        ([("grpc-status-details-bin", b"")], None),  # an empty Status: no RetryInfo
    ],
)
def test_server_retry_delay(metadata: list[tuple[str, str | bytes]] | None, delay: float | None) -> None:
    assert server_retry_delay(metadata) == delay


def test_both_signals_take_the_longer_delay() -> None:
    details = status_details(SC.UNAVAILABLE.value[0], "", 0.2)
    md: list[tuple[str, str | bytes]] = [("grpc-retry-pushback-ms", "700"), ("grpc-status-details-bin", details)]
    assert server_retry_delay(md) == pytest.approx(0.7)


def test_backoff_doubles_to_the_cap_with_jitter_below() -> None:
    top = Backoff(1.0, 8.0, jitter=0.5, rng=lambda: 0.0)
    assert [top.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    bottom = Backoff(1.0, 8.0, jitter=0.5, rng=lambda: 1.0)
    assert [bottom.next() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]


def test_a_server_delay_is_a_floor_even_above_the_cap() -> None:
    b = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert b.next(0.1) == 1.0
    assert b.next(30.0) == 30.0  # the batch deadline, not the backoff cap, bounds the wait


def test_a_server_delay_can_be_capped_and_reset_starts_over() -> None:
    b = Backoff(0.5, 4.0, server_delay_cap_s=4.0, rng=lambda: 1.0)
    assert b.next(3.0) == 3.0
    assert b.next(600.0) == 4.0  # an APIServer's Retry-After of ten minutes does not park the watcher
    b.reset()
    assert b.next() == 0.25


def test_backoff_delay_does_not_overflow() -> None:
    assert backoff_delay(10_000, 1.0, 8.0, 0.5, lambda: 0.0) == 8.0


def test_status_details_without_a_delay_carries_no_retry_info() -> None:
    assert retry_delay_from_details(status_details(14, "x")) is None
    assert retry_delay_from_details(b"\xff\xff\xff") is None
