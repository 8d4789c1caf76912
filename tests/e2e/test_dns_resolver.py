"""glibc's resolver through a Kubernetes search path: both ends of the DNS edge count the same answers.

The client namespace has a kubelet-style resolv.conf (``/etc/netns/<ns>/resolv.conf``, which
``ip netns exec`` bind-mounts over /etc/resolv.conf): ``search a.svc.cluster.local svc.cluster.local
cluster.local`` and ``ndots:5``. dnsmasq in the server namespace answers NXDOMAIN under cluster.local
(but for ``web.a.svc.cluster.local``) and forwards ``example`` to an upstream in a third namespace
that answers SERVFAIL. Real lookups (``getent ahosts``, Python's ``socket.getaddrinfo``) of an
external name go NXDOMAIN x3 then SERVFAIL (glibc retries it); of ``web``, the first expansion
answers. glibc sends A and AAAA with one sendmmsg per expansion, from the same stack vector each
time. The client side's records must equal dnsmasq's socket's records exactly per name, type and
response code, and both must equal what dnsmasq itself logs.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node_exporter.l7.collector import L7Collector
from node_exporter.l7.syscalls import SyscallL7Collector
from node_exporter.protocols import Role
from tests.e2e.l7trace import L7Trace, dns, l7peer, require
from tests.e2e.netns import CLI_V4, SRV_V4, Netns, Topology, run

pytestmark = pytest.mark.bpf

UP_SRV, UP_V4 = "198.18.1.1", "198.18.1.2"  # dnsmasq's side and the upstream's, on their own veth
SEARCH = ("a.svc.cluster.local", "svc.cluster.local", "cluster.local")
RESOLV_CONF = f"nameserver {SRV_V4}\nsearch {' '.join(SEARCH)}\noptions ndots:5\n"
EXTERNAL, INTERNAL = "ext.example", "web"
LOOKUPS = 5
_QUERY = re.compile(rf"query\[(\w+)\] (\S+) from {re.escape(CLI_V4)}$", re.M)
Key = tuple[str, str]  # (name, qtype)


@dataclass
class ResolverTopology(Topology):
    """Client and server namespaces (``Topology``), an upstream namespace behind the server, and the
    client's resolv.conf; all of it removed by ``close`` whatever happened."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.up = Netns(f"ks-{self.tag}-up")
        self.etc = Path("/etc/netns") / self.cli.name

    def create(self) -> ResolverTopology:
        super().create()
        run(["ip", "netns", "add", self.up.name])
        self._created.append(self.up)
        self.up.ip("link", "set", "lo", "up")
        run(["ip", "-n", self.srv.name, "link", "add", "eth1", "type", "veth",
             "peer", "name", "eth0", "netns", self.up.name])  # fmt: skip
        for ns, v4, dev in ((self.srv, UP_SRV, "eth1"), (self.up, UP_V4, "eth0")):
            ns.ip("link", "set", dev, "up")
            ns.ip("addr", "add", f"{v4}/24", "dev", dev)
        self.etc.mkdir(parents=True)
        (self.etc / "resolv.conf").write_text(RESOLV_CONF)
        return self

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self.etc, ignore_errors=True)


@pytest.fixture
def rtopo() -> Iterator[ResolverTopology]:
    t = ResolverTopology()
    try:
        t.create()
        yield t
    finally:
        t.close()


def start_dns(topo: ResolverTopology, tmp: Path) -> Path:
    """The SERVFAIL upstream and dnsmasq; returns dnsmasq's query log."""
    upstream = l7peer(topo, topo.up, "servfail", "--bind", UP_V4, "--port", "53")
    upstream.expect("listening")
    log = tmp / "dnsmasq.log"
    topo.spawn(topo.srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
               "--user=root", "--port=53", f"--listen-address={SRV_V4}", "--bind-interfaces", "--log-queries",
               "--local=/cluster.local/", "--address=/web.a.svc.cluster.local/198.18.0.9",
               f"--server=/example/{UP_V4}#53", f"--pid-file={tmp}/dnsmasq.pid", f"--log-facility={log}")  # fmt: skip
    topo.wait_listening(topo.srv, 53)
    return log


