"""`kscope run` from the outside, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from google.protobuf import json_format

from kscope.v1 import flow_pb2 as pb
from kscope_common.cli import EXIT_ENVIRONMENT, EXIT_USAGE

REPO = Path(__file__).resolve().parents[2]
KSCOPE = str(REPO / ".venv" / "bin" / "kscope")


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KSCOPE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _records(path: Path) -> list[pb.NodeRecord]:
    out = []
    for line in path.read_text().splitlines():
        out.append(json_format.Parse(line, pb.NodeRecord()))
    return out


def _clear_error(proc: subprocess.CompletedProcess[str], needle: str, code: int = EXIT_USAGE) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr


def _environment_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    """Exit 3, not argparse's 2, and the reason on the one line the CLI prints."""
    _clear_error(proc, needle, EXIT_ENVIRONMENT)
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("kscope: error:")]
    assert needle in line


def test_missing_object_dir_is_an_environment_error(tmp_path: Path) -> None:
    _environment_error(_run("run", "--no-live", "--duration", "1", "--bpf-dir", str(tmp_path)), "does not exist")


def test_no_btf_is_an_environment_error() -> None:
    env = dict(os.environ, KSCOPE_VMLINUX_BTF="/nonexistent/vmlinux")
    _environment_error(_run("run", "--no-live", "--duration", "1", env=env), "kernel BTF not found")


def test_not_root_is_an_environment_error() -> None:
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         KSCOPE, "run", "--no-live", "--duration", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    _environment_error(proc, "kscope needs root")


def test_root_without_cap_net_admin_is_an_environment_error_naming_it() -> None:
    """Root, but one capability the probes need dropped from every set: the agent names that one."""
    proc = subprocess.run(
        ["capsh", "--drop=cap_net_admin", "--", "-c", f"{KSCOPE} run --no-live --duration 1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    _environment_error(proc, "missing capability CAP_NET_ADMIN (running as uid 0)")


@pytest.mark.bpf
def test_metrics_port_in_use_is_an_environment_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run("run", "--no-live", "--duration", "5", "--metrics-port", str(port))
    _environment_error(proc, f"cannot serve self-metrics on 127.0.0.1:{port}")


def test_metrics_served_on_the_address_asked() -> None:
    """The chart passes the pod's IP (the node's, with hostNetwork): kubelet's probes and Prometheus
    reach it there, not on loopback. 127.0.0.2 is local on Linux but not 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            KSCOPE,
            "run",
            "--no-live",
            "--no-l7",
            "--duration",
            "120",
            "--metrics-port",
            str(port),
            "--metrics-addr",
            "127.0.0.2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90  # loading the probes takes seconds on a busy machine
        while True:
            try:
                with socket.create_connection(("127.0.0.2", port), timeout=1) as conn:
                    conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    body = b"".join(iter(lambda: conn.recv(65536), b""))
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
                time.sleep(0.2)
        assert b"kscope_capability_enabled" in body
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_bad_interval_is_a_clear_error() -> None:
    _clear_error(_run("run", "--no-live", "--interval", "0"), "--interval must be > 0")


def _exchange(port_holder: list[int], started: threading.Event, up: int, down: int) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port_holder.append(srv.getsockname()[1])
        started.wait(30)
        with socket.create_connection(srv.getsockname()) as cli:
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"u" * up)
                got = 0
                while got < up:
                    got += len(conn.recv(1 << 16))
                conn.sendall(b"d" * down)
            got = 0
            while chunk := cli.recv(1 << 16):
                got += len(chunk)


@pytest.mark.bpf
def test_run_writes_jsonl_records_with_exact_bytes(tmp_path: Path) -> None:
    out = tmp_path / "flows.jsonl"
    proc = subprocess.Popen([KSCOPE, "run", "--no-live", "--duration", "4", "--interval", "0.5", "--jsonl", str(out)],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # traffic only once the probes are attached
        if "agent_started" in line:
            break
    ports: list[int] = []
    started = threading.Event()
    t = threading.Thread(target=_exchange, args=(ports, started, 123_457, 65_432))
    t.start()
    started.set()
    t.join(30)
    assert proc.wait(timeout=60) == 0
    records = _records(out)
    assert records[-1].WhichOneof("record") == "stats"
    port = ports[0]
    flows = [r.l4 for r in records if r.WhichOneof("record") == "l4" and port in (r.l4.local_port, r.l4.remote_port)]
    client = [f for f in flows if f.role == pb.ROLE_CLIENT and f.remote_port == port]
    server = [f for f in flows if f.role == pb.ROLE_SERVER and f.local_port == port]
    assert client and server
    assert client[-1].kind == pb.RECORD_KIND_CLOSE
    assert client[-1].total.bytes_sent == 123_457 and client[-1].total.bytes_received == 65_432
    assert server[-1].total.bytes_received == 123_457 and server[-1].total.bytes_sent == 65_432
    assert sum(f.delta.bytes_sent for f in client) == 123_457
    assert client[-1].connect_status == pb.CONNECT_STATUS_OK
    assert client[-1].process.pid == os.getpid()
    assert json.loads(out.read_text().splitlines()[0])  # plain JSON per line


def _bpf_prog_ids_of(pid: int) -> set[int]:
    ids: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if "link_type:" in info:
            ids.update(int(line.split()[1]) for line in info.splitlines() if line.startswith("prog_id:"))
    return ids


@pytest.mark.bpf
def test_sigterm_detaches_and_exits_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "flows.jsonl"
    proc = subprocess.Popen([KSCOPE, "run", "--no-live", "--jsonl", str(out)], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "agent_started" in line:
            break
    prog_ids = _bpf_prog_ids_of(proc.pid)
    assert len(prog_ids) >= 5  # the L4 programs, held through link fds
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    time.sleep(0.2)
    for prog_id in prog_ids:
        show = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
        assert show.returncode != 0, f"program {prog_id} still loaded after exit"
    assert _records(out)[-1].WhichOneof("record") == "stats"


def test_capture_bytes_out_of_range_is_a_clear_error() -> None:
    _clear_error(_run("run", "--no-live", "--l7", "--capture-bytes", "5000"), "--capture-bytes must be 1..4096")


def test_nice_out_of_range_is_a_clear_error() -> None:
    _clear_error(_run("run", "--no-live", "--nice", "20"), "--nice must be 0..19")


def _thread_nice(pid: int) -> dict[int, int]:
    """Every thread's nice value (field 19 of /proc/PID/task/TID/stat, after the comm's ')')."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            out[int(tid)] = int(fh.read().rsplit(")", 1)[1].split()[16])
    return out


