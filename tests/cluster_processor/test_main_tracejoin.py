"""Two processor replicas in-process over real gRPC (the test APIServer, the test OTLP receiver, the
trace join's own service between them), each node's agent shipping to one of them as the chart's
Service spreads them: a three-hop chain loadgen -> productpage -> reviews -> ratings is ONE trace
per incoming request with the exact parent/child tree, however its four nodes are split across the
replicas and in whatever order they report; a traceparent is kept end to end; a replica down
degrades to pairwise ids (every span still leaves, every parent still right), counted."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cluster_processor import main as m
from cluster_processor.tracejoin import JoinSettings
from tests.cluster_processor.chainscene import ROLES, Chain, chains, hour_start, replica_flags
from tests.cluster_processor.kube import factories as f
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main import (  # noqa: F401 (autouse fixtures)
    TRACEPARENT,
    _no_proxy,
    _reset_logging,
    _scrape,
    cluster,
    config,
    run,
    send,
    spans,
)
from tests.helpers import eventually_async as eventually

CLIENT = 3  # Span.SpanKind
FAST = JoinSettings(wait_s=8.0, exchange_interval_s=0.05)  # a wait no join here may need


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def replicas(
    kubeconfig: Path, endpoint: str, n: int = 2, *, alive: int | None = None, join: JoinSettings = FAST
) -> AsyncIterator[list[m.Processor]]:
    """``n`` replicas listed as each other's peers; only the first ``alive`` run (the others down)."""
    addrs = tuple(f"127.0.0.1:{free_port()}" for _ in range(n))
    async with contextlib.AsyncExitStack() as stack:
        procs = []
        for i in range(n if alive is None else alive):
            # the trace settings as the command line gives them
            flags = ["--kubeconfig", str(kubeconfig), *replica_flags(addrs, i, join.wait_s, join.exchange_interval_s)]
            t = m.config_from_args(m._parser().parse_args(flags), {})
            cfg = config(kubeconfig, endpoint, replica=f"kscope-processor-{i}", trace=t.trace,
                         trace_listen=t.trace_listen, trace_self=t.trace_self, trace_peers=t.trace_peers)  # fmt: skip
            proc = await stack.enter_async_context(m.Processor(cfg))
            assert proc.watcher is not None and await proc.watcher.wait_synced(5)
            procs.append(proc)
        yield procs


def exported(rx: OtlpReceiver) -> dict[str, dict[tuple[str, int], list[Any]]]:
    """chain name -> (reporting node, span kind) -> spans, told by the url.path the chain gave them."""
    out: dict[str, dict[tuple[str, int], list[Any]]] = defaultdict(lambda: defaultdict(list))
    for _, s in spans(rx):
        path = next(kv.value.string_value for kv in s.attributes if kv.key == "url.path")
        _, role, name = path.split("/")
        hop = ROLES.index(role) - 1
        out[name][f"{name}-{ROLES[hop if s.kind == CLIENT else hop + 1]}", s.kind].append(s)
    return out


def check(
    chain: Chain, out: dict[str, dict[tuple[str, int], list[Any]]], *, one_trace: bool = True, without: str = ""
) -> set[bytes]:
    """The chain's six spans (less those of the ``without`` node's client) with their exact ids and
    parents; returns their trace ids."""
    got, traces = {}, set()
    for k, ss in out[chain.name].items():
        assert len(ss) == 1, f"{chain.name}: {len(ss)} spans {k}"
        got[k] = (ss[0].span_id, ss[0].parent_span_id)
        traces.add(ss[0].trace_id)
    want = {k: v for k, v in chain.expected().items() if not (without and k == (chain.node(without), CLIENT))}
    assert set(got) == set(want), f"{chain.name}: spans {sorted(got)}"
    for k, (span_id, parent) in want.items():
        assert got[k][1] == parent, f"{chain.name}: parent of {k}"
        assert not span_id or got[k][0] == span_id, f"{chain.name}: span id of {k}"
    if one_trace:
        assert traces == {chain.trace_id}, f"{chain.name}: {len(traces)} traces"
    return traces