def lookups(topo: ResolverTopology, tool: str, name: str) -> None:
    """LOOKUPS lookups of ``name`` through the client's resolver: one getent process each, or one
    Python process calling getaddrinfo LOOKUPS times (one thread: its sendmmsg vector reused)."""
    ok = name == INTERNAL
    if tool == "getent":
        for _ in range(LOOKUPS):
            got = topo.cli.run("getent", "ahosts", name, check=False)
            require((got.returncode == 0) == ok, f"getent ahosts {name}: {got.returncode} {got.stdout}")
        return
    script = (f"import json, socket\nout = []\nfor _ in range({LOOKUPS}):\n"
              f"    try:\n        out.append(len(socket.getaddrinfo({name!r}, 80)))\n"
              "    except socket.gaierror as e:\n        out.append(e.errno)\nprint(json.dumps(out))")  # fmt: skip
    got = json.loads(topo.cli.run(sys.executable, "-c", script, timeout=60).stdout)
    require(all((r > 0) == ok for r in got), f"getaddrinfo {name}: {got}")


def logged(log: Path) -> Counter[Key]:
    """The client's queries as dnsmasq logged them: (name, qtype) -> count."""
    text = log.read_text() if log.exists() else ""
    return Counter((name.lower(), qtype) for qtype, name in _QUERY.findall(text))


def both_sides(trace: L7Trace, topo: ResolverTopology) -> tuple[Counter[Any], Counter[Any]]:
    """(client, server) records: (name, qtype, rcode) -> count. The server side is dnsmasq's port-53
    socket answering the client (not its forwards to the upstream)."""
    client = Counter((e.record.name, e.record.qtype, e.record.rcode)
                     for e in dns(trace.events, side=Role.CLIENT, netns_ino=topo.cli.ino))  # fmt: skip
    server = Counter((e.record.name, e.record.qtype, e.record.rcode)
                     for e in dns(trace.events, side=Role.SERVER, netns_ino=topo.srv.ino, local_port=53)
                     if e.conn.remote_ip == CLI_V4)  # fmt: skip
    return client, server


def by_question(records: Counter[Any]) -> Counter[Key]:
    out: Counter[Key] = Counter()
    for (name, qtype, _), n in records.items():
        out[(name, qtype)] += n
    return out


PROBES: dict[str, Callable[..., Any]] = {"socket": L7Collector, "syscalls": SyscallL7Collector}


@pytest.mark.parametrize(
    ("probe", "tool", "name"),
    [
        ("socket", "getent", EXTERNAL),
        ("socket", "getaddrinfo", EXTERNAL),
        ("socket", "getent", INTERNAL),
        ("socket", "getaddrinfo", INTERNAL),
        ("syscalls", "getaddrinfo", EXTERNAL),
    ],
)
def test_client_and_server_count_the_same_answers(
    rtopo: ResolverTopology, tmp_path: Path, probe: str, tool: str, name: str
) -> None:
    log = start_dns(rtopo, tmp_path)
    kw = {"tls": False} if probe == "socket" else {}
    trace = L7Trace((rtopo.cli, rtopo.srv), collector=PROBES[probe], **kw)
    try:
        lookups(rtopo, tool, name)

        def done(_: object) -> bool:
            want = sum(logged(log).values())
            client, server = both_sides(trace, rtopo)
            return want > 0 and sum(client.values()) >= want and sum(server.values()) >= want

        trace.until(done, timeout=10)
        trace.poll()  # anything beyond the count would show up here
        client, server = both_sides(trace, rtopo)
        queries = logged(log)

        # The scenario is what it claims: every expansion of the search path, then the name itself.
        if name == EXTERNAL:
            expansions = {f"{name}.{s}" for s in SEARCH}
            assert {(n, rc) for n, _, rc in client} == {(n, "NXDOMAIN") for n in expansions} | {(name, "SERVFAIL")}
            # glibc retries SERVFAIL: more queries for the name than lookups
            require(queries[(name, "A")] > LOOKUPS, f"no SERVFAIL retries: {queries}")
        else:
            assert {(n, q, rc) for n, q, rc in client} >= {(f"{name}.{SEARCH[0]}", "A", "NOERROR")}
            assert {n for n, _, _ in client} == {f"{name}.{SEARCH[0]}"}
        assert by_question(server) == queries, "dnsmasq's socket vs dnsmasq's log"
        assert client == server, f"client {client} vs server {server}"
        counters = trace.pipe.counters()
        assert (counters["invalid_frames"], counters["orphan_responses"], counters["expired_requests"]) == (0, 0, 0)
        stats = trace.kernel_stats()
        assert stats["read_failed"] == stats["no_buffer"] == stats.get("mmsg_unknown", 0) == 0, stats
    finally:
        trace.close()


