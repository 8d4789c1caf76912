"""parse_cgroup_file against every cgroup layout we claim, as the kernel prints them."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_exporter.metadata.cgroup import (
    HOST,
    MAX_LINE_CHARS,
    MAX_LINES,
    ContainerIdentity,
    parse_cgroup_file,
    parse_cgroup_path,
)

CID = "3f2b8c1d9e0a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
OUTER_CID = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9"
POD_UID = "8d4c2f1e-7b3a-4e9d-a1c2-5f6e7d8c9b0a"
POD_UID_SYSTEMD = POD_UID.replace("-", "_")
STATIC_POD_UID = "5d1b7e4f0c2a9b8d3e6f1a0c4b7d2e9f"  # static pods: kubelet's 32-hex config hash

# --- kubelet, cgroupfs driver (cgroup v1, one line per hierarchy) -----------------------------
K8S_CGROUPFS_BURSTABLE_V1 = f"""\
12:pids:/kubepods/burstable/pod{POD_UID}/{CID}
11:hugetlb:/kubepods/burstable/pod{POD_UID}/{CID}
10:memory:/kubepods/burstable/pod{POD_UID}/{CID}
9:cpu,cpuacct:/kubepods/burstable/pod{POD_UID}/{CID}
8:devices:/kubepods/burstable/pod{POD_UID}/{CID}
1:name=systemd:/kubepods/burstable/pod{POD_UID}/{CID}
0::/
"""
K8S_CGROUPFS_GUARANTEED_V1 = f"4:memory:/kubepods/pod{POD_UID}/{CID}\n1:name=systemd:/kubepods/pod{POD_UID}/{CID}\n"
K8S_CGROUPFS_BESTEFFORT_V2 = f"0::/kubepods/besteffort/pod{POD_UID}/{CID}\n"
K8S_CGROUPFS_STATIC_POD_V2 = f"0::/kubepods/burstable/pod{STATIC_POD_UID}/{CID}\n"

# --- kubelet, systemd driver ------------------------------------------------------------------
K8S_SYSTEMD_CONTAINERD_V2 = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n"
)
K8S_SYSTEMD_CRIO_V2 = (
    f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/crio-{CID}.scope\n"
)
K8S_SYSTEMD_CRIO_CONMON_V2 = (
    "0::/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/crio-conmon-{CID}.scope\n"
)
K8S_SYSTEMD_DOCKER_GUARANTEED_V1 = f"""\
11:memory:/kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice/docker-{CID}.scope
1:name=systemd:/kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice/docker-{CID}.scope
"""
# A process inside the container with its own sub-cgroup (systemd in a container, nested runtime).
K8S_SYSTEMD_CRIO_NESTED_V2 = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_UID_SYSTEMD}.slice/crio-{CID}.scope/container\n"
)
# Read by an agent in a private cgroup namespace: paths are relative to the agent's own cgroup.
K8S_SYSTEMD_CGROUPNS_RELATIVE_V2 = (
    f"0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n"
)
# kind: the Kubernetes node is itself a Docker container; the pod's container is the inner one.
KIND_NESTED_V2 = (
    f"0::/system.slice/docker-{OUTER_CID}.scope/kubelet.slice/kubelet-kubepods.slice/"
    "kubelet-kubepods-besteffort.slice/"
    f"kubelet-kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n"
)
KIND_KUBELET_V2 = f"0::/system.slice/docker-{OUTER_CID}.scope/system.slice/kubelet.service\n"

# --- Docker, containerd, podman outside Kubernetes --------------------------------------------
DOCKER_CGROUPFS_V1 = f"""\
12:perf_event:/docker/{CID}
4:memory:/docker/{CID}
1:name=systemd:/docker/{CID}
0::/system.slice/containerd.service
"""
DOCKER_SYSTEMD_V2 = f"0::/system.slice/docker-{CID}.scope\n"
CONTAINERD_CTR_V2 = f"0::/default/{CID}\n"
NERDCTL_SYSTEMD_V2 = f"0::/system.slice/nerdctl-{CID}.scope\n"
PODMAN_V2 = f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope\n"
PODMAN_CONMON_V2 = f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-conmon-{CID}.scope\n"

# --- host processes ---------------------------------------------------------------------------
HOST_SESSION_V2 = "0::/user.slice/user-0.slice/session-1.scope\n"
HOST_ROOT_V2 = "0::/\n"
HOST_CONTAINERD_DAEMON_V2 = "0::/system.slice/containerd.service\n"
HOST_KUBELET_V1 = """\
12:pids:/system.slice/kubelet.service
4:memory:/system.slice/kubelet.service
1:name=systemd:/system.slice/kubelet.service
0::/system.slice/kubelet.service
"""
# A 32-hex cgroup name that is not a container (job runners name cgroups after hashes).
HOST_HASH_NAMED_V1 = "4:memory:/process_api/17292cfd0c847fe157d30e0bd82c3454\n0::/\n"

# --- hybrid hosts: v1 hierarchies plus the unified v2 one -------------------------------------
HYBRID_CONTAINER_IN_V1_ONLY = f"""\
10:memory:/kubepods/besteffort/pod{POD_UID}/{CID}
1:name=systemd:/kubepods/besteffort/pod{POD_UID}/{CID}
0::/
"""
HYBRID_CONTAINER_IN_V2_ONLY = f"""\
10:memory:/
1:name=systemd:/
0::/kubepods/besteffort/pod{POD_UID}/{CID}
"""
# One hierarchy knows the pod, another only the container: the pod-bearing line is more useful.
HYBRID_POD_ONLY_IN_ONE_LINE = f"""\
10:memory:/docker/{CID}
0::/kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice/docker-{CID}.scope
"""

IN_POD_CGROUPFS = ContainerIdentity(CID, POD_UID, "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(K8S_CGROUPFS_BURSTABLE_V1, IN_POD_CGROUPFS, id="k8s-cgroupfs-burstable-v1"),
        pytest.param(K8S_CGROUPFS_GUARANTEED_V1, IN_POD_CGROUPFS, id="k8s-cgroupfs-guaranteed-v1"),
        pytest.param(K8S_CGROUPFS_BESTEFFORT_V2, IN_POD_CGROUPFS, id="k8s-cgroupfs-besteffort-v2"),
        pytest.param(K8S_CGROUPFS_STATIC_POD_V2, ContainerIdentity(CID, STATIC_POD_UID, ""), id="k8s-static-pod"),
        pytest.param(
            K8S_SYSTEMD_CONTAINERD_V2, ContainerIdentity(CID, POD_UID, "containerd"), id="k8s-systemd-containerd"
        ),
        pytest.param(K8S_SYSTEMD_CRIO_V2, ContainerIdentity(CID, POD_UID, "cri-o"), id="k8s-systemd-crio"),
        pytest.param(
            K8S_SYSTEMD_DOCKER_GUARANTEED_V1, ContainerIdentity(CID, POD_UID, "docker"), id="k8s-systemd-docker"
        ),
        pytest.param(K8S_SYSTEMD_CRIO_NESTED_V2, ContainerIdentity(CID, POD_UID, "cri-o"), id="k8s-crio-sub-cgroup"),
        pytest.param(
            K8S_SYSTEMD_CGROUPNS_RELATIVE_V2, ContainerIdentity(CID, POD_UID, "containerd"), id="cgroupns-relative"
        ),
        pytest.param(KIND_NESTED_V2, ContainerIdentity(CID, POD_UID, "containerd"), id="kind-pod-in-node-container"),
        pytest.param(KIND_KUBELET_V2, ContainerIdentity(OUTER_CID, "", "docker"), id="kind-node-kubelet"),
        pytest.param(DOCKER_CGROUPFS_V1, ContainerIdentity(CID, "", "docker"), id="docker-cgroupfs"),
        pytest.param(DOCKER_SYSTEMD_V2, ContainerIdentity(CID, "", "docker"), id="docker-systemd"),
        pytest.param(CONTAINERD_CTR_V2, ContainerIdentity(CID, "", ""), id="containerd-namespace-unlabelled"),
        pytest.param(NERDCTL_SYSTEMD_V2, ContainerIdentity(CID, "", "containerd"), id="nerdctl"),
        pytest.param(PODMAN_V2, ContainerIdentity(CID, "", ""), id="podman"),
        pytest.param(HYBRID_CONTAINER_IN_V1_ONLY, IN_POD_CGROUPFS, id="hybrid-v1-only"),
        pytest.param(HYBRID_CONTAINER_IN_V2_ONLY, IN_POD_CGROUPFS, id="hybrid-v2-only"),
        pytest.param(HYBRID_POD_ONLY_IN_ONE_LINE, ContainerIdentity(CID, POD_UID, "docker"), id="hybrid-pod-wins"),
    ],
)
def test_container_layouts(text: str, expected: ContainerIdentity) -> None:
    assert parse_cgroup_file(text) == expected
    assert not expected.is_host


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(HOST_SESSION_V2, id="login-session"),
        pytest.param(HOST_ROOT_V2, id="root-cgroup"),
        pytest.param(HOST_CONTAINERD_DAEMON_V2, id="containerd-daemon"),
        pytest.param(HOST_KUBELET_V1, id="kubelet-v1"),
        pytest.param(HOST_HASH_NAMED_V1, id="32-hex-is-not-a-container"),
        pytest.param(K8S_SYSTEMD_CRIO_CONMON_V2, id="crio-conmon"),
        pytest.param(PODMAN_CONMON_V2, id="podman-conmon"),
    ],
)
def test_host_processes(text: str) -> None:
    identity = parse_cgroup_file(text)
    assert identity == HOST
    assert identity.is_host


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("\n\n\n", id="blank-lines"),
        pytest.param("hello world", id="prose"),
        pytest.param(f"{CID}\n", id="bare-id-no-fields"),
        pytest.param(f"x::/docker/{CID}\n", id="non-numeric-hierarchy"),
        pytest.param(f"0::docker/{CID}\n", id="relative-path"),
        pytest.param(f"0::/docker/{CID[:-1]}\n", id="63-hex"),
        pytest.param(f"0::/docker/{CID}0\n", id="65-hex"),
        pytest.param(f"0::/docker/{CID.upper()}\n", id="upper-case-hex"),
        pytest.param(f"0::/docker/rkt-{CID}.scope\n", id="unknown-runtime-prefix"),
        pytest.param("\x00\xff\ud800:::::\n", id="binary-junk"),
    ],
)
def test_garbage_is_host(text: str) -> None:
    assert parse_cgroup_file(text) == HOST


def test_crlf_and_missing_final_newline_are_tolerated() -> None:
    assert parse_cgroup_file(K8S_CGROUPFS_BESTEFFORT_V2.replace("\n", "\r\n")) == IN_POD_CGROUPFS
    assert parse_cgroup_file(K8S_CGROUPFS_BESTEFFORT_V2.rstrip("\n")) == IN_POD_CGROUPFS


def test_colons_inside_the_path_stay_in_the_path() -> None:
    assert parse_cgroup_path(f"/weird:name/docker/{CID}") == ContainerIdentity(CID, "", "docker")
    assert parse_cgroup_file(f"0::/weird:name/docker/{CID}\n") == ContainerIdentity(CID, "", "docker")


def test_pod_outside_the_container_path_is_not_claimed() -> None:
    # A pod segment below the container belongs to nothing we know; only enclosing pods count.
    assert parse_cgroup_path(f"/docker/{CID}/kubepods/pod{POD_UID}") == ContainerIdentity(CID, "", "docker")


def test_over_long_line_is_ignored_but_later_lines_are_read() -> None:
    long_line = "0::/" + "a" * MAX_LINE_CHARS + f"/docker/{CID}"
    assert parse_cgroup_file(long_line) == HOST
    assert parse_cgroup_file(long_line + "\n" + DOCKER_SYSTEMD_V2) == ContainerIdentity(CID, "", "docker")


def test_lines_past_the_cap_are_not_read() -> None:
    assert parse_cgroup_file("0::/\n" * MAX_LINES + DOCKER_SYSTEMD_V2) == HOST
    assert parse_cgroup_file("0::/\n" * (MAX_LINES - 1) + DOCKER_SYSTEMD_V2) == ContainerIdentity(CID, "", "docker")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("x" * 20_000_000, id="one-20MB-line"),
        pytest.param("0::/a\n" * 2_000_000, id="two-million-lines"),
        pytest.param("0::" + "/kubepods-" * 400 + "\n", id="pod-pattern-backtracking"),
        pytest.param(("0::/" + "-kubepods" * 14 + "\n") * MAX_LINES, id="many-near-miss-segments"),
    ],
)
def test_hostile_input_costs_bounded_time(text: str) -> None:
    started = time.perf_counter()
    assert parse_cgroup_file(text) == HOST
    assert time.perf_counter() - started < 1.0


@given(st.text())
@settings(max_examples=500)
def test_arbitrary_text_never_raises(text: str) -> None:
    assert isinstance(parse_cgroup_file(text), ContainerIdentity)


_cgroup_alphabet = st.sampled_from([*"0123456789abcdef:/-_.\nkubepodscrioslice", CID, POD_UID, "pod"])


@given(st.lists(_cgroup_alphabet, max_size=60).map("".join))
@settings(max_examples=500)
def test_cgroup_shaped_noise_never_raises(text: str) -> None:
    identity = parse_cgroup_file(text)
    # Whatever is found must at least be well-formed.
    assert identity.container_id == "" or len(identity.container_id) == 64
    assert identity.runtime in {"", "containerd", "cri-o", "docker"}


_hex = "0123456789abcdef"


@given(
    container_id=st.text(_hex, min_size=64, max_size=64),
    pod_uid=st.uuids().map(str),
    qos=st.sampled_from(["", "burstable", "besteffort"]),
    prefix=st.sampled_from([("cri-containerd", "containerd"), ("crio", "cri-o"), ("docker", "docker")]),
)
def test_systemd_driver_round_trip(container_id: str, pod_uid: str, qos: str, prefix: tuple[str, str]) -> None:
    scope, runtime = prefix
    qos_slices = f"kubepods-{qos}.slice/kubepods-{qos}-" if qos else "kubepods-"
    text = f"0::/kubepods.slice/{qos_slices}pod{pod_uid.replace('-', '_')}.slice/{scope}-{container_id}.scope\n"
    assert parse_cgroup_file(text) == ContainerIdentity(container_id, pod_uid, runtime)


@given(
    container_id=st.text(_hex, min_size=64, max_size=64),
    pod_uid=st.uuids().map(str),
    qos=st.sampled_from(["", "burstable/", "besteffort/"]),
)
def test_cgroupfs_driver_round_trip(container_id: str, pod_uid: str, qos: str) -> None:
    text = f"7:memory:/kubepods/{qos}pod{pod_uid}/{container_id}\n0::/\n"
    assert parse_cgroup_file(text) == ContainerIdentity(container_id, pod_uid, "")
