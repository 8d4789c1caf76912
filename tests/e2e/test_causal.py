"""In-process causality (issue 18 item 2, docs/traces.md) under the real agent: a client call's
parent is exactly the server request its thread was serving, and nothing is inferred where a
thread serves many requests at once.

One scene, one `kscope run --l7` over it, three checks on its JSON lines:
  - a chain of thread-per-request services load -> a -> b -> c (meshapp.py ``serve``, Python
    ThreadingHTTPServer + urllib), each hop through a DNAT'ed Service VIP; concurrent requests
    with unique paths that every hop forwards (``--forward-path``), so the test knows each call's
    true cause; plus a keep-alive connection into ``a`` opened before the agent started; ``b``
    also stores a value in memcached per request (pymemcache; the value's size names the request):
    a call user space pairs from chunks has its parent too;
  - an event-loop proxy: load -> nginx -> c, concurrent requests: no parent from the kernel on
    nginx's calls; a call linked only by the X-Request-ID nginx passes on, never when that id repeats;
  - an asyncio server whose calls run on its loop's thread after it answered (while it serves the
    next request: exactly what a per-thread guess would get wrong): no parent on its calls.
Then a second agent run past a tiny ``--l7-record-rate``: wrk on keep-alive connections into the
chain (unique paths from a Lua counter); ``a``'s requests are summed unless a sampled call was made
inside them (forced, counted); calls whose parent was summed go unlinked, counted; none wrong.
Addresses: 198.18.181.0/24 (pods) and 198.19.181.0/24 (VIPs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb
from node_exporter.l7.pipeline import L7Event
from node_exporter.protocols import HttpRecord, Role
from tests.e2e.agentproc import start_kscope
from tests.e2e.l7trace import L7Trace, l7peer, require
from tests.e2e.meshapp import memcached_value_len
from tests.e2e.meshtopo import MeshTopology
from tests.e2e.netns import NGINX_CONF, SRV_V4, Topology

pytestmark = pytest.mark.bpf
MESHAPP = Path(__file__).with_name("meshapp.py")
NET = 181
PORT, VIP_PORT = 8080, 80
MEMCACHED_PORT = 11211
RATE, LOAD_S = 60, 2.0  # per load: 120 requests, each on its own connection and thread
KEEPALIVE_N = 5
ASYNC_N = 8
RECORD_RATE, WRK_S = 10, 2
WRK_LUA = """n = 0
request = function() n = n + 1; return wrk.format("GET", "/w/" .. n) end
"""
Key = tuple[int, int, int]  # (tcp_request_seq, tcp_response_seq, start_time_unix_nano)


@dataclass
class Scene:
    records: list[pb.L7Request]
    counters: dict[str, int]
    ino: dict[str, int]  # pod -> network namespace inode
    load: dict[str, dict[str, object]]
    rated: list[pb.L7Request]  # the second run's, past the record rate
    rated_counters: dict[str, int]

    def of(self, pod: str, side: int, records: list[pb.L7Request] | None = None) -> list[pb.L7Request]:
        return [r for r in (records or self.records) if r.netns_inode == self.ino[pod] and r.side == side]


def _nginx(topo: MeshTopology, tmp: Path, upstream: str) -> None:
    """Debian's nginx in pod ``ngx``: one event-loop process proxying to ``upstream`` on keep-alive
    connections (its calls for many requests share its one thread)."""
    tmp.mkdir(parents=True, exist_ok=True)
    server = (f"listen {topo.ips['ngx']}:{PORT}; location / {{ proxy_pass http://up; proxy_http_version 1.1; "
              'proxy_set_header Connection ""; }')  # fmt: skip
    conf = NGINX_CONF.format(tmp=tmp, server=server).replace(
        "http {", f"http {{\n    upstream up {{ server {upstream}; keepalive 8; }}", 1
    )
    (tmp / "nginx.conf").write_text(conf)
    topo.start("ngx", "nginx", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf"))


def _load(topo: MeshTopology, url: str, *extra: str) -> subprocess.Popen[str]:
    return topo.start("load", sys.executable, str(MESHAPP), "load", "--url", url, "--rate", str(RATE),
                      "--duration", str(LOAD_S), "--timeout", "20", "--number", *extra, stdout=subprocess.PIPE,
                      text=True)  # fmt: skip


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    tmp = tmp_path_factory.mktemp("causal")
    topo = MeshTopology(net=NET)
    agent = None
    try:
        topo.create()
        for name in ("load", "a", "b", "c", "ngx", "asv", "mc"):
            topo.add_pod(name, container=False)
        vip = {name: topo.vip(i + 1) for i, name in enumerate(("a", "b", "c", "ngx", "asv"))}
        for name, v in vip.items():
            topo.service(v, VIP_PORT, name, PORT)
        mc_vip = topo.vip(len(vip) + 1)
        topo.service(mc_vip, MEMCACHED_PORT, "mc", MEMCACHED_PORT)
        topo.start("mc", "memcached", "-u", "root", "-l", topo.ips["mc"], "-p", str(MEMCACHED_PORT), "-U", "0")
        serve = [sys.executable, "-u", str(MESHAPP), "serve", "--port", str(PORT), "--forward-path"]
        topo.start("c", *serve, "--name", "c", "--bind", topo.ips["c"], "--delay", "0.02")
        topo.start("b", *serve, "--name", "b", "--bind", topo.ips["b"], "--next", f"http://{vip['c']}:{VIP_PORT}",
                   "--memcached", f"{mc_vip}:{MEMCACHED_PORT}")  # fmt: skip
        topo.start("a", *serve, "--name", "a", "--bind", topo.ips["a"], "--next", f"http://{vip['b']}:{VIP_PORT}")
        topo.start("asv", sys.executable, "-u", str(MESHAPP), "aserve", "--bind", topo.ips["asv"],
                   "--port", str(PORT), "--next", f"http://{vip['c']}:{VIP_PORT}", "--delay", "0.1",
                   "--audit-after", "0.05")  # fmt: skip
        _nginx(topo, tmp / "nginx", f"{vip['c']}:{VIP_PORT}")
        for name in ("a", "b", "c", "ngx", "asv"):
            topo.wait_listening(topo.pods[name], PORT)
        topo.wait_listening(topo.pods["mc"], MEMCACHED_PORT)
        # a keep-alive connection into a, opened (and used) before the agent starts
        ka = l7peer(topo, topo.pods["load"], "http-client", "--to", vip["a"], "--port", str(VIP_PORT))
        ka.expect("connected")
        require(ka.call("get /ka/before", "done")["statuses"] == {"200": 1}, "keep-alive request before the agent")

        out = tmp / "flows.jsonl"
        # the default --interval (how long a call waits for its parent's record) and --sweep-interval
        # (5 s: the last request on the keep-alive connection leaves with a sweep, run sooner while
        # calls wait for their parent)
        agent, _ = start_kscope("--l7", "--no-live", "--duration", "60", "--jsonl", str(out))
        topo.procs.append(agent)
        # through nginx: each request with an X-Request-ID of its own (nginx passes it on), and each
        # with the same one (a client that sends a constant)
        ngx = f"http://{vip['ngx']}:{VIP_PORT}"
        loads = {"chain": _load(topo, f"http://{vip['a']}:{VIP_PORT}/req"),
                 "nginx": _load(topo, f"{ngx}/ng", "--request-id", "unique"),
                 "nginx_same": _load(topo, f"{ngx}/nc", "--request-id", "constant-7")}  # fmt: skip
        for i in range(KEEPALIVE_N):
            require(ka.call(f"get /ka/{i}", "done")["statuses"] == {"200": 1}, f"keep-alive /ka/{i}")
        # sequential requests on one connection to the asyncio server: its call for request i
        # runs while it serves request i + 1
        acli = l7peer(topo, topo.pods["load"], "http-client", "--to", vip["asv"], "--port", str(VIP_PORT))
        acli.expect("connected")
        for i in range(ASYNC_N):
            require(acli.call(f"get /as/{i}", "done")["statuses"] == {"200": 1}, f"asyncio /as/{i}")
        done = {}
        for what, proc in loads.items():
            stdout, _ = proc.communicate(timeout=60)
            done[what] = json.loads(stdout.splitlines()[-1])
        time.sleep(0.5)  # the asyncio server's last call
        records, counters = _stop(agent, out)
        agent = None

        rated_out = tmp / "rated.jsonl"
        (tmp / "w.lua").write_text(WRK_LUA)
        agent, _ = start_kscope("--l7", "--l7-record-rate", str(RECORD_RATE), "--no-live", "--interval", "0.5",
                                "--sweep-interval", "0.5", "--duration", "60", "--jsonl", str(rated_out))  # fmt: skip
        topo.procs.append(agent)
        wrk = topo.pods["load"].run("wrk", "-t1", "-c3", f"-d{WRK_S}s", "-s", str(tmp / "w.lua"),
                                    f"http://{vip['a']}:{VIP_PORT}")  # fmt: skip
        done["wrk"] = {"stdout": wrk.stdout[-300:]}
        rated, rated_counters = _stop(agent, rated_out)
        agent = None
        yield Scene(records, counters, {n: p.ino for n, p in topo.pods.items()}, done, rated, rated_counters)
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(10)
        topo.close()


def _stop(agent: subprocess.Popen[str], out: Path) -> tuple[list[pb.L7Request], dict[str, int]]:
    agent.terminate()  # a stop runs a last interval: capture stopped, kernel drained
    _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err[-4000:]
    rows = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
    stats = [r.stats for r in rows if r.WhichOneof("record") == "stats"]
    return [r.l7 for r in rows if r.WhichOneof("record") == "l7"], dict(stats[-1].counters) if stats else {}


def _key(r: pb.L7Request) -> Key:
    return (r.http.tcp_request_seq, r.http.tcp_response_seq, r.start_time_unix_nano)


def _parent(r: pb.L7Request) -> Key | None:
    if not r.HasField("parent"):
        return None
    return (r.parent.tcp_request_seq, r.parent.tcp_response_seq, r.parent.start_time_unix_nano)


def _facts(scene: Scene) -> str:
    keep = ("causal", "l7_requests")
    return f"load {scene.load}; counters { {k: v for k, v in scene.counters.items() if any(s in k for s in keep)} }"


def test_chain_every_call_is_the_child_of_the_request_that_caused_it(scene: Scene) -> None:
    for what in ("chain", "nginx"):
        assert scene.load[what]["ok"] == RATE * LOAD_S, _facts(scene)
    wrong: list[tuple[str, str]] = []
    for pod in ("a", "b"):
        servers = {r.http.path: r for r in scene.of(pod, pb.ROLE_SERVER)}
        clients = [
            r for r in scene.of(pod, pb.ROLE_CLIENT) if r.WhichOneof("detail") == "http"
        ]  # b's cache calls: below
        # every request of the load and of the keep-alive connection, at both ends of the hop
        expected = {f"/req/{i}" for i in range(int(RATE * LOAD_S))} | {f"/ka/{i}" for i in range(KEEPALIVE_N)}
        assert expected <= set(servers), (pod, sorted(expected - set(servers))[:5], _facts(scene))
        assert expected <= {r.http.path for r in clients}, (pod, _facts(scene))
        for c in clients:
            truth = servers.get(c.http.path)
            got = _parent(c)
            assert got is not None, (pod, c.http.path, "no parent", _facts(scene))
            if truth is None or got != _key(truth):
                wrong.append((pod, c.http.path))
    assert wrong == [], f"wrong parents: {wrong[:10]} of {len(wrong)}; {_facts(scene)}"


def _memcached_set_bytes(value_len: int) -> int:
    """What pymemcache sends for ``set("k", value, noreply=False)``: the request's size on the wire."""
    return len(f"set k 0 0 {value_len}\r\n") + value_len + 2


