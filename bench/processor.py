"""Cluster-processor throughput and memory on ONE core (the process pins itself to CPU 0).

1. flows:  serialized FlowBatches of L4 records (``L4Columns`` as the agent ships them; ``--l4-form rows``:
           one L4Flow message per record, as older agents do) from many simulated nodes -> ``FlowBatch.FromString``
           -> ``Aggregator.add`` -> per interval ``Aggregator.flush`` -> ``OtlpPipeline`` (cumulative
           store + OTLP encoding) -> the serialized requests the exporter would send (no network).
           Reported: L4 records per second of wall time on the pinned core.
2. spans:  L7Request (HTTP) records on keep-alive sockets (an L4 record when a socket opens and when
           it closes, so Service-VIP requests join their NAT answer) -> the same path, spans encoded
           to serialized ``ExportTraceServiceRequest``s. Reported: spans per second (all the
           work counted, including RED metrics and the L4 records).
3. chains: three-hop chains (issue 18) whose records carry TCP sequence numbers and causal parents,
           spans per second with the trace join off and on, interleaved (``--only chains``).
4. memory: a ``KubeIndex`` filled through ``apply("ADDED", kind, raw_dict)`` with Nodes, Deployments,
           ReplicaSets, Services and pods (raw dicts shaped like the APIServer's JSON, dropped after
           each apply, as the watcher does). RSS growth is measured in a fresh child process without
           tracemalloc; tracemalloc current/peak in a second fresh child.

Synthetic data is generated (untimed) with a fixed seed; each repeat replays it through a fresh
Aggregator and OtlpPipeline with every module-level cache emptied (as a fresh process), after an
untimed warm-up interval (the cumulative store then holds its
streams, as in steady state). Medians of ``--repeats`` are reported. Another workload may share the
machine: use the medians, and compare runs by ratio rather than absolute values.

    .venv/bin/python bench/processor.py [--nodes 50] [--pods 2000] [--deployments 200] ... [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import json
import os
import pstats
import random
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "proto")):
    if p not in sys.path:
        sys.path.insert(0, p)

from cluster_processor.aggregate import Aggregator  # noqa: E402
from cluster_processor.kube.index import KubeIndex  # noqa: E402
from cluster_processor.otlp import encode, wire  # noqa: E402
from cluster_processor.otlp.encode import EncodedRequest  # noqa: E402
from cluster_processor.otlp.exporter import Signal  # noqa: E402
from cluster_processor.otlp.pipeline import OtlpPipeline  # noqa: E402
from cluster_processor.tracejoin import JoinSettings, TraceJoin  # noqa: E402
from kscope.v1 import flow_pb2 as pb  # noqa: E402
from kscope_common import l4_columns  # noqa: E402
from kscope_common.runtime import tune_gc  # noqa: E402
from tests.cluster_processor.kube import factories as f  # noqa: E402

T0 = 1_700_000_000_000_000_000
NS = 1_000_000_000
INTERVAL_NS = 10 * NS
MS = 1_000_000
NETNS_BASE = 4026532000


# ---- the simulated cluster ----------------------------------------------------------------------


def pod_ip(i: int) -> str:
    return f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def node_ip(n: int) -> str:
    return f"192.168.{n // 250}.{n % 250 + 1}"


def svc_ip(d: int) -> str:
    return f"10.96.{d >> 8}.{(d & 255) + 1}"


def pod_uid(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012d}"


@dataclass(frozen=True)
class Cluster:
    nodes: int
    pods: int
    deployments: int

    def dep_of(self, i: int) -> int:
        return i % self.deployments

    def node_of(self, i: int) -> int:
        return (i // self.deployments + i) % self.nodes

    def ns_of(self, d: int) -> str:
        return f"ns-{d % 20}"

    def rs_name(self, d: int) -> str:
        return f"app{d}-5f6d7c8b9a"

    def iter_raw(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for n in range(self.nodes):
            yield "Node", f.node(f"node-{n:03d}", internal=node_ip(n), uid=f"node-uid-{n}")
        for d in range(self.deployments):
            ns = self.ns_of(d)
            yield "Deployment", f.workload(f"app{d}", namespace=ns, uid=f"d-{d}")
            yield (
                "ReplicaSet",
                f.workload(
                    self.rs_name(d), namespace=ns, uid=f"rs-{d}", owners=[f.owner("Deployment", f"app{d}", f"d-{d}")]
                ),
            )
            yield "Service", f.service(f"app{d}", namespace=ns, uid=f"svc-{d}", cluster_ips=[svc_ip(d)])
        for i in range(self.pods):
            d = self.dep_of(i)
            yield (
                "Pod",
                f.pod(
                    f"{self.rs_name(d)}-{i:05d}",
                    namespace=self.ns_of(d),
                    uid=pod_uid(i),
                    ip=pod_ip(i),
                    node=f"node-{self.node_of(i):03d}",
                    owners=[f.owner("ReplicaSet", self.rs_name(d), f"rs-{d}")],
                    containers=["containerd://" + f.cid(i)],
                    created=f.ts(i % 3600),
                ),
            )

    def index(self) -> KubeIndex:
        ix = KubeIndex()
        for kind, raw in self.iter_raw():
            if not ix.apply("ADDED", kind, raw):
                raise RuntimeError(f"index rejected a {kind}")
        return ix


# ---- synthetic flow batches ---------------------------------------------------------------------


@dataclass
class _Sock:
    cookie: int
    netns: int
    role: int
    local: tuple[str, int]
    remote: tuple[str, int]
    nat: tuple[str, int]
    process: pb.ProcessIdentity
    records: int = 0
    life: int = 1
    server_dep: int = 0


@dataclass
class Workload:
    """Generated, serialized batches: ``intervals[k]`` is the list of FlowBatch bytes of interval k."""

    intervals: list[list[bytes]]
    l4_per_interval: list[int]
    l7_per_interval: list[int]
    bytes_total: int = 0


@dataclass
class _NodeGen:
    n: int
    local_pods: list[int]
    socks: list[_Sock] = field(default_factory=list)
    next_cookie: int = 1


class Generator:
    """Per node, a pool of sockets of pods on that node. Client sockets call one of the caller
    deployment's three callee deployments: 70% through the Service VIP (nat_remote set to the backend
    pod), 25% to the pod IP directly, 5% to one of 40 external addresses. Server sockets are the callee side
    of calls from pods anywhere. A socket lives 1-8 records; the last is a CLOSE."""

    def __init__(self, cluster: Cluster, seed: int = 1) -> None:
        self.c = cluster
        self.rng = random.Random(seed)
        self.by_dep: dict[int, list[int]] = {}
        for i in range(cluster.pods):
            self.by_dep.setdefault(cluster.dep_of(i), []).append(i)
        self.callees = {
            d: [(d + 1 + k * 7) % cluster.deployments for k in range(3)] for d in range(cluster.deployments)
        }
        self.routes = {d: [f"/api/app{d}/items/{{id}}", f"/api/app{d}/users/{{id}}/orders", "/healthz"] for d in
                       range(cluster.deployments)}  # fmt: skip
        local: dict[int, list[int]] = {}
        for i in range(cluster.pods):
            local.setdefault(cluster.node_of(i), []).append(i)
        self.nodes = [_NodeGen(n, local.get(n, [])) for n in range(cluster.nodes)]

    def _process(self, i: int) -> pb.ProcessIdentity:
        return pb.ProcessIdentity(
            pid=1000 + i, comm="app", container_id=f.cid(i), pod_uid=pod_uid(i), container_runtime="containerd"
        )

    def _open(self, g: _NodeGen, keepalive: bool) -> _Sock:
        r = self.rng
        me = r.choice(g.local_pods)
        dep = self.c.dep_of(me)
        cookie = g.next_cookie
        g.next_cookie += 1
        life = r.randint(2, 6) if keepalive else r.randint(1, 8)
        if r.random() < 0.5 or keepalive:  # client socket (L7 bench: client and server sides alternate below)
            target = r.choice(self.callees[dep])
            backend = r.choice(self.by_dep[target])
            x = r.random()
            if x < 0.70:
                remote, nat = (svc_ip(target), 80), (pod_ip(backend), 8080)
            elif x < 0.95:
                remote, nat = (pod_ip(backend), 8080), ("", 0)
            else:
                remote, nat = (f"52.{r.randrange(20)}.7.{r.randint(1, 2)}", 443), ("", 0)  # a few external APIs
                target = -1
            role = pb.ROLE_CLIENT
            if keepalive and r.random() < 0.5 and target >= 0:  # the server's view of a call to it
                caller_dep = r.choice([d for d, cs in self.callees.items() if dep in cs] or [dep])
                caller = r.choice(self.by_dep[caller_dep])
                remote, nat, role, target = (pod_ip(caller), r.randint(32768, 60999)), ("", 0), pb.ROLE_SERVER, dep
                return _Sock(cookie, NETNS_BASE + me, role, (pod_ip(me), 8080), remote, nat, self._process(me),
                             life=life, server_dep=target)  # fmt: skip
            return _Sock(cookie, NETNS_BASE + me, role, (pod_ip(me), r.randint(32768, 60999)), remote, nat,
                         self._process(me), life=life, server_dep=target)  # fmt: skip
        caller_dep = r.choice([d for d, cs in self.callees.items() if dep in cs] or [dep])
        caller = r.choice(self.by_dep[caller_dep])
        return _Sock(cookie, NETNS_BASE + me, pb.ROLE_SERVER, (pod_ip(me), 8080),
                     (pod_ip(caller), r.randint(32768, 60999)), ("", 0), self._process(me), life=life,
                     server_dep=dep)  # fmt: skip

    def _l4(self, s: _Sock, t: int, close: bool) -> pb.L4Flow:
        r = self.rng
        first = s.records == 0
        s.records += 1
        fl = pb.L4Flow(
            socket_cookie=s.cookie,
            netns_inode=s.netns,
            role=s.role,
            kind=pb.RECORD_KIND_CLOSE if close else pb.RECORD_KIND_PERIODIC,
            local_ip=s.local[0],
            local_port=s.local[1],
            remote_ip=s.remote[0],
            remote_port=s.remote[1],
            ip_family=4,
            process=s.process,
            start_time_unix_nano=t - 5 * NS,
            time_unix_nano=t,
            srtt_us=r.randint(50, 3000),
            rttvar_us=r.randint(10, 500),
            segs_out=r.randint(10, 10_000),
            segs_in=r.randint(10, 10_000),
            tcp_state="CLOSE" if close else "ESTABLISHED",
            nat_remote_ip=s.nat[0],
            nat_remote_port=s.nat[1],
        )
        sent, recv = r.randint(100, 200_000), r.randint(100, 200_000)
        fl.delta.bytes_sent, fl.delta.bytes_received = sent, recv
        fl.delta.sends, fl.delta.recvs = r.randint(1, 50), r.randint(1, 50)
        fl.total.bytes_sent, fl.total.bytes_received = sent * s.records, recv * s.records
        if r.random() < 0.02:
            fl.delta.retransmits = r.randint(1, 5)
        if close and r.random() < 0.01:
            fl.delta.resets_received = 1
        if first and s.role == pb.ROLE_CLIENT:
            if r.random() < 0.005:
                fl.connect_status, fl.connect_errno = pb.CONNECT_STATUS_REFUSED, 111
                fl.kind = pb.RECORD_KIND_CLOSE
                s.life = 0
            else:
                fl.connect_status = pb.CONNECT_STATUS_OK
                fl.connect_latency_ns = r.randint(50_000, 5_000_000)
        return fl

    def _l7(self, s: _Sock, t: int) -> pb.L7Request:
        r = self.rng
        route = r.choice(self.routes[max(s.server_dep, 0)]) if s.server_dep >= 0 else "/v1/external"
        path = route.replace("{id}", str(r.randint(1, 10**6)))
        status = 200 if r.random() < 0.97 else (500 if r.random() < 0.7 else 0)
        http = pb.HttpInfo(method="GET" if r.random() < 0.8 else "POST", path=path, route=route, status_code=status)
        if r.random() < 0.6:
            http.traceparent = f"00-{r.getrandbits(128):032x}-{r.getrandbits(64):016x}-01"
        if r.random() < 0.3:
            http.request_id = f"{r.getrandbits(128):032x}"
        return pb.L7Request(
            socket_cookie=s.cookie,
            netns_inode=s.netns,
            side=s.role,
            protocol="http1",
            local_ip=s.local[0],
            local_port=s.local[1],
            remote_ip=s.remote[0],
            remote_port=s.remote[1],
            ip_family=4,
            process=s.process,
            start_time_unix_nano=t - r.randint(1, 9) * NS,
            latency_ns=r.randint(1, 300) * MS,
            request_bytes=r.randint(200, 4000),
            response_bytes=r.randint(200, 40_000),
            http=http,
        )

    def flows(self, intervals: int, batches: int, records: int, active: int, columns: bool = True) -> Workload:
        """L4 only: per node ``batches`` batches of ``records`` L4 records per interval, as the agent
        ships them (``columns``: ``L4Columns``, schema_version 2) or as rows (older agents)."""
        out: list[list[bytes]] = []
        total = 0
        for k in range(intervals):
            blist: list[bytes] = []
            for b in range(batches):
                t = T0 + k * INTERVAL_NS + (b + 1) * INTERVAL_NS // (batches + 1)
                for g in self.nodes:
                    batch = pb.FlowBatch(schema_version=1, node_name=f"node-{g.n:03d}", time_unix_nano=t)
                    for _ in range(records):
                        while len(g.socks) < active:
                            g.socks.append(self._open(g, keepalive=False))
                        j = self.rng.randrange(len(g.socks))
                        s = g.socks[j]
                        close = s.records + 1 >= s.life
                        fl = self._l4(s, t, close)
                        if close or fl.kind == pb.RECORD_KIND_CLOSE:
                            g.socks[j] = g.socks[-1]
                            g.socks.pop()
                        batch.l4.append(fl)
                    if columns:
                        batch.schema_version = 2
                        batch.l4_columns.CopyFrom(l4_columns.to_columns(batch.l4))
                        del batch.l4[:]
                    data = batch.SerializeToString()
                    total += len(data)
                    blist.append(data)
            out.append(blist)
        n = batches * records * len(self.nodes)
        return Workload(out, [n] * intervals, [0] * intervals, total)

    def requests(self, intervals: int, batches: int, requests: int, active: int) -> Workload:
        """L7 on keep-alive sockets: an L4 record when a socket opens (with its NAT answer) and when it
        closes; each socket carries several batches' worth of requests."""
        out: list[list[bytes]] = []
        l4n: list[int] = []
        l7n: list[int] = []
        total = 0
        for k in range(intervals):
            blist: list[bytes] = []
            n4 = n7 = 0
            for b in range(batches):
                t = T0 + k * INTERVAL_NS + (b + 1) * INTERVAL_NS // (batches + 1)
                for g in self.nodes:
                    batch = pb.FlowBatch(schema_version=1, node_name=f"node-{g.n:03d}", time_unix_nano=t)
                    while len(g.socks) < active:
                        s = self._open(g, keepalive=True)
                        g.socks.append(s)
                        batch.l4.append(self._l4(s, t, close=False))
                    for _ in range(requests):
                        batch.l7.append(self._l7(self.rng.choice(g.socks), t))
                    keep = []
                    for s in g.socks:  # one batch of life spent; closing sockets send their CLOSE
                        s.life -= 1
                        if s.life <= 0:
                            batch.l4.append(self._l4(s, t, close=True))
                        else:
                            keep.append(s)
                    g.socks = keep
                    n4 += len(batch.l4)
                    n7 += len(batch.l7)
                    data = batch.SerializeToString()
                    total += len(data)
                    blist.append(data)
            out.append(blist)
            l4n.append(n4)
            l7n.append(n7)
        return Workload(out, l4n, l7n, total)

    def chains(self, intervals: int, batches: int, per_node: int) -> Workload:
        """Three-hop chains (issue 18, docs/traces.md): four pods along the callee graph (one of 300
        such chains), each hop an HTTP/1 request whose client and server records carry the same TCP
        sequence numbers, each call made inside a server request naming it (``L7Request.parent``).
        ``per_node`` chains per node and batch, their six records shipped by the nodes of their
        pods; no traceparent (the join does all the work)."""
        r, c = self.rng, self.c
        # 300 pod chains along the callee graph, reused as keep-alive connections reuse pod pairs
        pool = []
        for _ in range(300):
            deps = [r.randrange(c.deployments)]
            for _ in range(3):
                deps.append(self.callees[deps[-1]][0])
            pool.append([r.choice(self.by_dep[d]) for d in deps])
        out: list[list[bytes]] = []
        l7n: list[int] = []
        total = 0
        for k in range(intervals):
            blist: list[bytes] = []
            n7 = 0
            for b in range(batches):
                t = T0 + k * INTERVAL_NS + (b + 1) * INTERVAL_NS // (batches + 1)
                by_node: dict[int, list[pb.L7Request]] = {}
                for _ in range(per_node * c.nodes):
                    pods = r.choice(pool)
                    seqs = [(r.getrandbits(32), r.getrandbits(32)) for _ in range(3)]
                    start = t - 5 * NS
                    for hop in range(3):
                        caller, callee = pods[hop], pods[hop + 1]
                        route = self.routes[c.dep_of(callee)][0]
                        for side, me, peer in ((pb.ROLE_CLIENT, caller, callee), (pb.ROLE_SERVER, callee, caller)):
                            http = pb.HttpInfo(method="GET", path=route.replace("{id}", "7"), route=route,
                                               status_code=200, tcp_seqs_known=True, tcp_request_seq=seqs[hop][0],
                                               tcp_response_seq=seqs[hop][1])  # fmt: skip
                            q = pb.L7Request(socket_cookie=r.getrandbits(40), netns_inode=NETNS_BASE + me, side=side,
                                             protocol="http1", local_ip=pod_ip(me), local_port=8080 if side == 2 else
                                             40000 + hop, remote_ip=pod_ip(peer), remote_port=8080 if side == 1 else
                                             40000 + hop, ip_family=4, process=self._process(me),
                                             start_time_unix_nano=start + hop * MS + (side == 2) * 100_000,
                                             latency_ns=(8 - 2 * hop) * MS, request_bytes=300, response_bytes=900,
                                             http=http)  # fmt: skip
                            if side == pb.ROLE_CLIENT and hop:
                                q.parent.tcp_request_seq, q.parent.tcp_response_seq = seqs[hop - 1]
                                q.parent.start_time_unix_nano = start + (hop - 1) * MS + 100_000
                            by_node.setdefault(c.node_of(me), []).append(q)
                for n in sorted(by_node):
                    batch = pb.FlowBatch(schema_version=1, node_name=f"node-{n:03d}", time_unix_nano=t, l7=by_node[n])
                    n7 += len(batch.l7)
                    data = batch.SerializeToString()
                    total += len(data)
                    blist.append(data)
            out.append(blist)
            l7n.append(n7)
        return Workload(out, [0] * intervals, l7n, total)


