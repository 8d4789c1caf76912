"""A node with several pods, Service VIPs, a cluster DNS and Kubernetes-style resolv.conf files.

Every pod is a network namespace joined to the ``node`` namespace by a veth pair; as Calico does,
pod addresses are /32s routed on the node to each pod's veth, so every packet between pods crosses
the node: the kube-proxy-style DNAT of each Service VIP (TCP, and UDP for DNS) and its reverse both
happen in the node's conntrack, and a netfilter ``statistic`` rule in the node's FORWARD chain can
drop a share of one edge's packets. ``ip netns exec`` bind-mounts ``/etc/netns/<ns>/resolv.conf``
over ``/etc/resolv.conf``, so a pod's glibc resolver reads its own search path.

Addresses are in 198.18.0.0/15 (pods 198.18.<net>.x, VIPs 198.19.<net>.x) with ``net`` random:
the agent sees every namespace on the machine and the processor names endpoints by address, so
another test's pods must not read as ours. :meth:`MeshTopology.close` removes the namespaces,
their processes and the resolv.conf directories, whatever happened.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.nattopo import attach_pod
from tests.e2e.netns import Netns, PodCgroups, Topology, run

ETC_NETNS = Path("/etc/netns")


@dataclass
class MeshTopology(Topology):
    """Reuses :class:`Topology`'s process handling and teardown; pods are added by name."""

    net: int = field(default_factory=lambda: random.randrange(16, 250))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.node = Netns(f"ks-{self.tag}-node")
        self.node_gw = f"198.18.{self.net}.254"
        self.pods: dict[str, Netns] = {}
        self.ips: dict[str, str] = {}
        self.cgroups = PodCgroups()
        self.containers: dict[str, tuple[Path, str, str]] = {}  # pod -> (cgroup scope, pod uid, container id)

    def create(self) -> MeshTopology:
        run(["ip", "netns", "add", self.node.name])
        self._created.append(self.node)
        self.node.ip("link", "set", "lo", "up")
        self.node.sysctl("net.ipv4.ip_forward", 1)
        return self

    def add_pod(self, name: str, container: bool = True) -> Netns:
        """A pod namespace with the next address, routed through the node; with ``container``, a
        kubelet-style cgroup its programs run in (:meth:`start`)."""
        ip = f"198.18.{self.net}.{len(self.pods) + 1}"
        pod = Netns(f"ks-{self.tag}-p{len(self.pods)}")
        run(["ip", "netns", "add", pod.name])
        self._created.append(pod)
        self.pods[name], self.ips[name] = pod, ip
        pod.ip("link", "set", "lo", "up")
        attach_pod(self.node, pod, f"vp{len(self.pods) - 1}", ip, self.node_gw)
        if container:
            self.containers[name] = self.cgroups.add()
        return pod

    def start(self, pod: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """A program in ``pod``, moved into its container's cgroup before it makes a connection
        (a server: before anything connects to it; a client: it must wait for its stdin)."""
        proc = self.spawn(self.pods[pod], *args, **kw)
        if pod in self.containers:
            self.cgroups.move(self.containers[pod][0], proc.pid)
        return proc

    def vip(self, n: int) -> str:
        return f"198.19.{self.net}.{n}"

    def service(self, vip: str, port: int, backend: str, to_port: int, proto: str = "tcp") -> None:
        """What kube-proxy (iptables mode) does for a ClusterIP Service port with one endpoint."""
        self.node.iptables("-t", "nat", "-A", "PREROUTING", "-d", vip, "-p", proto, "--dport", str(port),
                           "-j", "DNAT", "--to-destination", f"{self.ips[backend]}:{to_port}")  # fmt: skip

    def lossy(self, a: str, b: str, probability: float) -> None:
        """Drop ``probability`` of the packets between pods ``a`` and ``b``, both ways (after DNAT:
        the FORWARD chain sees the backend's address)."""
        for src, dst in ((a, b), (b, a)):
            self.node.iptables("-A", "FORWARD", "-s", self.ips[src], "-d", self.ips[dst], "-m", "statistic",
                               "--mode", "random", "--probability", str(probability), "-j", "DROP")  # fmt: skip

    def blackhole(self, pod: str) -> None:
        """Drop every packet to ``pod`` (a backend behind a policy that drops): connects to it time out
        with their SYNs dropped before conntrack confirms the DNAT, so conntrack never has an answer."""
        self.node.iptables("-A", "FORWARD", "-d", self.ips[pod], "-j", "DROP")

    def dropped(self) -> int:
        """Packets the loss rules (:meth:`lossy`) have dropped so far."""
        out = self.node.run("iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n").stdout
        rows = [line.split() for line in out.splitlines()[2:]]  # after the chain and column headers
        return sum(int(row[0]) for row in rows if len(row) > 2 and row[2] == "DROP" and "statistic" in row)

    def resolv_conf(self, pod: str, nameserver: str, namespace: str) -> None:
        """The kubelet's resolv.conf for a ClusterFirst pod in ``namespace``."""
        d = ETC_NETNS / self.pods[pod].name
        d.mkdir(parents=True, exist_ok=True)
        search = f"{namespace}.svc.cluster.local svc.cluster.local cluster.local"
        (d / "resolv.conf").write_text(f"search {search}\nnameserver {nameserver}\noptions ndots:5\n")

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.cgroups.close()
            for pod in self.pods.values():
                shutil.rmtree(ETC_NETNS / pod.name, ignore_errors=True)
