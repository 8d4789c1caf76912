"""Redis and Memcached through the real L7 probe: redis-server with redis-cli and redis-benchmark, memcached
with pymemcache and meta-memcache, between two namespaces. Counts are checked against what the client did
(and, for redis-benchmark, against the server's own INFO commandstats); secret markers in keys, values and
an AUTH password must appear nowhere in the records or in their protobuf form."""

from __future__ import annotations

import random
import re
import select
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from cluster_processor.aggregate import Aggregator
from cluster_processor.kube.index import KubeIndex
from cluster_processor.otlp.encode import EncodedRequest, Reporter
from cluster_processor.otlp.exporter import Signal
from cluster_processor.otlp.pipeline import OtlpPipeline
from kscope.v1 import flow_pb2 as pb
from node_exporter.l7.pipeline import L7Event
from node_exporter.output.convert import MonotonicClock, l7_request
from node_exporter.protocols import DbRecord, Role
from tests.e2e.agentproc import start_kscope
from tests.e2e.l7trace import L7Trace, require
from tests.e2e.netns import SRV_V4, Topology

pytestmark = pytest.mark.bpf

REDIS_PORT, MEMCACHED_PORT, ODD_PORT = 6379, 11211, 7000


@pytest.fixture
def tracing(topo: Topology) -> Iterator[Callable[..., L7Trace]]:
    made: list[L7Trace] = []

    def start(**kw: Any) -> L7Trace:
        kw.setdefault("tls", False)
        t = L7Trace((topo.cli, topo.srv), **kw)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()


def db(events: Iterable[L7Event], side: Role | None = None, **match: Any) -> list[DbRecord]:
    return [
        e.record
        for e in events
        if isinstance(e.record, DbRecord)
        and (side is None or e.conn.side is side)
        and all(getattr(e.record, k) == v for k, v in match.items())
    ]


def ops(events: Iterable[L7Event], side: Role) -> list[str]:
    return [r.operation for r in db(events, side)]


def no_secrets(trace: L7Trace) -> None:
    """Neither the records, nor their kscope.v1 form (what leaves the agent), nor the OTLP the processor
    makes of them (metrics, spans, logs, as encoded for the exporter) hold a secret marker."""
    assert trace.events
    assert "SECRET" not in repr(trace.events)
    clock = MonotonicClock()
    l7 = [l7_request(e, None, clock) for e in trace.events]
    assert not [q for q in l7 if b"SECRET" in q.SerializeToString()]
    agg = Aggregator(KubeIndex())
    agg.add(pb.FlowBatch(schema_version=1, node_name="node", time_unix_nano=time.time_ns(), l7=l7))
    sent: list[bytes] = []

    class Sink:
        def submit(self, signal: Signal, request: EncodedRequest) -> bool:
            sent.append(request.data)
            return True

    pipe = OtlpPipeline(Reporter("r", "node"), Sink())
    for rep in agg.flush(time.time_ns()):
        pipe.export_interval(rep.interval)
        pipe.export_spans("node", rep.spans)
        pipe.export_logs("node", rep.logs)
    otlp = b"".join(sent)
    assert b"db.client.operation.duration" in otlp and b"db.system.name" in otlp
    assert b"SECRET" not in otlp


def redis_server(topo: Topology, port: int = REDIS_PORT) -> None:
    topo.spawn(topo.srv, "redis-server", "--bind", SRV_V4, "--port", str(port), "--save", "", "--appendonly", "no",
               "--protected-mode", "no", "--daemonize", "no", "--logfile", "")  # fmt: skip
    topo.wait_listening(topo.srv, port)


class Cli:
    """redis-cli reading commands from a pipe, one connection for its whole life; each reply awaited."""

    def __init__(self, topo: Topology, port: int = REDIS_PORT) -> None:
        self.proc = topo.spawn(topo.cli, "redis-cli", "-h", SRV_V4, "-p", str(port), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, bufsize=0)  # fmt: skip

    def __call__(self, line: str, expect: str, timeout: float = 10) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        out = b""
        while expect.encode() not in out:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            require(ready, f"redis-cli answer to {line!r}")
            chunk = self.proc.stdout.read(65536)
            require(chunk, f"redis-cli exited on {line!r}")
            out += chunk
        return out.decode()


REDIS_SCRIPT = [  # (command, what redis-cli prints, operation)
    ("SET k:SECRETKEY SECRETVALUE", "OK", "SET"),
    ("GET k:SECRETKEY", "SECRETVALUE", "GET"),
    ("GET nokey", "\n", "GET"),
    ("MGET k:SECRETKEY nokey", "\n", "MGET"),
    ("LPUSH lst a", "1", "LPUSH"),
    ("GET lst", "WRONGTYPE", "GET"),
    ("MULTI", "OK", "MULTI"),
    ("INCR ctr", "QUEUED", "INCR"),
    ("SET k2 v", "QUEUED", "SET"),
    ("EXEC", "OK", "EXEC"),
    ("AUTH SECRETPASS", "ERR", "AUTH"),
    ("PING", "PONG", "PING"),
]


