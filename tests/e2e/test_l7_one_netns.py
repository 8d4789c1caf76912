"""Client and server in ONE network namespace, talking over its own address (198.18.0.2, not 127.0.0.1):
both sockets of each connection are traced, with the same addresses swapped. Redis (redis-server and
redis-cli), HTTP/1 (curl and nginx) and PostgreSQL (psql and postgres): exact request and response
counts at both ends.

Over that address a redis-server left in its default protected mode answers every command with one
-DENIED line of ~1 KiB and closes: longer than the agent's default capture (512 bytes), so the line's
end was cut, the reply was dropped with the cut and each command counted unanswered (one truncation
each). Over 127.0.0.1 protected mode lets the client in and the replies are short. The same cut, a
head whose end is past the capture, lost HTTP/1 responses with long heads on the chunk path (HTTPS)
and the SQLSTATE of a long PostgreSQL error: each has a case here."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node_exporter.protocols import HttpRecord, Role
from tests.e2e.l7trace import TLS_CONF, L7Trace, require, self_signed_cert
from tests.e2e.netns import SRV_V4, Topology, nginx, start_nginx
from tests.e2e.sqlpeers import pg_data, pg_env, private_copy, start_postgres
from tests.e2e.test_l7_kv import REDIS_PORT, db, ops
from tests.e2e.test_l7_sql import both

pytestmark = pytest.mark.bpf

AGENT_CAPTURE = 512  # kscope run's --capture-bytes default


@pytest.fixture
def tracing(topo: Topology) -> Iterator[Callable[..., L7Trace]]:
    """The server namespace only: both ends live there."""
    made: list[L7Trace] = []

    def start(**kw: Any) -> L7Trace:
        kw.setdefault("tls", False)
        t = L7Trace((topo.srv,), capture_bytes=AGENT_CAPTURE, **kw)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()


def redis_server(topo: Topology, *extra: str) -> None:
    topo.spawn(topo.srv, "redis-server", "--bind", SRV_V4, "--port", str(REDIS_PORT), "--save", "", "--appendonly",
               "no", "--daemonize", "no", "--logfile", "", *extra)  # fmt: skip
    topo.wait_listening(topo.srv, REDIS_PORT)


def redis_cli(topo: Topology, *args: str) -> str:
    """One redis-cli connection in the server's namespace, over its own address."""
    return topo.srv.run("redis-cli", "-h", SRV_V4, "-p", str(REDIS_PORT), *args).stdout


COMMANDS = (("SET", "k", "v"), ("GET", "k"), ("INCR", "k"))


