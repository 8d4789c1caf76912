"""The image `make image` builds, run as the Helm chart runs it: agent and processor containers.

The agent runs with the DaemonSet's security context (not privileged, only its listed capabilities,
podman's default seccomp profile, no privilege escalation, read-only root, the chart's mounts read-only
where it says so), host PID and host network; the processor as the Deployment's non-root user with
no capabilities. Pod a curls pod b's nginx in throw-away namespaces; the records the agent ships
must come out of the processor as OTLP, named by the test APIServer (a -> b), at the test receiver.
Without one of its capabilities the agent must name it in one line and exit as documented.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from kscope_common.cli import EXIT_ENVIRONMENT
from tests.charts.test_chart import CHART, NAMESPACE, container, only, render
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main import latest
from tests.conftest import REQUIRE_BPF
from tests.deploy.pod import Container, Containers, built_image, podman, run_args
from tests.e2e.nattopo import BACKEND_PORT
from tests.e2e.test_cluster import NODE, REQUESTS, ClusterTopology, check, dump, populate, start_nginx
from tests.helpers import eventually

pytestmark = pytest.mark.bpf
KUBECONFIG_IN_POD = "/etc/kscope/kubeconfig"
# What only the cluster would fill in: the downward API's fields.
# status.podIP: with host networking the node's address; loopback here, where no pod network exists.
FIELD_REFS = {
    "spec.nodeName": NODE,
    "metadata.name": "kscope-processor-0",
    "metadata.namespace": NAMESPACE,
    "status.podIP": "127.0.0.1",
}


@pytest.fixture(scope="module")
def image() -> str:
    try:
        return built_image()
    except (RuntimeError, FileNotFoundError) as exc:
        if REQUIRE_BPF:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rendered(values: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        docs = render(chart, values)
    return {"agent": only(docs, "DaemonSet"), "processor": only(docs, "Deployment"), "service": only(docs, "Service")}


def chart_values(otlp: str, grpc_port: int) -> dict[str, Any]:
    """Ports of our own (both containers share the host's network with other tests), the test
    receiver as the OTLP endpoint, L7 on, and the test APIServer in place of the service account."""
    return {
        "otlp": {"endpoint": otlp, "insecure": True},
        "agent": {"l7": True, "metricsPort": free_port()},
        "processor": {
            "service": {"grpcPort": grpc_port, "metricsPort": free_port()},
            "extraArgs": [f"--kubeconfig={KUBECONFIG_IN_POD}", "--interval=1"],
        },
    }


def agent_args(workload: dict[str, Any], grpc_port: int) -> list[str]:
    """The chart's agent args with the processor's Service name resolved the way cluster DNS would,
    to where the processor container listens (the host's loopback)."""
    args: list[str] = list(container(workload)["args"])
    (i,) = [n for n, a in enumerate(args) if a.startswith("--processor=")]
    host, port = args[i].split("=", 1)[1].rsplit(":", 1)
    assert host.startswith("kscope-processor.") and int(port) == grpc_port, args[i]
    args[i] = f"--processor=127.0.0.1:{port}"
    return args


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def capability_names(mask_hex: str) -> set[str]:
    """``CapEff`` as capability names (``capsh --decode``: libcap's own table)."""
    out = subprocess.run(["capsh", f"--decode={mask_hex}"], capture_output=True, text=True, check=True).stdout
    names = out.strip().split("=", 1)[1]
    return {n.removeprefix("cap_").upper() for n in names.split(",") if n}


def assert_runs_as_rendered(pid: int, workload: dict[str, Any]) -> None:
    """The container's process holds what the rendered security context says, and nothing more."""
    pod = workload["spec"]["template"]["spec"]
    ctx = {**pod.get("securityContext", {}), **container(workload)["securityContext"]}
    st = status(pid)
    assert st["Uid"].split()[0] == str(ctx["runAsUser"]), st["Uid"]
    assert capability_names(st["CapEff"]) == set(ctx["capabilities"].get("add", [])), st["CapEff"]
    assert st["NoNewPrivs"] == "1"  # allowPrivilegeEscalation: false
    assert st["Seccomp"] == "2"  # a filter: podman's default profile (RuntimeDefault)
    root_mount = next(line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                      if line.split()[4] == "/")  # fmt: skip
    assert " ro," in f" {root_mount.split()[5]},", root_mount  # readOnlyRootFilesystem
    assert (Path(f"/proc/{pid}/ns/pid").stat().st_ino == Path("/proc/self/ns/pid").stat().st_ino) == bool(
        pod.get("hostPID")
    )


def test_traffic_reaches_otlp_through_the_agent_and_processor_images(
    image: str, nat_topo: ClusterTopology, pod_cgroup: tuple[Path, str, str], tmp_path: Path
) -> None:
    scope, b_uid, b_cid = pod_cgroup
    start_nginx(nat_topo, tmp_path / "nginx", scope)
    grpc_port = free_port()
    timings: dict[str, float] = {}

    def run_containers(rx: OtlpReceiver, kubeconfig: Path, ctrs: Containers) -> str:
        chart = rendered(chart_values(rx.endpoint, grpc_port))
        # The processor's pod network is the cluster's CNI: here the host's, where the agent reaches it.
        mount = (f"--volume={kubeconfig}:{KUBECONFIG_IN_POD}:ro",)
        processor = ctrs.start("processor", run_args(chart["processor"], image, field_refs=FIELD_REFS,
                                                     network="host", extra=mount))  # fmt: skip
        processor.wait_for("processor_started")
        assert_runs_as_rendered(processor.pid(), chart["processor"])

        t0 = time.monotonic()
        args = agent_args(chart["agent"], grpc_port)
        agent = ctrs.start("agent", run_args(chart["agent"], image, field_refs=FIELD_REFS, args=args))
        agent.wait_for("agent_started")
        timings["podman_run_to_agent_started_s"] = time.monotonic() - t0
        assert_runs_as_rendered(agent.pid(), chart["agent"])

        for _ in range(REQUESTS):
            r = nat_topo.cli.run("curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                                 f"http://{nat_topo.spod_ip}:{BACKEND_PORT}/orders/123")  # fmt: skip
            assert r.stdout == "200", r.stdout + r.stderr
        a_to_b = {"service.peer.name": "b"}
        eventually(
            lambda: latest(rx, "kscope.tcp.connections", {"service.name": "a"}, **a_to_b) >= REQUESTS,
            "a -> b connections at the receiver",
            60,
            interval_s=0.05,
            diag=lambda: dump(rx),
        )
        timings["podman_run_to_first_edge_at_otlp_s"] = time.monotonic() - t0
        # SIGTERM, as the kubelet stops a pod: a last interval is shipped, and the exit is clean.
        assert agent.stop() == 0, agent.output
        return agent.output

    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        try:
            populate(server, nat_topo, b_uid, b_cid)
            kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
            kubeconfig.chmod(0o644)  # read by the processor's uid 65532
            async with OtlpReceiver() as rx:
                with Containers() as ctrs:
                    stderr = await asyncio.to_thread(run_containers, rx, kubeconfig, ctrs)
                    assert "Traceback" not in stderr, stderr
                    await check(rx, nat_topo.vip, lambda: f"agent stderr:\n{stderr[-4000:]}\n{dump(rx)}")
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(body(), 240))
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(json.dumps({"image": image, "image_size_bytes": size, **timings}))


@pytest.fixture
def ctrs() -> Iterator[Containers]:
    with Containers() as c:
        yield c


def agent_without(
    image: str, capability: str, ctrs: Containers, agent_values: dict[str, Any] | None = None
) -> Container:
    """The agent exactly as rendered (``agent_values`` over the test's), but for one capability of its list."""
    values = chart_values("127.0.0.1:4317", free_port())
    values["agent"] |= agent_values or {}
    agent = rendered(values)["agent"]
    caps = container(agent)["securityContext"]["capabilities"]["add"]
    assert capability in caps, caps
    caps.remove(capability)
    return ctrs.start(f"no-{capability.lower()}", run_args(agent, image, field_refs=FIELD_REFS))


@pytest.mark.parametrize(
    ("capability", "says"),
    [
        # Checked before any BPF call (preflight).
        ("NET_ADMIN", "missing capability CAP_NET_ADMIN (running as uid 0)"),
        # podman's default seccomp profile allows bpf() only with CAP_SYS_ADMIN: refused at the first load.
        ("SYS_ADMIN", "bpf() was refused (EPERM) under a seccomp filter without CAP_SYS_ADMIN"),
    ],
)
def test_without_a_capability_the_agent_names_it_in_one_line_and_exits_3(
    image: str, ctrs: Containers, capability: str, says: str
) -> None:
    agent = agent_without(image, capability, ctrs)
    code = agent.wait(120)
    stderr = agent.output
    assert code == EXIT_ENVIRONMENT, stderr  # the documented exit of an environment error a user can act on
    assert stderr.count("\n") == 1 and stderr.startswith("kscope: error: "), stderr
    assert says in stderr, stderr


@pytest.mark.parametrize(
    ("capability", "agent_values", "event"),
    [
        # The chart's documented mode under a seccomp profile that allows bpf(): no setns(), so only
        # the node's own namespace is walked.
        ("SYS_ADMIN", {"seccompProfile": {"type": "Unconfined"}}, "netns_enter_failed"),
        # Host processes hold capabilities the agent lacks: their /proc/PID/ns/net fails the ptrace
        # access check, so namespaces only they are in are not found.
        ("SYS_PTRACE", {}, "netns_unreadable"),
    ],
)
def test_without_a_capability_for_namespaces_the_agent_runs_says_once_and_counts(
    image: str, ctrs: Containers, nat_topo: ClusterTopology, capability: str, agent_values: dict[str, Any], event: str
) -> None:
    """The topology's namespaces (and their processes) are there for the agent to try."""
    # A pod's process: the agent finds a namespace through /proc (its /run/netns is not mounted).
    nat_topo.spawn(nat_topo.cli, "sleep", "600")
    agent = agent_without(image, capability, ctrs, agent_values)
    agent.wait_for("agent_started")
    agent.wait_for(f'"event": "{event}"')
    assert agent.stop() == 0, agent.output
    lines = agent.output.splitlines()
    assert not [line for line in lines if "Traceback" in line], agent.output
    said = [line for line in lines if f'"event": "{event}"' in line]
    assert len(said) == 1, said  # said once, then counted
    assert f"CAP_{capability}" in said[0], said[0]
    (stopped,) = [json.loads(line) for line in lines if '"event": "agent_stopped"' in line]
    assert stopped[event] >= 1, stopped
