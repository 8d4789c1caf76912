"""Naming a local process from the cgroup path shapes systemd and the container runtimes write."""

from __future__ import annotations

from pathlib import Path

import pytest

from kscope.v1 import flow_pb2 as pb
from node_exporter.local.identity import (
    Placement,
    docker_name,
    label,
    placement,
    podman_names,
    process_attributes,
    short_label,
)
from node_exporter.local.namer import LocalNamer

CID = "3f4e1c0a9b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"
UID = "7c5b1b8e-2f0a-4d3c-9b1e-0a1b2c3d4e5f"


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        # systemd services (cgroup v2, and a hybrid host's v1 name=systemd line beside an empty v2 one)
        ("0::/system.slice/nginx.service\n", Placement(unit="nginx.service")),
        ("12:name=systemd:/system.slice/dnsmasq.service\n0::/\n", Placement(unit="dnsmasq.service")),
        ("0::/system.slice/postgresql@15-main.service\n", Placement(unit="postgresql@15-main.service")),
        # a service's own sub-cgroup, and a user service under user@.service: the innermost service
        ("0::/system.slice/containerd.service/shim\n", Placement(unit="containerd.service")),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/pipewire.service\n",
         Placement(unit="pipewire.service")),
        # containers: the runtime's scope wins over any service around it
        (f"0::/system.slice/docker-{CID}.scope\n", Placement(CID, "docker")),
        (f"0::/docker/{CID}\n", Placement(CID, "docker")),
        (f"0::/machine.slice/libpod-{CID}.scope/container\n", Placement(CID, "podman")),
        (f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n",
         Placement(CID, "podman")),
        (f"0::/system.slice/nerdctl-{CID}.scope\n", Placement(CID, "containerd")),
        (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
         f"crio-{CID}.scope\n", Placement(CID, "cri-o")),
        (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
         f"cri-containerd-{CID}.scope\n", Placement(CID, "containerd")),
        # neither: a login session, podman's conmon (not the container), the root
        ("0::/user.slice/user-0.slice/session-3.scope\n", Placement()),
        (f"0::/machine.slice/libpod-conmon-{CID}.scope\n", Placement()),
        ("0::/\n", Placement()),
        # bad input: no exception, nothing named
        ("garbage\n::\n0::relative\n" + "x" * 10_000, Placement()),
    ],
)  # fmt: skip
def test_placement_from_cgroup_paths(cgroup: str, expected: Placement) -> None:
    assert placement(cgroup) == expected


def test_attributes_and_labels() -> None:
    unit = process_attributes("nginx", "/usr/sbin/nginx", Placement(unit="nginx.service"))
    assert dict(unit) == {"process.executable.name": "nginx", "process.executable.path": "/usr/sbin/nginx",
                          "kscope.systemd.unit": "nginx.service", "service.name": "nginx.service"}  # fmt: skip
    assert label(unit) == "nginx@nginx.service" and label((*unit, ("server.port", 80))) == "nginx@nginx.service:80"
    named = process_attributes("redis-server", "", Placement(CID, "podman"), "cache")
    assert dict(named)["service.name"] == "cache" and dict(named)["container.id"] == CID
    assert label(named) == "redis-server@cache"
    anonymous = process_attributes("redis-server", "", Placement(CID, "containerd"))
    assert label(anonymous) == f"redis-server@{CID[:12]}" and "container.name" not in dict(anonymous)
    host = process_attributes("curl", "/usr/bin/curl", Placement())
    assert label(host) == "curl@host" and dict(host)["service.name"] == "curl"
    assert short_label((*unit, ("server.port", 8080))) == "nginx:8080"
    assert label((("server.address", "93.184.216.34"), ("server.port", 443))) == "93.184.216.34:443"


def test_runtime_state_files() -> None:
    # containers/storage's containers.json (podman) and Docker's config.v2.json, as they are written
    assert podman_names(f'[{{"id":"{CID}","names":["web"],"image":"x","layer":"y"}}]') == {CID: "web"}
    assert podman_names("not json") == {} and podman_names('{"id": 1}') == {}
    assert docker_name('{"ID":"' + CID + '","Name":"/shop-db","State":{}}') == "shop-db"
    assert docker_name("[") == ""


def test_namer_reads_proc_and_the_runtime(tmp_path: Path) -> None:
    """A /proc and host root with the files the kernel and podman write: the endpoint is named from
    them, a process that has gone keeps its cgroup's name, and a server's address names its clients' peer."""
    proc, root = tmp_path / "proc", tmp_path / "root"
    podman = f"0::/machine.slice/libpod-{CID}.scope/container\n"
    for pid, cgroup, exe in ((10, "0::/system.slice/nginx.service\n", "/usr/sbin/nginx"),
                             (11, podman, "/usr/bin/redis-server")):  # fmt: skip
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(cgroup)
        (proc / str(pid) / "exe").symlink_to(exe)
    store = root / "var/lib/containers/storage/overlay-containers"
    store.mkdir(parents=True)
    (store / "containers.json").write_text(f'[{{"id":"{CID}","names":["cache"]}}]')
    namer = LocalNamer(proc_root=str(proc), host_root=str(root))
    nginx = namer.local("n", pb.ProcessIdentity(pid=10, comm="nginx", cgroup_id=7), "198.18.0.2", 80)
    assert label(nginx.attributes) == "nginx@nginx.service" and nginx.observed
    assert dict(namer.local("n", pb.ProcessIdentity(pid=11, comm="redis-server"), "::1").attributes)[
        "container.name"] == "cache"  # fmt: skip
    # pid 12 has exited (no /proc entry) but ran in nginx's cgroup: its unit and executable are kept
    gone = namer.local("n", pb.ProcessIdentity(pid=12, comm="nginx", cgroup_id=7), "198.18.0.2")
    assert gone.attributes == nginx.attributes and namer.counters()["processes_unreadable"] == 1
    # a remote address is external until a socket there teaches who owns it
    assert namer.remote("198.18.0.2", 80).kind.value == "external"
    batch = pb.FlowBatch(l7=[pb.L7Request(side=pb.ROLE_SERVER, local_ip="198.18.0.2", local_port=80,
                                          process=pb.ProcessIdentity(pid=10, comm="nginx", cgroup_id=7))])  # fmt: skip
    generation = namer.generation
    namer.learn(batch)
    assert namer.generation > generation
    assert namer.remote("::ffff:198.18.0.2", 80).attributes == nginx.attributes
    assert namer.remote("198.18.0.2", 81).kind.value == "external"


def test_namer_tables_are_bounded_and_count_what_they_forget() -> None:
    namer = LocalNamer(proc_root="/nonexistent", max_servers=100)
    for port in range(1, 251):
        namer.learn(pb.FlowBatch(l7=[pb.L7Request(local_ip="198.18.0.2", local_port=port,
                                                  process=pb.ProcessIdentity(pid=1, comm="x"))]))  # fmt: skip
    assert namer.counters()["servers_evicted"] == 150
    assert namer.remote("198.18.0.2", 250).kind.value == "process"
    assert namer.remote("198.18.0.2", 1).kind.value == "external"  # forgotten: named by address again
