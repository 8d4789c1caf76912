"""KubeIndex rules, driven with raw objects and a hand-moved clock."""

from __future__ import annotations

import ipaddress
from typing import Any

from cluster_processor.kube import model
from cluster_processor.kube.index import KubeIndex
from tests.cluster_processor.kube import factories as f


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _index(grace: float = 30.0) -> tuple[KubeIndex, Clock]:
    clock = Clock()
    return KubeIndex(delete_grace_s=grace, clock=clock), clock


def test_lookup_by_ip_uid_and_ip_forms() -> None:
    idx, _ = _index()
    idx.apply("ADDED", "Pod", f.pod("a", uid="ua", ips=["10.0.0.1", "fd00::1"]))
    assert idx.pod_by_uid("ua") is not None
    assert idx.pod_by_ip("10.0.0.1") is idx.pod_by_uid("ua")
    assert idx.pod_by_ip("::ffff:10.0.0.1") is idx.pod_by_uid("ua")  # the wire's IPv4-mapped form
    assert idx.pod_by_ip(ipaddress.ip_address("10.0.0.1").packed) is idx.pod_by_uid("ua")
    assert idx.pod_by_ip("FD00:0:0::1") is idx.pod_by_uid("ua")
    assert idx.pod_by_ip("10.0.0.2") is None
    assert idx.pod_by_ip(b"\x01") is None


def test_host_network_pod_ip_resolves_to_the_node_not_the_pod() -> None:
    idx, _ = _index()
    idx.apply("ADDED", "Node", f.node("node-1", internal="192.168.1.10", external="203.0.113.5"))
    idx.apply(
        "ADDED", "Pod", f.pod("kube-proxy-x", uid="hn", ip="192.168.1.10", host_network=True, containers=[f.cid(9)])
    )
    assert idx.pod_by_ip("192.168.1.10") is None
    node = idx.node_by_ip("192.168.1.10")
    assert node is not None and node.name == "node-1"
    assert idx.node_by_ip("203.0.113.5") is node
    # Still found by what is its own: UID and container ID.
    assert idx.pod_by_uid("hn") is not None
    assert idx.pod_by_container_id(f.cid(9)) is idx.pod_by_uid("hn")
    assert idx.sizes()["pod_ips"] == 0


def test_newer_pod_wins_an_ip_and_a_late_update_of_the_old_pod_does_not_take_it_back() -> None:
    idx, _ = _index()
    old = f.pod("job-old", uid="old", ip="10.0.0.9", created=f.ts(0), phase="Succeeded")
    new = f.pod("web-new", uid="new", ip="10.0.0.9", created=f.ts(100))
    idx.apply("ADDED", "Pod", old)
    idx.apply("ADDED", "Pod", new)
    assert idx.pod_by_ip("10.0.0.9").uid == "new"  # type: ignore[union-attr]
    idx.apply("MODIFIED", "Pod", old)  # late status update of the finished pod
    assert idx.pod_by_ip("10.0.0.9").uid == "new"  # type: ignore[union-attr]
    # Arrival order does not matter either: the older pod never displaces the newer one.
    idx2, _ = _index()
    idx2.apply("ADDED", "Pod", new)
    idx2.apply("ADDED", "Pod", old)
    assert idx2.pod_by_ip("10.0.0.9").uid == "new"  # type: ignore[union-attr]


def test_delete_waits_out_the_grace_period() -> None:
    idx, clock = _index(grace=30)
    raw = f.pod("a", uid="ua", ip="10.0.0.1", containers=[f.cid(1)])
    idx.apply("ADDED", "Pod", raw)
    raw["metadata"]["deletionTimestamp"] = f.ts(60)
    idx.apply("DELETED", "Pod", raw)
    clock.now += 29
    assert idx.expire() == 0
    pod = idx.pod_by_ip("10.0.0.1")
    assert pod is not None and pod.deletion_ts is not None  # the final state is what is kept
    assert idx.pod_by_container_id(f.cid(1)) is pod
    assert idx.sizes()["pods"] == 0 and idx.sizes()["pods_total"] == 1
    clock.now += 2
    assert idx.expire() == 3  # uid, ip, container id
    assert idx.pod_by_ip("10.0.0.1") is None
    assert idx.pod_by_uid("ua") is None
    assert idx.pod_by_container_id(f.cid(1)) is None
    assert idx.pod_by_container_id(f.cid(1)[:12]) is None
    assert idx.sizes()["pending_deletes"] == 0


def test_delayed_delete_does_not_remove_an_ip_reused_by_a_new_pod() -> None:
    idx, clock = _index(grace=30)
    old = f.pod("old", uid="old", ip="10.0.0.5", created=f.ts(0))
    idx.apply("ADDED", "Pod", old)
    idx.apply("DELETED", "Pod", old)
    clock.now += 5
    idx.apply("ADDED", "Pod", f.pod("new", uid="new", ip="10.0.0.5", created=f.ts(10)))
    clock.now += 30
    idx.expire()
    assert idx.pod_by_uid("old") is None
    assert idx.pod_by_ip("10.0.0.5").uid == "new"  # type: ignore[union-attr]


