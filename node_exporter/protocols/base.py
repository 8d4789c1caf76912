"""The contract every L7 protocol parser follows, and the body readers they share.

Parsers are sans-I/O (Pixie's socket_tracer protocols, h11): they take bytes and return
values, never raise on bad input, never log and keep no state between calls. What a
connection remembers lives in ``ConnectionTracker`` (tracker.py), the one shared loop
that does timestamps, bounds, gaps and resync for every protocol.

A message on the wire is a *head* (what ``parse_request``/``parse_response`` decode) and
an optional *body* that is streamed through a ``BodyReader`` and counted, never stored:
bodies are usually larger than the buffer bound and we only need their size.
"""

from __future__ import annotations

import enum
import typing
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

# Parsers read from the tracker's bytearray directly; copying to bytes per call would
# double the work of every parse attempt.
Buffer = bytes | bytearray

F = TypeVar("F")


class ParseState(enum.Enum):
    NEEDS_MORE_DATA = "needs_more_data"  # a prefix of a valid head; nothing consumed
    INVALID = "invalid"  # not this protocol at this offset; the tracker resyncs
    IGNORED = "ignored"  # a well-formed message that yields no record (e.g. HTTP 100 Continue)
    EOS = "eos"  # the last message of this protocol on the connection (upgrade, read-until-close)
    SUCCESS = "success"


class MessageKind(enum.Enum):
    REQUEST = "request"
    RESPONSE = "response"

    # Members are singletons: hash them by identity. Enum's own hash is a Python-level method, and
    # HTTP/2 sessions key their per-direction tables by kind on every frame (1.8 M calls, ~2 % of
    # the agent's CPU under h2load, bench/RESULTS.md).
    __hash__ = object.__hash__


class Direction(enum.Enum):
    EGRESS = "egress"  # bytes this socket sent
    INGRESS = "ingress"  # bytes this socket received


class Role(enum.Enum):
    CLIENT = "client"  # connect()ed: requests go out
    SERVER = "server"  # accept()ed: requests come in


class BodyKind(enum.Enum):
    NONE = "none"
    LENGTH = "length"  # exactly Framing.length bytes follow the head
    CHUNKED = "chunked"  # HTTP/1.1 chunked transfer coding, trailers included
    UNTIL_CLOSE = "until_close"  # the body ends when the connection does


@dataclass(frozen=True, slots=True)
class Framing:
    """How the body after a head is delimited; decided by the parser, applied by the tracker."""

    kind: BodyKind = BodyKind.NONE
    length: int = 0


NO_BODY = Framing()


class ParseResult(NamedTuple):
    state: ParseState
    consumed: int  # bytes of the head; the body, if any, is read through body_reader()
    frame: Any  # the protocol's frozen head dataclass, or None


@dataclass(frozen=True, slots=True)
class Message(Generic[F]):
    """A complete message as the tracker saw it: head, first-byte time and wire size."""

    frame: F
    ts_ns: int  # timestamp of the chunk holding the message's first byte
    size: int  # bytes on the wire, head and body
    after_gap: bool = False  # first message after lost bytes: unknown messages may precede it


@dataclass(slots=True)
class Stitched:
    """What ``stitch`` made of the queues, and what it threw away (the tracker counts it)."""

    records: list[Any] = field(default_factory=list)
    unanswered_requests: int = 0  # requests that can no longer get a response
    orphan_responses: int = 0  # responses whose request was never seen
    requests: int = 0  # a Session's complete requests (stitch leaves these 0: the tracker counts)
    responses: int = 0


def fifo_pair(
    requests: deque[Message[Any]], responses: deque[Message[Any]], out: Stitched
) -> tuple[Message[Any], Message[Any]] | None:
    """The next in-order (request, response) pair, both taken off their queues (neither may be
    empty), for protocols answered in order (keep-alive, pipelining); None when the head response
    is older than the oldest request: it answered one never seen (taken, counted an orphan).
    After a gap in the response stream an unknown number of responses is lost, so the first one
    after it pairs with the latest request before it (the earlier ones counted unanswered), as
    Pixie does."""
    resp = responses[0]
    if resp.after_gap:
        while len(requests) > 1 and requests[1].ts_ns <= resp.ts_ns:
            requests.popleft()
            out.unanswered_requests += 1
    if requests[0].ts_ns > resp.ts_ns:
        responses.popleft()
        out.orphan_responses += 1
        return None
    return requests.popleft(), responses.popleft()


