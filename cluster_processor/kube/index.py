"""A pure, in-memory index of the cluster: which pod, Service or node an address or container is.

No I/O, and time only from an injectable clock: the watcher feeds it watch events (``apply``)
and relists (``replace``); the resolver asks it questions. Everything runs on one event loop, so there are no
locks. The rules are the OpenTelemetry collector's (``k8sattributesprocessor/internal/kube/
client.go``), learned the hard way there:

* A host-network pod's IP is its node's IP, shared by every host-network pod on that node, so it is
  never indexed for pod lookup: the address resolves to the node (``node_by_ip``) instead.
* When two pods claim one IP, the newer pod (by creation timestamp) wins: an IP freed by a finished
  pod is handed to a new pod, and a late update of the old pod must not take it back.
* A delete does not forget at once: flows from a pod's last seconds are still in flight. Its IP,
  UID and container IDs are kept for a grace period, then removed only if they still point at the
  same UID, so an IP already reused by a new pod is not wiped by the old pod's delayed delete.

Every key an object stops claiming (a deleted object, a relisted-away object, a container ID
replaced by a restart) goes through the same delayed, UID-checked release.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol, TypeVar

from cluster_processor.kube.model import (
    DEPLOYMENT,
    ENDPOINT_SLICE,
    JOB,
    KINDS,
    NODE,
    POD,
    REPLICA_SET,
    SERVICE,
    WORKLOAD_KINDS,
    EndpointSlice,
    KubeObject,
    Node,
    Pod,
    Service,
    Workload,
    canonical_ip,
    convert,
)

DEFAULT_DELETE_GRACE_S: Final = 30.0
# Docker's short form; anything shorter is too ambiguous to name one container.
SHORT_CONTAINER_ID_LEN: Final = 12
# Kinds that are only a step towards the workload a person named: a Deployment's ReplicaSet, a
# CronJob's Job. Any other controller (StatefulSet, DaemonSet, a CRD) is the answer itself.
_INTERMEDIATE_KINDS: Final = frozenset({REPLICA_SET, JOB})
_MAX_OWNER_DEPTH: Final = 4
# A Deployment names its ReplicaSets "<deployment>-<pod-template-hash>". Used only while the
# ReplicaSet itself is unknown (not yet listed); the collector's DeploymentNameFromReplicaSet rule.
_DEPLOYMENT_HASH_SUFFIX: Final = re.compile(r"^(.+)-[a-z0-9]{10}$")

_RECORD_TYPE: Final[dict[str, type]] = {
    POD: Pod,
    SERVICE: Service,
    ENDPOINT_SLICE: EndpointSlice,
    NODE: Node,
    **{kind: Workload for kind in WORKLOAD_KINDS},
}

_T = TypeVar("_T")

IpLike = str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address


class _HasUid(Protocol):
    @property
    def uid(self) -> str: ...


# (due time, table, key, uid that must still own the key for it to be removed)
_Pending = tuple[float, dict[Any, Any], Any, str]


class KubeIndex:
    """Lookups over the cluster's pods, Services, EndpointSlices, nodes and pod controllers."""

    def __init__(
        self,
        *,
        delete_grace_s: float = DEFAULT_DELETE_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._grace = delete_grace_s
        self._clock = clock
        self._pods: dict[str, Pod] = {}  # uid -> pod, including deleted pods inside their grace
        self._pod_by_ip: dict[str, Pod] = {}
        self._pod_by_cid: dict[str, Pod] = {}  # 64-hex container id -> pod
        self._cid_by_short: dict[str, str] = {}  # 12-hex prefix -> 64-hex id
        self._services: dict[str, Service] = {}  # uid ->
        self._svc_by_ip: dict[str, Service] = {}
        self._slices: dict[str, EndpointSlice] = {}  # uid ->
        self._slices_by_svc: dict[tuple[str, str], set[str]] = {}  # (namespace, service) -> slice uids
        self._nodes: dict[str, Node] = {}  # name -> (pods name their node, not its uid)
        self._node_by_ip: dict[str, Node] = {}
        self._workloads: dict[str, Workload] = {}  # uid -> (owner references carry uids)
        # Primary keys of objects not deleted, per kind: a relist removes those it no longer sees,
        # without touching (and so re-delaying) objects already waiting out their grace.
        self._live: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self._pending: deque[_Pending] = deque()  # ordered by due time: the clock is monotonic
        # Bumped by every change to any table, so a caller may cache answers (the aggregator's
        # resolution cache) and drop them when this moves: one int compare per batch.
        self.generation = 0
        self.rejected = 0  # objects without a key, unknown kinds or event types: counted, not raised

    # ---- mutation ----------------------------------------------------------------------------

    def apply(self, event_type: str, kind: str, obj: Mapping[str, Any] | KubeObject) -> bool:
        """Apply one watch event (ADDED, MODIFIED or DELETED). ``obj`` is the event's raw object or
        its record from ``model.convert``. False (and counted in ``rejected``) when not applicable."""
        self.expire()
        record = self._record(kind, obj)
        if record is None:
            return False
        if event_type in ("ADDED", "MODIFIED"):
            self._upsert(kind, record)
        elif event_type == "DELETED":
            self._delete(kind, record)
        else:
            self.rejected += 1
            return False
        self.generation += 1
        return True

    def replace(self, kind: str, objs: Iterable[Mapping[str, Any] | KubeObject]) -> None:
        """Make ``kind`` equal to a fresh list: upsert every object, delete (with the grace period)
        every live object the list no longer has. What a relist after 410 Gone needs."""
        self.expire()
        if kind not in KINDS:
            self.rejected += 1
            return
        self.generation += 1
        seen: set[str] = set()
        for obj in objs:
            record = self._record(kind, obj)
            if record is not None:
                self._upsert(kind, record)
                seen.add(_primary_key(record))
        for key in self._live[kind] - seen:
            stored = self._stored(kind, key)
            if stored is not None:
                self._delete(kind, stored)

    def expire(self) -> int:
        """Release every key whose grace period is over; returns how many were removed. ``apply``
        and ``replace`` call it; the owner calls it on a timer so a quiet cluster still forgets."""
        now = self._clock()
        removed = 0
        pending = self._pending
        while pending and pending[0][0] <= now:
            _, table, key, uid = pending.popleft()
            removed += self._release(table, key, uid)
        if removed:
            self.generation += 1
        return removed

    # ---- lookups -----------------------------------------------------------------------------

    def pod_by_ip(self, ip: IpLike) -> Pod | None:
        """The pod that owns ``ip``; never a host-network pod (ask ``node_by_ip``)."""
        return _lookup_ip(self._pod_by_ip, ip)

    def pod_by_uid(self, uid: str) -> Pod | None:
        return self._pods.get(uid)

    def pod_by_container_id(self, container_id: str) -> Pod | None:
        """By full 64-hex ID or any prefix of at least 12 hex digits; a runtime prefix is ignored.
        (Two live containers sharing a 12-hex prefix, odds 1 in 2**48 per pair, resolve to the later.)"""
        cid = container_id.rpartition("://")[2].strip().lower()
        pod = self._pod_by_cid.get(cid)
        if pod is not None or len(cid) < SHORT_CONTAINER_ID_LEN:
            return pod
        full = self._cid_by_short.get(cid[:SHORT_CONTAINER_ID_LEN])
        if full is None or not full.startswith(cid):
            return None
        return self._pod_by_cid.get(full)

    def service_by_cluster_ip(self, ip: IpLike) -> Service | None:
        return _lookup_ip(self._svc_by_ip, ip)

    def node_by_ip(self, ip: IpLike) -> Node | None:
        """The node with this InternalIP or ExternalIP: where host-network pod addresses resolve."""
        return _lookup_ip(self._node_by_ip, ip)

    def workload_of(self, pod: Pod) -> tuple[str, str]:
        """(kind, name) of the workload a person would name for ``pod``: ReplicaSet -> Deployment,
        Job -> CronJob, StatefulSet/DaemonSet (or any other controller) as is, a bare pod as
        ("Pod", name). Walked at lookup time, so the order in which kinds were listed is irrelevant."""
        owner = pod.owner
        if owner is None:
            return (POD, pod.name)
        for _ in range(_MAX_OWNER_DEPTH):
            if owner.kind not in _INTERMEDIATE_KINDS:
                break
            parent = self._workloads.get(owner.uid)
            if parent is None:
                if owner.kind == REPLICA_SET and (m := _DEPLOYMENT_HASH_SUFFIX.match(owner.name)):
                    return (DEPLOYMENT, m.group(1))
                break
            if parent.owner is None:
                break
            owner = parent.owner
        return (owner.kind, owner.name)

    def ready_backends(self, service: Service) -> tuple[Pod, ...] | None:
        """The pods behind every ready endpoint of ``service``'s EndpointSlices; None when there is
        none, or when one of them is not a pod this index knows (an address without a pod
        targetRef, a pod not listed yet): then who answers a connection to the VIP is not known."""
        pods: dict[str, Pod] = {}
        for slice_uid in self._slices_by_svc.get((service.namespace, service.name), ()):
            for _address, pod_uid in self._slices[slice_uid].endpoints:
                pod = self._pods.get(pod_uid) if pod_uid else None
                if pod is None:
                    return None
                pods[pod_uid] = pod
        return tuple(pods.values()) or None

    def endpoint_addresses(self, namespace: str, service: str) -> tuple[str, ...]:
        """The ready endpoint addresses of a Service's EndpointSlices, sorted (the processor's own
        replicas, for the trace join)."""
        addrs = {a for uid in self._slices_by_svc.get((namespace, service), ()) for a, _ in self._slices[uid].endpoints}
        return tuple(sorted(addrs))

    def sizes(self) -> dict[str, int]:
        """Table sizes for self-metrics. ``pods`` counts live pods; ``pods_total`` adds deleted pods
        still inside their grace period."""
        return {
            "pods": len(self._live[POD]),
            "pods_total": len(self._pods),
            "pod_ips": len(self._pod_by_ip),
            "container_ids": len(self._pod_by_cid),
            "services": len(self._live[SERVICE]),
            "service_ips": len(self._svc_by_ip),
            "endpoint_slices": len(self._slices),
            "nodes": len(self._live[NODE]),
            "node_ips": len(self._node_by_ip),
            "workloads": sum(len(self._live[k]) for k in WORKLOAD_KINDS),
            "pending_deletes": len(self._pending),
        }

    # ---- per-kind upsert / delete ------------------------------------------------------------

    def _record(self, kind: str, obj: Mapping[str, Any] | KubeObject) -> KubeObject | None:
        record = convert(kind, obj) if isinstance(obj, Mapping) else obj
        expected = _RECORD_TYPE.get(kind)
        if (
            record is None
            or expected is None
            or not isinstance(record, expected)
            or not _primary_key(record)
            or (isinstance(record, Workload) and record.kind != kind)
        ):
            self.rejected += 1
            return None
        return record

    def _stored(self, kind: str, key: str) -> KubeObject | None:
        if kind == POD:
            return self._pods.get(key)
        if kind == SERVICE:
            return self._services.get(key)
        if kind == ENDPOINT_SLICE:
            return self._slices.get(key)
        if kind == NODE:
            return self._nodes.get(key)
        return self._workloads.get(key)

    def _upsert(self, kind: str, record: KubeObject) -> None:
        key = _primary_key(record)
        if isinstance(record, EndpointSlice):
            self._upsert_slice(record)
            self._live[kind].add(key)
            return
        old = self._stored(kind, key)
        if old is not None and key not in self._live[kind] and old.uid == record.uid:
            # An event for an object already deleted (a DELETED replayed after a relist): keep
            # waiting out the grace rather than bringing it back.
            return
        self._live[kind].add(key)
        new_keys = self._keys_of(record)
        for table, k in new_keys:
            if isinstance(record, Pod) and table is not self._pods:
                claimed = _claim_newer(table, k, record)
                if claimed and table is self._pod_by_cid and len(k) >= SHORT_CONTAINER_ID_LEN:
                    self._cid_by_short[k[:SHORT_CONTAINER_ID_LEN]] = k
            else:
                # Service VIPs and node addresses belong to one live object at a time (the
                # APIServer allocates them), so the last writer wins.
                table[k] = record
        if old is not None:
            # Keys the object stopped claiming (a restarted container's old ID, a changed IP, a
            # node re-registered under its name) go through the same delayed, UID-checked release.
            claimed_now = {(id(t), k) for t, k in new_keys}
            for table, k in self._keys_of(old):
                if (id(table), k) not in claimed_now:
                    self._schedule(table, k, old.uid)

    def _delete(self, kind: str, record: KubeObject) -> None:
        key = _primary_key(record)
        stored = self._stored(kind, key)
        if key not in self._live[kind] or stored is None or stored.uid != record.uid:
            return  # unknown, already deleted, or a same-named successor owns the key now
        self._live[kind].discard(key)
        if isinstance(stored, EndpointSlice):
            # Slices are not delayed: they describe current backends, and a stale one would keep
            # a drained pod in its Service.
            self._unlink_slice(self._slices.pop(key))
            return
        # Keep the final state where this object still owns a key (a deleted pod's last object
        # carries its deletionTimestamp), but claim nothing new; release everything after the grace.
        done: set[tuple[int, Any]] = set()
        for table, k in self._keys_of(stored) + self._keys_of(record):
            current: _HasUid | None = table.get(k)
            if current is not None and current.uid == record.uid and (id(table), k) not in done:
                done.add((id(table), k))
                table[k] = record
                self._schedule(table, k, record.uid)

    def _keys_of(self, record: KubeObject) -> list[tuple[dict[Any, Any], Any]]:
        """Every (table, key) under which ``record`` is found, primary key first."""
        if isinstance(record, Pod):
            keys: list[tuple[dict[Any, Any], Any]] = [(self._pods, record.uid)]
            if not record.host_network:
                keys.extend((self._pod_by_ip, ip) for ip in record.pod_ips)
            keys.extend((self._pod_by_cid, cid) for cid in record.container_ids)
            return keys
        if isinstance(record, Service):
            keys = [(self._services, record.uid)]
            keys.extend((self._svc_by_ip, ip) for ip in record.cluster_ips)
            return keys
        if isinstance(record, Node):
            keys = [(self._nodes, record.name)]
            keys.extend((self._node_by_ip, ip) for ip in record.internal_ips + record.external_ips)
            return keys
        if isinstance(record, Workload):
            return [(self._workloads, record.uid)]
        return []

    def _upsert_slice(self, es: EndpointSlice) -> None:
        old = self._slices.get(es.uid)
        if old is not None:
            self._unlink_slice(old)
        self._slices[es.uid] = es
        self._slices_by_svc.setdefault((es.namespace, es.service_name), set()).add(es.uid)

    def _unlink_slice(self, es: EndpointSlice) -> None:
        _discard(self._slices_by_svc, (es.namespace, es.service_name), es.uid)

    # ---- delayed, UID-checked release ----------------------------------------------------------

    def _schedule(self, table: dict[Any, Any], key: Any, uid: str) -> None:
        if self._grace <= 0:
            self._release(table, key, uid)
        else:
            self._pending.append((self._clock() + self._grace, table, key, uid))

    def _release(self, table: dict[Any, Any], key: Any, uid: str) -> int:
        current: _HasUid | None = table.get(key)
        if current is None or current.uid != uid:
            return 0  # the key has a new owner since (a reused IP, a re-created Service)
        del table[key]
        if table is self._pod_by_cid and self._cid_by_short.get(key[:SHORT_CONTAINER_ID_LEN]) == key:
            del self._cid_by_short[key[:SHORT_CONTAINER_ID_LEN]]
        return 1


def _claim_newer(table: dict[str, Pod], key: str, pod: Pod) -> bool:
    """Point ``key`` at ``pod`` unless a different, strictly newer pod holds it (equal timestamps:
    the later event wins, as in the collector)."""
    current = table.get(key)
    if current is not None and current.uid != pod.uid and current.creation_ts > pod.creation_ts:
        return False
    table[key] = pod
    return True


def _primary_key(record: KubeObject) -> str:
    return record.name if isinstance(record, Node) else record.uid


def _discard(table: dict[Any, set[str]], key: Any, member: str) -> None:
    members = table.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del table[key]


def _lookup_ip(table: dict[str, _T], ip: IpLike) -> _T | None:
    # Fast path: the caller already has the canonical text form (the common case per flow).
    if isinstance(ip, str):
        found = table.get(ip)
        if found is not None:
            return found
        key = canonical_ip(ip)
        return table.get(key) if key != ip else None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return table.get(canonical_ip(str(addr)))
