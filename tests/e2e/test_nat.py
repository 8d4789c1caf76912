"""NAT resolution end to end: a pod connects to a Service VIP that the node DNATs to another pod.

`kscope run --nat` (a real agent process, real probes) reads the node namespace's
conntrack and ships the backend that really answered with the client's flow.
"""

from __future__ import annotations

import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb
from tests.e2e.nattopo import BACKEND_PORT, CPOD_IP, SPOD_IP, VIP, VIP_PORT, NatTopology
from tests.e2e.netns import nginx

REPO = Path(__file__).resolve().parents[2]
KSCOPE = str(REPO / ".venv" / "bin" / "kscope")
pytestmark = pytest.mark.bpf


@pytest.fixture
def nat_topo() -> Iterator[NatTopology]:
    t = NatTopology()
    try:
        t.create()
        yield t
    finally:
        t.close()


def _nginx(topo: NatTopology, tmp: Path) -> None:
    nginx(topo, tmp, f"listen {SPOD_IP}:{BACKEND_PORT}; location / {{ return 200; }}", (BACKEND_PORT,))


def _agent(topo: NatTopology, out: Path, conntrack_netns: str, *extra: str) -> subprocess.Popen[str]:
    """``kscope run --nat``; ``extra`` replaces the default 4 s duration (then the test stops it)."""
    proc = subprocess.Popen(
        [KSCOPE, "run", "--no-live", "--nat", "--conntrack-netns", conntrack_netns,
         *(extra or ("--duration", "4")), "--interval", "0.5", "--jsonl", str(out)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    topo.procs.append(proc)  # killed by the topology's teardown if the test fails first
    assert proc.stderr is not None
    for line in proc.stderr:  # traffic only once the probes are attached
        if "agent_started" in line:
            return proc
    raise AssertionError(f"agent did not start: exit {proc.wait(10)}")


def _finish(proc: subprocess.Popen[str], stop: bool = False) -> str:
    if stop:
        proc.send_signal(signal.SIGTERM)  # the agent's last interval still reports
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    return rest


def _curl(topo: NatTopology, url: str) -> str:
    """Returns the client's local port."""
    r = topo.cli.run("curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code} %{local_port}", url)
    code, port = r.stdout.split()
    assert code == "200", r.stdout + r.stderr
    return port


def _flows(path: Path) -> tuple[list[pb.L4Flow], pb.AgentStats]:
    records = [json_format.Parse(line, pb.NodeRecord()) for line in path.read_text().splitlines()]
    assert records[-1].WhichOneof("record") == "stats"
    return [r.l4 for r in records if r.WhichOneof("record") == "l4"], records[-1].stats


def test_client_flow_to_a_vip_carries_the_backend(nat_topo: NatTopology, tmp_path: Path) -> None:
    nat_topo.dnat()
    _nginx(nat_topo, tmp_path / "nginx")
    out = tmp_path / "flows.jsonl"
    agent = _agent(nat_topo, out, nat_topo.node.path)
    port = int(_curl(nat_topo, f"http://{VIP}:{VIP_PORT}/"))
    _finish(agent)
    flows, stats = _flows(out)
    client = [f for f in flows if f.role == pb.ROLE_CLIENT and (f.local_ip, f.local_port) == (CPOD_IP, port)]
    server = [f for f in flows if f.role == pb.ROLE_SERVER and (f.remote_ip, f.remote_port) == (CPOD_IP, port)]
    assert client and server, flows
    for f in client:  # the socket knows only the VIP; conntrack knows who answered
        assert (f.remote_ip, f.remote_port) == (VIP, VIP_PORT)
        assert (f.nat_remote_ip, f.nat_remote_port) == (SPOD_IP, BACKEND_PORT)
    assert client[-1].kind == pb.RECORD_KIND_CLOSE
    for f in server:
        assert (f.local_ip, f.local_port) == (SPOD_IP, BACKEND_PORT)
        assert (f.nat_remote_ip, f.nat_remote_port) == ("", 0)
    # one GET for the one new client socket, no dump (few new sockets), no error
    assert stats.counters["nat_gets"] >= 1 and stats.counters["nat_errors"] == 0
    # a malformed answer is counted where the agent's stats are read, even when there is none
    assert {"nat_malformed", "nat_malformed_given_up"} <= set(stats.counters) and stats.counters["nat_malformed"] == 0


def test_untranslated_connection_has_no_nat_fields(nat_topo: NatTopology, tmp_path: Path) -> None:
    nat_topo.dnat()
    _nginx(nat_topo, tmp_path / "nginx")
    out = tmp_path / "flows.jsonl"
    agent = _agent(nat_topo, out, nat_topo.node.path)
    port = int(_curl(nat_topo, f"http://{SPOD_IP}:{BACKEND_PORT}/"))  # straight to the pod, no VIP
    _finish(agent)
    flows, _ = _flows(out)
    client = [f for f in flows if f.role == pb.ROLE_CLIENT and (f.local_ip, f.local_port) == (CPOD_IP, port)]
    assert client
    assert all((f.nat_remote_ip, f.nat_remote_port) == ("", 0) for f in client)


def test_missing_conntrack_namespace_degrades_and_l4_still_flows(nat_topo: NatTopology, tmp_path: Path) -> None:
    _nginx(nat_topo, tmp_path / "nginx")
    out = tmp_path / "flows.jsonl"
    agent = _agent(nat_topo, out, f"/run/netns/ks-{nat_topo.tag}-gone")
    port = int(_curl(nat_topo, f"http://{SPOD_IP}:{BACKEND_PORT}/"))
    stderr = _finish(agent)
    assert stderr.count("conntrack_unavailable") == 1, stderr  # one line, not one per interval
    assert "Traceback" not in stderr
    flows, stats = _flows(out)
    assert [f for f in flows if f.role == pb.ROLE_CLIENT and (f.local_ip, f.local_port) == (CPOD_IP, port)]
    assert stats.counters["nat_errors"] >= 1 and stats.counters["nat_gets"] == 0


def test_the_dump_decoder_reads_what_the_kernel_holds(nat_topo: NatTopology) -> None:
    """Entries made with the conntrack tool in the node namespace: DNAT'ed TCP (v4, v6, port-only),
    DNAT'ed UDP, DNAT'ed ICMP and an untranslated TCP entry; the table has exactly the translated TCP and UDP
    ones."""
    from node_exporter.nat.conntrack import ConntrackTable

    def insert(*args: str) -> None:
        nat_topo.node.run("conntrack", "-I", *args, "-t", "600")

    est = ("--state", "ESTABLISHED", "-u", "ASSURED,SEEN_REPLY")
    insert("-p", "tcp", "-s", "198.18.7.5", "-d", "198.19.7.10", "--sport", "40000", "--dport", "80", *est,
           "--dst-nat", "198.18.7.7:8080")  # fmt: skip
    insert("-p", "tcp", "-s", "fd00:198:18::5", "-d", "fd00:198:19::a", "--sport", "40001", "--dport", "80", *est,
           "--dst-nat", "[fd00:198:18::7]:8080")  # fmt: skip
    insert("-p", "tcp", "-s", "198.18.7.5", "-d", "198.19.7.11", "--sport", "40002", "--dport", "443", *est,
           "--dst-nat", "198.18.7.8")  # fmt: skip
    insert("-p", "udp", "-s", "198.18.7.5", "-d", "198.19.7.10", "--sport", "5353", "--dport", "53",
           "--dst-nat", "198.18.7.7:5353")  # fmt: skip
    insert("-p", "tcp", "-s", "198.18.7.5", "-d", "198.18.7.9", "--sport", "40003", "--dport", "80", *est)
    insert("-p", "icmp", "-s", "198.18.7.5", "-d", "198.19.7.12", "--icmp-type", "8", "--icmp-code", "0",
           "--icmp-id", "77", "--dst-nat", "198.18.7.7")  # fmt: skip
    table = ConntrackTable(nat_topo.node.path)
    table.refresh()
    assert table.available
    assert table.nat == {
        (6, "198.18.7.5", 40000, "198.19.7.10", 80): ("198.18.7.7", 8080),
        (6, "fd00:198:18::5", 40001, "fd00:198:19::a", 80): ("fd00:198:18::7", 8080),
        (6, "198.18.7.5", 40002, "198.19.7.11", 443): ("198.18.7.8", 443),
        (17, "198.18.7.5", 5353, "198.19.7.10", 53): ("198.18.7.7", 5353),
    }
    c = table.counters()
    assert c["entries"] == 4 and c["skipped"] == 1  # the ICMP one; the untranslated one never left the kernel

    # What the agent does: ask about its client sockets only, one GET each, or one dump for many.
    keys = [*table.nat, (6, "198.18.7.5", 40003, "198.18.7.9", 80), (6, "198.18.7.5", 49999, "198.19.7.10", 80)]
    expected = {**table.nat, keys[4]: None, keys[5]: None}
    for get_limit, gets, dumps in ((16, 6, 0), (2, 0, 1)):
        agent_side = ConntrackTable(nat_topo.node.path, get_limit=get_limit)
        agent_side.resolve(keys)
        agent_side.resolve(keys)  # known now: nothing is asked twice
        assert {k: agent_side.lookup(k) for k in keys} == expected
        c = agent_side.counters()
        assert (c["gets"], c["dumps"], c["answers"], c["errors"]) == (gets, dumps, 6, 0)
        assert c["gets_missing"] == (1 if gets else 0)  # the untracked tuple; the untranslated one exists
        agent_side.forget(keys[0])
        assert agent_side.lookup(keys[0]) is None and agent_side.counters()["answers"] == 5


def test_gets_past_one_window_pair_every_answer_with_its_key(nat_topo: NatTopology, tmp_path: Path) -> None:
    """More new sockets than one window of GETs, not enough for a dump: 150 DNAT'ed entries (each to its
    own backend port, so an answer paired with the wrong key shows), 20 untranslated ones and 30 tuples
    conntrack does not have, shuffled so every window mixes entries, ENOENT errors and untranslated ones."""
    from node_exporter.nat.conntrack import DEFAULT_GET_LIMIT, GET_WINDOW, ConntrackTable, FlowKey

    client, est = "198.18.9.5", "--state ESTABLISHED -t 600 -u ASSURED,SEEN_REPLY"
    expected: dict[FlowKey, tuple[str, int] | None] = {}
    lines = []
    for i in range(150):
        vip, backend = f"198.19.9.{i % 50 + 1}", (f"198.18.10.{i % 250 + 1}", 8000 + i)
        lines.append(f"-I -p tcp -s {client} -d {vip} --sport {20000 + i} --dport 80 {est} "
                     f"--dst-nat {backend[0]}:{backend[1]}")  # fmt: skip
        expected[(6, client, 20000 + i, vip, 80)] = backend
    for i in range(20):
        lines.append(f"-I -p tcp -s {client} -d 198.18.11.{i + 1} --sport {21000 + i} --dport 8080 {est}")
        expected[(6, client, 21000 + i, f"198.18.11.{i + 1}", 8080)] = None
    for i in range(30):
        expected[(6, client, 22000 + i, "198.19.9.1", 80)] = None  # no such entry: ENOENT
    entries = tmp_path / "entries"
    entries.write_text("\n".join(lines) + "\n")
    nat_topo.node.run("conntrack", "-R", str(entries))
    keys = list(expected)
    random.Random(7).shuffle(keys)
    assert GET_WINDOW < len(keys) <= DEFAULT_GET_LIMIT  # several windows, and still GETs, not a dump

    table = ConntrackTable(nat_topo.node.path)
    table.resolve(keys)
    assert {k: table.lookup(k) for k in keys} == expected
    c = table.counters()
    assert (c["gets"], c["gets_missing"], c["dumps"], c["answers"]) == (200, 30, 0, 200)
    assert (c["skipped"], c["errors"]) == (0, 0)
    assert table.refresh() and table.nat == {k: v for k, v in expected.items() if v is not None}  # the dump agrees


def test_sockets_whose_syns_were_dropped_are_resolved_once_connected(nat_topo: NatTopology, tmp_path: Path) -> None:
    """Loss on the way to a VIP's backend: the node drops the first two SYNs of every connection (two
    nth counters after the DNAT, in FORWARD; connections one after another, so every one of them loses
    exactly its first two). conntrack confirms an entry only once a SYN leaves the node, so while the
    socket retransmits a GET finds nothing: that must not be kept as the socket's answer."""
    nat_topo.dnat()
    _nginx(nat_topo, tmp_path / "nginx")
    syn = ("-p", "tcp", "--syn", "-d", SPOD_IP, "--dport", str(BACKEND_PORT), "-m", "statistic", "--mode", "nth")
    nat_topo.node.iptables("-A", "FORWARD", *syn, "--every", "3", "--packet", "0", "-j", "DROP")
    nat_topo.node.iptables("-A", "FORWARD", *syn, "--every", "2", "--packet", "0", "-j", "DROP")
    out = tmp_path / "flows.jsonl"
    # only the client pod's sockets: the counters below are this test's alone on a shared machine
    agent = _agent(nat_topo, out, nat_topo.node.path, "--sweep-interval", "0.5", "--netns-inode", str(nat_topo.cli.ino))
    ports = [int(_curl(nat_topo, f"http://{VIP}:{VIP_PORT}/")) for _ in range(3)]  # ~3 s each (SYN at 0, 1, 3 s)
    _finish(agent, stop=True)
    flows, stats = _flows(out)
    for port in ports:
        client = [f for f in flows if f.role == pb.ROLE_CLIENT and (f.local_ip, f.local_port) == (CPOD_IP, port)]
        assert client and client[-1].kind == pb.RECORD_KIND_CLOSE, client
        assert client[-1].total.syn_retransmits == 2  # the loss happened as planned
        # a record while still connecting has no answer yet; every one after it names the backend
        connected = [f for f in client if f.tcp_state != "SYN_SENT"]
        assert connected and all((f.nat_remote_ip, f.nat_remote_port) == (SPOD_IP, BACKEND_PORT) for f in connected)
    c = stats.counters
    assert c["nat_missing_pending"] >= 1 and c["nat_retries"] >= 1, c  # asked again, counted
    assert c["nat_missing_given_up"] == 0 and c["nat_errors"] == 0


def _dnsmasq_behind_vip(topo: NatTopology, tmp: Path) -> None:
    """dnsmasq in the server pod answering *.ok.test, behind a kube-dns-like UDP VIP:53."""
    topo.dnat(port=53, to_port=53, proto="udp")
    topo.spawn(topo.srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
               f"--listen-address={SPOD_IP}", "--bind-interfaces", "--address=/ok.test/198.18.5.5",
               f"--pid-file={tmp}/dnsmasq.pid")  # fmt: skip
    topo.wait_listening(topo.srv, 53, udp=True)


def test_dns_through_a_udp_vip_names_the_backend(nat_topo: NatTopology, tmp_path: Path) -> None:
    """dig in the client pod asks a kube-dns-like UDP VIP that the node DNATs to dnsmasq in the other pod:
    the client side's DNS records carry the backend that answered, as TCP flows do."""
    _dnsmasq_behind_vip(nat_topo, tmp_path)
    out = tmp_path / "flows.jsonl"
    agent = _agent(nat_topo, out, nat_topo.node.path, "--l7", "--netns-inode", str(nat_topo.cli.ino))  # the client pod
    names = [f"n{i}.ok.test" for i in range(3)]
    for name in names:
        r = nat_topo.cli.run("dig", "+tries=1", "+time=3", f"@{VIP}", name, "A")
        assert "status: NOERROR" in r.stdout, r.stdout
    _finish(agent, stop=True)
    records = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
    dns = [r.l7 for r in records if r.WhichOneof("record") == "l7" and r.l7.protocol == "dns"]
    assert {q.side for q in dns} == {pb.ROLE_CLIENT} and {q.local_ip for q in dns} == {CPOD_IP}, dns
    assert sorted(q.dns.question_name for q in dns) == names, dns
    for q in dns:  # the socket knows only the VIP; conntrack knows who answered
        assert (q.remote_ip, q.remote_port) == (VIP, 53)
        assert (q.nat_remote_ip, q.nat_remote_port) == (SPOD_IP, 53)
    c = records[-1].stats.counters
    assert c["nat_gets"] >= len(names) and c["nat_errors"] == 0
