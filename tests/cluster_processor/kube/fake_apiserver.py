"""A test APIServer that speaks the Kubernetes list/watch HTTP protocol on 127.0.0.1.

What a real client depends on is reproduced, nothing more:

* one global, increasing resourceVersion (etcd's revision) stamped on every object it writes;
* ``GET <collection>``: a ``<Kind>List`` with ``metadata.resourceVersion``, paged by ``limit`` and
  ``continue`` over a consistent snapshot; an unknown continue token is 410 Expired;
* ``GET <collection>?watch=true&resourceVersion=N``: newline-delimited JSON events after N
  (ADDED/MODIFIED/DELETED), BOOKMARK on request when ``allowWatchBookmarks`` is set, the stream
  ended cleanly after ``timeoutSeconds``; a version older than the compaction floor is answered
  with an ERROR event carrying a 410 Status (the watch cache's way) or, with ``gone_as_http``, an
  HTTP 410 Status;
* a bearer token is required, so the client's kubeconfig authentication is exercised.

Test controls: ``put``/``delete`` objects, ``compact`` history, ``hold``/``release`` delivery to
open streams, ``bookmark``, ``drop_watches`` (the TCP connection is cut mid-stream),
``expire_watches`` (an ERROR 410 on open streams), ``fail_next`` (error statuses for lists), and
``reserve`` a port before the server listens, to play an APIServer that is down, and
``empty_watches`` (every watch ends at once with no event).
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import itertools
import json
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

TOKEN = "kscope-test-token"

# kind -> (collection path, apiVersion)
COLLECTIONS: dict[str, tuple[str, str]] = {
    "Pod": ("/api/v1/pods", "v1"),
    "Service": ("/api/v1/services", "v1"),
    "Node": ("/api/v1/nodes", "v1"),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1"),
    "ReplicaSet": ("/apis/apps/v1/replicasets", "apps/v1"),
    "Deployment": ("/apis/apps/v1/deployments", "apps/v1"),
    "StatefulSet": ("/apis/apps/v1/statefulsets", "apps/v1"),
    "DaemonSet": ("/apis/apps/v1/daemonsets", "apps/v1"),
    "Job": ("/apis/batch/v1/jobs", "batch/v1"),
    "CronJob": ("/apis/batch/v1/cronjobs", "batch/v1"),
}


@dataclass
class RequestRecord:
    kind: str
    watch: bool
    params: dict[str, str]
    status: int = 200


@dataclass(eq=False)
class _Stream:
    kind: str
    last_rv: int
    bookmarks: bool
    transport: asyncio.Transport | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    drop: bool = False
    error_code: int = 0
    bookmark_wanted: bool = False


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeApiServer:
    def __init__(self, *, gone_as_http: bool = False) -> None:
        self.gone_as_http = gone_as_http
        self.empty_watches = False  # end every watch at once, empty (a misbehaving proxy)
        self.requests: list[RequestRecord] = []
        self._rv = 100
        self._visible_rv = self._rv
        self._held = False
        self._compacted_rv = 0
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in COLLECTIONS}
        self._history: dict[str, list[tuple[int, str, dict[str, Any]]]] = {k: [] for k in COLLECTIONS}
        self._history_rvs: dict[str, list[int]] = {k: [] for k in COLLECTIONS}
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._snapshot_ids = itertools.count(1)
        self._streams: set[_Stream] = set()
        self._failures: dict[str, list[tuple[int, float | None]]] = {k: [] for k in COLLECTIONS}
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def reserve(self) -> int:
        """Bind a port without listening: connections are refused until ``start``."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        return int(sock.getsockname()[1])

    @property
    def port(self) -> int:
        assert self._sock is not None, "reserve() or start() first"
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self._sock is None:
            self.reserve()
        app = web.Application()
        for kind, (path, _) in COLLECTIONS.items():
            app.router.add_get(path, self._handler(kind))
        self._runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        assert self._sock is not None
        await web.SockSite(self._runner, self._sock).start()

    async def close(self) -> None:
        for stream in list(self._streams):
            stream.drop = True
            stream.wake.set()
        if self._runner is not None:
            await self._runner.cleanup()
        elif self._sock is not None:
            self._sock.close()

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig pointing at this server (JSON is valid YAML)."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(cfg))
        return path

    # ---- state -------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def put(self, kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create (ADDED) or update (MODIFIED) an object; returns the stored copy."""
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        existing = self._objects[kind].get(key)
        meta.setdefault("uid", existing["metadata"]["uid"] if existing else str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._objects[kind][key] = stored
        self._record(kind, "MODIFIED" if existing else "ADDED", stored)
        return stored

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        stored = self._objects[kind].pop((namespace, name))
        stored = copy.deepcopy(stored)
        self._rv += 1
        stored["metadata"]["resourceVersion"] = str(self._rv)
        self._record(kind, "DELETED", stored)

    def compact(self) -> None:
        """Forget history up to now: a watch from any older version gets 410."""
        self._compacted_rv = self._rv
        for kind in COLLECTIONS:
            self._history[kind].clear()
            self._history_rvs[kind].clear()

    def hold(self) -> None:
        """Keep recording changes but deliver none to open streams until ``release``."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self._visible_rv = self._rv
        self._wake_all()

    def bookmark(self, kind: str | None = None) -> None:
        """Ask open streams (that allowed bookmarks) to send a BOOKMARK at the current version."""
        for stream in self._select(kind):
            stream.bookmark_wanted = True
            stream.wake.set()

    def drop_watches(self, kind: str | None = None) -> int:
        """Cut the TCP connection of open streams mid-body; returns how many were cut."""
        streams = self._select(kind)
        for stream in streams:
            stream.drop = True
            stream.wake.set()
        return len(streams)

    def expire_watches(self, kind: str | None = None) -> int:
        """Send an ERROR event with a 410 Status on open streams and end them."""
        streams = self._select(kind)
        for stream in streams:
            stream.error_code = 410
            stream.wake.set()
        return len(streams)

    def fail_next(self, kind: str, status: int, count: int = 1, retry_after: float | None = None) -> None:
        """Answer the next ``count`` requests (list or watch) for ``kind`` with ``status``."""
        self._failures[kind].extend([(status, retry_after)] * count)

    def open_watches(self, kind: str | None = None) -> int:
        return len(self._select(kind))

    def watch_requests(self, kind: str) -> list[RequestRecord]:
        return [r for r in self.requests if r.kind == kind and r.watch]

    def list_requests(self, kind: str) -> list[RequestRecord]:
        return [r for r in self.requests if r.kind == kind and not r.watch]

    def _select(self, kind: str | None) -> list[_Stream]:
        return [s for s in self._streams if kind is None or s.kind == kind]

    def _record(self, kind: str, etype: str, obj: dict[str, Any]) -> None:
        self._history[kind].append((self._rv, etype, obj))
        self._history_rvs[kind].append(self._rv)
        if not self._held:
            self._visible_rv = self._rv
            self._wake_all()

    def _wake_all(self) -> None:
        for stream in self._streams:
            stream.wake.set()

    # ---- HTTP --------------------------------------------------------------------------------

    def _handler(self, kind: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            params = dict(request.query)
            watch = params.get("watch", "").lower() in ("true", "1")
            record = RequestRecord(kind, watch, params)
            self.requests.append(record)
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                record.status = 401
                return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
            if self._failures[kind]:
                code, retry_after = self._failures[kind].pop(0)
                record.status = code
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
                return web.json_response(_status(code, "InternalError", "injected"), status=code, headers=headers)
            if watch:
                return await self._watch(request, kind, params, record)
            return self._list(kind, params, record)

        return handle

    def _list(self, kind: str, params: dict[str, str], record: RequestRecord) -> web.Response:
        limit = int(params.get("limit") or 0)
        token = params.get("continue", "")
        if token:
            snap_id, _, offset_s = token.partition(":")
            snap = self._snapshots.get(snap_id)
            if snap is None:
                record.status = 410
                return web.json_response(_status(410, "Expired", "continue token expired"), status=410)
            offset = int(offset_s)
        else:
            items = [copy.deepcopy(self._objects[kind][k]) for k in sorted(self._objects[kind])]
            snap_id = str(next(self._snapshot_ids))
            snap = (self._rv, items)
            self._snapshots[snap_id] = snap
            offset = 0
        version, items = snap
        end = offset + limit if limit else len(items)
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if end < len(items):
            meta["continue"] = f"{snap_id}:{end}"
        else:
            self._snapshots.pop(snap_id, None)
        return web.json_response(
            {"kind": f"{kind}List", "apiVersion": COLLECTIONS[kind][1], "metadata": meta, "items": items[offset:end]}
        )

    async def _watch(
        self, request: web.Request, kind: str, params: dict[str, str], record: RequestRecord
    ) -> web.StreamResponse:
        since_s = params.get("resourceVersion", "")
        initial: list[tuple[str, dict[str, Any]]] = []
        if since_s in ("", "0"):
            # "Any version": synthetic ADDED events for the current state, then changes.
            since = self._visible_rv
            initial = [("ADDED", obj) for obj in self._objects[kind].values()]
        else:
            since = int(since_s)
        too_old = since < self._compacted_rv
        if too_old and self.gone_as_http:
            record.status = 410
            return web.json_response(_status(410, "Expired", f"too old resource version: {since}"), status=410)
        timeout_s = float(params.get("timeoutSeconds") or 0) or None
        deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if self.empty_watches:
            await resp.write_eof()
            return resp
        if too_old:
            msg = f"too old resource version: {since} ({self._compacted_rv})"
            await self._send(resp, {"type": "ERROR", "object": _status(410, "Expired", msg)})
            await resp.write_eof()
            return resp
        stream = _Stream(kind, since, params.get("allowWatchBookmarks", "").lower() in ("true", "1"), request.transport)
        self._streams.add(stream)
        try:
            for etype, obj in initial:
                await self._send(resp, {"type": etype, "object": obj})
            while True:
                # Clear before sending, not after: a change recorded while we await a write must
                # leave the wake set, or the stream would sleep on it.
                stream.wake.clear()
                if stream.drop:
                    if stream.transport is not None:
                        stream.transport.abort()
                    return resp
                if stream.error_code:
                    await self._send(resp, {"type": "ERROR", "object": _status(410, "Expired", "watch expired")})
                    break
                await self._send_history(resp, stream)
                if stream.bookmark_wanted:
                    stream.bookmark_wanted = False
                    if stream.bookmarks:
                        stream.last_rv = max(stream.last_rv, self._visible_rv)
                        bookmark = {
                            "kind": kind,
                            "apiVersion": COLLECTIONS[kind][1],
                            "metadata": {"resourceVersion": str(stream.last_rv)},
                        }
                        await self._send(resp, {"type": "BOOKMARK", "object": bookmark})
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(stream.wake.wait(), remaining)
                except TimeoutError:
                    break
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self._streams.discard(stream)
        return resp

    async def _send_history(self, resp: web.StreamResponse, stream: _Stream) -> None:
        rvs = self._history_rvs[stream.kind]
        start = bisect.bisect_right(rvs, stream.last_rv)
        for rv, etype, obj in self._history[stream.kind][start:]:
            if rv > self._visible_rv:
                break
            await self._send(resp, {"type": etype, "object": obj})
            stream.last_rv = rv

    @staticmethod
    async def _send(resp: web.StreamResponse, event: dict[str, Any]) -> None:
        await resp.write(json.dumps(event).encode() + b"\n")
