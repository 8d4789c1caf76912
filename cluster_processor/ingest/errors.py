"""The ingest package's exceptions. Bad batches are answered with a gRPC status and counted, never
raised; these are for a server that cannot start as configured."""

from __future__ import annotations


class IngestError(Exception):
    """Base of every error raised by ``cluster_processor.ingest``."""


class IngestConfigError(IngestError):
    """The server cannot start: a TLS file is missing or unreadable, or the address cannot be bound."""


class IngestListenError(IngestConfigError):
    """The address cannot be bound (in use, not this host's): the host's fault, not the flag's."""
