"""The L7 probe and pipeline against real PostgreSQL and MariaDB servers and their own clients.

Each test starts the server in the server namespace (data directories cached, see sqlpeers.py),
traces both namespaces, runs real clients (psql, pgbench, the mariadb client, mysql-connector-python
preparing statements on the server) and checks exactly what they did at both ends: operation
counts, error counts with their codes, rows, and that no literal (a secret marker in queries,
values and rows) ever appears in what the agent produced.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node_exporter.l7.pipeline import L7Event
from node_exporter.l7.syscalls import SyscallL7Collector
from node_exporter.protocols import DbRecord, Role
from tests.e2e.l7trace import L7Trace, require, self_signed_cert
from tests.e2e.netns import SRV_V4, Topology
from tests.e2e.sqlpeers import (
    MY_PORT,
    mariadb_cmd,
    mariadb_data,
    pg_data,
    pg_env,
    private_copy,
    start_mariadb,
    start_postgres,
)

pytestmark = pytest.mark.bpf
SECRET = "s3cr3tMARK"


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


@pytest.fixture
def postgres(topo: Topology) -> Iterator[Path]:
    with private_copy(pg_data(), "postgres") as top:
        start_postgres(topo, top)
        yield top


def db(events: list[L7Event], side: Role, **match: Any) -> list[DbRecord]:
    out = []
    for e in events:
        r = e.record
        if isinstance(r, DbRecord) and e.conn.side is side and all(getattr(r, k) == v for k, v in match.items()):
            out.append(r)
    return out


def both(trace: L7Trace, n: int, timeout: float = 10, **match: Any) -> tuple[list[DbRecord], list[DbRecord]]:
    """Poll until at least ``n`` records match at each end (or the deadline); (client, server)."""
    trace.until(lambda ev: min(len(db(ev, Role.CLIENT, **match)), len(db(ev, Role.SERVER, **match))) >= n, timeout)
    time.sleep(0.2)  # anything beyond n would be a bug: give it a chance to show
    trace.poll()
    return db(trace.events, Role.CLIENT, **match), db(trace.events, Role.SERVER, **match)


def no_secret(trace: L7Trace) -> None:
    assert SECRET not in repr(trace.events)


def psql(topo: Topology, script: str, sslmode: str = "disable") -> str:
    proc = subprocess.run(topo.cli.cmd("psql", "-X", "-At", "-v", "ON_ERROR_STOP=0"), input=script, text=True,
                          env=pg_env(sslmode), capture_output=True, timeout=60)  # fmt: skip
    return proc.stdout + proc.stderr


# ---- PostgreSQL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "probe"),
    [("simple", "socket"), ("extended", "socket"), ("prepared", "socket"), ("extended", "syscalls")],
)
def test_pgbench_select_only(
    topo: Topology, postgres: Path, tracing: Callable[..., L7Trace], mode: str, probe: str
) -> None:
    """pgbench -S -M <mode>: exactly one SELECT on pgbench_accounts per transaction, at both ends; also
    through the syscall-exit fallback older kernels get (the same inference and parsers)."""
    trace = tracing() if probe == "socket" else tracing(collector=SyscallL7Collector)
    n = 40
    out = topo.cli.run("pgbench", "-n", "-S", "-c", "1", "-t", str(n), "-M", mode, "-h", pg_env()["PGHOST"],
                       "-U", "postgres", "postgres").stdout  # fmt: skip
    require(f"number of transactions actually processed: {n}/{n}" in out, "pgbench ran")
    client, server = both(trace, n, collection="pgbench_accounts", namespace="postgres")
    assert len(client) == len(server) == n
    text = {"simple": "SELECT abalance FROM pgbench_accounts WHERE aid = ?;"}.get(
        mode, "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    )
    for r in client + server:
        assert (r.system, r.operation, r.query_summary, r.query_text) == (
            "postgresql", "SELECT", "SELECT pgbench_accounts", text)  # fmt: skip
        assert (r.status_code, r.error_type, r.returned_rows) == ("", "", 1)
        assert r.latency_ns > 0 and r.request_bytes > 0 and r.response_bytes > 0
    c = trace.pipe.counters()
    assert c["invalid_frames"] == c["state_misses"] == c["orphan_responses"] == 0, c


def test_psql_errors_copy_and_privacy(topo: Topology, postgres: Path, tracing: Callable[..., L7Trace]) -> None:
    """psql (simple protocol): 4 failing statements with their SQLSTATEs, a COPY FROM STDIN of 3 rows as
    one operation, rows counted; the secret in literals, rows and error messages appears nowhere."""
    trace = tracing()
    script = (
        "CREATE TABLE kv (k text, v text);\n"
        f"INSERT INTO kv VALUES ('{SECRET}-k', $q${SECRET}$q$);\n"
        f"SELECT v FROM kv WHERE k = '{SECRET}-k' OR v = E'{SECRET}\\n';\n"
        + "".join(f"SELECT * FROM missing_{i};\n" for i in range(3))
        + "SELECT 1/0;\n"
        "COPY kv FROM STDIN;\n" + "".join(f"{i}\t{SECRET}{i}\n" for i in range(3)) + "\\.\n"
        "SELECT k FROM kv;\n"
    )
    out = psql(topo, script)
    require("division by zero" in out and "COPY 3" in out, f"psql ran the script: {out}")
    client, server = both(trace, 9)
    for recs in (client, server):
        assert len(recs) == 9, recs
        failed = [r for r in recs if r.status_code]
        assert sorted(r.status_code for r in failed) == ["22012", "42P01", "42P01", "42P01"], recs
        assert all(r.error_type == r.status_code for r in failed)
        copy = [r for r in recs if r.operation == "COPY"]
        assert [(r.collection, r.returned_rows) for r in copy] == [("kv", 3)]
        assert [r.returned_rows for r in recs if r.query_text == "SELECT k FROM kv;"] == [4]
        assert [r.query_text for r in recs if r.operation == "INSERT"] == ["INSERT INTO kv VALUES (?);"]
    no_secret(trace)


def test_large_result_cut_by_the_capture(topo: Topology, postgres: Path, tracing: Callable[..., L7Trace]) -> None:
    """3000 rows (~300 KB) in calls of which the probe keeps the head: the result's end is lost at
    both ends. Each end still records the SELECT (no rows: unknown) when the client's next query
    comes, counts the cut, and parses the next statements exactly."""
    trace = tracing()
    out = psql(topo, "SELECT * FROM pgbench_accounts LIMIT 3000;\nSELECT 'after';\nSELECT * FROM nope;\n")
    require(out.count("\n") >= 3001 and "after" in out, "psql ran")
    client, server = both(trace, 3)
    for recs in (client, server):
        assert [(r.query_text, r.returned_rows, r.status_code) for r in recs] == [
            ("SELECT * FROM pgbench_accounts LIMIT ?;", 0, ""), ("SELECT ?;", 1, ""),
            ("SELECT * FROM nope;", 0, "42P01"),
        ]  # fmt: skip
        assert recs[0].response_bytes > 0 and recs[0].latency_ns > 0
    c = trace.pipe.counters()
    assert c["cut_responses"] == 2 and c["unanswered_requests"] == c["orphan_responses"] == 0, c
    assert trace.truncated > 0


def test_connection_older_than_the_agent(topo: Topology, postgres: Path, tracing: Callable[..., L7Trace]) -> None:
    """A psql session connected (and queried) before the probe loads is recognised from its next
    Query: both ends see exactly the later statements, 5 answered and 2 failed."""
    proc = topo.spawn(topo.cli, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=0", stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=pg_env(), bufsize=0)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"SELECT 'ready';\n")
    require(proc.stdout.readline().strip() == b"ready", "psql connected")
    trace = tracing()
    for i in range(5):
        proc.stdin.write(f"SELECT bid FROM pgbench_branches WHERE bid = {i};\n".encode())
    proc.stdin.write(b"SELECT * FROM nope;\nSELECT * FROM nope;\nSELECT 'done';\n")
    deadline = time.monotonic() + 20
    while proc.stdout.readline().strip() != b"done":
        require(time.monotonic() < deadline and proc.poll() is None, "psql ran the statements")
    client, server = both(trace, 8)
    for recs in (client, server):
        assert [(r.collection, r.status_code) for r in recs] == [("pgbench_branches", "")] * 5 + [
            ("nope", "42P01"), ("nope", "42P01"), ("", "")]  # fmt: skip
    proc.stdin.close()


# ---- MariaDB ---------------------------------------------------------------------------------

PREPARED_CLIENT = """
import sys
import mysql.connector
conn = mysql.connector.connect(host=sys.argv[1], port=int(sys.argv[2]), user="root", use_pure=True)
cur = conn.cursor(prepared=True)
for i in range(int(sys.argv[3])):
    cur.execute("SELECT v FROM d.kv WHERE k = %s", (sys.argv[4] + str(i % 3),))
    cur.fetchall()