def test_ip_reused_by_a_pod_with_an_equal_timestamp_is_not_removed_by_the_old_delete() -> None:
    # Same creation second: the later event wins the IP, and the UID check protects it.
    idx, clock = _index(grace=30)
    idx.apply("ADDED", "Pod", f.pod("old", uid="old", ip="10.0.0.5"))
    idx.apply("ADDED", "Pod", f.pod("new", uid="new", ip="10.0.0.5"))
    idx.apply("DELETED", "Pod", f.pod("old", uid="old", ip="10.0.0.5"))
    clock.now += 31
    idx.expire()
    assert idx.pod_by_ip("10.0.0.5").uid == "new"  # type: ignore[union-attr]


def test_repeated_delete_does_not_extend_the_grace_and_unknown_delete_is_ignored() -> None:
    idx, clock = _index(grace=30)
    raw = f.pod("a", uid="ua")
    idx.apply("ADDED", "Pod", raw)
    idx.apply("DELETED", "Pod", raw)
    clock.now += 20
    idx.apply("DELETED", "Pod", raw)
    idx.apply("MODIFIED", "Pod", raw)  # a replayed event must not revive it
    idx.apply("DELETED", "Pod", f.pod("ghost"))
    clock.now += 11
    idx.expire()
    assert idx.pod_by_uid("ua") is None


def test_restarted_container_id_is_released_after_the_grace() -> None:
    idx, clock = _index(grace=30)
    idx.apply("ADDED", "Pod", f.pod("a", uid="ua", containers=["containerd://" + f.cid(1)]))
    idx.apply("MODIFIED", "Pod", f.pod("a", uid="ua", containers=["containerd://" + f.cid(2)]))
    assert idx.pod_by_container_id(f.cid(1)) is not None  # late flows of the old container still resolve
    assert idx.pod_by_container_id(f.cid(2)) is not None
    clock.now += 31
    idx.expire()
    assert idx.pod_by_container_id(f.cid(1)) is None
    assert idx.pod_by_container_id(f.cid(2)).uid == "ua"  # type: ignore[union-attr]


def test_container_id_prefixes() -> None:
    idx, _ = _index()
    full = "ab" * 32
    idx.apply("ADDED", "Pod", f.pod("a", uid="ua", containers=["cri-o://" + full]))
    assert idx.pod_by_container_id(full).uid == "ua"  # type: ignore[union-attr]
    assert idx.pod_by_container_id(full[:12]).uid == "ua"  # type: ignore[union-attr]
    assert idx.pod_by_container_id(full[:20]).uid == "ua"  # type: ignore[union-attr]
    assert idx.pod_by_container_id("containerd://" + full.upper()).uid == "ua"  # type: ignore[union-attr]
    assert idx.pod_by_container_id(full[:11]) is None  # too short to be one container
    assert idx.pod_by_container_id(full[:12] + "ff") is None  # prefix matches, the rest does not
    assert idx.pod_by_container_id("") is None


def test_owner_chain() -> None:
    idx, _ = _index()
    idx.apply(
        "ADDED", "ReplicaSet", f.workload("web-7d4b9c8f6b", uid="rs1", owners=[f.owner("Deployment", "web", "d1")])
    )
    idx.apply("ADDED", "Deployment", f.workload("web", uid="d1"))
    idx.apply("ADDED", "Job", f.workload("backup-28500000", uid="j1", owners=[f.owner("CronJob", "backup", "cj1")]))
    idx.apply("ADDED", "Job", f.workload("migrate", uid="j2"))
    idx.apply("ADDED", "ReplicaSet", f.workload("bare-rs", uid="rs2"))

    def workload(*owners: dict[str, Any]) -> tuple[str, str]:
        return idx.workload_of(model.pod_from_api(f.pod("p-x", owners=list(owners))))

    assert workload(f.owner("ReplicaSet", "web-7d4b9c8f6b", "rs1")) == ("Deployment", "web")
    assert workload(f.owner("Job", "backup-28500000", "j1")) == ("CronJob", "backup")
    assert workload(f.owner("Job", "migrate", "j2")) == ("Job", "migrate")
    assert workload(f.owner("ReplicaSet", "bare-rs", "rs2")) == ("ReplicaSet", "bare-rs")
    assert workload(f.owner("StatefulSet", "db", "s1")) == ("StatefulSet", "db")
    assert workload(f.owner("DaemonSet", "agent", "ds1")) == ("DaemonSet", "agent")
    assert workload() == ("Pod", "p-x")
    # ReplicaSet not (yet) known: the Deployment is read from its name, as the collector does.
    assert workload(f.owner("ReplicaSet", "api-5f6d7c8b9a", "rs-unknown")) == ("Deployment", "api")
    assert workload(f.owner("ReplicaSet", "odd", "rs-unknown2")) == ("ReplicaSet", "odd")
    assert workload(f.owner("Job", "x-123", "j-unknown")) == ("Job", "x-123")
    assert idx.workload_by_uid("d1").name == "web"  # type: ignore[union-attr]


