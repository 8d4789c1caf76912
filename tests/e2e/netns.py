"""Throw-away network namespaces for end-to-end tests, and processes run inside them.

A :class:`Topology` is a small "node": a client namespace and a server namespace joined
by a veth pair, IPv4 in 198.18.0.0/15 and IPv6 in a ULA /64 (no DAD), lo up in both.
Names are random (``ks-<6hex>-cli``), nothing is routed off the machine, and
:meth:`Topology.close` kills every process started through it and deletes the
namespaces whatever happened in the test.

Commands run in a namespace through ``ip netns exec NAME ...`` (which execs the command
directly, so a ``Popen``'s pid is the pid of the program itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node_exporter.l4.collector import L4Collector
    from node_exporter.l4.records import L4Record

PEER = Path(__file__).with_name("peer.py")
PYTHON = sys.executable

CLI_V4, SRV_V4 = "198.18.0.1", "198.18.0.2"
CLI_V6, SRV_V6 = "fd00:198:18::1", "fd00:198:18::2"


def run(args: list[str], *, check: bool = True, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def ino(self) -> int:
        return os.stat(self.path).st_ino

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(*args), check=check, timeout=timeout)

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def iptables(self, *rule: str, v6: bool = False) -> None:
        self.run("ip6tables" if v6 else "iptables", "-w", *rule)

    def nstat(self, *counters: str) -> dict[str, int]:
        """Absolute SNMP counters of this namespace (``nstat -az``)."""
        out = self.run("nstat", "-az", "--json", *counters).stdout
        data = json.loads(out)
        return {k: int(v) for k, v in data.get("kernel", {}).items()}


class Peer:
    """A process in a namespace that speaks JSON lines on stdout and takes commands on stdin."""

    def __init__(self, proc: subprocess.Popen[bytes], label: str) -> None:
        self.proc = proc
        self.label = label
        self.events: list[dict[str, Any]] = []
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def _readline(self, deadline: float) -> bytes | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                if not sel.select(left):
                    return None
            chunk = os.read(fd, 65536)
            if not chunk:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line
                return b""
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def expect(self, event: str, timeout: float = 10) -> dict[str, Any]:
        """Wait for the next event named ``event``; any other event first is an error."""
        deadline = time.monotonic() + timeout
        line = self._readline(deadline)
        if line is None:
            raise TimeoutError(f"{self.label}: no {event!r} within {timeout}s; stderr: {self.stderr_tail()}")
        if line == b"":
            raise RuntimeError(f"{self.label}: exited ({self.proc.poll()}) waiting for {event!r}: {self.stderr_tail()}")
        msg: dict[str, Any] = json.loads(line)
        self.events.append(msg)
        if msg.get("event") != event:
            raise RuntimeError(f"{self.label}: expected {event!r}, got {msg}; stderr: {self.stderr_tail()}")
        return msg

    def call(self, command: str, event: str, timeout: float = 10) -> dict[str, Any]:
        self.send(command)
        return self.expect(event, timeout)

    def stderr_tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(running)"
        with contextlib.suppress(Exception):
            return self.proc.stderr.read().decode(errors="replace")[-2000:]
        return ""

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)


@dataclass
class Topology:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cli = Netns(f"ks-{self.tag}-cli")
        self.srv = Netns(f"ks-{self.tag}-srv")
        self._created: list[Netns] = []

    # ---- setup / teardown ---------------------------------------------------------------

    def create(self) -> Topology:
        for ns in (self.cli, self.srv):
            run(["ip", "netns", "add", ns.name])
            self._created.append(ns)
            ns.ip("link", "set", "lo", "up")
        # The pair is created straight inside the namespaces: no name in the root namespace.
        run(["ip", "-n", self.cli.name, "link", "add", "eth0", "type", "veth",
             "peer", "name", "eth0", "netns", self.srv.name])  # fmt: skip
        # Links up first, addresses after: an IPv6 address added while the link has no
        # carrier yet made the first neighbour solicitations go unanswered (the first SYN
        # then waited for its 1 s retransmit).
        for ns in (self.cli, self.srv):
            ns.ip("link", "set", "eth0", "up")
        for ns, v4, v6 in ((self.cli, CLI_V4, CLI_V6), (self.srv, SRV_V4, SRV_V6)):
            ns.ip("addr", "add", f"{v4}/24", "dev", "eth0")
            ns.ip("-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
        return self

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
        self.procs.clear()
        for ns in reversed(self._created):
            # Anything still inside a namespace of ours was started by this test (children
            # of the programs above): end it by pid, then the namespace can go.
            pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns.name], check=False)
        self._created.clear()

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- processes ----------------------------------------------------------------------

    def spawn(self, ns: Netns, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start a program in ``ns``; killed by :meth:`close`."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(ns.cmd(*args), **kw)
        self.procs.append(proc)
        return proc

    def peer(self, ns: Netns, *args: str, label: str | None = None) -> Peer:
        """Start ``tests/e2e/peer.py ARGS`` in ``ns`` (unbuffered pipes both ways)."""
        proc = self.spawn(ns, PYTHON, "-u", str(PEER), *args,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
        return Peer(proc, label or f"{ns.name}:{args[0]}")

    def wait_listening(self, ns: Netns, port: int, timeout: float = 10, udp: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ns.run("ss", "-Huln" if udp else "-Htln", f"sport = :{port}").stdout.strip():
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing listens on port {port} in {ns.name}")


NGINX_CONF = """\
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # A keep-alive connection stays one connection for the whole of a wrk run (default: 1000).
    keepalive_requests 1000000;
    server {{
{server}
    }}
}}
"""


def nginx(topo: Topology, tmp: Path, server: str, ports: tuple[int, ...]) -> subprocess.Popen[Any]:
    """Debian's nginx in the server namespace with one ``server {}`` body; config/pid/logs under
    ``tmp``; returns once every port in ``ports`` listens."""
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, server=server))
    proc = topo.spawn(topo.srv, "nginx", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf))
    try:
        for port in ports:
            topo.wait_listening(topo.srv, port)
    except TimeoutError:
        log = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
        raise RuntimeError(f"nginx did not start: {log}") from None
    return proc


def start_nginx(topo: Topology, tmp: Path, port: int) -> subprocess.Popen[Any]:
    """nginx (``return 200``) on the server namespace's IPv4 and IPv6 addresses."""
    server = f"listen {SRV_V4}:{port}; listen [{SRV_V6}]:{port}; location / {{ return 200; }}"
    return nginx(topo, tmp, server, (port,))


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Recorder:
    """Polls an L4 collector and keeps the records a test cares about."""

    def __init__(self, collector: L4Collector, keep: Callable[[L4Record], bool]) -> None:
        self.collector = collector
        self.keep = keep
        self.records: list[L4Record] = []

    def drain(self) -> None:
        """Forget whatever the collector holds from before this test."""
        self.collector.poll()

    def poll(self) -> list[L4Record]:
        new = [r for r in self.collector.poll() if self.keep(r)]
        self.records.extend(new)
        return new

    def until(
        self, done: Callable[[list[L4Record]], bool], timeout: float = 5, interval: float = 0.05
    ) -> list[L4Record]:
        """Poll until ``done(records)`` or the deadline; returns the records either way."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if done(self.records) or time.monotonic() >= deadline:
                return self.records
            time.sleep(interval)

    def closes(self, **match: Any) -> list[L4Record]:
        return [r for r in self.records if r.is_close and all(getattr(r, k) == v for k, v in match.items())]

    def of(self, cookie: int) -> list[L4Record]:
        return [r for r in self.records if r.sock_cookie == cookie]


CGROUP2 = Path("/sys/fs/cgroup/unified")


class PodCgroups:
    """systemd-driver kubelet cgroups, one containerd container per pod, or systemd services;
    :meth:`close` removes what it created (moving out any process still inside, as the topology's
    teardown kills them)."""

    def __init__(self) -> None:
        self.root = CGROUP2 if (CGROUP2 / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
        self._created: list[Path] = []

    def add(self) -> tuple[Path, str, str]:
        """A new pod's container cgroup: (scope dir, pod uid, container id)."""
        pod_uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
        slice_ = f"kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice"
        dirs = [self.root / "kubepods.slice", self.root / "kubepods.slice/kubepods-burstable.slice"]
        dirs += [dirs[-1] / slice_, dirs[-1] / slice_ / f"cri-containerd-{cid}.scope"]
        for d in dirs:
            if not d.exists():
                d.mkdir()
                self._created.append(d)
        return dirs[-1], pod_uid, cid

    def unit(self, name: str) -> Path:
        """A systemd service's cgroup as systemd makes it (``/system.slice/NAME``), e.g. ``web.service``."""
        dirs = [self.root / "system.slice", self.root / "system.slice" / name]
        for d in dirs:
            if not d.exists():
                d.mkdir()
                self._created.append(d)
        return dirs[-1]

    @staticmethod
    def move(scope: Path, pid: int) -> None:
        """From outside the namespace: inside ``ip netns exec`` /sys is the namespace's (KERNEL.md)."""
        (scope / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for d in reversed(self._created):
            for _ in range(50):  # the processes in it are being killed by the topology teardown
                with contextlib.suppress(OSError):
                    d.rmdir()
                    break
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        (self.root / "cgroup.procs").write_text(pid)
                time.sleep(0.05)
        self._created.clear()
