"""Converters from raw API JSON to slim records: the fields we keep, and no exception on odd input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster_processor.kube import model
from tests.cluster_processor.kube import factories as f


def test_pod_keeps_what_resolution_needs() -> None:
    rs = f.owner("ReplicaSet", "web-7d4b9c8f6b", "rs-uid")
    raw = f.pod(
        "web-7d4b9c8f6b-abcde",
        uid="pod-uid",
        ips=["10.0.0.7", "FD00::0007"],
        owners=[f.owner("Foo", "not-controller", controller=False), rs],
        containers=["containerd://" + f.cid(1).upper(), "cri-o://" + f.cid(2)],
        init_containers=["docker://" + f.cid(3)],
        created=f.ts(5),
        deleted=f.ts(65),
    )
    raw["metadata"]["resourceVersion"] = "42"
    pod = model.pod_from_api(raw)
    assert pod.uid == "pod-uid"
    assert (pod.namespace, pod.name, pod.node_name, pod.phase) == (
        "default",
        "web-7d4b9c8f6b-abcde",
        "node-1",
        "Running",
    )
    assert pod.pod_ips == ("10.0.0.7", "fd00::7")  # canonical text form
    assert pod.host_network is False
    assert pod.container_ids == (f.cid(3), f.cid(1), f.cid(2))  # init first, prefixes stripped, lowercase
    assert pod.owner == model.OwnerRef("ReplicaSet", "web-7d4b9c8f6b", "rs-uid")
    assert pod.deletion_ts is not None and pod.deletion_ts - pod.creation_ts == 60
    assert pod.resource_version == "42"


def test_pod_falls_back_to_pod_ip_and_owner_without_controller_flag() -> None:
    raw = f.pod("p", ip=None, owners=[f.owner("Job", "j", "job-uid", controller=False)])
    raw["status"]["podIP"] = "10.1.1.1"
    pod = model.pod_from_api(raw)
    assert pod.pod_ips == ("10.1.1.1",)
    assert pod.owner == model.OwnerRef("Job", "j", "job-uid")


def test_pending_pod_has_no_ips_nor_container_ids() -> None:
    raw = f.pod("p", ip=None, phase="Pending")
    raw["status"]["containerStatuses"] = [{"name": "c", "ready": False}]  # not started: no containerID
    pod = model.pod_from_api(raw)
    assert pod.pod_ips == () and pod.container_ids == () and pod.owner is None


def test_service_drops_headless_and_sorts_selector() -> None:
    svc = model.service_from_api(f.service("db", cluster_ips=["10.96.1.1", "fd00::a"], selector={"b": "2", "a": "1"}))
    assert svc.cluster_ips == ("10.96.1.1", "fd00::a")
    assert svc.selector == (("a", "1"), ("b", "2"))
    headless = model.service_from_api(f.service("h", cluster_ips=["None"]))
    assert headless.cluster_ips == ()


def test_endpoint_slice_maps_addresses_to_pod_uids() -> None:
    raw = f.endpoint_slice("db-abc", "db", [("10.0.0.1", "u1"), ("10.0.0.2", "u2")])
    raw["endpoints"].append({"addresses": ["10.0.0.3"], "targetRef": {"kind": "Node", "uid": "n"}})
    es = model.endpoint_slice_from_api(raw)
    assert es.service_name == "db"
    assert es.endpoints == (("10.0.0.1", "u1"), ("10.0.0.2", "u2"), ("10.0.0.3", ""))


def test_endpoint_slice_keeps_ready_endpoints_only() -> None:
    raw = f.endpoint_slice("db-abc", "db", [("10.0.0.1", "u1"), ("10.0.0.2", "u2")], not_ready={"10.0.0.2"})
    del raw["endpoints"][0]["conditions"]  # unknown readiness: the API asks consumers to read it as ready
    assert model.endpoint_slice_from_api(raw).endpoints == (("10.0.0.1", "u1"),)


def test_node_addresses_and_workload_owner() -> None:
    node = model.node_from_api(f.node("n1", internal="192.168.1.10", external="203.0.113.5"))
    assert (node.internal_ips, node.external_ips) == (("192.168.1.10",), ("203.0.113.5",))
    job = model.workload_from_api("Job", f.workload("backup-28500000", owners=[f.owner("CronJob", "backup", "cj")]))
    assert job.owner == model.OwnerRef("CronJob", "backup", "cj") and job.kind == "Job"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("containerd://ABC", "abc"),
        ("cri-o://abc", "abc"),
        ("docker://abc", "abc"),
        ("abc", "abc"),
        ("", ""),
    ],
)
def test_strip_runtime_prefix(text: str, expected: str) -> None:
    assert model.strip_runtime_prefix(text) == expected


def test_canonical_ip() -> None:
    assert model.canonical_ip("::ffff:10.0.0.1") == "10.0.0.1"
    assert model.canonical_ip("FD00:0::1") == "fd00::1"
    assert model.canonical_ip("not-an-ip") == "not-an-ip"


def test_parse_timestamp_never_raises() -> None:
    assert model.parse_timestamp("") == 0.0
    assert model.parse_timestamp("yesterday") == 0.0
    assert model.parse_timestamp("2024-05-01T10:00:00Z") == 1714557600.0


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
_fields = st.sampled_from(
    ["metadata", "spec", "status", "endpoints", "podIPs", "containerStatuses", "ownerReferences", "addresses"]
)


@given(st.dictionaries(_fields, _json, max_size=4), st.sampled_from(sorted(model.KINDS)))
def test_converters_never_raise_on_malformed_objects(raw: dict[str, Any], kind: str) -> None:
    assert model.convert(kind, raw) is not None


def test_converters_accept_non_mappings() -> None:
    for kind in model.KINDS:
        assert model.convert(kind, None) is not None  # type: ignore[arg-type]
    assert model.convert("ConfigMap", {}) is None


def test_owner_references_are_shared_and_the_sharing_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    owners = [f.owner("ReplicaSet", "web-5f6d7c8b9a", "rs-1")]
    a = model.pod_from_api(f.pod("web-1", uid="u1", owners=owners))
    b = model.pod_from_api(f.pod("web-2", uid="u2", owners=owners))
    assert a.owner is b.owner and a.owner == model.OwnerRef("ReplicaSet", "web-5f6d7c8b9a", "rs-1")
    monkeypatch.setattr(model, "_MAX_OWNERS", 4)
    for i in range(10):  # past the bound: the table is emptied, the answers stay right
        p = model.pod_from_api(f.pod(f"x-{i}", uid=f"x{i}", owners=[f.owner("ReplicaSet", f"x-{i}", f"rs-x{i}")]))
        assert p.owner == model.OwnerRef("ReplicaSet", f"x-{i}", f"rs-x{i}")
    assert len(model._OWNERS) <= 4


def test_canonical_ip_keeps_a_canonical_string() -> None:
    model.canonical_ip.cache_clear()  # an earlier equal string would be the cached answer
    text = "".join(["10.0.0.", "1"])  # built at run time: not a shared constant
    assert model.canonical_ip(text) is text
    assert model.canonical_ip("::FFFF:10.0.0.2") == "10.0.0.2"
    assert model.canonical_ip("2001:DB8::1") == "2001:db8::1"