# ---- the measured path --------------------------------------------------------------------------


class CountingSink:
    """``ExportSink`` that counts requests and bytes: the requests arrive serialized, and the
    exporter sends those bytes as they are."""

    def __init__(self) -> None:
        self.requests = {s: 0 for s in Signal}
        self.bytes = {s: 0 for s in Signal}

    def submit(self, signal: Signal, request: EncodedRequest) -> bool:
        self.requests[signal] += 1
        self.bytes[signal] += len(request.data)
        return True


@dataclass
class Phases:
    decode: float = 0.0
    add: float = 0.0
    flush: float = 0.0  # Aggregator.flush
    metrics: float = 0.0  # export_interval: semconv samples, cumulative store, encode, serialize
    spans: float = 0.0  # export_spans (+ logs): encode, serialize
    spans_out: int = 0
    logs_out: int = 0

    @property
    def total(self) -> float:
        return self.decode + self.add + self.flush + self.metrics + self.spans


def run_interval(
    agg: Aggregator, pipe: OtlpPipeline, batches: list[bytes], end_ns: int, ph: Phases, join: TraceJoin | None = None
) -> None:
    clock = time.perf_counter
    decode = pb.FlowBatch.FromString
    for data in batches:
        t0 = clock()
        batch = decode(data)
        t1 = clock()
        agg.add(batch, end_ns)
        t2 = clock()
        ph.decode += t1 - t0
        ph.add += t2 - t1
    t0 = clock()
    reports = agg.flush(end_ns)
    t1 = clock()
    ph.flush += t1 - t0
    for rep in reports:
        t0 = clock()
        pipe.export_interval(rep.interval)
        t1 = clock()
        if join is not None:  # as Processor.tick: every span through the trace join
            join.add(rep.interval.node_name, rep.spans, rep.held, rep.resolved, end_ns)
        elif rep.spans:
            pipe.export_spans(rep.interval.node_name, rep.spans)
            ph.spans_out += len(rep.spans)
        if rep.logs:
            pipe.export_logs(rep.interval.node_name, rep.logs)
        t2 = clock()
        ph.metrics += t1 - t0
        ph.spans += t2 - t1
        ph.logs_out += len(rep.logs)
    if join is not None:
        t0 = clock()
        asyncio.run(join.exchange(end_ns))  # one replica: the timeouts only
        for node, spans in join.take_ready().items():
            pipe.export_spans(node, spans)
            ph.spans_out += len(spans)
        ph.spans += clock() - t0
    t0 = clock()
    pipe.export_self({}, end_ns)
    ph.metrics += clock() - t0


