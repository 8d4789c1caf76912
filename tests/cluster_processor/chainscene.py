"""A three-hop chain as the agents report it (issue 18): loadgen -> productpage -> reviews -> ratings,
each service on its own node. Every hop is one HTTP/1 request whose two records carry the same TCP
sequence numbers; the client call a service makes inside the request it serves carries that server
record's facts in ``L7Request.parent`` (what the agent infers for thread-per-request servers).

``Chain.expected`` is the one tree every backend must see: six spans, one trace, each parent exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cluster_processor.otlp.links import LINK_WINDOW_NS, linked_ids
from cluster_processor.otlp.model import parse_traceparent
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor.test_aggregate import MS, l7

ROLES = ("loadgen", "productpage", "reviews", "ratings")  # each on its own node


def hour_start(t_ns: int) -> int:
    """A start well inside one hour: both ends of every hop in the same time bound."""
    return t_ns - t_ns % LINK_WINDOW_NS + 60_000 * MS


@dataclass(frozen=True)
class Chain:
    name: str  # prefixes its node names
    seqs: tuple[tuple[int, int], ...]  # per hop: (tcp_request_seq, tcp_response_seq)
    t0: int
    traceparent: str = ""  # loadgen's own header on hop 1 (an instrumented caller), or none

    def node(self, role: str) -> str:
        return f"{self.name}-{role}"

    def start(self, hop: int, side: int) -> int:
        return self.t0 + hop * 10 * MS + (MS if side == pb.ROLE_SERVER else 0)

    def _record(self, hop: int, side: int) -> pb.L7Request:
        req, resp = self.seqs[hop]
        http: dict[str, Any] = {"tcp_seqs_known": True, "tcp_request_seq": req, "tcp_response_seq": resp}
        if hop == 0 and self.traceparent:
            http["traceparent"] = self.traceparent
        # the path names the chain and the hop, so an exported span says where it belongs
        info = pb.HttpInfo(method="GET", path=f"/{ROLES[hop + 1]}/{self.name}", route=f"/{ROLES[hop + 1]}/{{chain}}",
                           status_code=200, **http)  # fmt: skip
        q = l7(side, http=info, start_time_unix_nano=self.start(hop, side), latency_ns=(8 - 2 * hop) * MS)
        if side == pb.ROLE_CLIENT and hop > 0:  # made inside the server request of the hop before
            p_req, p_resp = self.seqs[hop - 1]
            q.parent.CopyFrom(pb.CausalParent(tcp_request_seq=p_req, tcp_response_seq=p_resp,
                                              start_time_unix_nano=self.start(hop - 1, pb.ROLE_SERVER)))  # fmt: skip
        return q

    def records(self) -> dict[str, list[pb.L7Request]]:
        """Per node: its records (a service's server record and the call it made inside it)."""
        out: dict[str, list[pb.L7Request]] = {self.node(r): [] for r in ROLES}
        for hop in range(3):
            out[self.node(ROLES[hop])].append(self._record(hop, pb.ROLE_CLIENT))
            out[self.node(ROLES[hop + 1])].append(self._record(hop, pb.ROLE_SERVER))
        return out

    def batches(self, order: Iterable[str] = ROLES) -> list[pb.FlowBatch]:
        recs = self.records()
        return [pb.FlowBatch(schema_version=1, node_name=self.node(r), time_unix_nano=self.t0, l7=recs[self.node(r)])
                for r in order]  # fmt: skip

    def ids(self, hop: int) -> tuple[bytes, bytes, bytes]:
        """(pairwise trace, client span id, server span id) of a hop, from its client's start."""
        return linked_ids(*self.seqs[hop], self.start(hop, pb.ROLE_CLIENT))

    def server_ids(self, hop: int) -> tuple[bytes, bytes, bytes]:
        return linked_ids(*self.seqs[hop], self.start(hop, pb.ROLE_SERVER))

    @property
    def trace_id(self) -> bytes:
        if self.traceparent:
            parsed = parse_traceparent(self.traceparent)
            assert parsed is not None
            return parsed[0]
        return self.ids(0)[0]

    def expected(self) -> dict[tuple[str, int], tuple[bytes, bytes]]:
        """(node, OTLP span kind) -> (span id, parent span id) of the six spans; all in ``trace_id``.
        With loadgen's traceparent, hop 1's two spans are children of the header's span (their span
        ids are kscope's own: random for the client, the derivable server id for the server)."""
        client_kind, server_kind = 3, 2
        out: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        header = parse_traceparent(self.traceparent) if self.traceparent else None
        for hop in range(3):
            _, c, _ = self.ids(hop)
            _, _, s = self.server_ids(hop)
            client_parent = self.server_ids(hop - 1)[2] if hop else (header[1] if header else b"")
            out[self.node(ROLES[hop]), client_kind] = (b"" if header and hop == 0 else c, client_parent)
            out[self.node(ROLES[hop + 1]), server_kind] = (s, header[1] if header and hop == 0 else c)
        return out


def chains(n: int, t0: int, base: int = 0, traceparent: str = "") -> list[Chain]:
    out = []
    for k in range(base, base + n):
        seqs = tuple((k * 1000 + h * 7 + 1, 0xFFFF0000 + k * 100 + h) for h in range(3))
        out.append(Chain(f"c{k}", seqs, t0, traceparent))
    return out


def replica_flags(addrs: tuple[str, ...], i: int, wait_s: float = 3.0, exchange_s: float = 0.05) -> list[str]:
    """kscope-processor's trace-join flags for replica ``i`` of ``addrs`` (each replica's own
    --trace-listen address, all listed on every one): what a test starting replicas passes."""
    return ["--trace-listen", addrs[i], "--trace-self", addrs[i], "--trace-peers", ",".join(addrs),
            "--trace-wait", str(wait_s), "--trace-exchange", str(exchange_s)]  # fmt: skip
