"""The L4 probe against real traffic between network namespaces on this kernel.

Every test builds its own client/server namespaces (``topo``), drives real sockets
(python peers, curl, nginx) and checks what the collector reported for exactly
those sockets, identified by namespace inode and ports.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from node_exporter.bpf.abi import ConnectStatus, Role
from node_exporter.l4.records import Counters, L4Record
from tests.e2e.netns import CLI_V4, CLI_V6, SRV_V4, SRV_V6, Peer, Recorder, Topology, rss_bytes, start_nginx

pytestmark = pytest.mark.bpf

PORT = 8080
MS = 1_000_000
SKB_DROP_REASON_TCP_LISTEN_OVERFLOW = 40  # enum skb_drop_reason on this kernel (vmlinux BTF)
CLONE_NEWNET = 0x40000000


# ---- helpers ------------------------------------------------------------------------------


def summed_deltas(records: list[L4Record]) -> Counters:
    return Counters(*(sum(r.delta[i] for r in records) for i in range(len(Counters._fields))))


def one_close(rec: Recorder, **match: Any) -> L4Record:
    found = rec.closes(**match)
    assert len(found) == 1, f"expected one close record for {match}, got {found}"
    return found[0]


def check_deltas_sum_to_total(rec: Recorder, final: L4Record) -> None:
    history = rec.of(final.sock_cookie)
    assert sum(r.is_close for r in history) == 1, history
    assert history[-1] is final, "the close record is the socket's last"
    assert summed_deltas(history) == final.total


def require(cond: object, what: str) -> None:
    """A precondition of the scenario: not an AssertionError, so an xfail never hides it."""
    if not cond:
        raise RuntimeError(f"scenario broken: {what}")


def closed(*matches: dict[str, Any]) -> Callable[[list[L4Record]], bool]:
    """Predicate for :meth:`Recorder.until`: a close record for every one of ``matches``."""

    def done(records: list[L4Record]) -> bool:
        return all(any(r.is_close and all(getattr(r, k) == v for k, v in m.items()) for r in records) for m in matches)

    return done


def open_pair(topo: Topology, server_ip: str) -> tuple[Peer, Peer, dict[str, Any], dict[str, Any]]:
    """A python server (comm ks-srv) and client (ks-cli) connected over ``server_ip``."""
    srv = topo.peer(topo.srv, "listen", "--bind", server_ip, "--port", str(PORT), "--comm", "ks-srv")
    srv.expect("listening")
    cli = topo.peer(topo.cli, "connect", "--to", server_ip, "--port", str(PORT), "--comm", "ks-cli")
    c_info = cli.expect("connected")
    s_info = srv.expect("connected")
    assert c_info["remote"][1] == PORT and s_info["remote"][1] == c_info["local"][1]
    return srv, cli, s_info, c_info


def transfer(sender: Peer, receiver: Peer, n: int, timeout: float = 30) -> None:
    """``n`` bytes from one peer to the other (both commands issued before either waits)."""
    receiver.send(f"recv {n}")
    sender.send(f"send {n}")
    assert sender.expect("sent", timeout)["n"] == n
    assert receiver.expect("recvd", timeout)["n"] == n


def close_pair(cli: Peer, srv: Peer) -> None:
    cli.call("close", "closed")
    assert srv.call("recv_eof", "eof")["n"] == 0
    srv.call("close", "closed")


# ---- 1 / 6: exact bytes, roles, owners, over IPv4 and IPv6 --------------------------------


@pytest.mark.parametrize(("family", "srv_ip", "cli_ip"), [(2, SRV_V4, CLI_V4), (10, SRV_V6, CLI_V6)], ids=["v4", "v6"])
def test_exact_bytes_roles_and_owners(topo: Topology, rec: Recorder, family: int, srv_ip: str, cli_ip: str) -> None:
    up, down = 1_000_003, 777_777
    srv, cli, s_info, c_info = open_pair(topo, srv_ip)
    cport = c_info["local"][1]
    transfer(cli, srv, up)
    # A poll half-way: periodic records with the upload only, so the final ones carry the rest.
    mid = {(r.netns_ino, r.local_port): r for r in rec.poll() if cport in (r.local_port, r.remote_port)}
    mid_c, mid_s = mid[(topo.cli.ino, cport)], mid[(topo.srv.ino, PORT)]
    assert not mid_c.is_close and not mid_s.is_close
    assert (mid_c.total.bytes_sent, mid_c.total.bytes_received) == (up, 0)
    assert (mid_s.total.bytes_sent, mid_s.total.bytes_received) == (0, up)
    transfer(srv, cli, down)
    close_pair(cli, srv)

    rec.until(closed({"local_port": cport}, {"remote_port": cport}))
    c = one_close(rec, netns_ino=topo.cli.ino, local_port=cport, remote_port=PORT)
    s = one_close(rec, netns_ino=topo.srv.ino, local_port=PORT, remote_port=cport)
    assert (c.sock_cookie, s.sock_cookie) == (mid_c.sock_cookie, mid_s.sock_cookie)

    assert c.role == Role.KSCOPE_ROLE_CLIENT
    assert c.connect_status == ConnectStatus.KSCOPE_CONNECT_OK and c.connect_errno == 0
    # SYN_SENT -> ESTABLISHED happens inside the client's connect() call, timed by the client.
    assert 0 < c.connect_latency_ns <= c_info["connect_ns"]
    assert s.role == Role.KSCOPE_ROLE_SERVER
    assert (c.total.bytes_sent, c.total.bytes_received) == (up, down)
    assert (s.total.bytes_sent, s.total.bytes_received) == (down, up)
    assert c.total.sends > 0 and c.total.recvs > 0 and s.total.sends > 0 and s.total.recvs > 0
    for r, local, remote in ((c, cli_ip, srv_ip), (s, srv_ip, cli_ip)):
        assert r.family == family and r.sock_cookie != 0
        if family == 2:  # IPv6 text: test_ipv6_address_text (product bug, see there)
            assert (r.local_ip, r.remote_ip) == (local, remote)
    assert c.sock_cookie != s.sock_cookie
    # The processes we started, named by themselves (prctl) so the two python peers differ.
    assert (c.tgid, c.pid, c.comm) == (cli.pid, cli.pid, "ks-cli") == (c_info["pid"], c_info["pid"], c_info["comm"])
    assert (s.tgid, s.pid, s.comm) == (srv.pid, srv.pid, "ks-srv") == (s_info["pid"], s_info["pid"], s_info["comm"])
    check_deltas_sum_to_total(rec, c)
    check_deltas_sum_to_total(rec, s)


# ---- 2: connect latency under an injected SYN delay -----------------------------------------


def test_connect_latency_includes_injected_syn_delay(topo: Topology, rec: Recorder) -> None:
    delay_s, queue = 0.150, 7
    nfq = topo.peer(topo.cli, "nfq-delay", "--queue", str(queue), "--delay", str(delay_s))
    nfq.expect("ready")
    # Only the client's SYNs to our port go through the queue (and wait there delay_s).
    topo.cli.iptables("-A", "OUTPUT", "-p", "tcp", "--syn", "-d", SRV_V4, "--dport", str(PORT),
                      "-j", "NFQUEUE", "--queue-num", str(queue))  # fmt: skip
    srv, cli, _, c_info = open_pair(topo, SRV_V4)
    assert nfq.expect("delayed")["count"] == 1
    assert c_info["connect_ns"] >= delay_s * 1e9, "the SYN was not held"
    cport = c_info["local"][1]
    close_pair(cli, srv)

    rec.until(closed({"local_port": cport}, {"remote_port": cport}))
    c = one_close(rec, netns_ino=topo.cli.ino, local_port=cport, remote_port=PORT)
    s = one_close(rec, netns_ino=topo.srv.ino, local_port=PORT, remote_port=cport)
    assert c.connect_status == ConnectStatus.KSCOPE_CONNECT_OK
    assert delay_s * 1e9 <= c.connect_latency_ns < 2000 * MS
    assert c.connect_latency_ns <= c_info["connect_ns"]
    assert c.total.syn_retransmits == 0, "the delay must stay below the SYN timeout (1 s)"
    assert s.connect_latency_ns == 0 and s.role == Role.KSCOPE_ROLE_SERVER


# ---- 3: refused and timed-out connects ------------------------------------------------------


def test_refused_connect(topo: Topology, rec: Recorder) -> None:
    cli = topo.peer(topo.cli, "connect", "--to", SRV_V4, "--port", str(PORT), "--comm", "ks-refused")
    err = cli.expect("connect_error")
    assert err["errno"] == errno.ECONNREFUSED
    cli.wait()

    # Found by its owner: the tuple of a failed connect is wrong (test_failed_connect_tuple).
    rec.until(closed({"netns_ino": topo.cli.ino, "tgid": cli.pid}))
    c = one_close(rec, netns_ino=topo.cli.ino, tgid=cli.pid)
    assert c.role == Role.KSCOPE_ROLE_CLIENT
    assert c.connect_status == ConnectStatus.KSCOPE_CONNECT_REFUSED
    assert c.connect_errno == errno.ECONNREFUSED
    assert c.total.resets_received == 1
    assert c.total.syn_retransmits == 0
    assert (c.total.bytes_sent, c.total.bytes_received) == (0, 0)
    assert c.connect_latency_ns == 0
    assert (c.family, c.remote_ip) == (2, SRV_V4)
    assert (c.tgid, c.pid, c.comm) == (cli.pid, cli.pid, "ks-refused")
    assert [r for r in rec.records if r.netns_ino == topo.srv.ino] == [], "no socket on the server side"


def test_timed_out_connect(topo: Topology, rec: Recorder) -> None:
    # Per-namespace sysctl: the kernel gives up after ~3 s instead of ~2 min.
    topo.cli.sysctl("net.ipv4.tcp_syn_retries", 1)
    topo.srv.iptables("-A", "INPUT", "-p", "tcp", "--syn", "--dport", str(PORT), "-j", "DROP")
    srv = topo.peer(topo.srv, "listen", "--bind", SRV_V4, "--port", str(PORT))
    srv.expect("listening")
    cli = topo.peer(topo.cli, "connect", "--to", SRV_V4, "--port", str(PORT), "--comm", "ks-timeout")
    err = cli.expect("connect_error", timeout=15)
    assert err["errno"] == errno.ETIMEDOUT
    assert 2.5e9 < err["elapsed_ns"] < 6e9
    cli.wait()

    rec.until(closed({"netns_ino": topo.cli.ino, "tgid": cli.pid}))
    c = one_close(rec, netns_ino=topo.cli.ino, tgid=cli.pid)
    assert c.role == Role.KSCOPE_ROLE_CLIENT
    assert c.connect_status == ConnectStatus.KSCOPE_CONNECT_TIMEOUT
    assert c.connect_errno == errno.ETIMEDOUT
    # The namespace is this test's own: its SNMP counter is exactly this socket's SYN retransmits
    # (2 here: tcp_syn_linear_timeouts makes the early SYN timeouts 1 s each).
    kernel = topo.cli.nstat("TcpExtTCPSynRetrans")["TcpExtTCPSynRetrans"]
    assert c.total.syn_retransmits >= 1
    assert c.total.syn_retransmits == kernel
    assert c.total.retransmits == 0
    assert c.connect_latency_ns == 0
    assert (c.family, c.remote_ip) == (2, SRV_V4)
    assert (c.tgid, c.pid, c.comm) == (cli.pid, cli.pid, "ks-timeout")


def test_failed_connect_tuple(topo: Topology, rec: Recorder) -> None:
    cli = topo.peer(topo.cli, "connect", "--to", SRV_V4, "--port", str(PORT))
    require(cli.expect("connect_error")["errno"] == errno.ECONNREFUSED, "connect not refused")
    cli.wait()
    rec.until(closed({"netns_ino": topo.cli.ino, "tgid": cli.pid}))
    found = rec.closes(netns_ino=topo.cli.ino, tgid=cli.pid)
    require(len(found) == 1, f"one close record for the client, got {found}")
    c = found[0]
    assert (c.remote_ip, c.remote_port, c.local_ip) == (SRV_V4, PORT, CLI_V4)
    assert 1024 <= c.local_port <= 65535


def test_ipv6_address_text(topo: Topology, rec: Recorder) -> None:
    srv, cli, _, c_info = open_pair(topo, SRV_V6)
    cport = c_info["local"][1]
    transfer(cli, srv, 1000)
    close_pair(cli, srv)
    rec.until(closed({"local_port": cport}, {"remote_port": cport}))
    cs = rec.closes(netns_ino=topo.cli.ino, local_port=cport, remote_port=PORT)
    ss = rec.closes(netns_ino=topo.srv.ino, local_port=PORT, remote_port=cport)
    require(len(cs) == len(ss) == 1, f"one close record per end, got {cs} {ss}")
    c, s = cs[0], ss[0]
    assert (c.family, c.local_ip, c.remote_ip) == (10, CLI_V6, SRV_V6)
    assert (s.family, s.local_ip, s.remote_ip) == (10, SRV_V6, CLI_V6)


# ---- 4: retransmits under loss, resets on abort ---------------------------------------------


def test_retransmits_under_injected_loss(topo: Topology, rec: Recorder) -> None:
    # veth carries ~64 KB GSO segments: 2 MB was ~30 of them, and no drop at all 4 % of the time
    # (0.9 ** 30; seen in CI). 8 MB is ~120 segments: 0.9 ** 120 ~ 3e-6.
    size = 8_000_017
    srv, cli, _, c_info = open_pair(topo, SRV_V4)
    cport = c_info["local"][1]
    # 10 % of the server's data segments vanish on arrival at the client (after the handshake).
    # Not in the server's OUTPUT: a local netfilter drop fails the send and TCP just sends
    # again later, which is no retransmission. Bare ACKs/FINs pass, so the client (which
    # sends no data) has nothing to retransmit.
    topo.cli.iptables("-A", "INPUT", "-p", "tcp", "--sport", str(PORT), "-m", "length", "--length", "200:65535",
                      "-m", "statistic", "--mode", "random", "--probability", "0.1", "-j", "DROP")  # fmt: skip
    transfer(srv, cli, size, timeout=60)
    close_pair(cli, srv)

    rec.until(closed({"local_port": cport}, {"remote_port": cport}), timeout=10)
    s = one_close(rec, netns_ino=topo.srv.ino, local_port=PORT, remote_port=cport)
    c = one_close(rec, netns_ino=topo.cli.ino, local_port=cport, remote_port=PORT)
    dropped = int(topo.cli.run("iptables", "-w", "-nvxL", "INPUT").stdout.splitlines()[2].split()[0])
    kernel_segs = topo.srv.nstat("TcpRetransSegs")["TcpRetransSegs"]
    assert dropped > 0
    assert 0 < s.total.retransmits <= kernel_segs, (s.total, kernel_segs)
    assert s.total.syn_retransmits == 0
    assert c.total.retransmits == 0, "the client sent no data"
    assert (s.total.bytes_sent, c.total.bytes_received) == (size, size)
    check_deltas_sum_to_total(rec, s)
    check_deltas_sum_to_total(rec, c)


def test_reset_on_abortive_close(topo: Topology, rec: Recorder) -> None:
    srv, cli, _, c_info = open_pair(topo, SRV_V4)
    cport = c_info["local"][1]
    transfer(cli, srv, 4321)
    srv.call("linger0", "ok")
    srv.call("close", "closed")  # SO_LINGER 0: close() sends RST instead of FIN
    err = cli.call("recv_err", "recv_err")
    assert err["errno"] == errno.ECONNRESET
    cli.call("close", "closed")

    rec.until(closed({"local_port": cport}, {"remote_port": cport}))
    s = one_close(rec, netns_ino=topo.srv.ino, local_port=PORT, remote_port=cport)
    c = one_close(rec, netns_ino=topo.cli.ino, local_port=cport, remote_port=PORT)
    assert (s.total.resets_sent, s.total.resets_received) == (1, 0)
    assert (c.total.resets_sent, c.total.resets_received) == (0, 1)
    assert (s.total.bytes_received, c.total.bytes_sent) == (4321, 4321)
    assert s.comm == "ks-srv" and c.comm == "ks-cli"


# ---- 5: a connection older than the collector -----------------------------------------------


def test_connection_opened_before_the_collector(topo: Topology) -> None:
    from node_exporter.l4.collector import L4Collector

    srv, cli, _, c_info = open_pair(topo, SRV_V4)
    cport = c_info["local"][1]
    transfer(cli, srv, 11_111)  # before the probe exists: must not be counted
    transfer(srv, cli, 22_222)

    inos = {topo.cli.ino, topo.srv.ino}
    with L4Collector() as late:
        rec = Recorder(late, lambda r: r.netns_ino in inos)
        up, down = 123_457, 654_321
        transfer(cli, srv, up)
        transfer(srv, cli, down)

        def both_seen(records: list[L4Record]) -> bool:
            ends = {(r.local_port, r.remote_port) for r in records}
            return {(cport, PORT), (PORT, cport)} <= ends

        rec.until(both_seen)
        live_c = [r for r in rec.records if (r.local_port, r.remote_port) == (cport, PORT)]
        live_s = [r for r in rec.records if (r.local_port, r.remote_port) == (PORT, cport)]
        assert live_c and live_s, rec.records
        for r in live_c + live_s:
            assert not r.is_close
        c, s = live_c[-1], live_s[-1]
        assert (c.netns_ino, s.netns_ino) == (topo.cli.ino, topo.srv.ino)
        assert c.role == Role.KSCOPE_ROLE_CLIENT and s.role == Role.KSCOPE_ROLE_SERVER
        assert (c.tgid, c.pid, c.comm) == (cli.pid, cli.pid, "ks-cli")
        assert (s.tgid, s.pid, s.comm) == (srv.pid, srv.pid, "ks-srv")
        assert (c.total.bytes_sent, c.total.bytes_received) == (up, down)
        assert (s.total.bytes_sent, s.total.bytes_received) == (down, up)
        assert (c.local_ip, c.remote_ip, s.local_ip, s.remote_ip) == (CLI_V4, SRV_V4, SRV_V4, CLI_V4)

        close_pair(cli, srv)
        rec.until(closed({"local_port": cport}, {"remote_port": cport}))
        fc = one_close(rec, netns_ino=topo.cli.ino, local_port=cport, remote_port=PORT)
        fs = one_close(rec, netns_ino=topo.srv.ino, local_port=PORT, remote_port=cport)
        assert (fc.sock_cookie, fs.sock_cookie) == (c.sock_cookie, s.sock_cookie)
        assert (fc.total.bytes_sent, fc.total.bytes_received) == (up, down)
        assert (fs.total.bytes_sent, fs.total.bytes_received) == (down, up)
        check_deltas_sum_to_total(rec, fc)
        check_deltas_sum_to_total(rec, fs)


def test_listener_and_connection_older_than_the_collector_are_reported_at_once(topo: Topology) -> None:
    """Nothing happens on them after the collector starts: the start-up walk alone reports them, with
    role, tuple and owner; then a SYN flood on the old listener shows in its record."""
    from node_exporter.l4.collector import L4Collector

    srv, cli, _, c_info = open_pair(topo, SRV_V4)  # its listener is closed once it has accepted
    cport = c_info["local"][1]
    transfer(cli, srv, 1_000)  # before the probe: not counted
    old = topo.peer(topo.srv, "listen", "--bind", SRV_V4, "--port", str(PORT + 1), "--backlog", "1",
                    "--no-accept", "--comm", "ks-old")  # fmt: skip
    old.expect("listening")
    inos = {topo.cli.ino, topo.srv.ino}
    with L4Collector(netns_ino=topo.srv.ino) as srv_side, L4Collector(netns_ino=topo.cli.ino) as cli_side:
        assert "l4.seed" in srv_side.report.enabled
        first = [r for r in srv_side.poll() + cli_side.poll() if r.netns_ino in inos]
        by_end = {(r.role, r.local_port, r.remote_port): r for r in first}
        listener = by_end[(Role.KSCOPE_ROLE_LISTENER, PORT + 1, 0)]
        assert (listener.tgid, listener.comm, listener.tcp_state_name) == (old.pid, "ks-old", "LISTEN")
        assert listener.local_ip == SRV_V4
        c = by_end[(Role.KSCOPE_ROLE_CLIENT, cport, PORT)]
        s = by_end[(Role.KSCOPE_ROLE_SERVER, PORT, cport)]
        assert (c.tgid, c.comm, c.remote_ip) == (cli.pid, "ks-cli", SRV_V4)
        assert (s.tgid, s.comm, s.remote_ip) == (srv.pid, "ks-srv", CLI_V4)
        assert c.total == s.total == Counters(), "counts start when the collector does"
        assert (Role.KSCOPE_ROLE_LISTENER, PORT, 0) not in by_end  # the peer closed it after accept()
        assert not any(r.is_close for r in first)

        rec = Recorder(srv_side, lambda r: r.role == Role.KSCOPE_ROLE_LISTENER and r.local_port == PORT + 1)
        flood = topo.peer(topo.cli, "flood", "--to", SRV_V4, "--port", str(PORT + 1))
        flood.expect("ready")
        flood.call("connect 20", "connects", timeout=5)
        require(topo.srv.nstat("TcpExtListenOverflows")["TcpExtListenOverflows"] > 0, "no listen overflow")
        rec.until(lambda records: any(r.sk_drops for r in records), timeout=3)
        assert rec.records and rec.records[-1].sk_drops > 0 and rec.records[-1].tgid == old.pid
        assert rec.records[-1].ack_backlog == 2 and rec.records[-1].max_ack_backlog == 1


def test_start_up_walk_past_its_owner_map_counts_and_still_reports(topo: Topology) -> None:
    """The owners' map of the start-up walk holds one socket here: the other old sockets are still
    reported (role, tuple), their owner unknown until they next send or receive, and each owner
    not kept is counted."""
    from node_exporter.l4.collector import L4Collector

    srv, cli, _, c_info = open_pair(topo, SRV_V4)
    cport = c_info["local"][1]
    old = topo.peer(topo.srv, "listen", "--bind", SRV_V4, "--port", str(PORT + 1), "--comm", "ks-old")
    old.expect("listening")
    with L4Collector(netns_ino=topo.srv.ino, seed_owner_entries=1) as collector:
        first = [r for r in collector.poll() if r.netns_ino == topo.srv.ino]
        by_end = {(r.role, r.local_port, r.remote_port): r for r in first}
        assert set(by_end) >= {(Role.KSCOPE_ROLE_LISTENER, PORT + 1, 0), (Role.KSCOPE_ROLE_SERVER, PORT, cport)}
        owners = [r.tgid for r in by_end.values()]
        assert 0 in owners, by_end  # at most one owner was kept ...
        assert collector.kernel_stats()["seed_owners_full"] >= 1  # ... and the others were counted
        assert collector.netns.vanished == collector.netns.enter_failed == 0
        rec = Recorder(collector, lambda r: (r.local_port, r.remote_port) == (PORT, cport))
        transfer(srv, cli, 1_000)  # the accepted socket's next send names its owner
        rec.until(lambda records: any(r.tgid == srv.pid for r in records))


def test_without_the_start_up_walk_an_old_listener_stays_unseen(topo: Topology) -> None:
    """The control for the test above: the same scene with seed=False reports no listener."""
    from node_exporter.l4.collector import L4Collector

    srv = topo.peer(topo.srv, "listen", "--bind", SRV_V4, "--port", str(PORT), "--comm", "ks-srv")
    srv.expect("listening")
    with L4Collector(netns_ino=topo.srv.ino, seed=False) as collector:
        time.sleep(0.1)
        assert [r for r in collector.poll() if r.local_port == PORT] == []


# ---- sweeps: only the namespaces with news are walked ---------------------------------------


def test_sweep_walks_only_a_namespace_whose_sockets_changed(topo: Topology) -> None:
    """Every walk of a namespace costs a pass over the whole shared TCP hash table: a namespace
    where nothing changed since the last sweep is not walked at all, one with news is walked once
    and its socket reported."""
    from node_exporter.l4.collector import L4Collector

    srv, cli, s_info, _ = open_pair(topo, SRV_V4)
    sport = s_info["local"][1]
    with L4Collector(netns_ino=topo.srv.ino) as collector:
        collector.poll()  # the start-up walk marked every socket: reported once
        walked = collector.netns.walked
        assert walked >= 1
        for _ in range(3):
            assert collector.poll() == []
        assert collector.netns.walked == walked, "an idle namespace was walked"

        transfer(cli, srv, 5_000)
        news = [r for r in collector.poll() if r.local_port == sport and r.remote_port]
        assert collector.netns.walked == walked + 1
        assert [r.delta.bytes_received for r in news] == [5_000] and not news[0].is_close
        assert collector.poll() == [] and collector.netns.walked == walked + 1
        assert collector.kernel_stats()["netns_pending_full"] == 0


def test_busy_socket_reports_itself_and_the_sweep_only_what_went_quiet(topo: Topology) -> None:
    """With ``report_s`` a socket's own sends report it once that long has passed since its last
    report, through the ring, with no sweep at all; what it did after its last report waits for
    the sweep (here: never) or its close, whose record then carries it: nothing is lost."""
    from node_exporter.l4.collector import L4Collector

    srv, cli, _, c_info = open_pair(topo, SRV_V4)
    cport = c_info["local"][1]
    with L4Collector(netns_ino=topo.cli.ino, report_s=0.4, sweep_s=3600) as collector:
        rec = Recorder(collector, lambda r: r.local_port == cport)
        rec.poll()  # the first poll sweeps: the start-up walk's sockets, reported once
        walked, seeded = collector.netns.walked, len(rec.records)
        for _ in range(4):  # the first send sets the socket's deadline, each later one is past it
            transfer(cli, srv, 1_000)
            time.sleep(0.45)
        transfer(cli, srv, 1_000)
        own = rec.poll()
        assert collector.netns.walked == walked and collector.stats.swept_records == seeded
        assert len(own) == 4 and not any(r.is_close for r in own), own
        assert [r.delta.bytes_sent for r in own] == [2_000, 1_000, 1_000, 1_000]

        transfer(cli, srv, 777)  # not due yet: no record, and no sweep to find it
        time.sleep(0.1)
        assert rec.poll() == []
        close_pair(cli, srv)
        rec.until(closed({"local_port": cport}))
        final = one_close(rec, local_port=cport)
        assert final.delta.bytes_sent == 777 and final.total.bytes_sent == 5_777
        check_deltas_sum_to_total(rec, final)
        assert collector.kernel_stats()["report_rb_full"] == 0


def test_busy_socket_past_a_full_ring_loses_nothing(topo: Topology) -> None:
    """A socket's own periodic record that finds the ring half full (the rest is kept for final
    records) is not made (counted): its counts stay in the socket for its next record, so every
    byte is still in some record."""
    from node_exporter.l4.collector import L4Collector

    srv, cli, _, c_info = open_pair(topo, SRV_V4)
    cport = c_info["local"][1]
    with L4Collector(netns_ino=topo.cli.ino, close_ring_bytes=4096, report_s=0.05, sweep_s=3600) as small:
        rec = Recorder(small, lambda r: r.local_port == cport)
        rec.poll()
        for _ in range(30):  # ~30 records due, no poll: a 4 KiB ring takes 7 (half is for final records)
            transfer(cli, srv, 100)
            time.sleep(0.06)
        assert small.kernel_stats()["report_rb_full"] > 0
        assert 0 < len(rec.poll()) <= 7
        close_pair(cli, srv)
        rec.until(closed({"local_port": cport}))
        final = one_close(rec, local_port=cport)
        assert final.total.bytes_sent == 3_000
        check_deltas_sum_to_total(rec, final)


def test_marked_namespace_nobody_can_enter_is_counted_and_reports_at_close() -> None:
    """A namespace kept alive only by sockets whose process lives elsewhere (no process in it, its
    /run/netns mount gone) cannot be entered: its mark is counted (``unlisted``), and the bytes
    its sockets moved arrive with their final records."""
    from node_exporter.l4.collector import L4Collector

    name = f"ks-orphan-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{name}", os.O_RDONLY)
    ino = os.fstat(there).st_ino
    try:
        assert libc.setns(there, CLONE_NEWNET) == 0, ctypes.get_errno()
        try:  # made in that namespace: they stay there
            srv = socket.create_server(("127.0.0.1", 0))
            cli = socket.create_connection(srv.getsockname())
            conn, _ = srv.accept()
        finally:
            assert libc.setns(own, CLONE_NEWNET) == 0, ctypes.get_errno()
    finally:
        os.close(own)
        os.close(there)
        subprocess.run(["ip", "netns", "del", name], check=True)  # only the sockets keep it now
    with srv, cli, conn, L4Collector() as collector:
        rec = Recorder(collector, lambda r: r.netns_ino == ino)
        rec.poll()
        cli.sendall(b"x" * 1_000)
        assert len(conn.recv(4096)) == 1_000
        assert rec.poll() == [] and collector.pending.unlisted >= 1
        cport = cli.getsockname()[1]
        cli.close()
        conn.close()
        rec.until(closed({"local_port": cport}))
        assert one_close(rec, local_port=cport).total.bytes_sent == 1_000


def test_namespace_marks_past_their_map_walk_every_namespace(topo: Topology) -> None:
    """The map of marked namespaces holds one here: both ends' news still arrive (the kernel asks
    for a sweep of every namespace instead), and each mark that did not fit is counted."""
    from node_exporter.l4.collector import L4Collector

    srv, cli, s_info, c_info = open_pair(topo, SRV_V4)
    ends = {(s_info["local"][1], c_info["local"][1]), (c_info["local"][1], PORT)}
    with L4Collector(netns_pending_entries=1) as collector:
        collector.poll()
        full, everywhere = collector.kernel_stats()["netns_pending_full"], collector.pending.sweeps_of_all
        transfer(cli, srv, 7_000)
        news = [r for r in collector.poll() if (r.local_port, r.remote_port) in ends]
        assert sorted(r.total.bytes_sent + r.total.bytes_received for r in news) == [7_000, 7_000], news
        assert collector.kernel_stats()["netns_pending_full"] > full
        assert collector.pending.sweeps_of_all == everywhere + 1


# ---- 7: churn -------------------------------------------------------------------------------


def curl_many(topo: Topology, n: int) -> subprocess.Popen[str]:
    """One curl, ``n`` sequential requests, each on its own connection (the server closes it)."""
    return topo.spawn(topo.cli, "curl", "-s", "-S", "-o", "/dev/null", "-w", "%{http_code}\\n",
                      "-H", "Connection: close", f"http://{SRV_V4}:{PORT}/[1-{n}]",
                      stdout=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def test_churn_one_close_record_per_socket(topo: Topology, rec: Recorder, collector: Any, tmp_path: Any) -> None:
    n = 3000
    nginx = start_nginx(topo, tmp_path / "nginx", PORT)
    lost_before = collector.kernel_stats()["close_lost"]
    rss_before = rss_bytes()
    curl = curl_many(topo, n)
    while curl.poll() is None:  # the agent's pace: a poll every 150 ms under load
        rec.poll()
        time.sleep(0.15)
    codes = finish(curl).split()
    assert codes == ["200"] * n

    def client(r: L4Record) -> bool:
        return r.netns_ino == topo.cli.ino and r.remote_port == PORT and r.role == Role.KSCOPE_ROLE_CLIENT

    def server(r: L4Record) -> bool:
        return r.netns_ino == topo.srv.ino and r.local_port == PORT and r.role == Role.KSCOPE_ROLE_SERVER

    def all_closed(records: list[L4Record]) -> bool:
        return (
            sum(r.is_close and client(r) for r in records) >= n and sum(r.is_close and server(r) for r in records) >= n
        )

    rec.until(all_closed, timeout=10, interval=0.15)
    rss_growth = rss_bytes() - rss_before
    c_closes = [r for r in rec.records if r.is_close and client(r)]
    s_closes = [r for r in rec.records if r.is_close and server(r)]
    assert len(c_closes) == len({r.sock_cookie for r in c_closes}) == n
    assert len(s_closes) == len({r.sock_cookie for r in s_closes}) == n
    assert {(r.tgid, r.comm) for r in c_closes} == {(curl.pid, "curl")}
    assert {(r.tgid, r.comm) for r in s_closes} == {(nginx.pid, "nginx")}
    assert all(r.connect_status == ConnectStatus.KSCOPE_CONNECT_OK for r in c_closes)
    # Both ends agree on every byte: what curl sent nginx received and the other way round.
    assert sum(r.total.bytes_sent for r in c_closes) == sum(r.total.bytes_received for r in s_closes) > 0
    assert sum(r.total.bytes_received for r in c_closes) == sum(r.total.bytes_sent for r in s_closes) > 0
    assert all(r.total.bytes_sent > 0 and r.total.bytes_received > 0 for r in c_closes)
    for final in c_closes[:: n // 10]:
        check_deltas_sum_to_total(rec, final)
    assert collector.kernel_stats()["close_lost"] == lost_before == 0
    assert rss_growth < 50 * 2**20, f"agent RSS grew {rss_growth / 2**20:.1f} MiB"


def test_close_ring_full_is_counted_never_silent(topo: Topology, tmp_path: Any) -> None:
    from node_exporter.l4.collector import L4Collector

    n = 500
    start_nginx(topo, tmp_path / "nginx", PORT)
    # Only the client namespace: one final record per curl connection, nothing else.
    with L4Collector(netns_ino=topo.cli.ino, close_ring_bytes=4096, close_overflow_entries=16) as small:
        small.poll()
        codes = finish(curl_many(topo, n)).split()
        assert codes == ["200"] * n
        # No poll while the burst runs; wait until every client socket is gone from the kernel
        # (time-wait ones are no longer full sockets: their final record is made).
        deadline = time.monotonic() + 10
        while topo.cli.run("ss", "-Htan", "exclude", "time-wait").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        ks = small.kernel_stats()
        records = small.poll()
        closes = [r for r in records if r.is_close]
        assert all(r.remote_port == PORT and r.role == Role.KSCOPE_ROLE_CLIENT for r in closes)
        assert len({r.sock_cookie for r in closes}) == len(closes)
        assert ks["close_rb_full"] > 0 and ks["close_lost"] > 0
        assert 0 < small.stats.overflow_records <= 16
        assert ks["sockets_tracked"] == n
        assert len(closes) + ks["close_lost"] == n, (len(closes), ks)
        assert ks["close_rb_full"] == n - (len(closes) - small.stats.overflow_records)


# ---- 8: accept-queue overflow ---------------------------------------------------------------


def listener_records(rec: Recorder, topo: Topology) -> list[L4Record]:
    return [
        r for r in rec.records
        if r.netns_ino == topo.srv.ino and r.role == Role.KSCOPE_ROLE_LISTENER and r.local_port == PORT
    ]  # fmt: skip


def test_listen_overflow_on_handshake_completion(topo: Topology, rec: Recorder) -> None:
    """The accept queue fills while handshakes are pending: the kernel drops their final
    ACK with SKB_DROP_REASON_TCP_LISTEN_OVERFLOW, on the listener."""
    srv = topo.peer(topo.srv, "listen", "--bind", SRV_V4, "--port", str(PORT), "--backlog", "1", "--no-accept",
                    "--comm", "ks-srv")  # fmt: skip
    srv.expect("listening")
    flood = topo.peer(topo.cli, "flood", "--to", SRV_V4, "--port", str(PORT), "--comm", "ks-flood")
    flood.expect("ready")
    assert flood.call("connect 1", "connects")["connected"] == 1  # accept queue: 1 of 2
    # Hold the handshakes half-open: the client's pure ACKs never arrive ...
    topo.cli.iptables("-A", "OUTPUT", "-p", "tcp", "--dport", str(PORT),
                      "--tcp-flags", "SYN,ACK,FIN,RST,PSH", "ACK", "-j", "DROP")  # fmt: skip
    assert flood.call("connect 2", "connects")["connected"] == 3
    # ... until data (PSH|ACK) completes them: one more fits the queue, the other overflows.
    flood.call("poke", "poked")

    def overflowed(records: list[L4Record]) -> bool:
        return any(r.total.listen_overflows > 0 for r in listener_records(rec, topo))

    rec.until(overflowed, timeout=3)
    kernel = topo.srv.nstat("TcpExtListenOverflows")["TcpExtListenOverflows"]
    lst = listener_records(rec, topo)
    assert lst, "no listener record"
    last = lst[-1]
    assert kernel > 0
    assert 0 < last.total.listen_overflows <= kernel, (last.total, kernel)
    assert last.total.drops >= last.total.listen_overflows
    assert last.last_drop_reason == SKB_DROP_REASON_TCP_LISTEN_OVERFLOW
    assert (last.ack_backlog, last.max_ack_backlog) == (2, 1)
    assert (last.tgid, last.comm) == (srv.pid, "ks-srv")
    assert all(not r.is_close for r in lst)


def test_listen_overflow_on_syn(topo: Topology, rec: Recorder) -> None:
    """The usual overflow: a listener (backlog 1) that never accepts, and many connects."""
    srv = topo.peer(topo.srv, "listen", "--bind", SRV_V4, "--port", str(PORT), "--backlog", "1", "--no-accept")
    srv.expect("listening")
    flood = topo.peer(topo.cli, "flood", "--to", SRV_V4, "--port", str(PORT))
    flood.expect("ready")
    flood.call("connect 20", "connects", timeout=5)  # waits 1 s: the first SYN retransmits happen
    kernel = topo.srv.nstat("TcpExtListenOverflows")["TcpExtListenOverflows"]
    require(kernel > 0, "the kernel counted no listen overflow")
    # The SYN is dropped in tcp_conn_request() without the kfree_skb tracepoint: only the
    # listener's own sk_drops (and the SNMP counters) see it, so that is what the record carries.
    rec.until(lambda records: any(r.sk_drops for r in listener_records(rec, topo)), timeout=2)
    lst = listener_records(rec, topo)
    require(lst, "no listener record")
    listen_drops = topo.srv.nstat("TcpExtListenDrops")["TcpExtListenDrops"]
    assert 0 < lst[-1].sk_drops <= listen_drops, (lst[-1], kernel, listen_drops)
    assert kernel <= listen_drops
