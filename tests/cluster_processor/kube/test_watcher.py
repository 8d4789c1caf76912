"""The watch loop, driven through kubernetes_asyncio against a test APIServer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from cluster_processor.kube import watcher as w
from cluster_processor.kube.errors import KubeConfigError
from cluster_processor.kube.index import KubeIndex
from tests.cluster_processor.kube import factories as f
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer

FAST = w.WatchSettings(
    page_size=2,
    watch_timeout_s=30,
    backoff_initial_s=0.02,
    backoff_max_s=0.2,
    expire_interval_s=0.05,
)
PODS = [r for r in w.RESOURCES if r.kind == "Pod"]
PODS_AND_SERVICES = [r for r in w.RESOURCES if r.kind in ("Pod", "Service")]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # kubernetes_asyncio's session trusts the environment: a proxy must not see 127.0.0.1 traffic.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


async def eventually(pred: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def watching(
    server: FakeApiServer,
    tmp_path: Path,
    index: KubeIndex,
    resources: Sequence[w.Resource] = PODS,
    settings: w.WatchSettings = FAST,
) -> AsyncIterator[w.KubeWatcher]:
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    watcher = await w.KubeWatcher.from_config(index, kubeconfig, resources=resources, settings=settings)
    watcher.start()
    try:
        yield watcher
    finally:
        await watcher.stop()
        await server.close()


def test_initial_list_populates_every_kind(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        server.put("Deployment", f.workload("web", uid="d1"))
        server.put("ReplicaSet", f.workload("web-7d4b9c8f6b", uid="rs1", owners=[f.owner("Deployment", "web", "d1")]))
        server.put("StatefulSet", f.workload("db", uid="ss1"))
        server.put("DaemonSet", f.workload("agent", uid="ds1"))
        server.put("CronJob", f.workload("backup", uid="cj1"))
        server.put("Job", f.workload("backup-1", uid="j1", owners=[f.owner("CronJob", "backup", "cj1")]))
        rs = [f.owner("ReplicaSet", "web-7d4b9c8f6b", "rs1")]
        for i in range(5):  # 5 pods in pages of 2: a three-page list
            server.put("Pod", f.pod(f"web-7d4b9c8f6b-{i}", uid=f"p{i}", ip=f"10.0.0.{i}", owners=rs))
        server.put("Service", f.service("web", cluster_ips=["10.96.0.1"]))
        server.put("EndpointSlice", f.endpoint_slice("web-x", "web", [("10.0.0.0", "p0")]))
        server.put("Node", f.node("node-1", internal="192.168.1.10"))
        index = KubeIndex()
        async with watching(server, tmp_path, index, resources=w.RESOURCES) as watcher:
            assert await watcher.wait_synced(5)
            assert index.sizes()["pods"] == 5
            pod = index.pod_by_ip("10.0.0.3")
            assert pod is not None and index.workload_of(pod) == ("Deployment", "web")
            assert index.service_by_cluster_ip("10.96.0.1") is not None
            svc = index.service_by_cluster_ip("10.96.0.1")
            assert svc is not None and [p.uid for p in index.ready_backends(svc) or ()] == ["p0"]
            assert index.node_by_ip("192.168.1.10") is not None
            assert index.sizes()["workloads"] == 6
            pod_lists = server.list_requests("Pod")
            assert [r.params.get("continue", "") != "" for r in pod_lists] == [False, True, True]
            stats = watcher.stats()
            assert all(s.lists == 1 and s.synced and s.errors == 0 for s in stats.values()), stats
            await eventually(lambda: server.open_watches() == len(w.RESOURCES), "a watch per resource")
            watch = server.watch_requests("Pod")[0].params
            assert watch["resourceVersion"] == stats["Pod"].resource_version
            assert watch["allowWatchBookmarks"].lower() == "true"

    run(body())


def test_watch_events_update_the_index(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        index = KubeIndex(delete_grace_s=0)
        async with watching(server, tmp_path, index) as watcher:
            assert await watcher.wait_synced(5)
            raw = server.put("Pod", f.pod("a", uid="ua", ip="10.0.0.1"))
            await eventually(lambda: index.pod_by_ip("10.0.0.1") is not None, "ADDED applied")
            raw["status"]["podIPs"] = [{"ip": "10.0.0.2"}]
            server.put("Pod", raw)
            await eventually(lambda: index.pod_by_ip("10.0.0.2") is not None, "MODIFIED applied")
            server.delete("Pod", "a", "default")
            await eventually(lambda: index.pod_by_uid("ua") is None, "DELETED applied")
            st = watcher.stats()["Pod"]
            assert st.events == 3 and st.lists == 1 and st.errors == 0
            assert st.resource_version == str(server.resource_version)

    run(body())


def test_bookmark_advances_the_resource_version(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        index = KubeIndex()
        async with watching(server, tmp_path, index, resources=PODS_AND_SERVICES) as watcher:
            assert await watcher.wait_synced(5)
            await eventually(lambda: server.open_watches("Pod") == 1, "pod watch open")
            before = watcher.stats()["Pod"].resource_version
            server.put("Service", f.service("s"))  # moves the global version; no pod event
            server.bookmark("Pod")
            target = str(server.resource_version)
            await eventually(lambda: watcher.stats()["Pod"].resource_version == target, "bookmark applied")
            assert target != before and watcher.stats()["Pod"].bookmarks == 1
            # The next watch resumes from the bookmark, not from the last pod event.
            server.drop_watches("Pod")
            await eventually(lambda: len(server.watch_requests("Pod")) == 2, "resumed watch")
            assert server.watch_requests("Pod")[1].params["resourceVersion"] == target
            assert watcher.stats()["Pod"].lists == 1

    run(body())


def test_dropped_connection_resumes_without_relist_or_lost_events(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        server.put("Pod", f.pod("c", uid="uc", ip="10.0.0.3"))
        index = KubeIndex(delete_grace_s=0)
        async with watching(server, tmp_path, index) as watcher:
            assert await watcher.wait_synced(5)
            a = server.put("Pod", f.pod("a", uid="ua", ip="10.0.0.1"))
            await eventually(lambda: index.pod_by_uid("ua") is not None, "a added")
            seen = watcher.stats()["Pod"].resource_version
            assert server.drop_watches("Pod") == 1
            # These happen while the client is cut off (nothing yields to the loop in between).
            server.put("Pod", f.pod("b", uid="ub", ip="10.0.0.2"))
            a["status"]["podIPs"] = [{"ip": "10.0.0.11"}]
            server.put("Pod", a)
            server.delete("Pod", "c", "default")
            await eventually(lambda: index.pod_by_uid("uc") is None, "missed events delivered")
            assert index.pod_by_ip("10.0.0.2").uid == "ub"  # type: ignore[union-attr]
            assert index.pod_by_ip("10.0.0.11").uid == "ua"  # type: ignore[union-attr]
            st = watcher.stats()["Pod"]
            assert (st.lists, st.relists, st.gone) == (1, 0, 0)
            assert st.restarts == 1 and st.errors == 1
            assert server.watch_requests("Pod")[1].params["resourceVersion"] == seen

    run(body())


def test_server_timeout_restarts_the_watch_cleanly(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        index = KubeIndex()
        settings = w.WatchSettings(watch_timeout_s=1, backoff_initial_s=0.02, backoff_max_s=0.2)
        async with watching(server, tmp_path, index, settings=settings) as watcher:
            assert await watcher.wait_synced(5)
            await eventually(lambda: watcher.stats()["Pod"].restarts >= 1, "restart after timeoutSeconds")
            server.put("Pod", f.pod("a", uid="ua"))
            await eventually(lambda: index.pod_by_uid("ua") is not None, "event after the restart")
            st = watcher.stats()["Pod"]
            assert (st.lists, st.errors) == (1, 0)

    run(body())


def test_immediately_closed_watches_back_off(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        server.empty_watches = True
        index = KubeIndex()
        async with watching(server, tmp_path, index) as watcher:
            assert await watcher.wait_synced(5)
            await asyncio.sleep(0.5)
            # Backing off from 20 ms towards 200 ms allows a handful of attempts in 0.5 s;
            # resuming at once would have made hundreds.
            attempts = len(server.watch_requests("Pod"))
            assert 2 <= attempts <= 20
            st = watcher.stats()["Pod"]
            assert st.errors >= attempts - 1 and st.lists == 1
            server.empty_watches = False
            server.put("Pod", f.pod("a", uid="ua"))
            await eventually(lambda: index.pod_by_uid("ua") is not None, "recovered")

    run(body())


def test_410_error_event_relists_and_converges(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        for name in ("a", "b"):
            server.put("Pod", f.pod(name, uid=f"u{name}", ip=f"10.0.0.{ord(name)}"))
        index = KubeIndex(delete_grace_s=0)
        async with watching(server, tmp_path, index) as watcher:
            assert await watcher.wait_synced(5)
            await eventually(lambda: server.open_watches("Pod") == 1, "pod watch open")
            # The client never sees these as events: only the relist can tell it.
            server.hold()
            server.delete("Pod", "b", "default")
            server.put("Pod", f.pod("c", uid="uc", ip="10.0.0.99"))
            server.compact()
            assert server.expire_watches("Pod") == 1
            await eventually(lambda: watcher.stats()["Pod"].relists == 1, "relist after 410")
            server.release()
            assert index.pod_by_uid("ub") is None
            assert index.pod_by_ip("10.0.0.99").uid == "uc"  # type: ignore[union-attr]
            assert index.pod_by_uid("ua") is not None
            st = watcher.stats()["Pod"]
            assert (st.gone, st.lists, st.errors) == (1, 2, 0)
            # ...and watches again from the relist's version.
            await eventually(lambda: len(server.watch_requests("Pod")) == 2, "watch after relist")
            assert server.watch_requests("Pod")[1].params["resourceVersion"] == st.resource_version

    run(body())


def test_410_http_status_on_resume_relists(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer(gone_as_http=True)
        await server.start()
        server.put("Pod", f.pod("a", uid="ua", ip="10.0.0.1"))
        server.put("Pod", f.pod("b", uid="ub", ip="10.0.0.2"))
        index = KubeIndex(delete_grace_s=0)
        async with watching(server, tmp_path, index) as watcher:
            assert await watcher.wait_synced(5)
            await eventually(lambda: server.open_watches("Pod") == 1, "pod watch open")
            server.hold()
            server.delete("Pod", "b", "default")
            server.compact()
            server.drop_watches("Pod")  # the resume will ask for a compacted version
            await eventually(lambda: watcher.stats()["Pod"].relists == 1, "relist after HTTP 410")
            server.release()
            assert index.pod_by_uid("ub") is None and index.pod_by_uid("ua") is not None
            assert [r.status for r in server.watch_requests("Pod")][:2] == [200, 410]
            st = watcher.stats()["Pod"]
            assert (st.gone, st.errors, st.lists) == (1, 1, 2)

    run(body())


def test_apiserver_down_at_start_backs_off_and_recovers(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        server.reserve()  # the port is ours, but nothing listens: connection refused
        index = KubeIndex()
        async with watching(server, tmp_path, index) as watcher:
            await eventually(lambda: watcher.stats()["Pod"].errors >= 3, "failed attempts counted")
            assert not await watcher.wait_synced(0.05)
            server.put("Pod", f.pod("a", uid="ua"))
            server.fail_next("Pod", 503)  # up, but not ready yet
            await server.start()
            assert await watcher.wait_synced(5)
            assert index.pod_by_uid("ua") is not None
            st = watcher.stats()["Pod"]
            assert st.lists == 1 and st.relists == 0 and st.errors >= 4
            assert [r.status for r in server.list_requests("Pod")] == [503, 200]

    run(body())


def test_stop_closes_streams(tmp_path: Path) -> None:
    async def body() -> None:
        server = FakeApiServer()
        await server.start()
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        watcher = await w.KubeWatcher.from_config(KubeIndex(), kubeconfig, resources=PODS_AND_SERVICES, settings=FAST)
        watcher.start()
        assert await watcher.wait_synced(5)
        await eventually(lambda: server.open_watches() == 2, "watches open")
        await watcher.stop()
        await eventually(lambda: server.open_watches() == 0, "streams closed by the client")
        await watcher.stop()  # idempotent
        await server.close()

    run(body())


def test_missing_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(KubeConfigError):
            await w.load_api_client(tmp_path / "nope")

    run(body())