def test_a_cache_call_paired_in_user_space_is_the_child_of_its_request(scene: Scene) -> None:
    """b's memcached calls are parsed from chunks, not kernel exchanges: each still names b's server
    request it was made inside of (the value's size tells which), none another."""
    servers = {r.http.path: r for r in scene.of("b", pb.ROLE_SERVER)}
    calls = [r for r in scene.of("b", pb.ROLE_CLIENT) if r.WhichOneof("detail") == "db"]
    paths = [f"/req/{i}" for i in range(int(RATE * LOAD_S))] + [f"/ka/{i}" for i in range(KEEPALIVE_N)]
    by_size: dict[int, list[str]] = {}
    for path in paths:
        by_size.setdefault(_memcached_set_bytes(memcached_value_len(path)), []).append(path)
    assert {c.db.system for c in calls} == {"memcached"} and {c.db.operation for c in calls} == {"set"}, calls[:3]
    assert len(calls) >= len(paths), (len(calls), _facts(scene))
    wrong, unlinked = [], []
    for c in calls:
        got = _parent(c)
        if got is None:
            unlinked.append(c.request_bytes)
            continue
        # the request the size names (/req/i and /ka/i share sizes for i < KEEPALIVE_N: either)
        truths = [servers[p] for p in by_size.get(c.request_bytes, []) if p in servers]
        if got not in {_key(t) for t in truths}:
            wrong.append(c.request_bytes)
    assert wrong == [], f"wrong parents for sizes {wrong[:10]} of {len(wrong)}; {_facts(scene)}"
    assert unlinked == [], f"{len(unlinked)} of {len(calls)} calls unlinked; {_facts(scene)}"
    assert scene.counters.get("l7_kernel_causal_chunks", 0) >= len(paths), _facts(scene)


