"""The one loop every protocol shares: per-connection buffers, gaps, resync, bounds, pairing.

The kernel hands us per-connection, per-direction chunks of bytes with a timestamp and
(ideally) a stream offset. A ``ConnectionTracker`` turns them into request/response
records through a registered ``Protocol``. Everything it holds is bounded, and every
byte or message it gives up on is counted in a plain int attribute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from node_exporter.protocols.base import (
    BodyReader,
    Direction,
    Message,
    MessageKind,
    ParseResult,
    ParseState,
    Protocol,
    Role,
    Session,
    Stitched,
)

COUNTERS: Final = (
    "requests_parsed",  # complete request messages seen
    "responses_parsed",  # complete response messages seen
    "records",  # records emitted (pairs and timeouts)
    "invalid_frames",  # parse or body framing said INVALID; the tracker resynced
    "ignored_messages",  # well-formed messages that make no record (HTTP 1xx, DNS NOTIFY)
    "buffer_overflows",  # a direction's buffer passed max_buffer and was dropped
    "gaps",  # capture lost bytes (seq jump or gap=True)
    "gap_bytes",  # bytes lost, where the size was known
    "truncations",  # calls captured only in part (capture bound, a vector call's first buffer): not gaps
    "truncated_bytes",  # the bytes those calls moved beyond what was captured
    "discarded_bytes",  # bytes dropped unparsed: resync skips, gaps, overflows, close
    "duplicate_bytes",  # bytes at or below the stream offset already seen
    "aborted_messages",  # messages cut short by a gap, overflow, broken body or close
    "evicted_requests",  # unmatched requests dropped by the max_pending bound
    "evicted_responses",  # unmatched responses dropped by the max_pending bound
    "unanswered_requests",  # requests stitch or close decided will never be answered
    "orphan_responses",  # responses whose request was never seen
    "expired_requests",  # requests expire() gave up on (DNS turns them into timeout records)
    "unparsed_bytes",  # bytes after the protocol ended (upgrade, tunnel) or after close
    "state_evictions",  # per-connection protocol state dropped by its bound (prepared statements)
    "state_misses",  # state looked up and not found (a statement prepared before us, or evicted)
    "cut_responses",  # responses whose end was lost (capture bound, gap): recorded from what was captured
)


@dataclass(frozen=True, slots=True)
class TrackerLimits:
    max_buffer: int = 64 * 1024  # unparsed bytes held per direction
    max_pending: int = 256  # unmatched messages held per queue
    timeout_ns: int | None = None  # request timeout for expire(); None: the protocol's default


class _Pending:
    """A message whose head is parsed and whose body is still being read."""

    __slots__ = ("after_gap", "emit", "frame", "reader", "size", "ts_ns")

    def __init__(self, frame: Any, ts_ns: int, size: int, reader: BodyReader | None, emit: bool, gap: bool) -> None:
        self.frame = frame
        self.ts_ns = ts_ns
        self.size = size
        self.reader = reader
        self.emit = emit
        self.after_gap = gap


class _Stream:
    """One direction of the connection."""

    __slots__ = ("after_gap", "base", "buf", "chunks", "kind", "next_seq", "pending", "resync")

    def __init__(self, kind: MessageKind) -> None:
        self.kind = kind
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0], so chunk timestamps can be found again
        # (stream offset, ts_ns) of each chunk still (partly) in buf; a frame's time is
        # the time of the chunk holding its first byte.
        self.chunks: deque[tuple[int, int]] = deque()
        self.next_seq: int | None = None
        self.pending: _Pending | None = None
        self.resync = False  # after lost bytes: skip to a frame boundary before parsing
        self.after_gap = False  # flag the next message: its predecessors may be lost


class ConnectionTracker:
    """Per-connection parsing state for one protocol; feed it chunks, get records back."""

    def __init__(self, protocol: Protocol, role: Role, limits: TrackerLimits | None = None) -> None:
        # A protocol with per-connection state (prepared statements) gives each connection its own.
        fork = getattr(protocol, "for_connection", None)
        self.protocol: Protocol = fork() if fork is not None else protocol
        self.role = role
        self.limits = limits or TrackerLimits()
        self.closed = False
        self.eos = False  # the protocol said the connection carries nothing more we parse
        request_dir = Direction.EGRESS if role is Role.CLIENT else Direction.INGRESS
        self._streams = {
            d: _Stream(MessageKind.REQUEST if d is request_dir else MessageKind.RESPONSE) for d in Direction
        }
        self._requests: deque[Message[Any]] = deque()
        self._responses: deque[Message[Any]] = deque()
        new_session = getattr(protocol, "new_session", None)  # multiplexed protocols (HTTP/2) only
        self._session: Session | None = new_session(role) if new_session is not None else None
        # a session protocol may parse all whole frames of a buffer in one loop (the HTTP/2 frame walk's)
        frames_pump = getattr(protocol, "frames_pump", None) if self._session is not None else None
        self._frames_pump: Callable[..., tuple[int, Stitched, bool]] | None = (
            frames_pump() if frames_pump is not None else None
        )
        for name in COUNTERS:
            setattr(self, name, 0)

    # Counters, declared for type checkers; __init__ zeroes them all from COUNTERS.
    requests_parsed: int
    responses_parsed: int
    records: int
    invalid_frames: int
    ignored_messages: int
    buffer_overflows: int
    gaps: int
    gap_bytes: int
    truncations: int
    truncated_bytes: int
    discarded_bytes: int
    duplicate_bytes: int
    aborted_messages: int
    evicted_requests: int
    evicted_responses: int
    unanswered_requests: int
    orphan_responses: int
    expired_requests: int
    unparsed_bytes: int
    state_evictions: int
    state_misses: int
    cut_responses: int

    def counters(self) -> dict[str, int]:
        """COUNTERS (the protocol's per-connection state counters added in), and a session's own (e.g.
        h2_*) after them."""
        out = {name: getattr(self, name) for name in COUNTERS}
        state = getattr(self.protocol, "state_counters", None)
        if state is not None:
            for name, value in state().items():
                out[name] += value
        if self._session is not None:
            out.update(self._session.counters())
        return out

    def buffered_bytes(self, direction: Direction) -> int:
        return len(self._streams[direction].buf)

    def pending_requests(self) -> int:
        return len(self._requests) if self._session is None else self._session.pending()

    def pending_responses(self) -> int:
        return len(self._responses)

    def feed(
        self,
        direction: Direction,
        data: bytes,
        ts_ns: int,
        seq: int | None = None,
        *,
        gap: bool = False,
        length: int | None = None,
    ) -> list[Any]:
        """Add one captured chunk. ``seq`` is the stream offset of data[0] in this direction;
        a jump means bytes were lost, as does ``gap=True`` (lost bytes of unknown size).
        ``length``: what the call moved when only its head (``data``) was captured. The stream moves
        on at once (a body of known length completes now, not at the next chunk), and the tail is a
        truncation, skipped like lost bytes but not counted as a gap."""
        if self.closed:
            self.unparsed_bytes += len(data)
            return []
        s = self._streams[direction]
        if self.protocol.datagram:
            return self._feed_datagram(s, data, ts_ns)
        if gap:
            self._gap(s, None)
        if seq is not None:
            if s.next_seq is not None and seq > s.next_seq:
                self._gap(s, seq - s.next_seq)
            elif s.next_seq is not None and seq < s.next_seq:
                # Already seen (a re-read or retransmitted capture): keep only the new tail.
                dup = min(s.next_seq - seq, len(data))
                self.duplicate_bytes += dup
                data, seq = data[dup:], seq + dup
            s.next_seq = seq + len(data)
        elif s.next_seq is not None:
            s.next_seq += len(data)
        if data:
            s.chunks.append((s.base + len(s.buf), ts_ns))
            s.buf += data
        out = self._pump(s)
        if length is not None and seq is not None and s.next_seq is not None and seq + length > s.next_seq:
            cut = seq + length - s.next_seq
            s.next_seq += cut
            out += self._gap(s, cut, truncated=True)
            out += self._pump(s)
        if len(s.buf) > self.limits.max_buffer:
            self._drop(s, overflow=True)
        return out

    def expire(self, now_ns: int) -> list[Any]:
        """Give up on requests older than the timeout; returns the protocol's timeout records."""
        timeout = self.limits.timeout_ns if self.limits.timeout_ns is not None else self.protocol.default_timeout_ns
        cutoff = now_ns - timeout
        if self._session is not None:
            self.expired_requests += self._session.expire(cutoff)
            return []
        out: list[Any] = []
        keep: deque[Message[Any]] = deque()
        for msg in self._requests:
            if msg.ts_ns > cutoff:
                keep.append(msg)
                continue
            self.expired_requests += 1
            record = self.protocol.timeout_record(msg, now_ns)
            if record is not None:
                out.append(record)
        self._requests = keep
        fresh = deque(m for m in self._responses if m.ts_ns > cutoff)
        self.orphan_responses += len(self._responses) - len(fresh)
        self._responses = fresh
        self.records += len(out)
        return out

    def close(self) -> list[Any]:
        """The connection ended: finish bodies that end at close, count what is left."""
        out: list[Any] = []
        for s in self._streams.values():
            p = s.pending
            if p is not None and p.reader is not None and p.reader.ends_at_close() and not s.buf:
                out += self._complete(s)
            elif p is not None:
                self.aborted_messages += 1
                s.pending = None
            self.discarded_bytes += len(s.buf)
            self._consume(s, len(s.buf))
        self.unanswered_requests += len(self._requests)
        self.orphan_responses += len(self._responses)
        if self._session is not None:
            self.unanswered_requests += self._session.close()
        self._requests.clear()
        self._responses.clear()
        self.closed = True
        return out

    # -- the loop -------------------------------------------------------------------------

    def _pump(self, s: _Stream) -> list[Any]:
        out: list[Any] = []
        while True:
            p = s.pending
            if p is not None:
                if p.reader is None:
                    out += self._complete(s)
                    continue
                state, n = p.reader.read(s.buf)
                self._consume(s, n)
                p.size += n
                if state is ParseState.NEEDS_MORE_DATA:
                    break
                if state is ParseState.SUCCESS:
                    out += self._complete(s)
                    continue
                self.invalid_frames += 1
                self.aborted_messages += 1
                s.pending = None
                s.resync = True
                continue
            if not s.buf:
                break
            if self.eos:
                self.unparsed_bytes += len(s.buf)
                self._consume(s, len(s.buf))
                break
            if s.resync:
                self._skip(s, self.protocol.find_frame_boundary(s.buf, 0, s.kind))
                if not s.buf:
                    break
                s.resync = False
            if self._frames_pump is not None and self._session is not None:
                consumed, stitched, invalid = self._frames_pump(self._session, s.kind, s.buf, s.chunks, s.base)
                self._consume(s, consumed)
                out += self._count(stitched)
                if not invalid:
                    break
                self.invalid_frames += 1
                self._session.gap(s.kind)
                self._skip(s, max(1, self.protocol.find_frame_boundary(s.buf, 1, s.kind)))
                continue
            result = self._parse(s)
            if result.state is ParseState.NEEDS_MORE_DATA:
                break
            if result.state is ParseState.INVALID or result.consumed <= 0:
                # A parser that consumes nothing must not spin the loop: treat it as INVALID.
                self.invalid_frames += 1
                if self._session is not None:
                    self._session.gap(s.kind)  # what the skipped bytes meant is lost
                self._skip(s, max(1, self.protocol.find_frame_boundary(s.buf, 1, s.kind)))
                continue
            self._start_message(s, result)
        return out

    def _parse(self, s: _Stream) -> ParseResult:
        if s.kind is MessageKind.REQUEST:
            return self.protocol.parse_request(s.buf)
        return self.protocol.parse_response(s.buf, self._request_hint())

    def _start_message(self, s: _Stream, result: ParseResult) -> None:
        ts = self._front_ts(s)
        consumed = min(result.consumed, len(s.buf))
        self._consume(s, consumed)
        if result.state is ParseState.EOS:
            self.eos = True
        if result.state is ParseState.IGNORED:
            self.ignored_messages += 1
        if result.frame is None:
            return
        reader = self.protocol.body_reader(result.frame)
        emit = result.state is not ParseState.IGNORED
        s.pending = _Pending(result.frame, ts, consumed, reader, emit, s.after_gap)
        if emit:
            s.after_gap = False

    def _complete(self, s: _Stream) -> list[Any]:
        p = s.pending
        s.pending = None
        if p is None or not p.emit:
            return []
        msg = Message(p.frame, p.ts_ns, p.size, p.after_gap)
        if self._session is not None:
            return self._count(self._session.message(s.kind, msg))
        if s.kind is MessageKind.REQUEST:
            self.requests_parsed += 1
            self._requests.append(msg)
        else:
            self.responses_parsed += 1
            self._responses.append(msg)
        return self._stitch()

    def _stitch(self) -> list[Any]:
        result = self._count(self.protocol.stitch(self._requests, self._responses))
        # Bound after stitching, so a burst that pairs up is never evicted needlessly.
        while len(self._requests) > self.limits.max_pending:
            self._requests.popleft()
            self.evicted_requests += 1
        while len(self._responses) > self.limits.max_pending:
            self._responses.popleft()
            self.evicted_responses += 1
        return result

    def _count(self, result: Stitched) -> list[Any]:
        self.requests_parsed += result.requests
        self.responses_parsed += result.responses
        self.unanswered_requests += result.unanswered_requests
        self.orphan_responses += result.orphan_responses
        self.records += len(result.records)
        return result.records

    def _request_hint(self) -> Any | None:
        # Responses answer requests in order, so the next response most likely answers
        # the first request not yet matched by a queued response.
        idx = len(self._responses)
        if idx < len(self._requests):
            return self._requests[idx].frame
        req_stream = next(s for s in self._streams.values() if s.kind is MessageKind.REQUEST)
        p = req_stream.pending  # e.g. a request whose body waits for "100 Continue"
        if idx == len(self._requests) and p is not None and p.emit:
            return p.frame
        return None

    def _feed_datagram(self, s: _Stream, data: bytes, ts_ns: int) -> list[Any]:
        result = (
            self.protocol.parse_request(data)
            if s.kind is MessageKind.REQUEST
            else self.protocol.parse_response(data, self._request_hint())
        )
        if result.state is ParseState.IGNORED:
            self.ignored_messages += 1
            return []
        if result.state in (ParseState.INVALID, ParseState.NEEDS_MORE_DATA) or result.frame is None:
            # A datagram is whole or lost: a short one is as useless as a malformed one.
            self.invalid_frames += 1
            return []
        s.pending = _Pending(result.frame, ts_ns, len(data), None, True, False)
        return self._complete(s)

    # -- buffer bookkeeping ---------------------------------------------------------------

    def _gap(self, s: _Stream, nbytes: int | None, *, truncated: bool = False) -> list[Any]:
        """Bytes missing from the stream: a body of known length skips them, a head the capture bound cut
        may still be read (``_cut_head``), else the parser resyncs. Returns what the cut head completed."""
        if truncated:
            self.truncations += 1
            self.truncated_bytes += nbytes or 0
        else:
            self.gaps += 1
            self.gap_bytes += nbytes or 0
        p = s.pending
        if p is not None and p.reader is not None and not s.buf and p.reader.skip_gap(nbytes):
            p.size += nbytes or 0  # lost body bytes still count towards the message size
            return []
        if truncated and p is None and s.buf:
            done = self._cut_head(s, nbytes or 0)
            if done is not None:
                return done
        self._drop(s, overflow=False)
        return []

    def _cut_head(self, s: _Stream, nbytes: int) -> list[Any] | None:
        """The message whose head the capture bound cut, if the protocol can tell it from the captured
        part (a Redis reply line longer than the capture: -DENIED's ~1 KiB; an HTTP/1 response head with
        more fields than it; a PostgreSQL ErrorResponse with a long message), with the cut bytes in its
        size; None: it cannot. A message of known length whose rest is the cut goes on (the pump ends
        it); else it ends here and what else the cut held is lost (dropped: the next message after a gap)."""
        cut_head = getattr(self.protocol, "cut_head", None)
        if cut_head is None:
            return None
        hint = self._request_hint() if s.kind is MessageKind.RESPONSE else None
        result: ParseResult | None = cut_head(s.buf, s.kind, hint)
        if result is None:
            return None
        ts, size = self._front_ts(s), len(s.buf)
        self._consume(s, len(s.buf))
        emit = result.state is not ParseState.IGNORED
        self.ignored_messages += not emit
        reader = self.protocol.body_reader(result.frame)
        p = s.pending = _Pending(result.frame, ts, size + nbytes, reader, emit, s.after_gap)
        if reader is not None and reader.skip_gap(nbytes):
            return []
        # a length-framed message's protocol counts its cut response itself (PostgreSQL's CutResponses)
        self.cut_responses += reader is None and s.kind is MessageKind.RESPONSE
        p.reader = None
        out = self._complete(s)
        self._drop(s, overflow=False)
        return out

    def _drop(self, s: _Stream, *, overflow: bool) -> None:
        """Throw away partial state; parsing restarts at the next frame boundary."""
        if self._session is not None:
            self._session.gap(s.kind)
        if overflow:
            self.buffer_overflows += 1
        if s.pending is not None:
            self.aborted_messages += 1
            s.pending = None
        self.discarded_bytes += len(s.buf)
        self._consume(s, len(s.buf))
        s.resync = True
        s.after_gap = True
        lost = getattr(self.protocol, "lost_bytes", None)  # stateful protocols re-align their state
        if lost is not None:
            lost(s.kind)

    def _skip(self, s: _Stream, n: int) -> None:
        self.discarded_bytes += n
        self._consume(s, n)

    def _consume(self, s: _Stream, n: int) -> None:
        if n <= 0:
            return
        del s.buf[:n]
        s.base += n
        if not s.buf:
            s.chunks.clear()
            return
        while len(s.chunks) > 1 and s.chunks[1][0] <= s.base:
            s.chunks.popleft()

    @staticmethod
    def _front_ts(s: _Stream) -> int:
        return s.chunks[0][1] if s.chunks else 0
