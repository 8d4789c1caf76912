"""What the nginx benchmarks share: one pinned nginx `return 200` worker, wrk on the
other core, CPU time from /proc. Imported as `common` by the scripts next to it (a
script's own directory is first on sys.path when run as `.venv/bin/python bench/X.py`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")

_NGINX_CONF = """
worker_processes 1;{worker}
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log{log_level};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    keepalive_requests 10000000;{keepalive}
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {listen} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_conf(tmp: Path, listen: str, *, pinned: bool = True, connections: int = 4096,
               keepalive_timeout: str = "", log_level: str = "") -> str:  # fmt: skip
    """The benches' nginx: one worker answering ``return 200`` on ``listen`` (``ip:port``); ``pinned``:
    to core 0 (the benches run their load on core 1); more ``connections`` raise its file limit too."""
    worker = "\nworker_cpu_affinity 01;" if pinned else ""
    if connections > 4096:
        worker += f"\nworker_rlimit_nofile {connections + 4000};"
    return _NGINX_CONF.format(
        tmp=tmp, listen=listen, worker=worker, connections=connections,
        keepalive=f"\n    keepalive_timeout {keepalive_timeout};" if keepalive_timeout else "",
        log_level=f" {log_level}" if log_level else "",
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def db_operations(lines: list[str]) -> int:
    """Database operations in an agent's JSON lines (``NodeRecord``s): a record is one, a summary its count."""
    n = 0
    for line in lines:
        if '"db"' in line:
            n += int(json.loads(line)["l7"]["summary"]["count"]) if '"summary"' in line else 1
    return n


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (utime, stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wrk_requests(port: int, seconds: int, connections: int, close: bool = False, script: Path | None = None) -> int:
    """Requests one wrk thread on core 1 completes in `seconds` (keep-alive unless `close`; `script`:
    a wrk Lua script that makes the requests)."""
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    return int(m.group(1))


@contextmanager
def nginx(tmp: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """nginx from nginx_conf() in `tmp` on loopback, given a second to start; stopped gracefully on exit."""
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, f"127.0.0.1:{port}"))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)])
    try:
        time.sleep(1.0)
        yield proc
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=10)


def missing_prerequisite(tools: Iterable[str], why_root: str = "the agent loads BPF programs") -> str:
    """Why a bench cannot run here (not root, a program it drives not installed), or "" if it can."""
    if os.geteuid() != 0:
        return f"needs root ({why_root})"
    for tool in tools:
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} not found (make setup installs it)"
    return ""
