"""The I/O edge: list+watch every resource the index needs from the APIServer, informer-style.

Per resource: list (paged, noting the list's resourceVersion), replace the index's view of that
kind, then watch from that version with bookmarks. A stream that ends or breaks resumes from the
last version seen (an event's or a bookmark's), so nothing is missed and nothing is listed again;
only 410 Gone (the version was compacted away) forces a relist. Failures back off exponentially
with jitter, capped, honouring the server's Retry-After.

``kubernetes_asyncio`` supplies configuration, authentication, TLS and the request plumbing; its
generated model classes are bypassed (``_preload_content=False``) and each object's raw JSON goes
straight to a slim record, because a ``V1Pod`` costs tens of kilobytes and we hold 10,000 of them.
Its ``Watch`` helper is not used either: it swallows one 410 by resuming from the same version and
hides reconnects, which are exactly what we count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import structlog
from kubernetes_asyncio import client, config

from cluster_processor.kube.errors import KubeApiError, KubeConfigError, KubeInClusterError, ResourceGoneError
from cluster_processor.kube.model import (
    CRON_JOB,
    DAEMON_SET,
    DEPLOYMENT,
    ENDPOINT_SLICE,
    JOB,
    NODE,
    POD,
    REPLICA_SET,
    SERVICE,
    STATEFUL_SET,
    KubeObject,
    convert,
)
from kscope_common.grpc_retry import Backoff

log = structlog.get_logger(__name__)

_APPLIED_EVENTS: Final = frozenset({"ADDED", "MODIFIED", "DELETED"})
_SHORT_WATCH_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Resource:
    """One watched collection: its kind and the generated cluster-wide list function."""

    kind: str
    api: Callable[[client.ApiClient], Any]  # e.g. client.CoreV1Api
    method: str  # e.g. "list_pod_for_all_namespaces"


RESOURCES: Final[tuple[Resource, ...]] = (
    Resource(POD, client.CoreV1Api, "list_pod_for_all_namespaces"),
    Resource(SERVICE, client.CoreV1Api, "list_service_for_all_namespaces"),
    Resource(ENDPOINT_SLICE, client.DiscoveryV1Api, "list_endpoint_slice_for_all_namespaces"),
    Resource(NODE, client.CoreV1Api, "list_node"),
    Resource(REPLICA_SET, client.AppsV1Api, "list_replica_set_for_all_namespaces"),
    Resource(DEPLOYMENT, client.AppsV1Api, "list_deployment_for_all_namespaces"),
    Resource(STATEFUL_SET, client.AppsV1Api, "list_stateful_set_for_all_namespaces"),
    Resource(DAEMON_SET, client.AppsV1Api, "list_daemon_set_for_all_namespaces"),
    Resource(JOB, client.BatchV1Api, "list_job_for_all_namespaces"),
    Resource(CRON_JOB, client.BatchV1Api, "list_cron_job_for_all_namespaces"),
)


class IndexSink(Protocol):
    """What the watcher needs of ``KubeIndex``: a seam so tests can watch into anything."""

    def apply(self, event_type: str, kind: str, obj: KubeObject) -> bool: ...

    def replace(self, kind: str, objs: Iterable[KubeObject]) -> None: ...

    def expire(self) -> int: ...


@dataclass(frozen=True, slots=True)
class WatchSettings:
    page_size: int = 500  # list page: bounds the raw JSON held at once while listing 10,000 pods
    watch_timeout_s: int = 300  # server-side timeoutSeconds: the stream ends cleanly and resumes
    read_slack_s: float = 60.0  # silence beyond watch_timeout_s means a dead connection
    connect_timeout_s: float = 10.0
    list_timeout_s: float = 120.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    expire_interval_s: float = 1.0  # how often the index's delete grace queue is drained


@dataclass(slots=True)
class WatchStats:
    """Per-resource counters for self-metrics (``KubeWatcher.stats`` hands out copies)."""

    lists: int = 0  # complete lists, the first one included
    relists: int = 0  # lists after the first, i.e. after 410 Gone
    restarts: int = 0  # watches resumed from the last resourceVersion, without a list
    errors: int = 0  # failed requests, broken streams, error statuses, unparseable lines
    gone: int = 0  # 410 Gone, as an HTTP status or a watch ERROR event
    events: int = 0  # ADDED/MODIFIED/DELETED applied to the index
    bookmarks: int = 0
    ignored: int = 0  # well-formed events of a type we do not know
    resource_version: str = ""  # where the next watch resumes; "" until the first list
    synced: bool = False  # the first list has reached the index


async def load_api_client(
    kubeconfig: str | Path | None = None,
    *,
    context: str | None = None,
    max_connections: int = 2 * len(RESOURCES),
) -> client.ApiClient:
    """An API client from ``kubeconfig`` if given, else from the pod's service account when running
    in a cluster, else from the default kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``)."""
    cfg = client.Configuration()
    # Every open watch holds a pooled connection for as long as it runs. The library's default
    # pool is 5 per CPU: on a one-CPU pod, half of our ten watches would wait forever for one.
    cfg.connection_pool_maxsize = max_connections
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            except (config.ConfigException, OSError) as exc:
                raise KubeInClusterError(f"no usable in-cluster service account: {exc}") from exc
        else:
            await config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig is not None else None,
                context=context,
                client_configuration=cfg,
                persist_config=False,
            )
    except (config.ConfigException, OSError) as exc:
        raise KubeConfigError(f"no usable Kubernetes configuration: {exc}") from exc
    return client.ApiClient(configuration=cfg)


class KubeWatcher:
    """Keeps an ``IndexSink`` in step with the APIServer for a set of resources."""

    def __init__(
        self,
        index: IndexSink,
        api_client: client.ApiClient,
        *,
        resources: Sequence[Resource] = RESOURCES,
        settings: WatchSettings = WatchSettings(),
        owns_client: bool = False,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._index = index
        self._api = api_client
        self._resources = tuple(resources)
        self._settings = settings
        self._owns_client = owns_client
        self._rng = rng
        self._stats = {r.kind: WatchStats() for r in self._resources}
        self._synced = {r.kind: asyncio.Event() for r in self._resources}
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def from_config(
        cls,
        index: IndexSink,
        kubeconfig: str | Path | None = None,
        *,
        context: str | None = None,
        resources: Sequence[Resource] = RESOURCES,
        settings: WatchSettings = WatchSettings(),
        rng: Callable[[], float] = random.random,
    ) -> KubeWatcher:
        """A watcher with its own API client (closed by ``stop``), configured as ``load_api_client``."""
        api = await load_api_client(kubeconfig, context=context, max_connections=2 * len(resources) + 2)
        return cls(index, api, resources=resources, settings=settings, owns_client=True, rng=rng)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start one list+watch task per resource and the index housekeeping (needs a running loop)."""
        if self._tasks:
            return
        for res in self._resources:
            self._tasks.append(asyncio.create_task(self._run(res), name=f"kube-watch-{res.kind}"))
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="kube-index-expire"))

    async def wait_synced(self, timeout_s: float | None = None) -> bool:
        """True once every resource has been listed into the index; False on timeout."""
        waits = [asyncio.create_task(event.wait()) for event in self._synced.values()]
        if not waits:
            return True
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s)
        finally:
            for task in waits:
                task.cancel()
        return len(done) == len(waits)

    async def stop(self) -> None:
        """Cancel every task, wait for them to finish (open streams are closed on the way out),
        and close the API client if this watcher created it."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client:
            await self._api.close()

    async def __aenter__(self) -> KubeWatcher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def stats(self) -> dict[str, WatchStats]:
        return {kind: dataclasses.replace(st) for kind, st in self._stats.items()}

    # ---- the loop --------------------------------------------------------------------------

    async def _run(self, res: Resource) -> None:
        st = self._stats[res.kind]
        rlog = log.bind(resource=res.kind)
        s = self._settings
        backoff = Backoff(s.backoff_initial_s, s.backoff_max_s, server_delay_cap_s=s.backoff_max_s, rng=self._rng)
        must_list = True
        watched = False  # a watch has been opened since the last list
        while True:
            try:
                if must_list:
                    await self._list(res, st)
                    must_list, watched = False, False
                    backoff.reset()
                    if not st.synced:
                        st.synced = True
                        self._synced[res.kind].set()
                        rlog.info("kube_synced", resource_version=st.resource_version)
                    else:
                        rlog.info("kube_relisted", resource_version=st.resource_version, relists=st.relists)
                if watched:
                    st.restarts += 1
                watched = True
                started = asyncio.get_running_loop().time()
                received = await self._watch(res, st, backoff)
                if not received and asyncio.get_running_loop().time() - started < _SHORT_WATCH_S:
                    # client-go's "very short watch": a stream closed at once with nothing in it
                    # is a misbehaving server or proxy, and resuming at once would hammer it.
                    raise KubeApiError(200, "watch closed immediately without events")
                # Otherwise a clean end of stream (the server's timeoutSeconds): resume at once.
            except asyncio.CancelledError:
                raise
            except ResourceGoneError as exc:
                st.gone += 1
                must_list = True
                rlog.info("kube_watch_gone", reason=exc.reason, resource_version=st.resource_version)
                # Relist after a short backoff, not at once: a server that answers every watch
                # with 410 must not turn us into a list loop.
                await asyncio.sleep(backoff.next(exc.retry_after_s))
            except (KubeApiError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                st.errors += 1
                # A failed list is retried whole; a broken watch resumes from st.resource_version,
                # so the events it would have carried are replayed, not lost.
                retry_after = exc.retry_after_s if isinstance(exc, KubeApiError) else None
                delay = backoff.next(retry_after)
                rlog.warning("kube_watch_error", error=repr(exc), retry_in_s=round(delay, 3), listing=must_list)
                await asyncio.sleep(delay)
            except Exception:
                # A bug (in a converter or the index), not the network. Keep the loop alive and
                # loud: a watcher that died quietly would leave the index stale forever.
                st.errors += 1
                delay = backoff.next()
                rlog.exception("kube_watch_bug", retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)

    async def _list(self, res: Resource, st: WatchStats) -> None:
        method = getattr(res.api(self._api), res.method)
        timeout = aiohttp.ClientTimeout(total=self._settings.list_timeout_s)
        records: list[KubeObject] = []
        token = ""
        version = ""
        while True:
            kwargs: dict[str, Any] = {
                "limit": self._settings.page_size,
                "_preload_content": False,
                "_request_timeout": timeout,
            }
            if token:
                kwargs["_continue"] = token
            resp = await method(**kwargs)
            try:
                page = json.loads(await _read_ok(resp))
            finally:
                resp.release()
            if not isinstance(page, Mapping):
                raise KubeApiError(resp.status, "list response is not an object")
            meta = page.get("metadata")
            meta = meta if isinstance(meta, Mapping) else {}
            # Every page of a paged list reports the same snapshot version.
            version = str(meta.get("resourceVersion") or version)
            for item in page.get("items") or ():
                record = convert(res.kind, item) if isinstance(item, Mapping) else None
                if record is not None:
                    records.append(record)
            # Only the slim records outlive the page: its raw JSON is released before the next one.
            del page
            token = str(meta.get("continue") or "")
            if not token:
                break
        if not version:
            raise KubeApiError(200, "list response has no resourceVersion to watch from")
        self._index.replace(res.kind, records)
        if st.lists:
            st.relists += 1
        st.lists += 1
        st.resource_version = version

    async def _watch(self, res: Resource, st: WatchStats, backoff: Backoff) -> int:
        """Stream events into the index until the server ends the stream; returns how many lines
        (events and bookmarks) it carried. Raises on a broken stream or an error status."""
        s = self._settings
        received = 0
        method = getattr(res.api(self._api), res.method)
        resp = await method(
            watch=True,
            resource_version=st.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=s.watch_timeout_s,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=s.connect_timeout_s, sock_read=s.watch_timeout_s + s.read_slack_s
            ),
        )
        try:
            if resp.status != 200:
                await _read_ok(resp)  # raises with the server's Status
                raise KubeApiError(resp.status, "unexpected status for a watch")
            while True:
                line = await resp.content.readline()
                if not line:
                    return received
                if line.isspace():
                    continue
                # A line that does not parse raises ValueError: the watch restarts from the last
                # version we applied, so the event is fetched again rather than skipped.
                self._handle(res.kind, st, json.loads(line))
                received += 1
                backoff.reset()
        finally:
            # Close, not release: releasing would try to drain a stream that never ends.
            resp.close()

    def _handle(self, kind: str, st: WatchStats, event: Any) -> None:
        if not isinstance(event, Mapping) or not isinstance(event.get("object"), Mapping):
            raise ValueError("watch event without an object")
        etype = event.get("type")
        obj: Mapping[str, Any] = event["object"]
        if etype == "ERROR":
            code = obj.get("code")
            status = code if isinstance(code, int) else 500
            reason = f"{obj.get('reason', '')}: {obj.get('message', '')}"
            raise (ResourceGoneError if status == 410 else KubeApiError)(status, reason)
        meta = obj.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        if etype == "BOOKMARK":
            st.bookmarks += 1
        elif etype in _APPLIED_EVENTS:
            record = convert(kind, obj)
            if record is not None:
                self._index.apply(etype, kind, record)
            st.events += 1
        else:
            st.ignored += 1
            return
        if isinstance(version, str) and version:
            st.resource_version = version

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.expire_interval_s)
            self._index.expire()


async def _read_ok(resp: aiohttp.ClientResponse) -> bytes:
    """The body of a 2xx response; otherwise raise with the server's Status reason."""
    body = await resp.read()
    if 200 <= resp.status < 300:
        return body
    reason = resp.reason or ""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        status = json.loads(body)
        if isinstance(status, Mapping):
            reason = f"{status.get('reason', reason)}: {status.get('message', '')}"
    retry_after: float | None = None
    with contextlib.suppress(TypeError, ValueError):
        retry_after = float(resp.headers.get("Retry-After", ""))
    if resp.status == 410:
        raise ResourceGoneError(410, reason, retry_after)
    raise KubeApiError(resp.status, reason, retry_after)
