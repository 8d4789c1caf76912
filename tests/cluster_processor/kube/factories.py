"""Raw API objects shaped like the APIServer's JSON (only the fields a real object would carry that
matter here, plus a few it carries that we must ignore)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

EPOCH = "2024-05-01T10:00:00Z"


def ts(seconds: int) -> str:
    """An RFC 3339 timestamp ``seconds`` after 2024-05-01T10:00:00Z."""
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"2024-05-01T{10 + hours:02d}:{minutes:02d}:{sec:02d}Z"


def owner(kind: str, name: str, uid: str | None = None, *, controller: bool = True) -> dict[str, Any]:
    api = {"ReplicaSet": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1", "Deployment": "apps/v1"}
    return {
        "apiVersion": api.get(kind, "batch/v1"),
        "kind": kind,
        "name": name,
        "uid": uid or str(uuid.uuid4()),
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def pod(
    name: str,
    *,
    namespace: str = "default",
    uid: str | None = None,
    ip: str | None = "10.0.0.1",
    ips: list[str] | None = None,
    node: str = "node-1",
    host_network: bool = False,
    created: str = EPOCH,
    owners: list[dict[str, Any]] | None = None,
    containers: list[str] | None = None,
    init_containers: list[str] | None = None,
    phase: str = "Running",
    deleted: str | None = None,
) -> dict[str, Any]:
    pod_ips = ips if ips is not None else ([ip] if ip else [])
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or str(uuid.uuid4()),
        "creationTimestamp": created,
        "labels": {"app": name.rsplit("-", 1)[0]},
        "annotations": {"kubectl.kubernetes.io/restartedAt": created},
        "ownerReferences": owners or [],
    }
    if deleted:
        meta["deletionTimestamp"] = deleted
    status: dict[str, Any] = {
        "phase": phase,
        "hostIP": "192.168.1.10",
        "containerStatuses": [
            {"name": f"c{i}", "containerID": cid, "ready": True, "restartCount": 0, "image": "nginx:1.27"}
            for i, cid in enumerate(containers or [])
        ],
    }
    if init_containers:
        status["initContainerStatuses"] = [
            {"name": f"init{i}", "containerID": cid} for i, cid in enumerate(init_containers)
        ]
    if pod_ips:
        status["podIP"] = pod_ips[0]
        status["podIPs"] = [{"ip": a} for a in pod_ips]
    return {
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [{"name": "c0", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}],
        },
        "status": status,
    }


def service(
    name: str,
    *,
    namespace: str = "default",
    uid: str | None = None,
    cluster_ips: list[str] | None = None,
    type_: str = "ClusterIP",
    selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    ips = cluster_ips if cluster_ips is not None else ["10.96.0.10"]
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4())},
        "spec": {
            "clusterIP": ips[0] if ips else "",
            "clusterIPs": ips,
            "type": type_,
            "selector": selector or {"app": name},
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }


def endpoint_slice(
    name: str,
    service_name: str,
    endpoints: list[tuple[str, str]],
    *,
    namespace: str = "default",
    uid: str | None = None,
    not_ready: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """``not_ready``: addresses whose endpoint has conditions.ready false."""
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": address not in not_ready},
                "targetRef": {"kind": "Pod", "name": f"pod-{i}", "namespace": namespace, "uid": pod_uid},
            }
            for i, (address, pod_uid) in enumerate(endpoints)
        ],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }


def node(name: str, *, internal: str, external: str | None = None, uid: str | None = None) -> dict[str, Any]:
    addresses = [{"type": "InternalIP", "address": internal}, {"type": "Hostname", "address": name}]
    if external:
        addresses.append({"type": "ExternalIP", "address": external})
    return {
        "metadata": {"name": name, "uid": uid or str(uuid.uuid4())},
        "status": {"addresses": addresses, "nodeInfo": {"kubeletVersion": "v1.30.0"}},
    }


def workload(
    name: str, *, namespace: str = "default", uid: str | None = None, owners: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "ownerReferences": owners or [],
        },
        "spec": {"replicas": 2},
    }


def cid(n: int) -> str:
    """A deterministic 64-hex container ID that looks like a real one (no shared prefix)."""
    return hashlib.sha256(str(n).encode()).hexdigest()