def test_mmsg_entry_hook_missing_is_counted(rtopo: ResolverTopology, tmp_path: Path) -> None:
    """Without the sendmmsg entry hook a message's place in its vector is unknown: its bytes are not
    guessed (no stray records), the chunk says it has none and the kernel counts each such message."""
    log = start_dns(rtopo, tmp_path)
    trace = L7Trace((rtopo.cli, rtopo.srv), tls=False)
    try:
        for _, l7 in trace.pairs:
            l7.obj._detach_capability("l7.mmsg")  # what a kernel without the syscall tracepoints leaves
        lookups(rtopo, "getent", INTERNAL)
        want = 2 * LOOKUPS  # A and AAAA, one sendmmsg per lookup
        trace.until(lambda _: sum(both_sides(trace, rtopo)[1].values()) >= want)
        client, server = both_sides(trace, rtopo)
        require(sum(logged(log).values()) == want, f"dnsmasq log: {logged(log)}")
        assert sum(server.values()) == want  # dnsmasq answers with sendmsg: unaffected
        assert trace.kernel_stats()["mmsg_unknown"] == want
        assert not client  # the client's queries went without bytes: nothing paired, nothing invented
        counters = trace.pipe.counters()
        # no query of the client reached a parser; its answers wait for them (orphans after the timeout)
        assert (counters["requests_parsed"], counters["responses_parsed"]) == (want, 2 * want)
        assert counters["invalid_frames"] == 0
    finally:
        trace.close()


# One sendmmsg of VECTOR messages (past the 64 the probe once assumed at most) with a zero-length
# datagram among them, then the answers read with recvmmsg: libc's own calls through ctypes.
VECTOR, EMPTY_AT = 101, 50
MMSG_CLIENT = """
import ctypes, json, socket, struct, sys, threading, time
from ctypes import POINTER, c_int, c_size_t, c_uint, c_uint32, c_void_p
class Iov(ctypes.Structure):
    _fields_ = [("base", c_void_p), ("len", c_size_t)]
class Msg(ctypes.Structure):
    _fields_ = [("name", c_void_p), ("namelen", c_uint32), ("iov", POINTER(Iov)), ("iovlen", c_size_t),
                ("control", c_void_p), ("controllen", c_size_t), ("flags", c_int)]
class MMsg(ctypes.Structure):
    _fields_ = [("hdr", Msg), ("len", c_uint)]
libc = ctypes.CDLL(None, use_errno=True)
mode, server, n, empty_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def query(i):
    name = b"".join(bytes([len(p)]) + p for p in f"q{i}.a.svc.cluster.local".encode().split(b"."))
    return struct.pack("!HHHHHH", i + 1, 0x0100, 1, 0, 0, 0) + name + b"\\0" + struct.pack("!HH", 1, 1)
payloads = [b"" if i == empty_at else query(i) for i in range(n)]
keep = [ctypes.create_string_buffer(p, len(p) or 1) for p in payloads]
iovs = (Iov * n)(*[Iov(ctypes.cast(b, c_void_p), len(p)) for b, p in zip(keep, payloads)])
vec = (MMsg * n)()
for i in range(n):
    vec[i].hdr.iov, vec[i].hdr.iovlen = ctypes.pointer(iovs[i]), 1
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
s.connect((server, 53))
rbufs = [ctypes.create_string_buffer(512) for _ in range(n)]
riovs = (Iov * n)(*[Iov(ctypes.cast(b, c_void_p), 512) for b in rbufs])
rvec = (MMsg * n)()
for i in range(n):
    rvec[i].hdr.iov, rvec[i].hdr.iovlen = ctypes.pointer(riovs[i]), 1
got = 0
def receive(want, flags):
    global got
    while got < want:
        r = libc.recvmmsg(s.fileno(), rvec, n, flags, None)
        if r <= 0:
            break
        got += r
if mode == "evict":
    # a thread blocked in recvmmsg (its entry made), then this one's sendmmsg (another entry)
    reader = threading.Thread(target=receive, args=(n, 0))
    reader.start()
    while not open(f"/proc/self/task/{reader.native_id}/syscall").read().startswith("299 "):
        time.sleep(0.01)
    sent = libc.sendmmsg(s.fileno(), vec, n, 0)
    reader.join()
else:
    sent = libc.sendmmsg(s.fileno(), vec, n, 0)
    receive(n - (0 <= empty_at < n), 0x10000)  # MSG_WAITFORONE
print(json.dumps({"sent": sent, "received": got}))
"""