def test_redis_denied_replies_longer_than_the_capture(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    """Protected mode (the default, no password): each command's reply is the one -DENIED line, cut by
    the capture. Each is recorded as answered, error DENIED, its whole size; none unanswered. The server
    writes the line as it accepts and never reads the command: its end makes no record."""
    redis_server(topo)
    trace = tracing()
    lines = [redis_cli(topo, *cmd).strip() for cmd in COMMANDS]
    require(all(line.startswith("DENIED ") for line in lines), f"protected mode refused the client: {lines}")
    reply = len(lines[0]) + 3  # redis-cli prints the line without its "-" and CRLF
    require(reply > AGENT_CAPTURE, f"the -DENIED line ({reply} bytes) is longer than the capture")
    trace.until(lambda ev: len(db(ev)) >= len(COMMANDS))
    trace.poll()
    assert ops(trace.events, Role.CLIENT) == [cmd[0] for cmd in COMMANDS]
    recs = db(trace.events, Role.CLIENT)
    assert [(r.error_type, r.response_bytes) for r in recs] == [("DENIED", reply)] * len(COMMANDS)
    assert db(trace.events, Role.SERVER) == []
    c = trace.pipe.counters()
    assert (c["truncations"], c["cut_responses"], c["unanswered_requests"]) == (len(COMMANDS), len(COMMANDS), 0)


def test_redis_both_ends(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    redis_server(topo, "--protected-mode", "no")
    trace = tracing()
    for cmd in COMMANDS:
        redis_cli(topo, *cmd)
    trace.until(lambda ev: len(db(ev)) >= 2 * len(COMMANDS))
    trace.poll()
    for side in (Role.CLIENT, Role.SERVER):
        assert ops(trace.events, side) == [cmd[0] for cmd in COMMANDS], side
        assert [r.error_type for r in db(trace.events, side)] == ["", "", "ERR"], side
    assert trace.pipe.counters()["unanswered_requests"] == 0


def http_records(events: list[Any], side: Role) -> list[tuple[str, int]]:
    recs = [e.record for e in events if isinstance(e.record, HttpRecord) and e.conn.side is side]
    return [(r.path, r.status) for r in recs]


def test_http1_curl_and_nginx_both_ends(topo: Topology, tracing: Callable[..., L7Trace], tmp_path: Path) -> None:
    """curl's keep-alive connection to nginx (the kernel pairs HTTP/1): each request once per end."""
    start_nginx(topo, tmp_path / "nginx", 8080)
    trace = tracing()
    paths = [f"/one/{i}" for i in range(5)]
    topo.srv.run("curl", "-sf", "-o", "/dev/null", *(f"http://{SRV_V4}:8080{p}" for p in paths))
    trace.until(lambda ev: len(http_records(ev, Role.CLIENT)) + len(http_records(ev, Role.SERVER)) >= 2 * len(paths))
    trace.poll()
    for side in (Role.CLIENT, Role.SERVER):
        assert http_records(trace.events, side) == [(p, 200) for p in paths], side


def test_https_response_heads_longer_than_the_capture(
    topo: Topology, tracing: Callable[..., L7Trace], tmp_path: Path
) -> None:
    """HTTPS (the chunk path: plaintext from the OpenSSL uprobes), curl and nginx in one namespace:
    /big answers with ~1.2 KiB of fields, a head the 512-byte capture cuts. Each response is still
    recorded at both ends with its status (from the status line), none left unanswered."""
    tmp = tmp_path / "nginx"
    tmp.mkdir()
    self_signed_cert(tmp)
    pad = " ".join(f"add_header X-Pad-{i} {'v' * 40};" for i in range(20))
    server = TLS_CONF.format(ip=SRV_V4, port=8443, tmp=tmp) + (
        f'\nlocation /big/ {{ {pad} return 200 "ok\\n"; }}\nlocation / {{ return 200 "ok\\n"; }}'
    )
    nginx(topo, tmp, server, (8443,))
    trace = tracing(tls=True)
    require(any("libssl" in lib for lib in trace.tls_libraries()), f"no libssl attached: {trace.tls_libraries()}")
    paths = ["/big/1", "/small", "/big/2"]
    heads = topo.srv.run("curl", "-skf", "-o", "/dev/null", "-D", "-", *(f"https://{SRV_V4}:8443{p}" for p in paths))
    require(heads.stdout.count("X-Pad-19") == 2 and len(heads.stdout) > 2 * 1024, "two heads past the capture")
    trace.until(lambda ev: len(http_records(ev, Role.CLIENT)) + len(http_records(ev, Role.SERVER)) >= 6)
    trace.poll()
    for side in (Role.CLIENT, Role.SERVER):
        assert http_records(trace.events, side) == [(p, 200) for p in paths], side
    c = trace.pipe.counters()
    assert (c["cut_responses"], c["unanswered_requests"], c["invalid_frames"]) == (4, 0, 0), c


# the third's ErrorResponse carries a 2,000-byte message: longer than the capture, SQLSTATE first
PSQL_SCRIPT = (
    "SELECT 1;\nSELECT * FROM missing;\nDO $$ BEGIN RAISE EXCEPTION '%', repeat('x', 2000); END $$;\nSELECT 2;\n"
)

PSQL_WANT = [("SELECT", ""), ("SELECT", "42P01"), ("DO", "P0001"), ("SELECT", "")]


def test_postgres_psql_both_ends(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    """psql and postgres: each statement once per end with its SQLSTATE, the one whose error is longer
    than the capture too."""
    with private_copy(pg_data(), "postgres") as top:
        start_postgres(topo, top)
        trace = tracing()
        out = subprocess.run(topo.srv.cmd("psql", "-X", "-At", "-v", "ON_ERROR_STOP=0"), text=True, env=pg_env(),
                             input=PSQL_SCRIPT, capture_output=True,
                             timeout=60)  # fmt: skip
        require("missing" in out.stderr, f"psql ran: {out.stdout} {out.stderr}")
        client, server = both(trace, 4)
        for recs in (client, server):
            assert [(r.operation, r.status_code) for r in recs] == PSQL_WANT, recs
