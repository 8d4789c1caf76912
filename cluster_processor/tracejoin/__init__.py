"""The trace join between processor replicas: one trace per incoming request (docs/traces.md)."""

from cluster_processor.tracejoin.join import Held, JoinSettings, PeerError, TraceJoin, owner

__all__ = ["Held", "JoinSettings", "PeerError", "TraceJoin", "owner"]