def clear_module_caches() -> int:
    """Empty every module-level cache of the processor (``functools.lru_cache`` functions, the
    encoder's attribute cache): each repeat replays the same workload, and a cache warmed by the
    previous repeat would make later repeats cheaper than a fresh process ever is. Returns how
    many caches were cleared."""
    n = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("cluster_processor"):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()
                n += 1
            elif isinstance(value, wire.AttributesCache):
                value.clear()
                n += 1
    return n


def one_repeat(
    index: KubeIndex, wl: Workload, join: TraceJoin | None = None
) -> tuple[Phases, CountingSink, dict[str, int]]:
    """A fresh aggregator and pipeline and empty module caches (as in a fresh process); interval 0
    untimed (warm-up), the rest timed."""
    clear_module_caches()
    agg = Aggregator(index)
    sink = CountingSink()
    pipe = OtlpPipeline(encode.Reporter("bench-0", "node-000"), sink, start_unix_nano=T0)
    run_interval(agg, pipe, wl.intervals[0], T0 + INTERVAL_NS, Phases(), join)
    sink.__init__()  # type: ignore[misc]
    ph = Phases()
    gc.collect()
    for k in range(1, len(wl.intervals)):
        run_interval(agg, pipe, wl.intervals[k], T0 + (k + 1) * INTERVAL_NS, ph, join)
    counters = agg.counters()
    if join is not None:
        counters |= {k: v for k, v in join.counters.items() if v}
    counters["series_in_store"] = pipe.store.stats().series
    return ph, sink, counters