def test_event_loop_proxy_calls_link_only_by_a_unique_request_id(scene: Scene) -> None:
    """nginx serves every request on one thread: the kernel names no parent for its calls. A call
    carrying the X-Request-ID of the request it proxies is that request's child; with an id every
    request repeats, none is linked (counted)."""
    for what in ("nginx", "nginx_same"):
        assert scene.load[what]["ok"] == RATE * LOAD_S, _facts(scene)
    servers = {r.http.path: r for r in scene.of("ngx", pb.ROLE_SERVER)}
    calls = scene.of("ngx", pb.ROLE_CLIENT)
    unique = [c for c in calls if c.http.path.startswith("/ng/")]
    same = [c for c in calls if c.http.path.startswith("/nc/")]
    assert len(unique) == len(same) == RATE * LOAD_S, _facts(scene)
    assert {c.http.request_id for c in unique} == {servers[c.http.path].http.request_id for c in unique}
    wrong = [c.http.path for c in unique if c.HasField("parent") and _parent(c) != _key(servers[c.http.path])]
    assert wrong == [], _facts(scene)
    unlinked = sum(1 for c in unique if not c.HasField("parent"))
    # counted: no parent in time, evicted, or (nginx's first calls) made before its process had served
    # a request with an id: a server record leaves when it is answered, after the call it proxied
    c = scene.counters
    assert unlinked <= c["l7_causal_rid_timeout"] + c["l7_causal_pending_evicted"] + c["l7_causal_rid_unserved"]
    assert unlinked <= len(unique) // 10, (unlinked, _facts(scene))
    assert [c.http.path for c in same if c.HasField("parent")] == [], _facts(scene)
    assert scene.counters["l7_causal_rid_repeated"] >= len(same) - 1, _facts(scene)


