"""Node-local identity through the running agent: a server in a kubelet-style cgroup, a host client."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb
from tests.e2e.agentproc import start_kscope
from tests.e2e.netns import SRV_V4, Topology, start_nginx

pytestmark = pytest.mark.bpf
PORT = 8080


def test_container_and_pod_of_a_server_and_a_host_client(
    topo: Topology, tmp_path: Path, pod_cgroup: tuple[Path, str, str]
) -> None:
    scope, pod_uid, cid = pod_cgroup
    nginx = start_nginx(topo, tmp_path, PORT)
    (scope / "cgroup.procs").write_text(str(nginx.pid))  # from outside the namespace (KERNEL.md)
    assert f"cri-containerd-{cid}.scope" in Path(f"/proc/{nginx.pid}/cgroup").read_text()
    out = tmp_path / "flows.jsonl"
    agent, _ = start_kscope("--no-live", "--duration", "3", "--interval", "0.5", "--jsonl", str(out))
    curl = topo.cli.run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{SRV_V4}:{PORT}/")
    assert curl.stdout == "200"
    assert agent.wait(timeout=60) == 0
    flows = [json_format.Parse(line, pb.NodeRecord()).l4 for line in out.read_text().splitlines()]
    mine = [f for f in flows if f.netns_inode in (topo.cli.ino, topo.srv.ino) and f.kind == pb.RECORD_KIND_CLOSE]
    server = [f for f in mine if f.role == pb.ROLE_SERVER]
    client = [f for f in mine if f.role == pb.ROLE_CLIENT]
    assert len(server) == len(client) == 1, mine
    s, c = server[0].process, client[0].process
    assert (s.pid, s.comm) == (nginx.pid, "nginx")
    assert (s.container_id, s.pod_uid, s.container_runtime, s.host_process) == (cid, pod_uid, "containerd", False)
    assert s.cgroup_id == os.stat(scope).st_ino  # cgroup v2 id = the directory's inode
    assert c.comm == "curl" and c.host_process and not c.container_id and not c.pod_uid
