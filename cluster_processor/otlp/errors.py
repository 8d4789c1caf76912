"""The otlp package's exceptions. Data that cannot be delivered is counted, never raised: these are
for aggregates that break the model's invariants (a bug upstream, caught at construction) and for
an exporter used after it was stopped."""

from __future__ import annotations


class OtlpError(Exception):
    """Base of every error raised by ``cluster_processor.otlp``."""


class InvalidAggregateError(OtlpError, ValueError):
    """An aggregate that cannot be encoded faithfully, e.g. bucket counts that do not match the bounds."""