def test_asyncio_server_calls_get_no_parent(scene: Scene) -> None:
    calls = scene.of("asv", pb.ROLE_CLIENT)
    assert {c.http.path for c in calls} >= {f"/audit/as/{i}" for i in range(ASYNC_N - 1)}, _facts(scene)
    assert [c.http.path for c in calls if c.HasField("parent")] == [], _facts(scene)
    # the kernel refused them: they started inside a request of a thread that waits in epoll
    assert scene.counters.get("l7_kernel_causal_refused", 0) >= ASYNC_N - 1, _facts(scene)


def test_past_the_record_rate_links_stay_right_and_losses_are_counted(scene: Scene) -> None:
    servers = scene.of("a", pb.ROLE_SERVER, scene.rated)
    records = {r.http.path: r for r in servers if not r.HasField("summary")}
    summed = sum(r.summary.count for r in servers if r.HasField("summary"))
    # calls that are records (--l7-trace-ratio auto past the record rate: one the share did not pick
    # is a summary of one, counted in the metrics, with no span and no parent, at both ends alike)
    clients = [c for c in scene.of("a", pb.ROLE_CLIENT, scene.rated)
               if c.http.path.startswith("/w/") and not c.HasField("summary")]  # fmt: skip
    linked = [c for c in clients if c.HasField("parent")]
    facts = (f"wrk {scene.load['wrk']}; {len(records)} server records, {summed} summed, {len(clients)} calls, "
             f"{len(linked)} linked; { {k: v for k, v in scene.rated_counters.items() if 'causal' in k} }")  # fmt: skip
    assert summed >= RECORD_RATE and clients, f"not past the record rate: {facts}"
    # a linked call's parent is the record of the request that caused it, never another
    wrong = [c.http.path for c in linked if c.http.path not in records or _parent(c) != _key(records[c.http.path])]
    assert wrong == [], facts
    # calls whose parent was summed are unlinked and counted (the counters are the node's: at least
    # ours). A sampled call whose parent was not forces the parent to be a record (l7_kernel_causal_forced,
    # in the facts): how often depends on which CPU's bucket each took a token from, so it may be 0 in a
    # run (CI saw 0 of 90 once: every linked call's parent had its own token)
    assert linked, facts
    unlinked = len(clients) - len(linked)
    counted = sum(scene.rated_counters[f"l7_causal_children_{k}"] for k in ("timeout", "unconfirmed"))
    assert unlinked <= counted, facts


