"""Trace and span ids that link both ends of one request, derived without a join (docs/traces.md).

Each agent sees, for a plain-text HTTP/1 request, the TCP sequence number of the request's first
byte and the response stream's next byte (``HttpInfo.tcp_request_seq``/``tcp_response_seq``).
NAT rewrites addresses and ports, never these, so the client's record and the server's carry the
same pair. Hashed with the hour the request started, they give the same trace id at both ends, a
client span id, and a server span id whose parent is that client span id: any processor replica
computes the same ids from either record alone, with no state shared between replicas.

:class:`LinkStats` counts, where one processor sees both ends, how many spans were linked and
how many of the client spans it saw found their server span (self-metrics of item 3).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Final

from cluster_processor.otlp.model import FLAG_SAMPLED, SpanContext
from cluster_processor.resolved import Side

# The coarse time bound in the ids: the same connection's sequence numbers come round again after
# 4 GiB per direction, and an hour is far wider than any request's clock skew plus latency between
# the ends. A request whose two ends straddle an hour boundary gets unlinked ids (a missing link,
# never a wrong one).
LINK_WINDOW_NS: Final = 3600 * 1_000_000_000
_FACTS: Final = struct.Struct("<IIQ")
_PERSON: Final = b"kscope-link-v1"  # a version: a change of derivation must not collide with the old


def linked_ids(req_seq: int, resp_seq: int, start_unix_nano: int) -> tuple[bytes, bytes, bytes]:
    """(trace id, client span id, server span id) of the request with these TCP sequence numbers."""
    d = hashlib.blake2b(
        _FACTS.pack(req_seq, resp_seq, start_unix_nano // LINK_WINDOW_NS), digest_size=32, person=_PERSON
    ).digest()
    trace_id, client, server = d[:16], d[16:24], d[24:]
    # all-zero ids are invalid in W3C and OTLP (a 2^-64 chance): one bit set keeps them ids
    if trace_id == bytes(16):
        trace_id = bytes(15) + b"\x01"
    if client == bytes(8):
        client = bytes(7) + b"\x01"
    if server == bytes(8) or server == client:
        server = bytes(7) + b"\x02"
    return trace_id, client, server


def linked_context(side: Side, req_seq: int, resp_seq: int, start_unix_nano: int) -> SpanContext:
    """The context of a span with no traceparent of its own but known TCP sequence numbers: the
    client span is the trace's root, the server span its child (a remote parent)."""
    trace_id, client, server = linked_ids(req_seq, resp_seq, start_unix_nano)
    if side is Side.CLIENT:
        return SpanContext(trace_id, client, b"", FLAG_SAMPLED, "", False)
    return SpanContext(trace_id, server, client, FLAG_SAMPLED, "", True)


COUNTERS: Final = (
    "spans_client",  # client spans made
    "spans_client_linked",  # ... whose ids came from the TCP sequence numbers
    "spans_client_matched",  # ... whose server span this processor saw too (within max_pending)
    "spans_client_parent_inferred",  # ... made inside a server request the agent named (L7Request.parent)
    "spans_server",  # server spans made
    "spans_server_parent_header",  # ... whose parent came from the request's traceparent
    "spans_server_parent_inferred",  # ... whose parent is the client span derived from the TCP sequence numbers
    "spans_server_matched",  # ... whose client span this processor saw too
    "link_pending_evicted",  # linked spans forgotten unmatched: max_pending reached (their match is not counted)
)


class LinkStats:
    """Counts linked spans and, among those whose other end this processor also sees, the matched
    ones. Pending ends wait in a bounded table keyed by the client span id (oldest evicted, counted)."""

    def __init__(self, max_pending: int = 65_536) -> None:
        self.max_pending = max_pending
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._pending: OrderedDict[bytes, Side] = OrderedDict()

    def span(self, side: Side, ctx: SpanContext, linked: bool, parent: bool = False) -> None:
        c = self.counters
        client = side is Side.CLIENT
        c["spans_client" if client else "spans_server"] += 1
        if parent:
            c["spans_client_parent_inferred"] += 1
        if not linked:
            if not client and ctx.remote_parent:
                c["spans_server_parent_header"] += 1
            return
        c["spans_client_linked" if client else "spans_server_parent_inferred"] += 1
        key = ctx.span_id if client else ctx.parent_span_id
        pending = self._pending
        other = pending.get(key)
        if other is not None and other is not side:
            del pending[key]
            c["spans_client_matched"] += 1
            c["spans_server_matched"] += 1
            return
        if other is None and len(pending) >= self.max_pending:
            pending.popitem(last=False)
            c["link_pending_evicted"] += 1
        pending[key] = side

    @property
    def pending(self) -> int:
        return len(self._pending)
