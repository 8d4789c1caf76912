"""One HTTP/2 connection's state: HPACK tables per direction, header blocks being assembled,
streams in flight; frames in, records out.

A stream's request is its HEADERS (+ CONTINUATION) until END_STREAM, the response likewise; the
record leaves when the response ends (END_STREAM on its last DATA or trailers), so its latency is
request's first HEADERS -> response's end, what ``rpc.*.duration`` measures. gRPC adds the service,
method and ``grpc-status`` (from the trailers, or a trailers-only response); ``grpc-message`` is
never kept (it may carry user data). Everything is bounded per connection and every drop counted
(``COUNTERS``, summed by the pipeline into the agent's self-metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from node_exporter.protocols import hpack_state as hp
from node_exporter.protocols.base import Buffer, Message, MessageKind, Role, Stitched
from node_exporter.protocols.http1 import HttpRecord, HttpSummary
from node_exporter.protocols.http2 import (
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADER_LEN,
    HEADERS,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    H2Frame,
)
from node_exporter.protocols.http_fields import request_id, route_template, target_path, valid_traceparent

MAX_STREAMS: Final = 1000  # streams in flight per connection; a new one past it is dropped (counted)
MAX_HEADER_BLOCK: Final = 16 * 1024  # header block bytes per stream and message (HEADERS + CONTINUATION)

COUNTERS: Final = (
    "h2_frames",  # frames seen, both directions
    "h2_streams_dropped",  # new streams past MAX_STREAMS (not tracked: their response is an orphan)
    "h2_streams_reset",  # streams ended by RST_STREAM before their response ended
    "h2_streams_refused",  # streams past a GOAWAY's last stream id: never processed
    "h2_header_block_too_large",  # a header block past MAX_HEADER_BLOCK (dropped; table out of step)
    "h2_continuation_unexpected",  # CONTINUATION that continues nothing, or a frame cutting into a block
    "h2_frame_too_large",  # a frame past the receiver's SETTINGS_MAX_FRAME_SIZE (when that is known)
    "h2_hpack_unknown_index",  # header fields an index into the unseen part of a dynamic table hid
    "h2_hpack_table_capped",  # times our table bound made a direction's table incomplete
    "h2_requests_unknown_path",  # records whose :path (or :method) was hidden by an unknown index
    *(f"h2_{k}" for k in (hp.BAD_INTEGER, hp.BAD_STRING, hp.BAD_HUFFMAN, hp.BAD_INDEX, hp.BAD_SIZE_UPDATE)),
)
GRPC_CONTENT_TYPE: Final = "application/grpc"


@dataclass(frozen=True, slots=True)
class Http2Record(HttpRecord):
    """An HTTP/2 request; gRPC ones (content-type application/grpc*) carry the RPC fields.
    method/path/route are "" when an unknown HPACK index hid them (never guessed)."""

    rpc_system: str = ""  # "grpc" or ""
    rpc_service: str = ""  # "package.Service" from :path "/package.Service/Method"
    rpc_method: str = ""
    grpc_status: int = -1  # grpc-status of the trailers; -1: none seen (not gRPC, or no trailers)


@dataclass(frozen=True, slots=True)
class Http2SummaryRecord(Http2Record):
    """HTTP/2 requests of one socket past the node's record budget, summed by the agent (l7/agentsum.py), as
    HttpSummaryRecord: start_ns is the first's, bytes are sums, latency_ns is 0, no trace headers."""

    summary: HttpSummary = field(kw_only=True)  # type: ignore[misc]  # a slot here; None on HttpRecord


@dataclass(frozen=True, slots=True)
class Http2ChildRecord(Http2Record):
    """An HTTP/2 call made inside a server request of the same thread, confirmed
    (node_exporter/l7/causal.py): as HttpChildRecord's, that server record's sequence numbers and start."""

    parent: tuple[int, int, int] | None = None  # type: ignore[misc]  # a slot here; None on HttpRecord


class _Stream:
    __slots__ = ("content_type", "grpc_status", "method", "path", "req_bytes", "request_id", "resp_bytes", "start_ns",
                 "status", "traceparent", "unknown")  # fmt: skip

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.req_bytes = 0
        self.resp_bytes = 0
        self.method = self.path = self.content_type = self.traceparent = self.request_id = ""
        self.status = 0
        self.grpc_status = -1
        self.unknown = False  # a field of the request head was hidden by an unknown index


class _Block:
    """A header block being assembled from HEADERS/PUSH_PROMISE and CONTINUATION frames."""

    __slots__ = ("data", "end_stream", "push", "stream_id", "ts_ns")

    def __init__(self, ftype: int, flags: int, stream_id: int, data: Buffer, ts_ns: int) -> None:
        self.stream_id = stream_id
        self.end_stream = ftype == HEADERS and bool(flags & END_STREAM)
        self.push = ftype == PUSH_PROMISE
        self.data = bytearray(data)
        self.ts_ns = ts_ns