def _http(e: L7Event) -> HttpRecord:
    assert isinstance(e.record, HttpRecord), e
    return e.record


def _trace_chain(topo: Topology, **l7_kw: Any) -> tuple[list[L7Event], dict[str, int]]:
    """curl -> b -> c, both thread-per-request servers in the server namespace (c on loopback),
    traced there by L7Trace with ``l7_kw``; two asyncio loops wait in epoll there meanwhile."""
    serve = [sys.executable, "-u", str(MESHAPP), "serve", "--port"]
    topo.spawn(topo.srv, *serve, "8091", "--name", "c", "--bind", "127.0.0.1")
    topo.spawn(topo.srv, *serve, "8090", "--name", "b", "--bind", SRV_V4, "--next", "http://127.0.0.1:8091",
               "--forward-path")  # fmt: skip
    for port in (8090, 8091):
        topo.wait_listening(topo.srv, port)
    trace = L7Trace([topo.srv], **l7_kw)
    try:
        for port in (8092, 8093):  # event loops waiting in epoll: two more flagged threads at least
            topo.spawn(topo.srv, sys.executable, "-u", str(MESHAPP), "aserve", "--bind", "127.0.0.1", "--port",
                       str(port), "--next", "http://127.0.0.1:8091")  # fmt: skip
            topo.wait_listening(topo.srv, port)
        topo.cli.run("curl", "-sS", "-o", "/dev/null", f"http://{SRV_V4}:8090/one")
        events = trace.until(lambda ev: any(e.conn.side is Role.CLIENT for e in ev), 5)
        time.sleep(1.0)  # the parent's record (a keep-alive server exchange: the sweep sends it)
        events = trace.until(lambda ev: False, 1.5)
        return events, trace.kernel_stats()
    finally:
        trace.close()


def test_full_flag_table_turns_causality_off_counted(topo: Topology) -> None:
    """Flags are never forgotten: when one cannot be stored, nothing is linked any more (counted)."""
    events, stats = _trace_chain(topo, causal_flagged=1)
    calls = [e for e in events if e.conn.side is Role.CLIENT]
    assert calls, events
    assert all(_http(e).parent is None for e in calls), calls
    assert stats["causal_map_full"] >= 1 and stats["causal_refused"] >= 1, stats


def test_the_same_chain_links_with_room_in_the_table(topo: Topology) -> None:
    events, stats = _trace_chain(topo)
    calls = [e for e in events if e.conn.side is Role.CLIENT]
    assert [(_http(e).path, _http(e).parent is not None) for e in calls] == [("/one", True)], (
        events,
        stats,
    )
    assert stats["causal_map_full"] == 0, stats