def test_one_vector_call_of_many_messages(rtopo: ResolverTopology, tmp_path: Path) -> None:
    """Every message of a long vector at its own place, past a zero-length one, both ways: the client
    records each query once, paired with its answer, as dnsmasq's socket does."""
    log = start_dns(rtopo, tmp_path)
    trace = L7Trace((rtopo.cli, rtopo.srv), tls=False)
    try:
        out = rtopo.cli.run(sys.executable, "-c", MMSG_CLIENT, "vector", SRV_V4, str(VECTOR), str(EMPTY_AT), timeout=30)
        got = json.loads(out.stdout)
        require(got == {"sent": VECTOR, "received": VECTOR - 1}, f"mmsg client: {got}")
        trace.until(lambda _: sum(both_sides(trace, rtopo)[0].values()) >= VECTOR - 1, timeout=10)
        trace.poll()
        client, server = both_sides(trace, rtopo)
        want = Counter({(f"q{i}.a.svc.cluster.local", "A", "NXDOMAIN"): 1 for i in range(VECTOR) if i != EMPTY_AT})
        assert by_question(want) == logged(log)
        assert client == server == want
        assert trace.pipe.counters()["invalid_frames"] == 0
        stats = trace.kernel_stats()
        assert stats["mmsg_unknown"] == stats["read_failed"] == stats["no_buffer"] == 0, stats
    finally:
        trace.close()


def test_mmsg_threads_past_the_bound_are_counted(rtopo: ResolverTopology, tmp_path: Path) -> None:
    """The kernel keeps one thread's place in its vector (bound shrunk to 1): a thread blocked in
    recvmmsg loses its entry to another thread's sendmmsg. Its messages are counted, not guessed."""
    log = start_dns(rtopo, tmp_path)
    trace = L7Trace((rtopo.cli, rtopo.srv), tls=False, mmsg_threads=1)
    try:
        out = rtopo.cli.run(sys.executable, "-c", MMSG_CLIENT, "evict", SRV_V4, "2", "-1", timeout=30)
        require(json.loads(out.stdout) == {"sent": 2, "received": 2}, f"mmsg client: {out.stdout}")
        trace.until(lambda _: sum(both_sides(trace, rtopo)[1].values()) >= 2, timeout=10)
        client, server = both_sides(trace, rtopo)
        require(sum(logged(log).values()) == 2, f"dnsmasq log: {logged(log)}")
        assert sum(server.values()) == 2
        assert trace.kernel_stats()["mmsg_unknown"] == 2  # the reader's two answers
        assert not client  # answers without bytes: nothing paired, nothing invented
        counters = trace.pipe.counters()
        assert counters["requests_parsed"] == 2 + 2  # the client's queries (sendmmsg kept its place) and the server's
        assert counters["invalid_frames"] == 2  # the client's answers, counted where they were dropped
    finally:
        trace.close()
