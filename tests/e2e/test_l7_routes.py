"""Requests summed in the kernel by route, with real traffic: the route corpus through nginx.

wrk sends every target of tests/node_exporter/l7/route_corpus.txt (those a real client can put on
the wire: no control bytes) ROUNDS times over one keep-alive connection, grouped by route, with
the sampler past its rate so nearly every request is summed. At both ends, the requests counted per
route (a record one, a summary its count, named by its first request's head) must be exactly what
was sent per route: two routes summed together would move requests from one to the other. And
routes, not paths, must be what the slots hold: one summary per route and round, where keys by raw
path (--l7-summary-raw-paths) take one per request.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from node_exporter.l7.exchanges import HeadParser
from node_exporter.protocols import Role
from tests.e2e.l7trace import L7Trace, http, require, start_l7_nginx
from tests.e2e.netns import SRV_V4, Topology
from tests.node_exporter.l7.test_route_corpus import corpus, must_refuse, request_head

pytestmark = pytest.mark.bpf

PORT = 8080
ROUNDS = 3
# Each target ROUNDS times, in order, on one connection; the thread stops after the last response
# (wrk itself waits out -d: a few seconds suffice for ~1,500 requests).
WRK_SCRIPT = """
local targets = {%s}
local total = #targets * %d
local i, done = 0, 0
request = function()
  local t = targets[(i %% #targets) + 1]
  i = i + 1
  return wrk.format("GET", t)
end
response = function(status, headers, body)
  done = done + 1
  if done >= total then wrk.thread:stop() end
end
"""


def lua_string(b: bytes) -> str:
    return '"' + "".join(chr(c) if 0x20 <= c < 0x7F and c not in b'"\\' else f"\\{c:03d}" for c in b) + '"'


def live_targets() -> list[tuple[bytes, str]]:
    """(target, route) a client can send, grouped by route (as a service's traffic often is)."""
    parser = HeadParser()
    out = []
    for t in corpus():
        head = parser.parse(request_head(b"GET", t))
        if head is not None and not any(c < 0x20 or c == 0x7F for c in t):
            out.append((t, head[2]))
    return sorted(out, key=lambda tr: (tr[1], tr[0]))


@pytest.mark.parametrize("raw", [False, True], ids=["routes", "raw-paths"])
def test_requests_are_summed_by_route(
    topo: Topology, tmp_path: Path, tracing: Callable[..., L7Trace], raw: bool
) -> None:
    targets = live_targets()
    n = len(targets) * ROUNDS
    refused = [t for t, _ in targets if must_refuse(b"GET", t)]
    assert len(targets) >= 400 and 5 <= len(refused) < 20
    start_l7_nginx(topo, tmp_path, PORT)
    script = tmp_path / "routes.lua"
    script.write_text(WRK_SCRIPT % (", ".join(lua_string(t) for t, _ in targets), ROUNDS))
    trace = tracing(record_rate=1, summary_s=30, summary_raw_paths=raw)
    wrk = topo.spawn(topo.cli, "wrk", "-t1", "-c1", "-d10s", "-s", str(script), f"http://{SRV_V4}:{PORT}/",
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    while wrk.poll() is None:
        trace.poll()
        time.sleep(0.05)
    out = wrk.stdout.read() if wrk.stdout else ""
    m = re.search(r"(\d+) requests in", out)
    require(wrk.returncode == 0 and m is not None and "Socket errors" not in out, f"wrk failed: {out}")
    assert m is not None and int(m[1]) == n, out
    trace.until(lambda ev: False, timeout=0.5)
    for _, l7 in trace.pairs:
        l7.final_sweep()
    trace.poll()

    stats = trace.kernel_stats()
    assert stats["exchange_rb_full"] == stats["summary_lost"] == stats["fallback"] == 0, stats
    sent = Counter(route for _, route in targets)
    keys = len(sent) + sum(1 for t, _ in targets if not t.startswith(b"/"))  # a target not a path: its own key
    first_route = targets[0][1]  # wrk may send one request past the last round: the first target's
    for side in (Role.CLIENT, Role.SERVER):
        events = http(trace.events, side=side)
        got: Counter[str] = Counter()
        for e in events:
            got[e.record.route] += e.record.summary.count if e.record.summary else 1
        extra = got - Counter({r: ROUNDS * c for r, c in sent.items()})
        assert got - extra == Counter({r: ROUNDS * c for r, c in sent.items()}), (side, got)
        assert sum(extra.values()) <= 1 and set(extra) <= {first_route}, (side, extra)
        summaries = [e for e in events if e.record.summary is not None]
        summed = sum(e.record.summary.count for e in summaries if e.record.summary)
        if raw:
            # one key per path: the slots take turns, a summary for nearly every request
            assert len(summaries) > ROUNDS * keys and len(summaries) > summed / 2, (len(summaries), summed)
        else:
            # what the kernel cannot template as user space would is never in a summary
            assert not [e for e in summaries if must_refuse(b"GET", e.record.path.encode())]
            assert len(summaries) <= ROUNDS * keys, (len(summaries), ROUNDS * keys)
            assert summed >= 0.95 * ROUNDS * (len(targets) - len(refused)) - 10, (summed, n)
    if not raw:
        # each request of a refused target is a record at both ends; those the sampler did not pick counted
        sampled = 2 * ROUNDS * len(refused) - stats["unsummable"]
        assert 0 <= sampled <= 10, stats
