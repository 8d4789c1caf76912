"""Both ends of one HTTP/1 request carry the same TCP sequence numbers (docs/traces.md, item 1).

A pod calls another through a Service VIP that the node DNATs (``NatTopology``): the client's
socket names the VIP, the server's the pod, yet both records of each request carry the same
(request, response) sequence numbers, and no two requests share them. A keep-alive connection
older than the probe pairs too: its numbers advance by exactly the bytes of each exchange.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from node_exporter.protocols import Role
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
