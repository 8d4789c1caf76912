"""What every database/cache parser (Redis, Memcached, PostgreSQL, MySQL) turns an operation into.

One record shape for all of them, named after the OpenTelemetry database semantic conventions
(``db.*``), so the output (kscope.v1 ``DbInfo``) and the processor treat them alike. Nothing here
may hold a key, a value, a row, a parameter or a password: the parsers keep only the command name
(Redis, Memcached) or the statement with every literal replaced by ``?`` (SQL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from node_exporter.protocols.http1 import HttpSummary

MAX_QUERY_TEXT: Final = 1024  # characters of sanitized db.query.text kept
TIMEOUT_ERROR: Final = "timeout"  # error.type of an operation that got no response in time


@dataclass(frozen=True, slots=True)
class DbRecord:
    system: str  # db.system.name: "redis", "memcached", "postgresql", "mysql", "mariadb"
    operation: str  # db.operation.name, upper case ("GET", "SELECT")
    request_bytes: int  # on the wire
    response_bytes: int  # 0 if no response was seen
    start_ns: int  # first byte of the request as seen from this side
    latency_ns: int  # response first byte - request first byte; for a timeout, how long we waited
    collection: str = ""  # db.collection.name
    namespace: str = ""  # db.namespace
    query_summary: str = ""  # db.query.summary
    query_text: str = ""  # db.query.text, sanitized, at most MAX_QUERY_TEXT characters
    status_code: str = ""  # db.response.status_code; "" on success
    error_type: str = ""  # error.type; "" on success
    returned_rows: int = 0  # db.response.returned_rows
    cache_hits: int = 0
    cache_misses: int = 0
    batch_size: int = 0  # db.operation.batch.size (MULTI/EXEC)
    # (tcp_req_seq, tcp_resp_seq, start_ns) of the server request of the same thread this call was
    # made inside of, confirmed (node_exporter/l7/causal.py); None: no parent
    parent: tuple[int, int, int] | None = None
    # Set on a summary of this socket's operations past the node's record budget (node_exporter/l7/agentsum.py):
    # then latency_ns is 0, bytes, rows, hits and misses are sums, the texts are the first operation's
    summary: HttpSummary | None = None