class H2Session:
    def __init__(self, role: Role) -> None:
        self.role = role
        # Joined mid-connection until the preface says otherwise: tables incomplete, limits unknown.
        self._tables = {k: hp.DynamicTable(complete=False) for k in MessageKind}
        self._max_frame: dict[MessageKind, int | None] = dict.fromkeys(MessageKind)  # the receiver's limit
        self._blocks: dict[MessageKind, _Block | None] = dict.fromkeys(MessageKind)
        self._streams: dict[int, _Stream] = {}
        self._decoded = False  # a header block was decoded (so a late preface cannot mean a fresh table)
        self.counts = dict.fromkeys(COUNTERS, 0)

    def counters(self) -> dict[str, int]:
        out = dict(self.counts)
        out["h2_hpack_unknown_index"] += sum(t.unknown_index for t in self._tables.values())
        out["h2_hpack_table_capped"] += sum(t.evicted_unknown for t in self._tables.values())
        return out

    def pending(self) -> int:
        return len(self._streams)

    # -- frames in ----------------------------------------------------------------------------

    def message(self, kind: MessageKind, msg: Message[H2Frame]) -> Stitched:
        out = Stitched()
        f = msg.frame
        if f.type == -1:
            self.counts["h2_frames"] += 1
            if not self._decoded:
                self._tables = {k: hp.DynamicTable(complete=True) for k in MessageKind}
                self._max_frame = dict.fromkeys(MessageKind, DEFAULT_MAX_FRAME)
            return out
        self.frame(kind, f.type, f.flags, f.stream_id, f.length, f.block, msg.ts_ns, f, out)
        return out

    def frame(self, kind: MessageKind, ftype: int, flags: int, sid: int, length: int, block_data: Buffer,
              ts_ns: int, f: H2Frame | None, out: Stitched) -> None:  # fmt: skip
        """One frame (not the preface) by its fields: ``block_data`` the header block fragment of a
        HEADERS/PUSH_PROMISE/CONTINUATION, ``f`` the decoded frame for the control frames that need
        it (RST_STREAM, GOAWAY, SETTINGS; the per-call loop, http2_frames.py, makes only those)."""
        self.counts["h2_frames"] += 1
        limit = self._max_frame[kind]
        if limit is not None and length > limit:
            self.counts["h2_frame_too_large"] += 1
        block = self._blocks[kind]
        if block is not None and (ftype != CONTINUATION or sid != block.stream_id):
            # RFC 9113 6.10: nothing may come between a block's frames; this block is lost
            self.counts["h2_continuation_unexpected"] += 1
            self._blocks[kind] = None
            self._tables[kind].lost_step()
            block = None
        if ftype == DATA:
            s = self._streams.get(sid)
            if s is not None:
                self._add_bytes(kind, s, HEADER_LEN + length)  # also when the kernel sent no payload
                if flags & END_STREAM and kind is MessageKind.RESPONSE:
                    self._finish(sid, s, ts_ns, out)
            elif flags & END_STREAM and kind is MessageKind.RESPONSE:
                out.orphan_responses += 1  # a response whose request we never saw ends here
        elif ftype in (HEADERS, PUSH_PROMISE, CONTINUATION):
            self._header_frame(kind, ftype, flags, sid, HEADER_LEN + length, block_data, ts_ns, block, out)
        elif f is None:
            return
        elif ftype == RST_STREAM:
            if self._streams.pop(f.stream_id, None) is not None:
                self.counts["h2_streams_reset"] += 1
                out.unanswered_requests += 1
        elif ftype == GOAWAY and kind is MessageKind.RESPONSE:
            refused = [sid for sid in self._streams if sid > f.last_stream_id]
            for sid in refused:
                del self._streams[sid]
            self.counts["h2_streams_refused"] += len(refused)
            out.unanswered_requests += len(refused)
        elif ftype == SETTINGS:
            self._settings(kind, f)

    def _settings(self, kind: MessageKind, f: H2Frame) -> None:
        other = MessageKind.RESPONSE if kind is MessageKind.REQUEST else MessageKind.REQUEST
        for ident, value in f.settings:
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                self._tables[other].set_allowed(value)  # bounds the other side's encoder
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                self._max_frame[other] = value

    def _header_frame(self, kind: MessageKind, ftype: int, flags: int, sid: int, size: int, data: Buffer,
                      ts_ns: int, block: _Block | None, out: Stitched) -> None:  # fmt: skip
        if ftype == CONTINUATION:
            if block is None:
                self.counts["h2_continuation_unexpected"] += 1
                self._tables[kind].lost_step()
                return
            block.data += data
        else:
            block = _Block(ftype, flags, sid, data, ts_ns)
        s = self._streams.get(block.stream_id)
        if s is None and kind is MessageKind.REQUEST and ftype == HEADERS:
            if len(self._streams) >= MAX_STREAMS:
                self.counts["h2_streams_dropped"] += 1
            else:
                s = self._streams[block.stream_id] = _Stream(ts_ns)
        if s is not None:
            self._add_bytes(kind, s, size)
        if len(block.data) > MAX_HEADER_BLOCK:
            self.counts["h2_header_block_too_large"] += 1
            self._tables[kind].lost_step()
            self._blocks[kind] = None
            return
        if not flags & END_HEADERS:
            self._blocks[kind] = block
            return
        self._blocks[kind] = None
        self._decoded = True
        fields, err = self._tables[kind].decode(bytes(block.data))
        if err is not None:
            self.counts["h2_" + err] += 1
        if block.push or s is None:
            if s is None and kind is MessageKind.RESPONSE and block.end_stream:
                out.orphan_responses += 1
            return
        if kind is MessageKind.REQUEST:
            self._request_fields(s, fields)
            return
        status, grpc_status = _response_fields(fields)
        if status and (status >= 200 or block.end_stream):
            s.status = status
        if grpc_status >= 0:
            s.grpc_status = grpc_status
        if block.end_stream:
            self._finish(block.stream_id, s, ts_ns, out)

    @staticmethod
    def _request_fields(s: _Stream, fields: list[hp.Field | None]) -> None:
        if s.method or s.path:
            return  # trailers of a request: nothing we report
        for fv in fields:
            if fv is None:
                s.unknown = True
                continue
            name, value = fv
            if value is None:
                continue
            if name == b":method" and not s.method:
                s.method = value[:16].decode("ascii", "replace")
            elif name == b":path" and not s.path:
                s.path = target_path(b"GET", value) or ""
            elif name == b"content-type":
                s.content_type = value[:64].decode("ascii", "replace").lower()
            elif name == b"traceparent":
                s.traceparent = valid_traceparent(value)
            elif name == b"x-request-id":
                s.request_id = request_id(value)

    @staticmethod
    def _add_bytes(kind: MessageKind, s: _Stream, n: int) -> None:
        if kind is MessageKind.REQUEST:
            s.req_bytes += n
        else:
            s.resp_bytes += n

    def _finish(self, sid: int, s: _Stream, end_ns: int, out: Stitched) -> None:
        del self._streams[sid]
        out.records.append(self._record(s, end_ns))
        out.requests += 1
        out.responses += 1

    def _record(self, s: _Stream, end_ns: int) -> Http2Record:
        path = s.path
        if not path or not s.method:
            self.counts["h2_requests_unknown_path"] += 1
        system = service = method = ""
        if s.content_type.startswith(GRPC_CONTENT_TYPE) and path.count("/") == 2:
            system = "grpc"
            service, _, method = path[1:].partition("/")
        return Http2Record(
            method=s.method, path=path, route=route_template(path) if path else "", status=s.status,
            request_bytes=s.req_bytes, response_bytes=s.resp_bytes, start_ns=s.start_ns,
            latency_ns=end_ns - s.start_ns, traceparent=s.traceparent, request_id=s.request_id,
            rpc_system=system, rpc_service=service, rpc_method=method, grpc_status=s.grpc_status,
        )  # fmt: skip

    # -- the tracker's other events -------------------------------------------------------------

    def gap(self, kind: MessageKind) -> None:
        """Bytes of one direction were lost: a block in assembly is gone, and what the lost frames
        inserted into that direction's table is unknown."""
        self._blocks[kind] = None
        self._tables[kind].lost_step()

    def expire(self, cutoff_ns: int) -> int:
        old = [sid for sid, s in self._streams.items() if s.start_ns <= cutoff_ns]
        for sid in old:
            del self._streams[sid]
        return len(old)

    def close(self) -> int:
        """The connection ended: streams still in flight are unanswered."""
        n = len(self._streams)
        self._streams.clear()
        return n


def _response_fields(fields: list[hp.Field | None]) -> tuple[int, int]:
    status = 0
    grpc_status = -1
    for fv in fields:
        if fv is None:
            continue
        name, value = fv
        if value is None:
            continue
        if name == b":status" and value.isdigit() and len(value) == 3:
            status = int(value)
        elif name == b"grpc-status" and value.isdigit() and len(value) <= 2:
            grpc_status = int(value)
    return status, grpc_status