def test_a_chain_split_across_two_replicas_in_every_way_is_one_trace(tmp_path: Path) -> None:
    splits = list(itertools.product((0, 1), repeat=len(ROLES)))  # node -> replica, all 16 ways
    scene = chains(len(splits), hour_start(time.time_ns()))

    async def body() -> None:
        async with cluster(tmp_path) as (_, kubeconfig), OtlpReceiver() as rx:
            async with replicas(kubeconfig, rx.endpoint) as procs:
                for k, (chain, split) in enumerate(zip(scene, splits, strict=True)):
                    order = ROLES if k % 2 else tuple(reversed(ROLES))  # servers often before their callers
                    for role, batch in zip(order, chain.batches(order), strict=True):
                        await send(procs[split[ROLES.index(role)]].ingest.port, batch)
                await eventually(lambda: len(spans(rx)) == 6 * len(scene), "six spans per chain", timeout_s=15)
                counters = [dict(p.join.counters) for p in procs]
                # the self-metrics say it: every held span joined, the tables sized
                scraped = [_scrape(p.metrics_port) for p in procs]
                joined = 'kscope_processor_trace_join_total{counter="trace_spans_joined"} %s.0'
                assert all(joined % c["trace_spans_joined"] in text for c, text in zip(counters, scraped, strict=True))
                assert all('kscope_processor_trace_join_size{table="peers"} 2.0' in text for text in scraped)
            out = exported(rx)
            for chain in scene:
                check(chain, out)
            # every span that waited left with its parent's trace, none with a fallback
            assert sum(c["trace_spans_held"] for c in counters) == 5 * len(scene)
            assert sum(c["trace_spans_joined"] for c in counters) == 5 * len(scene)
            assert sum(c["trace_spans_fallback"] + c["trace_peer_failures"] for c in counters) == 0
            assert all(c["trace_served_requests"] > 0 for c in counters)  # both replicas owned hops

    run(body())


def test_a_chain_below_a_caller_never_seen_is_one_trace_across_replicas(tmp_path: Path) -> None:
    """The caller of hop 1 is not traced (its node reports nothing: an external client), and every
    node reports at once: hop 1's server span must time out to its pairwise trace, while the spans
    below it, on other replicas, wait as long as it (their own waits run out at the same time). A
    client span waiting for its parent announces its hop as pending at the hop's owner, so the
    server end waits on instead of falling back: one trace per chain, every way the three traced
    nodes split over two replicas (each chain's five spans in hop 1's pairwise trace)."""
    splits = list(itertools.product((0, 1), repeat=len(ROLES) - 1))
    scene = chains(len(splits), hour_start(time.time_ns()), base=300)
    join = JoinSettings(wait_s=1.0, exchange_interval_s=0.2)

    async def body() -> None:
        async with cluster(tmp_path) as (_, kubeconfig), OtlpReceiver() as rx:
            async with replicas(kubeconfig, rx.endpoint, join=join) as procs:
                # loadgen's node never reports; productpage's, the root's, reports last: the spans below
                # it are older, so their own waits run out before the root's
                for late in (False, True):
                    for chain, split in zip(scene, splits, strict=True):
                        for role, r, b in zip(ROLES[1:], split, chain.batches(ROLES[1:]), strict=True):
                            if (role == ROLES[1]) == late:
                                await send(procs[r].ingest.port, b)
                    await asyncio.sleep(0 if late else 0.6)
                await eventually(lambda: len(spans(rx)) == 5 * len(scene), "five spans per chain", timeout_s=20)
                counters = [dict(p.join.counters) for p in procs]
            out = exported(rx)
            for chain in scene:
                got = {k: ss for k, ss in out[chain.name].items()}
                want = {k: v for k, v in chain.expected().items() if k[0] != chain.node("loadgen")}
                assert {k: [(x.span_id, x.parent_span_id) for x in ss] for k, ss in got.items()} == {
                    k: [v] for k, v in want.items()}, chain.name  # fmt: skip
                assert {x.trace_id for ss in got.values() for x in ss} == {chain.ids(0)[0]}, chain.name
            c = {k: sum(x[k] for x in counters) for k in counters[0]}
            # what left with its own fallback is hop 1's (the root and the call beside it, which waits
            # for the same hop); the spans below waited on for a trace that was coming
            assert len(scene) <= c["trace_spans_fallback"] <= 2 * len(scene), counters
            assert c["trace_pending_waits"] > 0, counters

    run(body())


