"""Slim records of the Kubernetes objects the resolver needs, built from the API's raw JSON.

A cluster processor replica holds every pod of the cluster (10,000 is a normal size), so each
record keeps only what resolving a flow endpoint to a workload needs: no labels, annotations,
specs or managed fields. The converters take the plain dicts a list or watch response carries
(never the generated ``kubernetes_asyncio`` models, which cost tens of kilobytes per pod) and
never raise: a missing or mistyped field becomes an empty value, so one odd object cannot stop
the watch that carries it.

Low-cardinality strings (namespace, node, phase, kinds) are interned: ``json.loads`` makes a
new string for every occurrence, and 10,000 copies of "default" add up.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

# Kinds the index understands, named as the API names them (``obj["kind"]`` of a list item is
# empty in list responses, so the watcher passes the kind explicitly).
POD: Final = "Pod"
SERVICE: Final = "Service"
ENDPOINT_SLICE: Final = "EndpointSlice"
NODE: Final = "Node"
REPLICA_SET: Final = "ReplicaSet"
DEPLOYMENT: Final = "Deployment"
STATEFUL_SET: Final = "StatefulSet"
DAEMON_SET: Final = "DaemonSet"
JOB: Final = "Job"
CRON_JOB: Final = "CronJob"

WORKLOAD_KINDS: Final = frozenset({REPLICA_SET, DEPLOYMENT, STATEFUL_SET, DAEMON_SET, JOB, CRON_JOB})
KINDS: Final = frozenset({POD, SERVICE, ENDPOINT_SLICE, NODE}) | WORKLOAD_KINDS

# The label the EndpointSlice controller sets to name the Service a slice belongs to.
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class OwnerRef:
    """The controller owner reference of an object (``metadata.ownerReferences[controller]``)."""

    kind: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class Pod:
    uid: str
    namespace: str
    name: str
    node_name: str
    pod_ips: tuple[str, ...]  # status.podIPs, canonical text form, IPv4 first as the API orders them
    host_network: bool  # the pod shares its node's addresses, so its IPs name the node, not the pod
    phase: str
    container_ids: tuple[str, ...]  # 64 lowercase hex, runtime prefix ("containerd://") stripped
    owner: OwnerRef | None
    creation_ts: float  # epoch seconds; 0.0 when absent. Decides which pod wins a reused IP.
    deletion_ts: float | None  # set once the pod is terminating
    resource_version: str


@dataclass(frozen=True, slots=True)
class Service:
    uid: str
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # "None" (headless) and empty values dropped
    type: str
    selector: tuple[tuple[str, str], ...]  # sorted (key, value) pairs: hashable and smaller than a dict
    resource_version: str


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    uid: str
    namespace: str
    name: str
    service_name: str  # from the kubernetes.io/service-name label; "" for a slice managed by hand
    # (address, pod uid) of ready endpoints; pod uid "" when targetRef is not a pod
    endpoints: tuple[tuple[str, str], ...]
    resource_version: str


@dataclass(frozen=True, slots=True)
class Node:
    uid: str
    name: str
    internal_ips: tuple[str, ...]
    external_ips: tuple[str, ...]
    resource_version: str


@dataclass(frozen=True, slots=True)
class Workload:
    """A pod controller: ReplicaSet and Job keep their own controller (Deployment, CronJob) in ``owner``
    so the index can walk pod -> ReplicaSet -> Deployment; the top kinds are kept for their names."""

    kind: str
    uid: str
    namespace: str
    name: str
    owner: OwnerRef | None
    resource_version: str


KubeObject = Pod | Service | EndpointSlice | Node | Workload


def convert(kind: str, raw: Mapping[str, Any]) -> KubeObject | None:
    """The slim record of one raw API object of ``kind``; None for a kind we do not keep."""
    if kind == POD:
        return pod_from_api(raw)
    if kind == SERVICE:
        return service_from_api(raw)
    if kind == ENDPOINT_SLICE:
        return endpoint_slice_from_api(raw)
    if kind == NODE:
        return node_from_api(raw)
    if kind in WORKLOAD_KINDS:
        return workload_from_api(kind, raw)
    return None


def pod_from_api(raw: Mapping[str, Any]) -> Pod:
    raw = _as_map(raw)
    meta = _map(raw, "metadata")
    spec = _map(raw, "spec")
    status = _map(raw, "status")
    ips = [_str(entry, "ip") for entry in _list(status, "podIPs") if isinstance(entry, Mapping)]
    if not any(ips):
        # podIPs arrived in 1.16; older servers and some test fixtures only fill podIP.
        ips = [_str(status, "podIP")]
    container_ids: list[str] = []
    for field in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in _list(status, field):
            if isinstance(cs, Mapping):
                cid = strip_runtime_prefix(_str(cs, "containerID"))
                if cid and cid not in container_ids:
                    container_ids.append(cid)
    deletion = _str(meta, "deletionTimestamp")
    return Pod(
        uid=_str(meta, "uid"),
        namespace=_interned(meta, "namespace"),
        name=_str(meta, "name"),
        node_name=_interned(spec, "nodeName"),
        pod_ips=_ips(ips),
        host_network=spec.get("hostNetwork") is True,
        phase=_interned(status, "phase"),
        container_ids=tuple(container_ids),
        owner=controller_of(meta),
        creation_ts=parse_timestamp(_str(meta, "creationTimestamp")),
        deletion_ts=parse_timestamp(deletion) if deletion else None,
        resource_version=_str(meta, "resourceVersion"),
    )


def service_from_api(raw: Mapping[str, Any]) -> Service:
    raw = _as_map(raw)
    meta = _map(raw, "metadata")
    spec = _map(raw, "spec")
    ips = [ip for ip in _list(spec, "clusterIPs") if isinstance(ip, str)]
    if not ips:
        ips = [_str(spec, "clusterIP")]
    selector = _map(spec, "selector")
    return Service(
        uid=_str(meta, "uid"),
        namespace=_interned(meta, "namespace"),
        name=_str(meta, "name"),
        # A headless Service's clusterIP is the literal "None": it has no VIP to resolve.
        cluster_ips=_ips(ip for ip in ips if ip != "None"),
        type=_interned(spec, "type"),
        selector=tuple(sorted((str(k), str(v)) for k, v in selector.items())),
        resource_version=_str(meta, "resourceVersion"),
    )


def endpoint_slice_from_api(raw: Mapping[str, Any]) -> EndpointSlice:
    raw = _as_map(raw)
    meta = _map(raw, "metadata")
    endpoints: list[tuple[str, str]] = []
    for ep in _list(raw, "endpoints"):
        # conditions.ready unset means unknown, which the API asks consumers to read as ready
        if not isinstance(ep, Mapping) or _map(ep, "conditions").get("ready") is False:
            continue  # a not-ready endpoint gets no traffic: it names no backend
        target = _map(ep, "targetRef")
        pod_uid = _str(target, "uid") if _str(target, "kind") == POD else ""
        for addr in _ips(a for a in _list(ep, "addresses") if isinstance(a, str)):
            endpoints.append((addr, pod_uid))
    return EndpointSlice(
        uid=_str(meta, "uid"),
        namespace=_interned(meta, "namespace"),
        name=_str(meta, "name"),
        service_name=_str(_map(meta, "labels"), SERVICE_NAME_LABEL),
        endpoints=tuple(endpoints),
        resource_version=_str(meta, "resourceVersion"),
    )


def node_from_api(raw: Mapping[str, Any]) -> Node:
    raw = _as_map(raw)
    meta = _map(raw, "metadata")
    internal: list[str] = []
    external: list[str] = []
    for addr in _list(_map(raw, "status"), "addresses"):
        if not isinstance(addr, Mapping):
            continue
        kind = _str(addr, "type")
        if kind == "InternalIP":
            internal.append(_str(addr, "address"))
        elif kind == "ExternalIP":
            external.append(_str(addr, "address"))
    return Node(
        uid=_str(meta, "uid"),
        name=_interned(meta, "name"),
        internal_ips=_ips(internal),
        external_ips=_ips(external),
        resource_version=_str(meta, "resourceVersion"),
    )


def workload_from_api(kind: str, raw: Mapping[str, Any]) -> Workload:
    raw = _as_map(raw)
    meta = _map(raw, "metadata")
    return Workload(
        kind=sys.intern(kind),
        uid=_str(meta, "uid"),
        namespace=_interned(meta, "namespace"),
        name=_str(meta, "name"),
        owner=controller_of(meta),
        resource_version=_str(meta, "resourceVersion"),
    )


def controller_of(meta: Mapping[str, Any]) -> OwnerRef | None:
    """The owner reference marked ``controller: true``; failing that, the first one naming a workload
    kind (hand-made ownerRefs often omit the flag, and the collector ignores it too); else None."""
    refs = [r for r in _list(meta, "ownerReferences") if isinstance(r, Mapping)]
    chosen = next((r for r in refs if r.get("controller") is True), None)
    if chosen is None:
        chosen = next((r for r in refs if _str(r, "kind") in WORKLOAD_KINDS), None)
    if chosen is None:
        return None
    return _owner_ref(_interned(chosen, "kind"), _str(chosen, "name"), _str(chosen, "uid"))


# Every pod of a ReplicaSet names the same owner: one shared record (and strings) instead of one
# copy per pod, ~190 bytes each. Bounded: cleared when full, which only loses the sharing.
_OWNERS: Final[dict[tuple[str, str, str], OwnerRef]] = {}
_MAX_OWNERS: Final = 65_536


def _owner_ref(kind: str, name: str, uid: str) -> OwnerRef:
    key = (kind, name, uid)
    ref = _OWNERS.get(key)
    if ref is None:
        if len(_OWNERS) >= _MAX_OWNERS:
            _OWNERS.clear()
        ref = _OWNERS[key] = OwnerRef(kind=kind, name=name, uid=uid)
    return ref


def strip_runtime_prefix(container_id: str) -> str:
    """``containerd://<id>``, ``cri-o://<id>``, ``docker://<id>`` -> ``<id>`` in lowercase.

    Split on the scheme separator rather than a list of runtimes, so a runtime we have not heard of
    still yields its ID (the cgroup side only ever reports the bare ID)."""
    _, sep, rest = container_id.partition("://")
    return (rest if sep else container_id).strip().lower()


@lru_cache(maxsize=4096)  # pods created in the same second share one float instead of 24 bytes each
def parse_timestamp(text: str) -> float:
    """RFC 3339 (``2024-05-01T10:00:00Z``) to epoch seconds; 0.0 when absent or malformed."""
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


@lru_cache(maxsize=65536)  # every flow resolves two addresses; the same ones, over and over
def canonical_ip(text: str) -> str:
    """One text form per address, so keys from the API and from the wire meet: IPv6 compressed and
    lowercase, IPv4-mapped IPv6 (the wire's ``::ffff:a.b.c.d``) as plain IPv4. Unparseable text is
    returned unchanged (it will simply never match)."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    canonical = str(addr)
    # Already canonical (the usual case): keep the caller's string, so the cache entry and the
    # record that stores the address hold one string instead of two equal ones.
    return text if canonical == text else canonical


def _ips(values: Any) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        if value:
            ip = canonical_ip(value)
            if ip not in out:
                out.append(ip)
    return tuple(out)


def _as_map(obj: object) -> Mapping[str, Any]:
    return obj if isinstance(obj, Mapping) else {}


def _map(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _list(obj: Mapping[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    return value if isinstance(value, list) else []


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _interned(obj: Mapping[str, Any], key: str) -> str:
    return sys.intern(_str(obj, key))