def measure(index: KubeIndex, wl: Workload, repeats: int, what: str) -> dict[str, Any]:
    l4 = sum(wl.l4_per_interval[1:])
    l7 = sum(wl.l7_per_interval[1:])
    rates, runs = [], []
    for _ in range(repeats):
        ph, sink, counters = one_repeat(index, wl)
        rate = (l4 if what == "flows" else ph.spans_out) / ph.total
        rates.append(rate)
        runs.append((rate, ph, sink, counters))
    rate, ph, sink, counters = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
    t = ph.total
    return {
        f"{'records' if what == 'flows' else 'spans'}_per_s_median": round(statistics.median(rates)),
        "per_s_all_repeats": [round(r) for r in rates],
        # decode + add only: the per-record cost; flush and encode scale with series, not records
        "ingest_only_per_s_median_run": round((l4 if what == "flows" else ph.spans_out) / (ph.decode + ph.add)),
        "spread_max_over_min": round(max(rates) / min(rates), 3),
        "timed_l4_records": l4,
        "timed_l7_records": l7,
        "spans_exported": ph.spans_out,
        "logs_exported": ph.logs_out,
        "median_run_seconds": round(t, 4),
        "median_run_share": {
            "protobuf_decode": round(ph.decode / t, 3),
            "aggregator_add": round(ph.add / t, 3),
            "aggregator_flush": round(ph.flush / t, 3),
            "metrics_encode_serialize": round(ph.metrics / t, 3),
            "spans_logs_encode_serialize": round(ph.spans / t, 3),
        },
        "otlp_requests": {s.value: n for s, n in sink.requests.items()},
        "otlp_bytes": {s.value: n for s, n in sink.bytes.items()},
        "series_in_store": counters.pop("series_in_store"),
        "aggregator_counters_last_repeat": {k: v for k, v in counters.items() if v},
    }