def test_a_traceparent_is_kept_end_to_end_across_replicas(tmp_path: Path) -> None:
    scene = chains(4, hour_start(time.time_ns()), base=100, traceparent=TRACEPARENT)

    async def body() -> None:
        async with cluster(tmp_path) as (_, kubeconfig), OtlpReceiver() as rx:
            async with replicas(kubeconfig, rx.endpoint) as procs:
                for k, chain in enumerate(scene):
                    for i, batch in enumerate(chain.batches()):
                        await send(procs[(i + k) % 2].ingest.port, batch)
                await eventually(lambda: len(spans(rx)) == 6 * len(scene), "six spans per chain", timeout_s=15)
            out = exported(rx)
            for chain in scene:
                check(chain, out)
                assert chain.trace_id.hex() == TRACEPARENT.split("-")[1]

    run(body())


def test_a_replica_down_degrades_to_pairwise_ids_counted(tmp_path: Path) -> None:
    scene = chains(8, hour_start(time.time_ns()), base=200)

    async def body() -> None:
        async with cluster(tmp_path) as (_, kubeconfig), OtlpReceiver() as rx:
            # two replicas listed, one running: the hops the dead one owns cannot be joined
            async with replicas(kubeconfig, rx.endpoint, alive=1, join=JoinSettings(1.0, 0.05)) as (proc,):
                for chain in scene:
                    await send(proc.ingest.port, *chain.batches())
                await eventually(lambda: len(spans(rx)) == 6 * len(scene), "every span leaves", timeout_s=15)
                c = dict(proc.join.counters)
            out = exported(rx)
            split = 0
            for chain in scene:  # every parent still right; only the trace may be cut, never wrong
                split += len(check(chain, out, one_trace=False)) > 1
            assert split > 0 and c["trace_peer_failures"] > 0 and c["trace_peer_degraded"] > 0
            assert c["trace_spans_joined"] + c["trace_spans_fallback"] == c["trace_spans_held"] == 5 * len(scene)

    run(body())


@pytest.mark.parametrize(
    ("argv", "env", "want"),
    [
        ([], {}, (None, "", ())),
        (["--trace-peers", "a:9441,b:9441", "--trace-self", "b:9441"], {}, ("0.0.0.0:9442", "b:9441",
                                                                               ("a:9441", "b:9441"))),
        (["--trace-peer-service", "kscope/kscope-processor"], {"POD_IP": "10.1.2.3"},
         ("0.0.0.0:9442", "10.1.2.3:9442", ())),
        (["--trace-peer-service", "k/p", "--trace-listen", "[::]:9500"], {"POD_IP": "fd00::3"},
         ("[::]:9500", "[fd00::3]:9500", ())),
    ],
)  # fmt: skip
def test_trace_flags(argv: list[str], env: dict[str, str], want: tuple[Any, ...]) -> None:
    base = {"KUBECONFIG": "/dev/null"}
    cfg = m.config_from_args(m._parser().parse_args(argv), base | env)
    assert (cfg.trace_listen, cfg.trace_self, cfg.trace_peers) == want


@pytest.mark.parametrize(
    "argv",
    [
        ["--trace-peers", "a:1,b:1", "--trace-self", "c:1"],
        ["--trace-peers", "a:1,b:1"],
        ["--trace-peer-service", "noslash"],
        ["--trace-peer-service", "k/p"],  # no POD_IP, no --trace-self
        ["--trace-wait", "-1"],
        ["--trace-peers", "a:1", "--trace-self", "a:1", "--trace-peer-service", "k/p"],
    ],
)
def test_bad_trace_flags_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(m.ProcessorConfigError):
        m.config_from_args(m._parser().parse_args(argv), {"KUBECONFIG": "/dev/null"})


