"""Shared fixtures: one background event loop for the servers, and a session's test certificates."""

from tests.cluster_processor.ingest.harness import certs, loop_thread

__all__ = ["certs", "loop_thread"]