def measure_join(index: KubeIndex, wl: Workload, repeats: int) -> dict[str, Any]:
    """Spans per second through the whole path with the trace join off (today's pairwise ids, spans
    exported as flushed) and on (one replica, ``JoinSettings()``), one after the other in each
    repeat: the median of the per-repeat ratios is the figure (the machine's drift cancels)."""
    on_rates, off_rates, ratios = [], [], []
    counters: dict[str, int] = {}
    for _ in range(repeats):
        rates = {}
        for mode in ("off", "on"):
            join = TraceJoin(JoinSettings()) if mode == "on" else None
            ph, _, c = one_repeat(index, wl, join)
            rates[mode] = ph.spans_out / ph.total
            if join is not None:
                counters = c
        off_rates.append(rates["off"])
        on_rates.append(rates["on"])
        ratios.append(rates["on"] / rates["off"])
    return {
        "spans_per_s_join_off_median": round(statistics.median(off_rates)),
        "spans_per_s_join_on_median": round(statistics.median(on_rates)),
        "on_over_off_ratio_median": round(statistics.median(ratios), 3),
        "ratios_all_repeats": [round(r, 3) for r in ratios],
        "timed_l7_records": sum(wl.l7_per_interval[1:]),
        "counters_last_on_repeat": {k: v for k, v in counters.items() if k.startswith(("trace_", "spans_"))},
    }


