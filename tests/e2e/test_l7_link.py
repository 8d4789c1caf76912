"""Both ends of one HTTP/1 request carry the same TCP sequence numbers (docs/traces.md, item 1).

A pod calls another through a Service VIP that the node DNATs (``NatTopology``): the client's
socket names the VIP, the server's the pod, yet both records of each request carry the same
(request, response) sequence numbers, and no two requests share them. A keep-alive connection
older than the probe pairs too: its numbers advance by exactly the bytes of each exchange.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from node_exporter.l7.pick import link_mix, link_pick
from node_exporter.l7.pipeline import L7Event
from node_exporter.protocols import Role
from node_exporter.protocols.http1 import HttpSummaryRecord
from tests.e2e.l7trace import L7Trace, count_at_least, http, l7peer, require
from tests.e2e.nattopo import BACKEND_PORT, CPOD_IP, SPOD_IP, VIP, VIP_PORT, NatTopology
from tests.e2e.test_nat import nat_topo

pytestmark = pytest.mark.bpf
U32 = 1 << 32
__all__ = ["nat_topo"]  # the fixture


def test_both_ends_share_tcp_seqs_through_dnat(nat_topo: NatTopology) -> None:
    topo = nat_topo
    topo.dnat()
    server = l7peer(topo, topo.srv, "http-server", "--bind", SPOD_IP, "--port", str(BACKEND_PORT), "--comm", "ks-srv")
    server.expect("listening")
    # one keep-alive connection opened (and used once) before the probe: its numbers are
    # read from the socket, not counted from what the probe saw
    cli = l7peer(topo, topo.cli, "http-client", "--to", VIP, "--port", str(VIP_PORT), "--comm", "ks-cli")
    cli.expect("connected")
    require(cli.call("get /before", "done")["statuses"] == {"200": 1}, "first request")
    trace = L7Trace((topo.cli, topo.srv), tls=False)
    try:
        paths = [f"/r/{i}" for i in range(6)]
        sizes = []
        for p in paths:
            got = cli.call(f"get {p}", "done")
            require(got["statuses"] == {"200": 1}, p)
            sizes.append(got)
        # new connections too: each starts from its own random initial sequence numbers
        for i in range(4):
            topo.cli.run("curl", "-sS", "-o", "/dev/null", f"http://{VIP}:{VIP_PORT}/new/{i}")
        trace.until(count_at_least(2 * (len(paths) + 4), http), 10)
        client, server_side = http(trace.events, side=Role.CLIENT), http(trace.events, side=Role.SERVER)
    finally:
        trace.close()

    assert len(client) == len(server_side) == len(paths) + 4
    # the client's socket names the VIP, the server's the pod: no address both ends share
    assert {(e.conn.remote_ip, e.conn.remote_port) for e in client} == {(VIP, VIP_PORT)}
    assert {(e.conn.local_ip, e.conn.local_port) for e in server_side} == {(SPOD_IP, BACKEND_PORT)}
    assert {e.conn.remote_ip for e in server_side} == {CPOD_IP}
    by_path_c = {e.record.path: e.record.tcp_seqs for e in client}
    by_path_s = {e.record.path: e.record.tcp_seqs for e in server_side}
    assert None not in by_path_c.values(), client
    assert by_path_c == by_path_s
    assert len(set(by_path_c.values())) == len(by_path_c), "two requests share their numbers"
    # on the keep-alive connection each exchange moves both numbers by exactly its bytes
    keep = [s for s in (by_path_c[p] for p in paths) if s is not None]
    for (a, b), got in zip(pairwise(keep), sizes, strict=False):
        assert ((b[0] - a[0]) % U32, (b[1] - a[1]) % U32) == (got["request_bytes"], got["response_bytes"][0])


def test_both_ends_pick_the_same_requests(nat_topo: NatTopology) -> None:
    """Item 5: with ``trace_ratio`` the requests that become records are picked by their TCP sequence
    numbers, so two collectors that share nothing (each its own BPF object and sampler, as two
    nodes' agents) pick exactly the same requests through the DNAT; the rest are summed at both
    ends, and every request is counted once per end. Without the ratio each end would pick alone."""
    topo = nat_topo
    topo.dnat()
    server = l7peer(topo, topo.srv, "http-server", "--bind", SPOD_IP, "--port", str(BACKEND_PORT), "--comm", "ks-srv")
    server.expect("listening")
    keepalive, fresh = 400, 60
    trace = L7Trace((topo.cli, topo.srv), tls=False, trace_ratio=0.25)
    trace.pipe.link_pick = link_pick(0.25)  # as the agent's pipeline has it
    try:
        # one keep-alive connection (curl's URL range reuses it) and fresh connections
        topo.cli.run("curl", "-sS", "-o", "/dev/null", f"http://{VIP}:{VIP_PORT}/ka/[1-{keepalive}]")
        for i in range(fresh):
            topo.cli.run("curl", "-sS", "-o", "/dev/null", f"http://{VIP}:{VIP_PORT}/new/{i}")
        total = keepalive + fresh

        def counted(events: list[L7Event], side: Role) -> int:
            return sum(e.record.summary.count if isinstance(e.record, HttpSummaryRecord) else 1
                       for e in http(events, side=side))  # fmt: skip

        trace.until(lambda ev: counted(ev, Role.CLIENT) >= total and counted(ev, Role.SERVER) >= total, 15)
        stats = trace.kernel_stats()
    finally:
        trace.close()
    picked = {side: {e.record.tcp_seqs for e in http(trace.events, side=side)
                     if not isinstance(e.record, HttpSummaryRecord)}
              for side in (Role.CLIENT, Role.SERVER)}  # fmt: skip
    assert (counted(trace.events, Role.CLIENT), counted(trace.events, Role.SERVER)) == (total, total)
    assert picked[Role.CLIENT] == picked[Role.SERVER]
    # exactly the ones the hash picks (the same function in Python), about a quarter; the unpicked
    # last request of each connection, a record from the kernel, is a summary of one at both ends
    seqs = [s for s in picked[Role.CLIENT] if s is not None]
    assert len(seqs) == len(picked[Role.CLIENT]) and all(link_mix(*s) < link_pick(0.25) for s in seqs)
    assert 0.15 * total < len(seqs) < 0.35 * total, len(seqs)
    assert trace.pipe.unpicked_records > 0
    # the kernel picked: the keep-alive connection's unpicked requests were summed there, at both ends
    assert stats["summarized"] > 2 * 0.5 * keepalive, stats
    assert stats["pick_over_budget"] == 0  # no sampler here (record rate 0): the pick alone decides
    assert stats["pick_over_budget"] == 0  # no sampler here (record rate 0): the pick alone decides