def test_replicas_find_each_other_as_their_services_ready_endpoints(tmp_path: Path) -> None:
    """As the chart runs them: the peers are the processor Service's EndpointSlice addresses (the
    test APIServer's), each on the one trace-join port; a replica leaving the slice leaves the list."""
    ips = ("127.0.0.2", "127.0.0.3")  # one port on two loopback addresses, as two pods would have
    with socket.socket() as s:
        s.bind((ips[0], 0))
        port = s.getsockname()[1]
    scene = chains(4, hour_start(time.time_ns()), base=300)
    later = chains(2, hour_start(time.time_ns()), base=400)

    async def body() -> None:
        async with cluster(tmp_path) as (api, kubeconfig), OtlpReceiver() as rx:
            slice_ = f.endpoint_slice("kscope-processor-x1", "kscope-processor", [(ip, f"uid-{ip}") for ip in ips],
                                      namespace="kscope")  # fmt: skip
            api.put("EndpointSlice", slice_)
            async with contextlib.AsyncExitStack() as stack:
                procs = []
                for i, ip in enumerate(ips):
                    cfg = config(kubeconfig, rx.endpoint, replica=f"kscope-processor-{i}", trace=FAST,
                                 trace_listen=f"{ip}:{port}", trace_self=f"{ip}:{port}",
                                 trace_peer_service="kscope/kscope-processor")  # fmt: skip
                    procs.append(await stack.enter_async_context(m.Processor(cfg)))
                want = tuple(f"{ip}:{port}" for ip in ips)
                await eventually(lambda: all(p.join.peers == want for p in procs), "both replicas listed")
                for k, chain in enumerate(scene):
                    for i, batch in enumerate(chain.batches()):
                        await send(procs[(i >> (k % 2)) % 2].ingest.port, batch)
                await eventually(lambda: len(spans(rx)) == 6 * len(scene), "six spans per chain", timeout_s=15)
                assert all(p.join.counters["trace_served_requests"] > 0 for p in procs)
                # the second replica's endpoint leaves the slice: the first owns every hop again
                uid = slice_["metadata"]["uid"]
                shrunk = f.endpoint_slice("kscope-processor-x1", "kscope-processor", [(ips[0], "uid-a")],
                                          namespace="kscope", uid=uid)  # fmt: skip
                api.put("EndpointSlice", shrunk)
                await eventually(lambda: procs[0].join.peers == (), "the first replica alone")
                # the leaving one, not listed, owns nothing: it hands every hop to the one listed
                await eventually(lambda: procs[1].join.peers == want[:1], "the second replica a client")
                for chain in later:
                    await send(procs[0].ingest.port, *chain.batches())
                await eventually(lambda: len(spans(rx)) == 6 * (len(scene) + len(later)), "the later chains")
            out = exported(rx)
            for chain in scene + later:
                check(chain, out)

    run(body())


def test_spans_still_waiting_leave_at_shutdown_with_pairwise_ids(tmp_path: Path) -> None:
    (chain,) = chains(1, hour_start(time.time_ns()), base=500)

    async def body() -> None:
        async with cluster(tmp_path) as (_, kubeconfig), OtlpReceiver() as rx:
            cfg = config(kubeconfig, rx.endpoint, trace=JoinSettings(wait_s=600))  # alone, a long wait
            async with m.Processor(cfg) as proc:
                await send(proc.ingest.port, *chain.batches(ROLES[1:]))  # loadgen never reports
                await eventually(lambda: proc.join.sizes()["held"] == 5, "five spans waiting")
                assert not spans(rx)
            # stopped: nothing lost, the tree still exact, in the first traced hop's pairwise trace
            traces = check(chain, exported(rx), one_trace=False, without=ROLES[0])
            assert traces == {chain.ids(0)[0]}
            assert proc.join.counters["trace_spans_fallback"] == 1 and proc.join.counters["trace_spans_joined"] == 4

    run(body())
