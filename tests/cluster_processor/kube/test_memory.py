"""10,000 pods: the index's size, its lookups, and what it costs in memory.

Memory is measured the way the watcher fills the index (JSON pages decoded, converted to slim
records, the raw JSON dropped), so the retained strings are counted, not shared with fixtures.
Only a loose ceiling is asserted; the measured figure is printed (run with ``-s``)."""

from __future__ import annotations

import gc
import json
import tracemalloc

from cluster_processor.kube import model
from cluster_processor.kube.index import KubeIndex
from tests.cluster_processor.kube import factories as f

N_PODS = 10_000
N_NODES = 200
PAGE = 500
CEILING_BYTES = 40 * 1024 * 1024


def _raw_pod(i: int) -> dict[str, object]:
    node = i % N_NODES
    if i < N_NODES:  # one host-network DaemonSet pod per node
        return f.pod(
            f"agent-{i:05d}",
            namespace="kube-system",
            uid=f"00000000-0000-0000-0000-{i:012d}",
            ip=f"192.168.{node // 250}.{node % 250 + 1}",
            node=f"node-{node:03d}",
            host_network=True,
            owners=[f.owner("DaemonSet", "agent", "ds-agent")],
            containers=["containerd://" + f.cid(2 * i), "containerd://" + f.cid(2 * i + 1)],
            created=f.ts(i % 3600),
        )
    app = i % 500
    return f.pod(
        f"app{app}-5f6d7c8b9a-{i:05d}",
        namespace=f"ns-{app % 100}",
        uid=f"00000000-0000-0000-0000-{i:012d}",
        ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
        node=f"node-{node:03d}",
        owners=[f.owner("ReplicaSet", f"app{app}-5f6d7c8b9a", f"rs-{app}")],
        containers=["containerd://" + f.cid(2 * i), "containerd://" + f.cid(2 * i + 1)],
        created=f.ts(i % 3600),
    )


def test_ten_thousand_pods() -> None:
    pages = [
        json.dumps({"items": [_raw_pod(i) for i in range(start, min(start + PAGE, N_PODS))]}).encode()
        for start in range(0, N_PODS, PAGE)
    ]
    replica_sets = [
        json.dumps(
            f.workload(
                f"app{a}-5f6d7c8b9a",
                namespace=f"ns-{a % 100}",
                uid=f"rs-{a}",
                owners=[f.owner("Deployment", f"app{a}", f"d-{a}")],
            )
        ).encode()
        for a in range(500)
    ]
    gc.collect()
    tracemalloc.start()
    try:
        index = KubeIndex()
        records: list[model.KubeObject] = []
        for page in pages:
            items = json.loads(page)["items"]
            records.extend(model.pod_from_api(item) for item in items)
            del items
        index.replace("Pod", records)
        index.replace("ReplicaSet", [model.workload_from_api("ReplicaSet", json.loads(b)) for b in replica_sets])
        del records
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"\nKubeIndex with {N_PODS} pods (+500 ReplicaSets): retained {retained / 2**20:.1f} MiB "
        f"({retained / N_PODS:.0f} B/pod), peak while loading {peak / 2**20:.1f} MiB"
    )
    assert retained < CEILING_BYTES

    sizes = index.sizes()
    assert sizes["pods"] == N_PODS
    assert sizes["pod_ips"] == N_PODS - N_NODES  # host-network pods are not indexed by IP
    assert sizes["container_ids"] == 2 * N_PODS
    assert sizes["workloads"] == 500

    for i in range(N_NODES, N_PODS, 7):
        pod = index.pod_by_ip(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        assert pod is not None and pod.uid == f"00000000-0000-0000-0000-{i:012d}"
        assert index.pod_by_container_id(f.cid(2 * i + 1)[:12]) is pod
        assert index.workload_of(pod) == ("Deployment", f"app{i % 500}")
    agent = index.pod_by_container_id(f.cid(0))
    assert agent is not None and agent.host_network
    assert index.workload_of(agent) == ("DaemonSet", "agent")
    assert index.pod_by_ip("192.168.0.1") is None
