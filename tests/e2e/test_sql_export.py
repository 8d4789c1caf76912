"""PostgreSQL operations from the agent to OTLP: ``kscope run --l7`` (JSON lines and the processor) on
the server namespace, the real processor (a test APIServer, the test OTLP receiver) behind it. What
leaves is the OTel database metric and spans of exactly what psql did; a secret in the password (a
cleartext PasswordMessage), in literals, in rows and in an error message appears nowhere: not in
the JSON lines, not in any OTLP request."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from google.protobuf import json_format

from cluster_processor import main as m
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main import latest, spans
from tests.e2e.agentproc import KSCOPE
from tests.e2e.netns import Topology
from tests.e2e.sqlpeers import pg_data, pg_env, private_copy, start_postgres
from tests.e2e.test_cluster import NODE, processor_config

pytestmark = pytest.mark.bpf
SECRET = "s3cr3tMARK"
PASSWORD = f"pw-{SECRET}"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # gRPC and aiohttp trust proxy variables: 127.0.0.1 must go direct
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "grpc_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield
    structlog.reset_defaults()


@contextlib.asynccontextmanager
async def processor(tmp_path: Path) -> AsyncIterator[tuple[OtlpReceiver, m.Processor]]:
    server = FakeApiServer()  # no pods: both ends are named by address
    await server.start()
    try:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        async with OtlpReceiver() as rx, m.Processor(processor_config(kubeconfig, rx.endpoint)) as proc:
            assert proc.watcher is not None and await proc.watcher.wait_synced(5)
            yield rx, proc
    finally:
        await server.close()


def psql_as_app(topo: Topology, script: str) -> str:
    env = {**pg_env(), "PGUSER": "app", "PGPASSWORD": PASSWORD}
    proc = subprocess.run(topo.cli.cmd("psql", "-X", "-At", "-v", "ON_ERROR_STOP=0"), input=script, text=True,
                          env=env, capture_output=True, timeout=60)  # fmt: skip
    return proc.stdout + proc.stderr


def test_postgres_operations_reach_otlp_without_secrets(topo: Topology, tmp_path: Path) -> None:
    with private_copy(pg_data(), "postgres") as top:
        hba = top / "data" / "pg_hba.conf"
        hba.write_text("host all app 198.18.0.0/15 password\n" + hba.read_text())  # first match: cleartext
        start_postgres(topo, top)
        setup = f"CREATE ROLE app LOGIN PASSWORD '{PASSWORD}';\nGRANT SELECT ON pgbench_branches TO app;\n"
        subprocess.run(topo.cli.cmd("psql", "-X", "-q"), input=setup, text=True, env=pg_env(), check=True,
                       timeout=60)  # fmt: skip
        out = tmp_path / "flows.jsonl"
        script = (
            "".join(f"SELECT bid FROM pgbench_branches WHERE bid = 1 AND '{SECRET}{i}' <> '';\n" for i in range(5))
            + f"SELECT '{SECRET}'::int;\n" * 2
        )

        async def body() -> tuple[OtlpReceiver, str]:
            async with processor(tmp_path) as (rx, proc):
                agent = subprocess.Popen(
                    [KSCOPE, "run", "--no-live", "--l7", "--processor", f"127.0.0.1:{proc.ingest.port}",
                     "--interval", "0.5", "--duration", "5", "--node-name", NODE, "--netns-inode",
                     str(topo.srv.ino), "--jsonl", str(out)],
                    stderr=subprocess.PIPE, text=True, env=dict(os.environ),
                )  # fmt: skip
                topo.procs.append(agent)
                assert agent.stderr is not None
                seen = []
                for line in agent.stderr:
                    seen.append(line)
                    if "agent_started" in line:
                        break
                said = await asyncio.to_thread(psql_as_app, topo, script)
                assert "invalid input syntax" in said and said.count("1\n") == 5, said
                _, rest = await asyncio.to_thread(agent.communicate, None, 60)
                assert agent.returncode == 0, "".join(seen) + rest
                name = "kscope.db.server.operation.duration"
                deadline = asyncio.get_running_loop().time() + 15
                while latest(rx, name, **{"db.collection.name": "pgbench_branches"}) < 5 or len(spans(rx)) < 7:
                    assert asyncio.get_running_loop().time() < deadline, "no db metrics/spans at OTLP"
                    await asyncio.sleep(0.1)
                return rx, "".join(seen) + rest

        rx, stderr = asyncio.run(asyncio.wait_for(body(), 90))
    assert "Traceback" not in stderr
    records = [json_format.Parse(line, pb.NodeRecord()) for line in out.read_text().splitlines()]
    dbs = [r.l7 for r in records if r.WhichOneof("record") == "l7" and r.l7.WhichOneof("detail") == "db"]
    assert sorted((d.db.query_summary, d.db.status_code) for d in dbs) == [("SELECT", "22P02")] * 2 + [
        ("SELECT pgbench_branches", "")] * 5  # fmt: skip
    assert {(d.protocol, d.side, d.db.system) for d in dbs} == {("postgresql", pb.ROLE_SERVER, "postgresql")}
    name = "kscope.db.server.operation.duration"
    assert latest(rx, name, **{"db.collection.name": "pgbench_branches", "db.operation.name": "SELECT"}) == 5
    assert latest(rx, name, **{"error.type": "22P02", "db.response.status_code": "22P02"}) == 2
    assert sorted(s.name for _, s in spans(rx)) == ["SELECT"] * 2 + ["SELECT pgbench_branches"] * 5
    assert SECRET not in out.read_text()
    for signal, reqs in rx.received.items():
        for req in reqs:
            assert SECRET.encode() not in req.SerializeToString(), signal