def test_redis_cli_on_a_connection_older_than_the_probe(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    redis_server(topo)
    cli = Cli(topo)
    cli("PING", "PONG")  # connect, and redis-cli's COMMAND DOCS, before the probe exists
    trace = tracing()
    for line, expect, _ in REDIS_SCRIPT:
        cli(line, expect)
    want = [op for _, _, op in REDIS_SCRIPT]
    trace.until(lambda ev: len(db(ev)) >= 2 * len(want))
    for side, comm in ((Role.CLIENT, "redis-cli"), (Role.SERVER, "redis-server")):
        assert ops(trace.events, side) == want, side
        recs = db(trace.events, side)
        assert [(r.operation, r.error_type) for r in recs if r.error_type] == [("GET", "WRONGTYPE"), ("AUTH", "ERR")]
        assert [(r.cache_hits, r.cache_misses) for r in recs if r.operation in ("GET", "MGET")] == [
            (1, 0), (0, 1), (1, 1), (0, 0)]  # fmt: skip
        assert [r.batch_size for r in recs if r.operation == "EXEC"] == [2]
        assert all(r.system == "redis" and r.latency_ns > 0 for r in recs)
        conns = {(e.conn.comm, e.conn.sock_cookie, e.conn.protocol) for e in trace.events if e.conn.side is side}
        assert len(conns) == 1 and next(iter(conns))[::2] == (comm, "redis")
    assert trace.pipe.counters()["invalid_frames"] == 0
    no_secrets(trace)


def commandstats(topo: Topology) -> Counter[str]:
    out = topo.cli.run("redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT), "INFO", "commandstats").stdout
    return Counter({m[1].upper(): int(m[2]) for m in re.finditer(r"cmdstat_([a-z|]+):calls=(\d+)", out)})


@pytest.mark.parametrize("pipeline", [1, 16])
def test_redis_benchmark_counts_match_the_servers(
    topo: Topology, tracing: Callable[..., L7Trace], pipeline: int
) -> None:
    redis_server(topo)
    topo.cli.run("redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT), "CONFIG", "RESETSTAT")
    trace = tracing()
    topo.cli.run("redis-benchmark", "-h", SRV_V4, "-p", str(REDIS_PORT), "-t", "set,get", "-n", "2000",
                 "-c", "2", "-P", str(pipeline), "-q", timeout=120)  # fmt: skip
    served = commandstats(topo)  # the server's own count (INFO is counted after the reply is built)
    require(served["SET"] >= 2000 and served["GET"] >= 2000, f"benchmark ran: {served}")
    want = served["SET"] + served["GET"]
    trace.until(lambda ev: sum(r.operation in ("SET", "GET") for r in db(ev, Role.SERVER)) >= want and
                sum(r.operation in ("SET", "GET") for r in db(ev, Role.CLIENT)) >= want, timeout=30)  # fmt: skip
    for side in (Role.CLIENT, Role.SERVER):
        seen = Counter(ops(trace.events, side))
        assert (seen["SET"], seen["GET"]) == (served["SET"], served["GET"]), side
    assert trace.kernel_stats().get("rb_full", 0) == 0
    c = trace.pipe.counters()
    assert (c["invalid_frames"], c["gaps"], c["orphan_responses"]) == (0, 0, 0)


def test_redis_pubsub_pushes_make_no_records(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    redis_server(topo)
    trace = tracing()
    sub = topo.spawn(topo.cli, "redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT), "subscribe", "SECRETCH",
                     stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    assert sub.stdout is not None
    require(select.select([sub.stdout], [], [], 10)[0], "subscribed")
    for i in range(5):
        out = topo.cli.run("redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT), "PUBLISH", "SECRETCH", f"SECRET{i}")
        require(out.stdout.strip() == "1", "one subscriber")
    trace.until(lambda ev: ops(ev, Role.SERVER).count("PUBLISH") >= 5 and ops(ev, Role.CLIENT).count("PUBLISH") >= 5)
    # Only the publishers' commands are records (one connection each): the subscriber's connection makes
    # none, on either side, though it carried SUBSCRIBE, its confirmation and five pushes.
    for side in (Role.CLIENT, Role.SERVER):
        assert ops(trace.events, side) == ["PUBLISH"] * 5
        assert len({e.conn.sock_cookie for e in trace.events if e.conn.side is side}) == 5
    assert trace.pipe.counters()["ignored_messages"] >= 2 * (1 + 5)  # both ends: SUBSCRIBE + confirmation, pushes
    assert trace.pipe.counters()["invalid_frames"] == 0
    no_secrets(trace)


def test_redis_inferred_at_any_port(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    redis_server(topo, ODD_PORT)
    trace = tracing()
    topo.cli.run("redis-cli", "-h", SRV_V4, "-p", str(ODD_PORT), "SET", "a", "b")
    trace.until(lambda ev: len(db(ev)) >= 2)
    assert ops(trace.events, Role.CLIENT) == ops(trace.events, Role.SERVER) == ["SET"]


MEMCACHED_CLIENT = """
import sys
import time
from pymemcache.client.base import Client
c = Client(("{srv}", {port}))
c.set("k:SECRETKEY", b"SECRETVALUE", noreply=False)
assert c.get("k:SECRETKEY") == b"SECRETVALUE"
assert c.get("nokey") is None
assert c.get_many(["k:SECRETKEY", "nokey", "k2"]) == {{"k:SECRETKEY": b"SECRETVALUE"}}
assert c.add("k:SECRETKEY", b"x", noreply=False) is False
c.set("ctr", b"10", noreply=True)
assert c.incr("ctr", 5) == 15
assert c.delete("nokey", noreply=False) is False
from meta_memcache import CacheClient, Key, ServerAddress, connection_pool_factory_builder
m = CacheClient.cache_client_from_servers(servers=[ServerAddress(host="{srv}", port={port})],
                                          connection_pool_factory_fn=connection_pool_factory_builder())
assert m.set(key=Key("m:SECRETKEY"), value="SECRETVALUE", ttl=60)
assert m.get(key=Key("m:SECRETKEY")) == "SECRETVALUE"
assert m.get(key=Key("m:nokey")) is None
assert m.delete(key=Key("m:SECRETKEY"))
print("done", flush=True)
"""
MEMCACHED_OPS = ["set", "get", "get", "get", "add", "set", "incr", "delete", "ms", "mg", "mg", "md"]


def test_memcached_text_and_meta_clients(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    topo.spawn(topo.srv, "memcached", "-u", "root", "-l", SRV_V4, "-p", str(MEMCACHED_PORT), "-U", "0")
    topo.wait_listening(topo.srv, MEMCACHED_PORT)
    trace = tracing()
    script = MEMCACHED_CLIENT.format(srv=SRV_V4, port=MEMCACHED_PORT)
    require("done" in topo.cli.run(sys.executable, "-c", script).stdout, "the client ran")
    trace.until(lambda ev: len(db(ev)) >= 2 * len(MEMCACHED_OPS))
    for side in (Role.CLIENT, Role.SERVER):
        recs = db(trace.events, side)
        assert sorted(r.operation for r in recs) == sorted(MEMCACHED_OPS), side  # two connections: any order
        text = [r for r in recs if r.operation in ("get", "set", "add", "incr", "delete")]
        meta = [r for r in recs if r.operation in ("ms", "mg", "md")]
        assert [r.operation for r in text] == MEMCACHED_OPS[:8] and [r.operation for r in meta] == MEMCACHED_OPS[8:]
        assert [(r.cache_hits, r.cache_misses) for r in recs if r.operation in ("get", "mg")] == [
            (1, 0), (0, 1), (1, 2), (1, 0), (0, 1)]  # fmt: skip
        assert [(r.operation, r.status_code) for r in recs if r.status_code] == [
            ("add", "NOT_STORED"),
            ("delete", "NOT_FOUND"),
        ]
        assert all(r.error_type == "" for r in recs)
    assert {e.conn.comm for e in trace.events if e.conn.side is Role.SERVER} == {"memcached"}
    assert trace.pipe.counters()["invalid_frames"] == 0
    no_secrets(trace)


def test_agent_jsonl_carries_db_info_and_no_secret(topo: Topology, tmp_path: Path) -> None:
    """`kscope run --l7 --jsonl` tracing redis-server's namespace: each command is one L7Request with
    its DbInfo; the key, the value and the AUTH password appear nowhere in what the agent writes."""
    redis_server(topo)
    out = tmp_path / "flows.jsonl"
    agent, _ = start_kscope("--l7", "--no-live", "--duration", "4", "--interval", "0.5", "--jsonl", str(out),
                            "--netns-inode", str(topo.srv.ino))  # fmt: skip
    for args in (("SET", "k:SECRETKEY", "SECRETVALUE"), ("GET", "k:SECRETKEY"), ("AUTH", "SECRETPASS")):
        topo.cli.run("redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT), *args)
    _, rest = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest
    text = out.read_text()
    records = [json_format.Parse(line, pb.NodeRecord()) for line in text.splitlines()]
    l7 = [r.l7 for r in records if r.WhichOneof("record") == "l7"]
    assert [(r.side, r.protocol, r.db.system, r.db.operation, r.db.error_type) for r in l7] == [
        (pb.ROLE_SERVER, "redis", "redis", "SET", ""),
        (pb.ROLE_SERVER, "redis", "redis", "GET", ""),
        (pb.ROLE_SERVER, "redis", "redis", "AUTH", "ERR"),
    ]
    assert l7[1].db.cache_hits == 1 and all(r.process.comm == "redis-server" for r in l7)
    assert "SECRET" not in text + rest


def test_run_sums_operations_past_the_record_rate_and_accounts_for_each(topo: Topology, tmp_path: Path) -> None:
    """redis-benchmark past a tiny --l7-record-rate through `kscope run --jsonl`: past the node's budget the
    agent sums operations per socket, command and status each interval (node_exporter/l7/agentsum.py), so most
    leave as summaries; records and summaries together count exactly what the server's INFO commandstats
    counted, errors included, and no key or value appears."""
    redis_server(topo)
    cli = ("redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT))
    topo.cli.run(*cli, "CONFIG", "RESETSTAT")
    out, rate = tmp_path / "flows.jsonl", 5
    # 16 pipelined SETs are ~720 bytes: the capture holds them all (past it, the rest is a counted gap)
    agent, _ = start_kscope("--l7", "--l7-record-rate", str(rate), "--capture-bytes", "1024", "--no-live",
                            "--interval", "0.5", "--duration", "120", "--jsonl", str(out),
                            "--netns-inode", str(topo.srv.ino))  # fmt: skip
    try:
        topo.cli.run("redis-benchmark", "-h", SRV_V4, "-p", str(REDIS_PORT), "-t", "set,get", "-n", "3000",
                     "-c", "2", "-P", "16", "-q", timeout=120)  # fmt: skip
        topo.cli.run(*cli, "SET", "k:SECRETKEY", "SECRETVALUE")
        topo.cli.run(*cli, "-r", "40", "INCR", "k:SECRETKEY")  # one connection, 40 "ERR not an integer"
        served = commandstats(topo)
        time.sleep(1)  # the last interval's operations reach the ring before the stop
    finally:
        agent.terminate()  # a stop runs a last interval: capture stopped, the ring drained, summaries sent
        _, rest = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest[-3000:]
    text = out.read_text()
    rows = [json_format.Parse(line, pb.NodeRecord()) for line in text.splitlines()]
    l7 = [r.l7 for r in rows if r.WhichOneof("record") == "l7" and r.l7.protocol == "redis"]
    counted: Counter[tuple[str, str]] = Counter()
    for r in l7:
        counted[(r.db.operation, r.db.error_type)] += r.summary.count if r.HasField("summary") else 1
        if r.HasField("summary"):
            s = r.summary
            assert r.latency_ns == 0 and sum(s.latency_bucket_counts) == s.count and s.latency_sum_ns > 0, r
            assert s.latency_min_ns <= s.latency_max_ns and r.side == pb.ROLE_SERVER, r
    require(served["SET"] >= 3000 and served["GET"] >= 3000 and served["INCR"] == 40, f"clients ran: {served}")
    assert counted[("GET", "")] == served["GET"] and counted[("INCR", "ERR")] == served["INCR"], (counted, served)
    assert counted[("SET", "")] == served["SET"], (counted, served)
    summaries = [r for r in l7 if r.HasField("summary")]
    singles = len(l7) - len(summaries)
    assert summaries and len(l7) < (served["GET"] + served["SET"]) / 20, (len(l7), len(summaries))
    stats = [r.stats for r in rows if r.WhichOneof("record") == "stats"][-1].counters
    assert stats["l7_agent_summed"] == sum(counted.values()) - singles and stats["l7_agent_summaries_full"] == 0, stats
    assert stats["l7_agent_summaries"] == len(summaries) and stats["l7_kernel_rb_full"] == 0, stats
    assert "SECRET" not in text + rest


def test_binary_garbage_on_the_redis_port_makes_nothing(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    """Bytes that are not RESP, sent by nc to redis-server: neither end is
    taken for Redis (inference wants a RESP command, the port alone never decides), nothing is
    parsed or invented; a real command on another connection still is."""
    redis_server(topo)
    trace = tracing()
    garbage = bytes([0, 255]) + random.Random(14).randbytes(3000).replace(b"*", b"+")
    # redis-server drops such a client (a protocol error), maybe after an -ERR line
    subprocess.run(topo.cli.cmd("nc", "-q", "1", SRV_V4, str(REDIS_PORT)), input=garbage, capture_output=True,
                   timeout=30, check=False)  # fmt: skip
    topo.cli.run("redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT), "PING")
    trace.until(lambda ev: len(db(ev)) >= 2)
    assert ops(trace.events, Role.CLIENT) == ops(trace.events, Role.SERVER) == ["PING"]
    c = trace.pipe.counters()
    assert (c["invalid_frames"], trace.pipe.chunks_unusable) == (0, 0)
