"""The replicas' side channel for the trace join: ``kscope.v1.TraceJoin/ExchangeTraces`` on
``grpc.aio`` (proto/kscope/v1/tracejoin.proto). ``PeerServer`` answers as the owner of its hops;
``GrpcTransport`` calls the other replicas (one channel each, a short deadline: a peer down costs a
counted failure per exchange and pairwise ids for its hops, never a stalled processor).

Plaintext on purpose: only 8-byte hop keys and trace ids cross, between replicas of one Deployment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeAlias

import grpc
import grpc.aio
import structlog

from cluster_processor.tracejoin.join import FALLBACK, PENDING, REAL, PeerError, Proposal, TraceJoin
from kscope.v1 import tracejoin_pb2 as pb
from kscope.v1 import tracejoin_pb2_grpc as pb_grpc

log = structlog.get_logger("kscope.tracejoin")
Context: TypeAlias = "grpc.aio.ServicerContext[pb.ExchangeTracesRequest, pb.ExchangeTracesResponse]"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # max_per_request entries of ~30 bytes fit many times over


class PeerListenError(Exception):
    """The peer address cannot be served (in use, unparsable)."""


class _Servicer(pb_grpc.TraceJoinServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, join: TraceJoin, clock: Callable[[], int]) -> None:
        self._join, self._clock = join, clock

    async def ExchangeTraces(self, request: pb.ExchangeTracesRequest, context: Context) -> pb.ExchangeTracesResponse:
        propose = [(h.hop, h.trace_id, PENDING if h.pending else FALLBACK if h.fallback else REAL)
                   for h in request.propose]  # fmt: skip
        known, invalid = self._join.serve(propose, list(request.lookup), self._clock())
        return pb.ExchangeTracesResponse(known=[pb.HopTrace(hop=k, trace_id=t, pending=not t) for k, t in known],
                                         invalid=invalid)  # fmt: skip


class PeerServer:
    def __init__(self, join: TraceJoin, listen: str, clock: Callable[[], int] = time.time_ns) -> None:
        self._join, self._listen, self._clock = join, listen, clock
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        server = grpc.aio.server(options=opts)
        pb_grpc.add_TraceJoinServicer_to_server(_Servicer(self._join, self._clock), server)
        try:
            self.port = server.add_insecure_port(self._listen)
        except RuntimeError as exc:
            raise PeerListenError(f"cannot serve the trace join on {self._listen}: {exc}") from exc
        await server.start()
        self._server = server
        return self.port

    async def stop(self, grace_s: float = 0.5) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)


class GrpcTransport:
    """``join.Transport`` over gRPC: one channel per peer address, made on first use."""

    def __init__(self, me: str, timeout_s: float = 2.0) -> None:
        self._me, self._timeout = me, timeout_s
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.TraceJoinStub]] = {}

    async def exchange(
        self, peer: str, propose: Sequence[Proposal], lookup: Sequence[bytes]
    ) -> list[tuple[bytes, bytes]]:
        stub = self._stubs.get(peer)
        if stub is None:
            ch = grpc.aio.insecure_channel(peer, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
            stub = self._stubs[peer] = (ch, pb_grpc.TraceJoinStub(ch))
        req = pb.ExchangeTracesRequest(
            sender=self._me,
            propose=[pb.HopTrace(hop=k, trace_id=t, pending=kind == PENDING, fallback=kind == FALLBACK)
                     for k, t, kind in propose],
            lookup=lookup,
        )  # fmt: skip
        try:
            resp = await stub[1].ExchangeTraces(req, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            log.debug("trace_peer_failed", peer=peer, code=exc.code().name)
            raise PeerError(f"{peer}: {exc.code().name}") from exc
        return [(h.hop, b"" if h.pending else h.trace_id) for h in resp.known]

    def forget(self, keep: Sequence[str]) -> list[grpc.aio.Channel]:
        """Drop the channels of peers no longer listed; returns them for the caller to close."""
        gone = [p for p in self._stubs if p not in keep]
        return [self._stubs.pop(p)[0] for p in gone]

    async def close(self) -> None:
        for ch, _ in self._stubs.values():
            await ch.close()
        self._stubs = {}