@pytest.mark.bpf
@pytest.mark.parametrize(("args", "expected"), [((), 10), (("--nice", "0"), 0), (("--nice", "19"), 19)])
def test_every_agent_thread_runs_at_the_asked_nice_value(args: tuple[str, ...], expected: int) -> None:
    """The agent's threads (the shipper's, the metrics server's) inherit the lowered priority."""
    proc = subprocess.Popen(
        [KSCOPE, "run", "--no-live", "--metrics-port", "0", "--processor", "127.0.0.1:9", *args],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "agent_started" in line:
                break
        nice = _thread_nice(proc.pid)
        assert len(nice) >= 2, "the shipper runs a thread of its own"
        assert set(nice.values()) == {expected}, nice
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.bpf
def test_without_cap_sys_admin_other_namespaces_are_skipped_counted_and_said_once(tmp_path: Path) -> None:
    """setns() into another network namespace needs CAP_SYS_ADMIN: without it the agent still runs
    (its own namespace walked), says so in one warning line, and counts every namespace skipped."""
    name = f"ks-cap-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    # news in that namespace every interval (refused connects on its loopback): the sweep is due there
    loop = "ip link set lo up; while :; do curl -s http://127.0.0.1:9/; sleep 0.2; done"
    busy = subprocess.Popen(["ip", "netns", "exec", name, "sh", "-c", loop])
    try:
        out = tmp_path / "flows.jsonl"
        proc = subprocess.run(
            ["capsh", "--drop=cap_sys_admin", "--", "-c",
             f"{KSCOPE} run --no-live --duration 2.5 --jsonl {out}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        busy.kill()
        busy.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count('"event": "netns_enter_failed"') == 1, proc.stderr
    counters = _records(out)[-1].stats.counters
    assert counters["netns_enter_failed"] >= 2  # every sweep skipped it again, counted each time
    assert counters["periodic_records"] >= 0


def test_non_positive_sweep_interval_is_a_clear_error() -> None:
    _clear_error(_run("run", "--no-live", "--sweep-interval", "0"), "--sweep-interval must be > 0")


def test_negative_record_rate_is_a_clear_error() -> None:
    _clear_error(_run("run", "--no-live", "--l7", "--l7-record-rate", "-5"), "--l7-record-rate must be >= 0")
