"""A node with two pods and a Service VIP, in throw-away network namespaces.

``cpod`` and ``spod`` are pod namespaces joined to the ``node`` namespace by veth pairs.
As Calico does, pod addresses are /32s routed on the node to each pod's veth, so every
packet between the pods crosses the node: kube-proxy-style DNAT of the VIP in the node's
PREROUTING, and its reverse on the replies, both happen in the node's conntrack.
All addresses are in 198.18.0.0/15 and nothing is routed off the machine.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from tests.e2e.netns import Netns, Topology, run

NODE_GW = "198.18.0.254"  # the node's address on every pod veth (pods' next hop)
CPOD_IP = "198.18.1.1"
SPOD_IP = "198.18.2.1"
VIP = "198.19.0.10"
VIP_PORT, BACKEND_PORT = 80, 8080


def attach_pod(node: Netns, pod: Netns, veth: str, ip: str, gw: str) -> None:
    """``pod``'s eth0 paired with ``veth`` in ``node``: the pod's /32 routed to it on the node, the pod's
    routes through the node's address ``gw`` (as Calico does)."""
    run(["ip", "-n", node.name, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.name])
    node.ip("link", "set", veth, "up")
    pod.ip("link", "set", "eth0", "up")
    node.ip("addr", "add", f"{gw}/32", "dev", veth)
    node.ip("route", "add", f"{ip}/32", "dev", veth)
    pod.ip("addr", "add", f"{ip}/32", "dev", "eth0")
    pod.ip("route", "add", gw, "dev", "eth0", "scope", "link")
    pod.ip("route", "add", "198.18.0.0/15", "via", gw, "dev", "eth0")


@dataclass
class NatTopology(Topology):
    """Reuses :class:`Topology`'s process handling and teardown; ``cli``/``srv`` are the pods."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cli = Netns(f"ks-{self.tag}-cpod")
        self.srv = Netns(f"ks-{self.tag}-spod")
        self.node = Netns(f"ks-{self.tag}-node")

    def create(self) -> NatTopology:
        for ns in (self.node, self.cli, self.srv):
            run(["ip", "netns", "add", ns.name])
            self._created.append(ns)
            ns.ip("link", "set", "lo", "up")
        self.node.sysctl("net.ipv4.ip_forward", 1)
        for pod, veth, ip in ((self.cli, "vcpod", CPOD_IP), (self.srv, "vspod", SPOD_IP)):
            attach_pod(self.node, pod, veth, ip, NODE_GW)
        return self

    def dnat(
        self,
        vip: str = VIP,
        port: int = VIP_PORT,
        backend: str = SPOD_IP,
        to_port: int = BACKEND_PORT,
        proto: str = "tcp",
    ) -> None:
        """What kube-proxy (iptables mode) does for a ClusterIP Service with one endpoint."""
        self.node.iptables("-t", "nat", "-A", "PREROUTING", "-d", vip, "-p", proto, "--dport", str(port),
                           "-j", "DNAT", "--to-destination", f"{backend}:{to_port}")  # fmt: skip
