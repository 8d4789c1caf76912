"""Real PostgreSQL and MariaDB servers for the L7 tests, in a test's server namespace.

The data directories are made once (initdb + ``pgbench -i``; mariadb-install-db) and cached under
``build/testcache`` behind a stamp naming the server version, then copied per test, so a test
starts a server in about a second. Each server runs as its own system user, listens on the server
namespace's address only, and is killed with the namespace's processes by ``Topology.close``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.e2e.netns import SRV_V4, Topology, run

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_PORT, MY_PORT = 5432, 3306
CACHE = Path(__file__).resolve().parents[2] / "build" / "testcache"
PGBENCH_SCALE = 1
RECIPE = "2"


def _version(*cmd: str) -> str:
    return run(list(cmd)).stdout.strip().replace(" ", "_").replace("/", "_")


def _cached(name: str, stamp: str, make: Callable[[Path], None]) -> Path:
    """``CACHE/name``, made by ``make(dir)`` unless its stamp says it was made for ``stamp``."""
    target = CACHE / name
    stamp_file = CACHE / f"{name}.stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp and target.is_dir():
        return target
    shutil.rmtree(target, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"ks-{name}-", dir="/tmp"))
    try:
        make(work)
        shutil.copytree(work, target, symlinks=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stamp_file.write_text(stamp)
    return target


@contextlib.contextmanager
def private_copy(src: Path, owner: str) -> Iterator[Path]:
    """A copy of a cached data directory in /tmp, owned by ``owner`` (pytest's tmp_path is root-only)."""
    top = Path(tempfile.mkdtemp(prefix="ks-db-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        data = top / "data"
        shutil.copytree(src, data, symlinks=True)
        run(["chown", "-R", f"{owner}:", str(top)])
        os.chmod(data, 0o700)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _as(user: str, *cmd: str) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd]


# ---- PostgreSQL ------------------------------------------------------------------------------


def _make_pg(work: Path) -> None:
    run(["chown", "postgres:", str(work)])
    os.chmod(work, 0o700)
    run(_as("postgres", str(PG_BIN / "initdb"), "-D", str(work), "-A", "trust", "-U", "postgres", "--no-sync"),
        timeout=120)  # fmt: skip
    with (work / "pg_hba.conf").open("a") as hba:
        hba.write("host all all 198.18.0.0/15 trust\n")  # the test namespaces' addresses, TLS or not
    sock = Path(tempfile.mkdtemp(prefix="ks-pgsock-", dir="/tmp"))
    run(["chown", "postgres:", str(sock)])
    proc = subprocess.Popen(
        _as(
            "postgres",
            str(PG_BIN / "postgres"),
            "-D",
            str(work),
            "-k",
            str(sock),
            "-c",
            "listen_addresses=",
            "-c",
            "fsync=off",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while run(["pg_isready", "-h", str(sock)], check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("postgres did not start")
            time.sleep(0.1)
        run(_as("postgres", "pgbench", "-h", str(sock), "-U", "postgres", "-i", "-s", str(PGBENCH_SCALE), "-q",
                "postgres"), timeout=120)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(sock, ignore_errors=True)


def pg_data() -> Path:
    # the stamp names the server and this recipe's version: change RECIPE when _make_pg changes
    return _cached(f"pgdata-s{PGBENCH_SCALE}", f"{RECIPE} {_version(str(PG_BIN / 'postgres'), '--version')}", _make_pg)


def start_postgres(topo: Topology, top: Path, *extra: str) -> None:
    """postgres in the server namespace on SRV_V4:5432, from the private copy at ``top`` (``private_copy``)."""
    sock = top / "sock"
    sock.mkdir(exist_ok=True)
    run(["chown", "postgres:", str(sock)])
    topo.spawn(
        topo.srv,
        *_as(
            "postgres",
            str(PG_BIN / "postgres"),
            "-D",
            str(top / "data"),
            "-k",
            str(sock),
            "-c",
            f"listen_addresses={SRV_V4}",
            "-p",
            str(PG_PORT),
            "-c",
            "fsync=off",
            *extra,
        ),
    )
    topo.wait_listening(topo.srv, PG_PORT, timeout=30)


def pg_env(sslmode: str = "disable") -> dict[str, str]:
    return {**os.environ, "PGHOST": SRV_V4, "PGPORT": str(PG_PORT), "PGUSER": "postgres", "PGDATABASE": "postgres",
            "PGSSLMODE": sslmode, "PGCONNECT_TIMEOUT": "10"}  # fmt: skip


# ---- MariaDB ---------------------------------------------------------------------------------


def _make_mariadb(work: Path) -> None:
    os.chmod(work, 0o755)
    run(["chown", "mysql:", str(work)])
    run(["mariadb-install-db", f"--datadir={work}", "--user=mysql", "--auth-root-authentication-method=normal",
         "--skip-test-db"], timeout=180)  # fmt: skip


def mariadb_data() -> Path:
    return _cached("mariadb", f"{RECIPE} {_version('mariadbd', '--version')}", _make_mariadb)


def start_mariadb(topo: Topology, top: Path, *extra: str) -> None:
    """mariadbd in the server namespace on SRV_V4:3306, no grant tables (any user, no password)."""
    topo.spawn(
        topo.srv,
        "mariadbd", "--no-defaults", f"--datadir={top / 'data'}", "--user=mysql", f"--socket={top / 'sock'}",
        f"--bind-address={SRV_V4}", f"--port={MY_PORT}", "--skip-grant-tables", "--skip-name-resolve",
        f"--pid-file={top / 'pid'}", "--innodb-buffer-pool-size=16M", "--skip-log-bin", *extra,
    )  # fmt: skip
    topo.wait_listening(topo.srv, MY_PORT, timeout=60)


def mariadb_cmd(*args: str) -> list[str]:
    return ["mariadb", "--no-defaults", "-h", SRV_V4, "-P", str(MY_PORT), "-u", "root", *args]