def profile(index: KubeIndex, wl: Workload, top: int = 10) -> dict[str, Any]:
    prof = cProfile.Profile()
    prof.enable()
    one_repeat(index, wl)
    prof.disable()
    st = pstats.Stats(prof)
    total = st.total_tt  # type: ignore[attr-defined]

    def rows(key: str) -> list[dict[str, Any]]:
        items = sorted(st.stats.items(), key=lambda kv: kv[1][2 if key == "tottime" else 3], reverse=True)  # type: ignore[attr-defined]
        out = []
        for (file, line, fn), (_cc, nc, tt, ct, _callers) in items[:top]:
            short = file.replace(str(ROOT) + "/", "")
            short = short if len(short) < 60 else "..." + short[-57:]
            out.append({"function": f"{short}:{line}({fn})", "calls": nc, "tottime_share": round(tt / total, 3),
                        "cumtime_share": round(ct / total, 3)})  # fmt: skip
        return out

    return {"profiled_seconds": round(total, 3), "top_by_tottime": rows("tottime"), "top_by_cumtime": rows("cumtime")}


# ---- memory (run in a fresh child process) ------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(cluster: Cluster, mode: str) -> dict[str, Any]:
    gc.collect()
    if mode == "tracemalloc":
        tracemalloc.start()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    index = cluster.index()  # raw dicts are built one at a time and dropped after apply
    elapsed = time.perf_counter() - t0
    gc.collect()
    out: dict[str, Any] = {"sizes": index.sizes(), "fill_seconds": round(elapsed, 3)}
    if mode == "tracemalloc":
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out |= {"tracemalloc_current_bytes": cur, "tracemalloc_peak_bytes": peak}
    else:
        out |= {"rss_before_bytes": rss0, "rss_after_bytes": _rss_bytes(), "rss_growth_bytes": _rss_bytes() - rss0,
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # fmt: skip
    return out


def memory(cluster: Cluster, repeats: int) -> dict[str, Any]:
    def child(mode: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--_memory-child", mode, "--pods", str(cluster.pods),
               "--nodes", str(cluster.nodes), "--deployments", str(cluster.deployments)]  # fmt: skip
        result: dict[str, Any] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        return result

    rss = [child("rss") for _ in range(repeats)]
    tm = child("tracemalloc")
    growth = statistics.median(r["rss_growth_bytes"] for r in rss)
    return {
        "objects": {
            "pods": cluster.pods,
            "nodes": cluster.nodes,
            "deployments": cluster.deployments,
            "replicasets": cluster.deployments,
            "services": cluster.deployments,
        },
        "sizes": tm["sizes"],
        "rss_growth_mib_median": round(growth / 2**20, 1),
        "rss_growth_mib_all": [round(r["rss_growth_bytes"] / 2**20, 1) for r in rss],
        "rss_growth_bytes_per_pod": round(growth / cluster.pods),
        "rss_after_mib_median": round(statistics.median(r["rss_after_bytes"] for r in rss) / 2**20, 1),
        "tracemalloc_current_mib": round(tm["tracemalloc_current_bytes"] / 2**20, 1),
        "tracemalloc_peak_mib": round(tm["tracemalloc_peak_bytes"] / 2**20, 1),
        "tracemalloc_bytes_per_pod": round(tm["tracemalloc_current_bytes"] / cluster.pods),
        "fill_seconds_median": statistics.median(r["fill_seconds"] for r in rss),
    }


# ---- CLI ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--pods", type=int, default=2000)
    ap.add_argument("--deployments", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--intervals", type=int, default=2, help="timed intervals per repeat (+1 untimed warm-up)")
    ap.add_argument("--batches", type=int, default=2, help="batches per node per interval")
    ap.add_argument("--l4-records", type=int, default=200, help="L4 records per batch (flows run)")
    ap.add_argument("--l7-records", type=int, default=100, help="L7 records per batch (spans run)")
    ap.add_argument("--sockets", type=int, default=300, help="open sockets per node (flows run)")
    ap.add_argument("--l4-form", choices=["columns", "rows"], default="columns",
                    help="how the flows run's batches carry L4 records (rows: as agents before schema 2)")  # fmt: skip
    ap.add_argument("--memory-pods", type=int, default=10_000)
    ap.add_argument("--memory-nodes", type=int, default=200)
    ap.add_argument("--memory-deployments", type=int, default=500)
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument("--only", choices=["flows", "spans", "chains", "memory"], action="append")
    ap.add_argument("--chains", type=int, default=4, help="three-hop chains per node and batch (chains run)")
    ap.add_argument("--profile", action="store_true", help="cProfile one repeat of each run (flows, spans)")
    ap.add_argument("--profile-top", type=int, default=10, help="functions listed per profile table")
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    os.sched_setaffinity(0, {a.cpu})
    if a.memory_child:
        print(json.dumps(memory_child(Cluster(a.nodes, a.pods, a.deployments), a.memory_child)))
        return 0

    from google.protobuf.internal import api_implementation

    only = set(a.only or ["flows", "spans", "memory"])
    t_start = time.perf_counter()
    out: dict[str, Any] = {
        "note": "one process pinned to one CPU; medians of repeats; the machine may be shared, so compare by ratio",
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "protobuf_backend": api_implementation.Type(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("memory_child", "only")},
    }
    goals: dict[str, Any] = {}
    if only & {"flows", "spans", "chains"}:
        cluster = Cluster(a.nodes, a.pods, a.deployments)
        index = cluster.index()
        tune_gc()  # as kscope-processor does once started
        if "flows" in only:
            wl = Generator(cluster, seed=1).flows(a.intervals + 1, a.batches, a.l4_records, a.sockets,
                                                  columns=a.l4_form == "columns")  # fmt: skip
            r = measure(index, wl, a.repeats, "flows")
            r["batch_bytes_mean"] = round(wl.bytes_total / sum(len(i) for i in wl.intervals))
            out["flows"] = r
            goals["flow_records_per_s_goal_200k_met"] = r["records_per_s_median"] >= 200_000
            if a.profile:
                out["flows_profile"] = profile(index, wl, a.profile_top)
        if "spans" in only:
            keepalive = max(a.l7_records // 5, 1)  # open sockets per node: ~5 requests each per batch
            wl = Generator(cluster, seed=2).requests(a.intervals + 1, a.batches, a.l7_records, keepalive)
            r = measure(index, wl, a.repeats, "spans")
            r["batch_bytes_mean"] = round(wl.bytes_total / sum(len(i) for i in wl.intervals))
            out["spans"] = r
            goals["spans_per_s_goal_30k_met"] = r["spans_per_s_median"] >= 30_000
            if a.profile:
                out["spans_profile"] = profile(index, wl, a.profile_top)
        if "chains" in only:
            wl = Generator(cluster, seed=3).chains(a.intervals + 1, a.batches, a.chains)
            out["chains"] = measure_join(index, wl, a.repeats)
    if "memory" in only:
        out["memory"] = memory(Cluster(a.memory_nodes, a.memory_pods, a.memory_deployments), a.memory_repeats)
    out["goals"] = goals
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
