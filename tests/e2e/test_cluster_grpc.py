"""gRPC through the whole pipeline on one node: agent (real probes) -> processor -> OTLP.

As ``test_cluster``, but pod b-1 runs a grpcio server (in its container cgroup) and pod a-1 a grpcio
client calling Service b's VIP, DNAT'ed to b-1: OK calls, a NOT_FOUND (the caller's mistake) and an
INTERNAL (the server's failure). What reaches the OTLP receiver must be RPCs between workloads a
and b with the conventions' names, the edge's failures counted by the server's rule, and error spans.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_processor.test_main import _kv as kv
from tests.cluster_processor.test_main import latest, points, spans
from tests.e2e.nattopo import BACKEND_PORT, VIP_PORT
from tests.e2e.netns import Peer
from tests.e2e.test_cluster import (  # noqa: F401 (autouse fixtures, the topology fixture)
    A_RES,
    B_RES,
    CLIENT,
    SERVER,
    ClusterTopology,
    _no_proxy,
    _reset_logging,
    cluster,
    dump,
    nat_topo,
    run_agent_and_traffic,
)
from tests.helpers import eventually_async as eventually

pytestmark = pytest.mark.bpf
GRPC_PEER = Path(__file__).with_name("grpcpeer.py")
METHOD = "demo.v1.Echo/Ping"
OK, NOT_FOUND, INTERNAL = 3, 2, 1  # calls of each outcome
CALLS = OK + NOT_FOUND + INTERNAL


def start_grpc_server(topo: ClusterTopology, scope: Path) -> None:
    proc = topo.spawn(topo.srv, sys.executable, "-u", str(GRPC_PEER), "server", "--bind", topo.spod_ip,
                      "--port", str(BACKEND_PORT), stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    Peer(proc, "grpc-server").expect("listening", 20)
    (scope / "cgroup.procs").write_text(str(proc.pid))  # before any connection (KERNEL.md: from outside)


def grpc_calls(topo: ClusterTopology) -> None:
    """One channel to the VIP (one HTTP/2 connection, opened after the probes attached)."""
    proc = topo.spawn(topo.cli, sys.executable, "-u", str(GRPC_PEER), "client", "--to", topo.vip,
                      "--port", str(VIP_PORT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    client = Peer(proc, "grpc-client")
    client.expect("connected", 20)
    assert client.call(f"unary {OK}", "done")["codes"] == {"OK": OK}
    assert client.call(f"unary {NOT_FOUND} fail", "done")["codes"] == {"NOT_FOUND": NOT_FOUND}
    assert client.call(f"unary {INTERNAL} boom", "done")["codes"] == {"INTERNAL": INTERNAL}
    client.call("close", "done")


def test_grpc_calls_between_pods_are_rpcs_with_a_failed_edge(
    nat_topo: ClusterTopology,  # noqa: F811 (the imported fixture)
    pod_cgroup: tuple[Path, str, str],
    tmp_path: Path,
) -> None:
    scope, b_uid, b_cid = pod_cgroup
    start_grpc_server(nat_topo, scope)

    async def body() -> None:
        async with cluster(nat_topo, tmp_path, b_uid, b_cid) as (rx, proc):
            stderr = await asyncio.to_thread(run_agent_and_traffic, nat_topo, proc.ingest.port, 4, grpc_calls)
            assert "Traceback" not in stderr, stderr

            def diag() -> str:
                rpc = [f"  {n} {r.get('service.name')} {a} = {v}" for n in ("rpc.server.call.duration",
                       "rpc.client.call.duration") for r, a, v in points(rx, n)]  # fmt: skip
                return f"agent stderr:\n{stderr[-3000:]}\n{dump(rx)}\n" + "\n".join(rpc)

            sg = "traces_service_graph_request_total"
            await eventually(lambda: latest(rx, sg, client="a", server="b") == CALLS, f"service graph a -> b = {CALLS}",
                             diag=diag)  # fmt: skip
            await eventually(lambda: len([s for r, s in spans(rx) if s.name == METHOD]) == 2 * CALLS,
                             "a span per call and side", diag=diag)  # fmt: skip
            await asyncio.sleep(1.5)  # one more processor interval: nothing may arrive late
            # b is observed, so its side counts the edge: only INTERNAL is a server's failure
            assert latest(rx, "traces_service_graph_request_failed_total", client="a", server="b") == INTERNAL, diag()
            base = {"rpc.system.name": "grpc", "rpc.method": METHOD}
            srv = {**base, "service.peer.name": "a"}
            dur = "rpc.server.call.duration"
            for code, n, error in (
                ("OK", OK, None),
                ("NOT_FOUND", NOT_FOUND, None),
                ("INTERNAL", INTERNAL, "INTERNAL"),
            ):
                assert latest(rx, dur, B_RES, **srv, **{"rpc.response.status_code": code}) == n, diag()
                got = {a.get("error.type") for r, a, _ in points(rx, dur)
                       if a.get("rpc.response.status_code") == code and r.get("service.name") == "b"}  # fmt: skip
                assert got == {error}, (code, got)
            # the client's view: a calling b-1's Deployment on the port that answered, never the VIP
            cli = {**base, "service.peer.name": "b", "server.port": BACKEND_PORT}
            for code, n in (("OK", OK), ("NOT_FOUND", NOT_FOUND), ("INTERNAL", INTERNAL)):
                assert latest(rx, "rpc.client.call.duration", A_RES, **cli, **{"rpc.response.status_code": code}) == n
            assert not any(nat_topo.vip in str(a) for _, a, _ in points(rx, "rpc.client.call.duration"))
            # no gRPC call in the HTTP series
            assert not [
                a for _, a, _ in points(rx, "http.server.request.duration") if a.get("http.route") == "/" + METHOD
            ]
            # spans: each side's error statuses by its own rule (Status.code 2 = ERROR)
            ours = [(r, s) for r, s in spans(rx) if s.name == METHOD]
            by_kind = {
                kind: sorted(
                    (kv(s.attributes)["rpc.response.status_code"], s.status.code) for _, s in ours if s.kind == kind
                )
                for kind in (SERVER, CLIENT)
            }
            assert by_kind[SERVER] == sorted([("OK", 0)] * OK + [("NOT_FOUND", 0)] * NOT_FOUND + [("INTERNAL", 2)])
            assert by_kind[CLIENT] == sorted([("OK", 0)] * OK + [("NOT_FOUND", 2)] * NOT_FOUND + [("INTERNAL", 2)])
            assert {r["service.name"] for r, s in ours if s.kind == SERVER} == {"b"}
            assert {r["service.name"] for r, s in ours if s.kind == CLIENT} == {"a"}

    asyncio.run(asyncio.wait_for(body(), 90))
