"""The ship package's exceptions. Failed deliveries are counted, never raised; these are for a shipper
that cannot be built as configured."""

from __future__ import annotations

from node_exporter.errors import KscopeError


class ShipError(KscopeError):
    """Base of every error raised by ``node_exporter.ship``."""


class ShipConfigError(ShipError):
    """Bad shipper settings: a TLS file missing or unreadable, a certificate without its key, a
    non-positive timeout."""