try:
    cur.execute("SELECT v FROM d.nope WHERE k = %s", ("x",))
except mysql.connector.Error as e:
    print("error", e.errno)
conn.close()
print("done")
"""


@pytest.fixture
def mariadb(topo: Topology) -> Iterator[Path]:
    with private_copy(mariadb_data(), "mysql") as top:
        start_mariadb(topo, top)
        yield top


def mariadb_run(topo: Topology, sql: str) -> str:
    proc = subprocess.run(topo.cli.cmd(*mariadb_cmd("--force", "-N", "-B")), input=sql, text=True,
                          capture_output=True, timeout=60)  # fmt: skip
    return proc.stdout + proc.stderr


SETUP = "CREATE DATABASE d;\nCREATE TABLE d.kv (k VARCHAR(64) PRIMARY KEY, v VARCHAR(64));\n" + "".join(
    f"INSERT INTO d.kv VALUES ('{SECRET}{i}', \"{SECRET}-value\");\n" for i in range(3)
)


def test_mariadb_client_queries_errors_and_rows(topo: Topology, mariadb: Path, tracing: Callable[..., L7Trace]) -> None:
    """The mariadb client (COM_QUERY per statement): 3 inserts, 2 selects with their rows counted,
    3 failing statements with error number and SQLSTATE, at both ends; no secret anywhere."""
    trace = tracing()
    script = (
        SETUP
        + f"SELECT v FROM d.kv WHERE k = '{SECRET}1';\nSELECT k, v FROM d.kv;\n"
        + "SELECT * FROM d.nope;\nSELECT * FROM d.nope;\nINSERT INTO d.kv VALUES ('a', 'b'), ('a', 'c');\n"
    )
    out = mariadb_run(topo, script)
    require("ERROR 1146" in out and "ERROR 1062" in out, f"mariadb ran the script: {out}")
    client, server = both(trace, 10)
    for recs in (client, server):
        assert len(recs) == 10, recs
        assert {r.system for r in recs} == {"mariadb"}
        assert [(r.status_code, r.error_type) for r in recs if r.status_code] == [
            ("1146", "42S02"), ("1146", "42S02"), ("1062", "23000")]  # fmt: skip
        assert [r.query_text for r in recs if r.operation == "INSERT"] == ["INSERT INTO d.kv VALUES (?)"] * 3 + [
            "INSERT INTO d.kv VALUES (?), (?)"]  # fmt: skip
        selects = [(r.collection, r.returned_rows) for r in recs if r.operation == "SELECT" and not r.status_code]
        assert selects == [("d.kv", 1), ("d.kv", 3)]
    c = trace.pipe.counters()
    assert c["invalid_frames"] == c["orphan_responses"] == c["unanswered_requests"] == 0, c
    no_secret(trace)


def test_mariadb_prepared_statements(topo: Topology, mariadb: Path, tracing: Callable[..., L7Trace]) -> None:
    """mysql-connector-python with prepared=True: COM_STMT_PREPARE once, COM_STMT_EXECUTE per call; each
    execution named by the prepared text (found by statement id), binary rows counted; a failing
    prepare is the one error."""
    require("ERROR" not in mariadb_run(topo, SETUP), "setup")
    trace = tracing()
    n = 12
    proc = subprocess.run(topo.cli.cmd(sys.executable, "-c", PREPARED_CLIENT, SRV_V4, str(MY_PORT), str(n), SECRET),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    require(proc.stdout.split() == ["error", "1146", "done"], f"client ran: {proc.stdout} {proc.stderr}")
    client, server = both(trace, n + 1)
    for recs in (client, server):
        ok = [r for r in recs if not r.status_code and r.collection == "d.kv"]
        assert len(ok) == n, recs
        assert {(r.query_text, r.returned_rows) for r in ok} == {("SELECT v FROM d.kv WHERE k = ?", 1)}
        assert [(r.collection, r.status_code) for r in recs if r.status_code] == [("d.nope", "1146")]
    c = trace.pipe.counters()
    assert c["state_misses"] == c["invalid_frames"] == 0, c
    no_secret(trace)


# ---- TLS through the OpenSSL uprobes ---------------------------------------------------------


def tls_files(top: Path, owner: str) -> tuple[Path, Path]:
    """A self-signed certificate and key readable only by the server's user (PostgreSQL insists)."""
    self_signed_cert(top)
    cert, key = top / "cert.pem", top / "key.pem"
    subprocess.run(["chown", f"{owner}:", str(cert), str(key)], check=True)
    key.chmod(0o600)
    return cert, key


