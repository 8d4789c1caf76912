"""Issue 18 item 5 at the defaults: two agents that share nothing, one at each end of a busy
keep-alive path, make the same sampling choice (docs/traces.md, sampling).

Each ``kscope-agent --l7`` sees one pod's namespace (``--netns-inode``), as two nodes' agents do;
wrk drives one keep-alive connection through a DNAT'ed Service VIP far past the (tiny) record
rate. With ``--l7-trace-ratio auto`` (the default) each agent lowers its node's share to a power
of two as its requests pass the rate, and the requests that stay records are the ones whose TCP
sequence numbers hash below it: once both ends settled, the same ones at both ends. The control run
(``--l7-trace-ratio 1``: each end's token bucket alone) shows the test can fail: there the two
ends' records barely overlap.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb
from node_exporter.l7.pick import link_mix
from tests.e2e.agentproc import REPO, AgentProcess
from tests.e2e.nattopo import BACKEND_PORT, SPOD_IP, VIP, VIP_PORT, NatTopology
from tests.e2e.netns import nginx
from tests.e2e.test_nat import nat_topo

pytestmark = pytest.mark.bpf
__all__ = ["nat_topo"]  # the fixture
AGENT = str(REPO / ".venv" / "bin" / "kscope-agent")
RECORD_RATE = 5  # per CPU: wrk passes it a hundredfold
LOAD_S = 6
SETTLED_S = 2.0  # from the load's start: both agents have stepped their share down by then


def _run(topo: NatTopology, tmp: Path, ratio: str) -> tuple[dict[str, list[pb.L7Request]], dict[str, dict[str, int]]]:
    """Both agents over one wrk run: each end's HTTP records (not summaries), and its last counters."""
    outs = {side: tmp / f"{ratio}-{side}.jsonl" for side in ("client", "server")}
    agents = {
        side: AgentProcess(
            [
                AGENT,
                "--l7",
                "--netns-inode",
                str(ns.ino),
                "--interval",
                "0.5",
                "--l7-record-rate",
                str(RECORD_RATE),
                "--l7-trace-ratio",
                ratio,
                "--jsonl",
                str(outs[side]),
                "--node-name",
                f"node-{side}",
            ],
            topo.procs,
            side,
        )
        for side, ns in (("client", topo.cli), ("server", topo.srv))
    }
    for a in agents.values():
        a.wait_started()
    wrk = topo.cli.run("wrk", "-t1", "-c1", f"-d{LOAD_S}s", f"http://{VIP}:{VIP_PORT}/p", check=False)
    assert wrk.returncode == 0, wrk.stderr
    for a in agents.values():
        a.stop()
    records: dict[str, list[pb.L7Request]] = {}
    counters: dict[str, dict[str, int]] = {}
    for side, out in outs.items():
        rows = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
        records[side] = [r.l7 for r in rows if r.WhichOneof("record") == "l7" and r.l7.http.tcp_seqs_known
                         and not r.l7.HasField("summary")]  # fmt: skip
        stats = [r.stats for r in rows if r.WhichOneof("record") == "stats"]
        counters[side] = dict(stats[-1].counters)
    return records, counters


def _settled(records: list[pb.L7Request], since: int) -> set[tuple[int, int]]:
    return {(r.http.tcp_request_seq, r.http.tcp_response_seq) for r in records if r.start_time_unix_nano >= since}


def test_both_ends_keep_the_same_requests_by_default(nat_topo: NatTopology, tmp_path: Path) -> None:
    topo = nat_topo
    topo.dnat()
    nginx(
        topo, tmp_path / "nginx", f'listen {SPOD_IP}:{BACKEND_PORT}; location / {{ return 200 "ok"; }}', (BACKEND_PORT,)
    )
    overlap: dict[str, float] = {}
    facts: dict[str, object] = {}
    for ratio in ("auto", "1"):
        records, counters = _run(topo, tmp_path, ratio)
        first = min(r.start_time_unix_nano for side in records.values() for r in side)
        since = first + int(SETTLED_S * 1e9)
        got = {side: _settled(rs, since) for side, rs in records.items()}
        both = got["client"] & got["server"]
        overlap[ratio] = len(both) / max(1, min(len(got["client"]), len(got["server"])))
        shifts = {side: c.get("l7_trace_share_shift") for side, c in counters.items()}
        summed = {side: c.get("l7_kernel_summarized", 0) for side, c in counters.items()}
        over = {side: c.get("l7_kernel_pick_over_budget", 0) for side, c in counters.items()}
        facts[ratio] = {"records": {s: len(g) for s, g in got.items()}, "both": len(both), "shift": shifts,
                        "summed": summed, "over_budget": over}  # fmt: skip
        assert all(n > 1000 for n in summed.values()), facts  # far past the record rate at both ends
        if ratio == "auto":
            assert all(s is not None for s in shifts.values()), facts  # the gauge of the auto share
            assert got["client"] and got["server"], facts
            # picked by the hash: at this load both shares went to 1/16 or below (a bucket alone keeps
            # requests whatever their hash)
            assert all(link_mix(*s) < 1 << 28 for s in got["client"] | got["server"]), facts
            # every settled record at either end hashes below the share of the end that kept it;
            # one the other end lacks is one its bucket refused (counted) or kept before it settled
            lone = got["client"] ^ got["server"]
            assert len(lone) <= sum(over.values()) + 2, facts
        else:
            assert all(s is None for s in shifts.values()), facts  # a fixed share: no auto gauge
            # each end's bucket alone keeps requests whatever their hash
            assert any(link_mix(*s) >= 1 << 28 for s in got["client"] | got["server"]), facts
    # the control's agreement is the two buckets' timing alone: 7 of 41 ... 30 of 34 seen in CI, so
    # no figure is asserted for it; what tells the two apart is the hash check above
    assert overlap["auto"] >= 0.9, facts


def test_bad_trace_ratio_is_a_usage_error() -> None:
    for bad in ("0", "1.5", "often"):
        done = subprocess.run([AGENT, "--l7-trace-ratio", bad], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "--l7-trace-ratio" in done.stderr and "Traceback" not in done.stderr, bad