def test_services_endpoint_slices_and_nodes() -> None:
    idx, clock = _index(grace=30)
    idx.apply("ADDED", "Pod", f.pod("db-0", uid="p0", ip="10.0.0.10"))
    idx.apply("ADDED", "Service", f.service("db", uid="s1", cluster_ips=["10.96.0.20"]))
    idx.apply("ADDED", "EndpointSlice", f.endpoint_slice("db-1", "db", [("10.0.0.10", "p0")], uid="es1"))
    assert idx.service_by_cluster_ip("10.96.0.20").name == "db"  # type: ignore[union-attr]
    assert idx.service_by_name("default", "db").uid == "s1"  # type: ignore[union-attr]
    svc = idx.service_by_name("default", "db")
    assert svc is not None

    def backends() -> list[str] | None:
        pods = idx.ready_backends(svc)
        return None if pods is None else [p.uid for p in pods]

    assert backends() == ["p0"]
    # A slice update replaces its endpoints; a not-ready endpoint is no backend.
    idx.apply("ADDED", "Pod", f.pod("db-1", uid="p1", ip="10.0.0.11"))
    two = [("10.0.0.10", "p0"), ("10.0.0.11", "p1")]
    idx.apply("MODIFIED", "EndpointSlice", f.endpoint_slice("db-1", "db", two, uid="es1", not_ready={"10.0.0.10"}))
    assert backends() == ["p1"]
    # A ready endpoint whose pod is not known (not listed yet, or no pod at all): backends unknown.
    idx.apply("MODIFIED", "EndpointSlice", f.endpoint_slice("db-1", "db", [*two, ("10.0.0.12", "p2")], uid="es1"))
    assert backends() is None
    # A delete is immediate (no stale backends).
    idx.apply("DELETED", "EndpointSlice", f.endpoint_slice("db-1", "db", [], uid="es1"))
    assert backends() is None
    # A Service VIP survives its delete for the grace, unless a new Service takes it.
    idx.apply("DELETED", "Service", f.service("db", uid="s1", cluster_ips=["10.96.0.20"]))
    idx.apply("ADDED", "Service", f.service("db2", uid="s2", cluster_ips=["10.96.0.20"]))
    clock.now += 31
    idx.expire()
    assert idx.service_by_cluster_ip("10.96.0.20").uid == "s2"  # type: ignore[union-attr]
    assert idx.service_by_name("default", "db") is None


def test_node_re_registered_under_the_same_name() -> None:
    idx, clock = _index(grace=30)
    idx.apply("ADDED", "Node", f.node("n1", internal="192.168.1.1", uid="old"))
    idx.replace("Node", [model.node_from_api(f.node("n1", internal="192.168.1.2", uid="new"))])
    clock.now += 31
    idx.expire()
    node = idx.node_by_name("n1")
    assert node is not None and node.uid == "new"
    assert idx.node_by_ip("192.168.1.1") is None
    assert idx.node_by_ip("192.168.1.2") is node


def test_replace_removes_what_is_gone_after_the_grace() -> None:
    idx, clock = _index(grace=30)
    for i in range(3):
        idx.apply("ADDED", "Pod", f.pod(f"p{i}", uid=f"u{i}", ip=f"10.0.0.{i}"))
    idx.apply("ADDED", "ReplicaSet", f.workload("rs", uid="rs"))
    idx.replace("Pod", [f.pod("p0", uid="u0", ip="10.0.0.0"), f.pod("p3", uid="u3", ip="10.0.0.3")])
    assert idx.sizes()["pods"] == 2
    clock.now += 31
    idx.expire()
    assert {u for u in ("u0", "u1", "u2", "u3") if idx.pod_by_uid(u)} == {"u0", "u3"}
    assert idx.pod_by_ip("10.0.0.1") is None
    assert idx.workload_by_uid("rs") is not None  # a relist of one kind leaves the others alone


def test_bad_input_is_counted_not_raised() -> None:
    idx, _ = _index()
    assert not idx.apply("ADDED", "Pod", {"metadata": {}})  # no uid
    assert not idx.apply("BOOKMARK", "Pod", f.pod("a"))
    assert not idx.apply("ADDED", "ConfigMap", {"metadata": {"uid": "x"}})
    assert not idx.apply("ADDED", "Pod", model.service_from_api(f.service("s")))  # record of the wrong kind
    idx.replace("Secret", [])
    assert idx.rejected == 5
    assert idx.sizes()["pods"] == 0


def test_zero_grace_forgets_at_once() -> None:
    idx, _ = _index(grace=0)
    raw = f.pod("a", uid="ua", ip="10.0.0.1")
    idx.apply("ADDED", "Pod", raw)
    idx.apply("DELETED", "Pod", raw)
    assert idx.pod_by_uid("ua") is None and idx.pod_by_ip("10.0.0.1") is None
