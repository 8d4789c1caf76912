"""User-space half of L7 request tracing: sans-I/O parsers and the per-connection tracker.

``PROTOCOLS`` is the registry: the agent picks a parser by the name the kernel's
protocol inference reports, never by an if-chain.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from node_exporter.protocols.base import Direction, ParseState, Protocol, Role
from node_exporter.protocols.db import DbRecord
from node_exporter.protocols.dns import Dns, DnsRecord
from node_exporter.protocols.http1 import Http1, HttpRecord
from node_exporter.protocols.http2 import Http2
from node_exporter.protocols.http2_session import Http2Record
from node_exporter.protocols.memcached import Memcached
from node_exporter.protocols.mysql import MySql
from node_exporter.protocols.postgres import Postgres
from node_exporter.protocols.redis import Redis
from node_exporter.protocols.tracker import ConnectionTracker, TrackerLimits

PROTOCOLS: Final[Mapping[str, Protocol]] = MappingProxyType(
    {
        p.name: p
        for p in (
            Http1(),
            Http2(),
            Http2(compact=True),
            Dns(tcp=False),
            Dns(tcp=True),
            Redis(),
            Memcached(),
            Postgres(),
            MySql(),
        )
    }
)

__all__ = [
    "PROTOCOLS",
    "ConnectionTracker",
    "DbRecord",
    "Direction",
    "DnsRecord",
    "Http2Record",
    "HttpRecord",
    "ParseState",
    "Protocol",
    "Role",
    "TrackerLimits",
]