def test_postgres_over_tls(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    """psql sslmode=require: SSLRequest answered S, the statements inside TLS come from the OpenSSL
    probes at both ends (libpq and the server), flagged tls, with their errors; no secret anywhere."""
    with private_copy(pg_data(), "postgres") as top:
        cert, key = tls_files(top, "postgres")
        start_postgres(topo, top, "-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}")
        trace = tracing(tls=True)
        script = f"SELECT bid FROM pgbench_branches WHERE bid = 1 AND '{SECRET}' <> '';\nSELECT * FROM nope;\n"
        out = psql(topo, script + "SHOW ssl;\n", sslmode="require")
        require("on" in out.split() and "nope" in out, f"psql over TLS: {out}")
        client, server = both(trace, 3)
    for recs in (client, server):
        assert [(r.collection, r.status_code) for r in recs] == [("pgbench_branches", ""), ("nope", "42P01"),
                                                                 ("", "")], recs  # fmt: skip
    tls = [e for e in trace.events if isinstance(e.record, DbRecord)]
    assert all(e.conn.tls and e.conn.protocol == "postgresql" for e in tls)
    no_secret(trace)


def test_mariadb_over_tls(topo: Topology, tracing: Callable[..., L7Trace]) -> None:
    """The mariadb client with --ssl: the SSL request ends the cleartext, the statements inside TLS are
    recognised from their first command (port 3306) and parsed at both ends; no secret anywhere."""
    with private_copy(mariadb_data(), "mysql") as top:
        cert, key = tls_files(top, "mysql")
        start_mariadb(topo, top, f"--ssl-cert={cert}", f"--ssl-key={key}")
        trace = tracing(tls=True)
        proc = subprocess.run(
            topo.cli.cmd(*mariadb_cmd("--ssl", "--ssl-verify-server-cert=0", "--force", "-N", "-B")),
            input=f"SELECT '{SECRET}';\nSELECT * FROM mysql.nope;\nSHOW STATUS LIKE 'Ssl_version';\n",
            text=True, capture_output=True, timeout=60,
        )  # fmt: skip
        require("TLSv1.3" in proc.stdout and "1146" in proc.stderr, f"mariadb over TLS: {proc.stdout} {proc.stderr}")
        client, server = both(trace, 3)
    for recs in (client, server):
        assert [(r.operation, r.status_code) for r in recs] == [("SELECT", ""), ("SELECT", "1146"), ("SHOW", "")]
    assert all(e.conn.tls for e in trace.events if isinstance(e.record, DbRecord))
    no_secret(trace)


LONG_LIVED_CLIENT = """
import sys
import mysql.connector
conn = mysql.connector.connect(host=sys.argv[1], port=int(sys.argv[2]), user="root", use_pure=True)
cur = conn.cursor()
cur.execute("SELECT 1")
cur.fetchall()
print("ready", flush=True)
sys.stdin.readline()
for i in range(4):
    cur.execute("SELECT v FROM d.kv WHERE k = %s", (sys.argv[3] + str(i % 3),))
    cur.fetchall()
try:
    cur.execute("SELECT * FROM d.nope")
except mysql.connector.Error as e:
    print("error", e.errno, flush=True)
conn.close()
print("done", flush=True)
"""


def test_mariadb_connection_older_than_the_agent(
    topo: Topology, mariadb: Path, tracing: Callable[..., L7Trace]
) -> None:
    """A client connected (handshake, first query) before the probe loads: recognised on port 3306 from
    its next COM_QUERY (the tie-breaker), the classic EOF assumed; exactly its later statements at both
    ends, rows counted, the error with its code."""
    require("ERROR" not in mariadb_run(topo, SETUP), "setup")
    proc = topo.spawn(topo.cli, sys.executable, "-c", LONG_LIVED_CLIENT, SRV_V4, str(MY_PORT), SECRET,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    require(proc.stdout.readline().strip() == b"ready", "client connected")
    trace = tracing()
    proc.stdin.write(b"go\n")
    require(proc.stdout.readline().split() == [b"error", b"1146"], "client ran")
    client, server = both(trace, 5, timeout=15, system="mysql")
    # The connector's own commands come first (COM_PING, SELECT @@session.sql_mode): the client
    # recognises the connection from its COM_PING; the server, which reads a packet's header and
    # payload apart, from the answer to it (so it misses that one command, and counts its answer).
    assert [(r.operation, r.query_text) for r in client[:2]] == [("PING", ""), ("SELECT", "SELECT @@session.sql_mode")]
    assert [r.query_text for r in server[:1]] == ["SELECT @@session.sql_mode"]
    for recs in (client, server):
        assert [(r.collection, r.returned_rows, r.status_code) for r in recs if r.collection] == [
            ("d.kv", 1, "")] * 4 + [("d.nope", 0, "1146")]  # fmt: skip
    assert trace.pipe.counters()["orphan_responses"] == 1
