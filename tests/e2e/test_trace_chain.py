"""Issue 18 across nodes and processor replicas (tests/e2e/tracechain.py): four agents, one per node,
each seeing only its own pod, ship to two processor replicas; the chain's spans are joined by nobody
but the ids both ends derive, and by the replicas' exchange of what a chain's trace is.

Ground truth: every service forwards the path it was asked for, so a span's ``url.path`` names the
incoming request (``/a/N``, ``/b/N``) whose tree it belongs to."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_processor.test_main import _kv as kv
from tests.cluster_processor.test_main import spans
from tests.e2e.meshtopo import MeshTopology
from tests.e2e.tracechain import NODE_OF, Scene, build, run_scene

pytestmark = pytest.mark.bpf

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
Key = tuple[str, int]  # (service, span kind)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    tmp = Path(tmp_path_factory.mktemp("tracechain"))
    topo = MeshTopology().create()
    try:
        build(topo, tmp)
        yield asyncio.run(asyncio.wait_for(run_scene(topo, tmp), 150))
    finally:
        topo.close()


def http_spans(scene: Scene) -> list[tuple[str, Any]]:
    """(service, span) of every HTTP span of the scene's services."""
    return [(str(r.get("service.name")), s) for r, s in spans(scene.rx)
            if r.get("service.name") in NODE_OF and "http.request.method" in kv(s.attributes)]  # fmt: skip


def by_request(scene: Scene) -> dict[str, dict[Key, list[Any]]]:
    """url.path -> (service, kind) -> spans."""
    out: dict[str, dict[Key, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for service, s in http_spans(scene):
        out[str(kv(s.attributes).get("url.path"))][(service, s.kind)].append(s)
    return out


def facts(scene: Scene) -> str:
    """What a failure message needs: the counts per service and kind, the replicas' counters."""
    kinds = Counter((w, s.kind) for w, s in http_spans(scene))
    links = [{k: v for k, v in c.items() if k.startswith(("spans_", "link", "trace"))} for c in scene.counters]
    return f"spans {dict(kinds)}\nserved { ({k: len(v) for k, v in scene.served.items()}) }\nload {scene.load}\n{links}"


def test_every_hop_is_served_and_seen(scene: Scene) -> None:
    """The scene itself: both chains answered every request, and each node's agent saw its pod only."""
    for chain in "ab":
        assert scene.load[chain]["ok"] == scene.load[chain]["sent"] > 0, scene.load
    served = {name: Counter(p.split("/")[1] for p in ps) for name, ps in scene.served.items()}
    sent = {c: scene.load[c]["sent"] for c in "ab"}
    assert served == {"front": {"a": sent["a"]}, "middle": sent, "back": sent}, served
    seen = Counter((w, s.kind) for w, s in http_spans(scene))
    assert seen[("front", SERVER)] == seen[("front", CLIENT)] == sent["a"], facts(scene)
    assert seen[("gate", SERVER)] == seen[("gate", CLIENT)] == sent["b"], facts(scene)
    for w in ("middle", "back"):
        assert seen[(w, SERVER)] == sent["a"] + sent["b"], facts(scene)


def test_both_ends_of_each_hop_share_ids_across_nodes_and_replicas(scene: Scene) -> None:
    """Item 1 with each end on another node and exported by another replica: every server span's
    parent is the client span of the same request (the same url.path) in the same trace, never
    another request's; the client spans with their server span are every hop's."""
    http = http_spans(scene)
    clients = {s.span_id: (w, s) for w, s in http if s.kind == CLIENT}
    linked = 0
    for w, s in http:
        if s.kind != SERVER or s.parent_span_id not in clients:
            continue
        cw, c = clients[s.parent_span_id]
        assert c.trace_id == s.trace_id, (w, cw)
        assert kv(c.attributes)["url.path"] == kv(s.attributes)["url.path"], (w, cw)
        assert (cw, w) in {("front", "middle"), ("gate", "middle"), ("middle", "back")}, (cw, w)
        linked += 1
    assert linked == sum(1 for w, s in http if s.kind == CLIENT), facts(scene)