class Session(typing.Protocol):
    """Per-connection state of a multiplexed protocol (HTTP/2: HPACK tables, streams). A protocol
    that has one offers ``new_session(role)``; the tracker then hands it every complete message
    (a frame) in arrival order instead of queueing and stitching, and tells it of lost bytes."""

    def message(self, kind: MessageKind, msg: Message[Any]) -> Stitched: ...

    def gap(self, kind: MessageKind) -> None: ...

    def expire(self, cutoff_ns: int) -> int:
        """Forget requests that started at or before ``cutoff_ns``; how many."""
        ...

    def close(self) -> int:
        """The connection ended; how many requests are left unanswered."""
        ...

    def pending(self) -> int: ...

    def counters(self) -> dict[str, int]: ...


class BodyReader(typing.Protocol):
    """Streams over one body. Stateful, so one per message, owned by the tracker."""

    def read(self, buf: Buffer) -> tuple[ParseState, int]:
        """Consume body bytes from the front of ``buf``.

        (SUCCESS, n): the body ended after n bytes. (NEEDS_MORE_DATA, n): n bytes consumed,
        the body goes on. (INVALID, n): the framing is broken.
        """
        ...

    def skip_gap(self, nbytes: int | None) -> bool:
        """Account for ``nbytes`` lost in capture (None: unknown); True if framing survives."""
        ...

    def ends_at_close(self) -> bool:
        """True if connection close is a legitimate end of this body."""
        ...


class LengthReader:
    """A body of known length (Content-Length, the rest of a length-prefixed DNS message)."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        self.remaining = length

    def read(self, buf: Buffer) -> tuple[ParseState, int]:
        take = min(self.remaining, len(buf))
        self.remaining -= take
        return (ParseState.SUCCESS if self.remaining == 0 else ParseState.NEEDS_MORE_DATA), take

    def skip_gap(self, nbytes: int | None) -> bool:
        # Lost body bytes cost nothing as long as we know how many: the next head is
        # still exactly `remaining` bytes away.
        if nbytes is None or nbytes > self.remaining:
            return False
        self.remaining -= nbytes
        return True

    def ends_at_close(self) -> bool:
        return False


class UntilCloseReader:
    """A body that runs to connection close (HTTP/1.0 style responses without a length)."""

    __slots__ = ()

    def read(self, buf: Buffer) -> tuple[ParseState, int]:
        return ParseState.NEEDS_MORE_DATA, len(buf)

    def skip_gap(self, nbytes: int | None) -> bool:
        return True

    def ends_at_close(self) -> bool:
        return True


def generic_reader(framing: Framing) -> BodyReader | None:
    """Readers for the framings that need no protocol knowledge (all but CHUNKED)."""
    if framing.kind is BodyKind.LENGTH and framing.length > 0:
        return LengthReader(framing.length)
    if framing.kind is BodyKind.UNTIL_CLOSE:
        return UntilCloseReader()
    return None


class Protocol(typing.Protocol):
    """One L7 protocol. Implementations are stateless; register one instance in PROTOCOLS."""

    @property
    def name(self) -> str: ...

    @property
    def datagram(self) -> bool:
        """True if every chunk is one whole message (UDP): no stream buffer, no resync."""
        ...

    @property
    def default_timeout_ns(self) -> int:
        """How long a request may wait for its response before ``expire`` gives up on it."""
        ...

    def find_frame_boundary(self, buf: Buffer, start: int, kind: MessageKind) -> int:
        """First offset >= start where a head of ``kind`` may begin, len(buf) if none.

        A truncated candidate at the end of ``buf`` counts, so resync never drops the
        first bytes of a real head that happens to straddle two chunks.
        """
        ...

    def parse_request(self, buf: Buffer) -> ParseResult: ...

    def parse_response(self, buf: Buffer, request_hint: Any | None) -> ParseResult:
        """``request_hint`` is the head of the request this response most likely answers."""
        ...

    def body_reader(self, frame: Any) -> BodyReader | None: ...

    def stitch(self, requests: deque[Message[Any]], responses: deque[Message[Any]]) -> Stitched:
        """Pair requests with responses, consuming both deques in place.

        Whatever cannot be paired yet stays queued; whatever can never be paired is
        removed and counted in the result.
        """
        ...

    def timeout_record(self, request: Message[Any], now_ns: int) -> Any | None:
        """The record for a request that got no response in time, or None for none."""
        ...
