"""The processor end to end, in process: a test APIServer (pods a-1 of Deployment A and b-1 of Deployment
B through their ReplicaSets, Service b with a ClusterIP), a test OTLP receiver, the processor's real
components started against them, and a real gRPC client sending FlowBatches as the agent does. Plus
the command line: the chart's rendered args and env parse, user errors exit 2, environment errors 3 (run
as a subprocess), SIGTERM stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from cluster_processor import main as m
from cluster_processor.ingest import IngestConfig
from cluster_processor.kube.watcher import WatchSettings
from cluster_processor.otlp.exporter import ExporterSettings, RetryPolicy, Signal
from kscope.v1 import flow_pb2 as pb
from kscope.v1 import flow_pb2_grpc
from kscope_common.cli import EXIT_ENVIRONMENT, EXIT_USAGE
from tests.cluster_processor.ingest.harness import Certs, make_certs
from tests.cluster_processor.kube import factories as f
from tests.cluster_processor.kube.fake_apiserver import FakeApiServer
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.helpers import eventually_async as eventually

REPO = Path(__file__).resolve().parents[2]
A_IP, B_IP, VIP = "10.1.0.5", "10.1.1.7", "10.96.0.20"
MS = 1_000_000
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FAST_WATCH = WatchSettings(watch_timeout_s=30, backoff_initial_s=0.02, backoff_max_s=0.2, expire_interval_s=0.05)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # aiohttp (kubernetes_asyncio) and gRPC both trust proxy variables: 127.0.0.1 must go direct.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "grpc_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    # main() configures structlog for the process; later tests get the library defaults back.
    yield
    structlog.reset_defaults()


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


# ---- the cluster --------------------------------------------------------------------------------


def populate(server: FakeApiServer) -> None:
    for name in ("a", "b"):
        server.put("Deployment", f.workload(name, uid=f"dep-{name}"))
        rs = f.workload(f"{name}-5d8f7c9b6d", uid=f"rs-{name}", owners=[f.owner("Deployment", name, f"dep-{name}")])
        server.put("ReplicaSet", rs)
    owners = {n: [f.owner("ReplicaSet", f"{n}-5d8f7c9b6d", f"rs-{n}")] for n in ("a", "b")}
    server.put("Pod", f.pod("a-5d8f7c9b6d-1", uid="uid-a1", ip=A_IP, node="node-1", owners=owners["a"]))
    server.put("Pod", f.pod("b-5d8f7c9b6d-1", uid="uid-b1", ip=B_IP, node="node-2", owners=owners["b"]))
    server.put("Service", f.service("b", cluster_ips=[VIP]))
    server.put("Node", f.node("node-1", internal="192.168.1.10"))
    server.put("Node", f.node("node-2", internal="192.168.1.11"))


def client_batch(cookie: int = 7, t: int | None = None) -> pb.FlowBatch:
    """node-1: pod a-1 connected to the VIP; conntrack says b-1 answered; one HTTP request seen."""
    t = t or time.time_ns()
    flow = pb.L4Flow(
        socket_cookie=cookie,
        netns_inode=4026532000,
        role=pb.ROLE_CLIENT,
        kind=pb.RECORD_KIND_CLOSE,
        local_ip=A_IP,
        local_port=40000 + cookie,
        remote_ip=VIP,
        remote_port=80,
        ip_family=4,
        process=pb.ProcessIdentity(pid=100, comm="curl", container_id=f.cid(1), pod_uid="uid-a1"),
        time_unix_nano=t,
        connect_status=pb.CONNECT_STATUS_OK,
        connect_latency_ns=MS,
        delta=pb.L4Counters(bytes_sent=120, bytes_received=450),
        srtt_us=300,
        nat_remote_ip=B_IP,
        nat_remote_port=8080,
    )
    req = pb.L7Request(
        socket_cookie=cookie,
        netns_inode=4026532000,
        side=pb.ROLE_CLIENT,
        protocol="http1",
        local_ip=A_IP,
        local_port=40000 + cookie,
        remote_ip=VIP,
        remote_port=80,
        ip_family=4,
        process=pb.ProcessIdentity(pid=100, pod_uid="uid-a1"),
        start_time_unix_nano=t - 5 * MS,
        latency_ns=4 * MS,
        request_bytes=120,
        response_bytes=450,
        http=pb.HttpInfo(method="GET", path="/items/42", route="/items/{id}", status_code=200, traceparent=TRACEPARENT),
    )
    return pb.FlowBatch(schema_version=1, node_name="node-1", time_unix_nano=t, l4=[flow], l7=[req])


def server_batch(cookie: int = 9, t: int | None = None) -> pb.FlowBatch:
    """node-2: b-1 accepted from a-1 and answered the same request."""
    t = t or time.time_ns()
    req = pb.L7Request(
        socket_cookie=cookie,
        netns_inode=4026532001,
        side=pb.ROLE_SERVER,
        protocol="http1",
        local_ip=B_IP,
        local_port=8080,
        remote_ip=A_IP,
        remote_port=40007,
        ip_family=4,
        process=pb.ProcessIdentity(pid=200, pod_uid="uid-b1"),
        start_time_unix_nano=t - 4 * MS,
        latency_ns=3 * MS,
        http=pb.HttpInfo(method="GET", path="/items/42", route="/items/{id}", status_code=200, traceparent=TRACEPARENT),
    )
    return pb.FlowBatch(schema_version=1, node_name="node-2", time_unix_nano=t, l7=[req])


async def send(port: int, *batches: pb.FlowBatch, creds: grpc.ChannelCredentials | None = None) -> None:
    """As the agent ships: unary ExportFlows over gRPC, gzip, with a deadline."""
    target = f"127.0.0.1:{port}"
    gz = grpc.Compression.Gzip
    channel = (
        grpc.aio.secure_channel(target, creds, compression=gz)
        if creds is not None
        else grpc.aio.insecure_channel(target, compression=gz)
    )
    async with channel:
        stub = flow_pb2_grpc.FlowIngestStub(channel)
        for b in batches:
            resp = await stub.ExportFlows(b, timeout=5)
            assert resp.rejected == 0, resp.error_message


# ---- reading what the receiver got ----------------------------------------------------------------


def _kv(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        which = item.value.WhichOneof("value")
        out[item.key] = getattr(item.value, which) if which else None
    return out


def points(rx: OtlpReceiver, name: str) -> Iterator[tuple[dict[str, Any], dict[str, Any], float]]:
    """(resource, attributes, value or histogram count) of every data point of metric ``name``."""
    for req in rx.received["metrics"]:
        for rm in req.resource_metrics:
            res = _kv(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != name:
                        continue
                    data = getattr(metric, metric.WhichOneof("data"))
                    for dp in data.data_points:
                        value = dp.count if metric.WhichOneof("data") == "histogram" else (dp.as_int or dp.as_double)
                        yield res, _kv(dp.attributes), value


def latest(rx: OtlpReceiver, name: str, resource: dict[str, Any] | None = None, /, **want: Any) -> float:
    """The largest (cumulative: latest) value of the points of ``name`` whose attributes include ``want``
    and whose resource includes ``resource``."""
    res_want = resource or {}
    values = [
        v
        for r, a, v in points(rx, name)
        if all(a.get(k) == w for k, w in want.items()) and all(r.get(k) == w for k, w in res_want.items())
    ]
    return max(values, default=0)


def spans(rx: OtlpReceiver) -> list[tuple[dict[str, Any], Any]]:
    return [
        (_kv(rs.resource.attributes), span)
        for req in rx.received["traces"]
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]


# ---- the processor under test ---------------------------------------------------------------------


def config(kubeconfig: Path, otlp_endpoint: str, **kw: Any) -> m.ProcessorConfig:
    otlp = ExporterSettings(
        otlp_endpoint,
        timeout_s=0.5,
        max_elapsed_s=kw.pop("max_elapsed_s", 5.0),
        retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2),
        reconnect_backoff_max_s=0.1,
    )
    base: dict[str, Any] = {
        "ingest": IngestConfig(listen="127.0.0.1:0", drain_timeout_s=1.0),
        "otlp": otlp,
        "kubeconfig": str(kubeconfig),
        "interval_s": 0.2,
        "metrics_port": 0,
        "metrics_addr": "127.0.0.1",
        "replica": "kscope-processor-0",
        "watch": FAST_WATCH,
        "shutdown_timeout_s": 1.0,
    }
    return m.ProcessorConfig(**(base | kw))


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, *, apiserver_up: bool = True) -> AsyncIterator[tuple[FakeApiServer, Path]]:
    server = FakeApiServer()
    if apiserver_up:
        await server.start()
        populate(server)
    else:
        server.reserve()
    try:
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")
    finally:
        await server.close()


def test_vip_call_becomes_a_to_b_metrics_graph_and_spans(tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            cluster(tmp_path) as (_, kubeconfig),
            OtlpReceiver() as rx,
            m.Processor(config(kubeconfig, rx.endpoint)) as proc,
        ):
            assert proc.watcher is not None and await proc.watcher.wait_synced(5)
            with_stats = client_batch()
            with_stats.stats.counters.update({"ring_lost": 7, "kernel_close_lost": 0})
            await send(proc.ingest.port, with_stats, server_batch())
            sg = "traces_service_graph_request_total"
            await eventually(lambda: latest(rx, sg, client="a", server="b") == 1, "service graph a -> b")
            await eventually(lambda: len(spans(rx)) == 2, "two spans")
            # The server side, named from b-1's own view, with a as its peer; never the VIP.
            # Each workload's series under its own resource, the peer in data-point attributes.
            assert latest(rx, "http.server.request.duration", {"service.name": "b"}, **{"service.peer.name": "a"}) == 1
            assert latest(rx, "http.client.request.duration", {"service.name": "a"}, **{"service.peer.name": "b"}) == 1
            assert latest(rx, "traces_service_graph_request_client_seconds", {"service.name": "kscope"}, client="a",
                          server="b") == 1  # fmt: skip
            assert latest(rx, "kscope.tcp.connections", {"k8s.deployment.name": "a"}) == 1
            assert latest(rx, "kscope.tcp.bytes", **{"network.io.direction": "receive"}) == 450
            assert not any(VIP in str(a) for _, a, _ in points(rx, "kscope.tcp.bytes"))
            # One writer per stream: each node's streams carry that node in the resource.
            nodes = {r["k8s.node.name"] for r, _, _ in points(rx, "http.server.request.duration")}
            assert nodes == {"node-2"}
            by_kind = {s.kind: (res, s) for res, s in spans(rx)}
            res, server_span = by_kind[2]  # SPAN_KIND_SERVER
            assert res["service.name"] == "b" and res["k8s.pod.name"] == "b-5d8f7c9b6d-1"
            assert server_span.trace_id.hex() == TRACEPARENT.split("-")[1]
            assert by_kind[3][0]["service.name"] == "a"  # SPAN_KIND_CLIENT
            # Self-metrics on the Prometheus endpoint.
            # The receiver holds the spans before the exporter has read its answer and counted them.
            exported = 'kscope_processor_otlp_items_total{outcome="exported",signal="traces"} 2.0'
            await eventually(lambda: exported in _scrape(proc.metrics_port), "the exporter counted 2 spans")
            text = await asyncio.to_thread(_scrape, proc.metrics_port)
            assert 'kscope_processor_ingest_total{counter="consumed_batches"} 2.0' in text
            assert 'kscope_processor_kube_index_size{table="pods"} 2.0' in text
            assert 'kscope_processor_kube_watch_total{counter="restarts",resource="Pod"}' in text
            assert 'kscope_processor_aggregator_total{counter="edges_overflowed"} 0.0' in text
            assert 'kscope_processor_otlp_items_total{outcome="exported",signal="traces"} 2.0' in text
            assert 'kscope_processor_agent_stats_dropped_total{reason="too_many_nodes"} 0.0' in text
            # The agents' own counters, re-exported under their node (the batches carried stats).
            await eventually(lambda: latest(rx, "kscope.agent.stat", **{"kscope.agent.stat.name": "ring_lost"}) == 7,
                             "agent self-metrics exported")  # fmt: skip
            agent_nodes = {r["k8s.node.name"] for r, _, _ in points(rx, "kscope.agent.stat")}
            assert agent_nodes == {"node-1"}

    run(body())


def _scrape(port: int) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_prometheus_endpoint_serves_what_otlp_exports(tmp_path: Path) -> None:
    """``--prometheus-port``: the same streams the OTLP receiver gets, Prometheus-named, each workload
    its own job, the service graph under kscope's, resources in target_info."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(_scrape(port)):
            for sample in fam.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out

    async def body() -> None:
        async with (
            cluster(tmp_path) as (_, kubeconfig),
            OtlpReceiver() as rx,
            m.Processor(config(kubeconfig, rx.endpoint, prometheus_port=0)) as proc,
        ):
            assert proc.watcher is not None and await proc.watcher.wait_synced(5)
            assert proc.prometheus_port not in (0, proc.metrics_port)
            await send(proc.ingest.port, client_batch(), server_batch())
            sg = "traces_service_graph_request_total"
            await eventually(lambda: latest(rx, sg, client="a", server="b") == 1, "service graph a -> b (OTLP)")
            got = await asyncio.to_thread(samples, proc.prometheus_port)
            (graph,) = got[sg]
            assert graph[1] == 1 and graph[0]["client"] == "a" and graph[0]["server"] == "b"
            assert graph[0]["job"] == "kscope" and graph[0]["instance"] == "kscope-processor-0/node-2"
            count = got["http_server_request_duration_seconds_count"]
            assert [(lb["job"], lb["service_peer_name"], v) for lb, v in count] == [("default/b", "a", 1)]
            client = got["http_client_request_duration_seconds_count"]
            assert [(lb["job"], lb["instance"], v) for lb, v in client] == [
                ("default/a", "kscope-processor-0/node-1", 1)
            ]
            received = [
                (lb["job"], v) for lb, v in got["kscope_tcp_bytes_total"] if lb["network_io_direction"] == "receive"
            ]
            assert received == [("default/a", 450)]
            info = {lb["job"]: lb for lb, _ in got["target_info"]}
            assert info["default/b"]["k8s_deployment_name"] == "b" and info["default/b"]["k8s_node_name"] == "node-2"
            assert "kscope_processor_ingest_total" not in got  # self-metrics stay on --metrics-port

    run(body())


def test_otlp_endpoint_down_then_up(tmp_path: Path) -> None:
    async def body() -> None:
        rx = OtlpReceiver()
        await rx.start()
        await rx.stop()  # the port is known and nothing listens: a collector that is down
        async with (
            cluster(tmp_path) as (_, kubeconfig),
            m.Processor(config(kubeconfig, rx.endpoint, max_elapsed_s=0.4)) as proc,
        ):
            assert proc.watcher is not None and await proc.watcher.wait_synced(5)
            await send(proc.ingest.port, server_batch())

            def dropped() -> int:
                return sum(s.dropped_retry_exhausted for s in proc.exporter.stats().values())

            await eventually(lambda: dropped() > 0, "drops counted while the collector is down")
            assert proc.ticks >= 1  # still ticking, no crash
            await rx.start()
            try:
                await send(proc.ingest.port, server_batch())
                sg = "traces_service_graph_request_total"
                # Cumulative: the total includes the request whose export was dropped.
                await eventually(lambda: latest(rx, sg, client="a", server="b") == 2, "data flows after")
                await eventually(lambda: len(spans(rx)) >= 1, "spans flow after")
                assert proc.exporter.stats()[Signal.METRICS].exported > 0
            finally:
                await rx.stop()

    run(body())


def test_apiserver_down_at_start_resolves_once_back(tmp_path: Path) -> None:
    async def body() -> None:
        async with (
            cluster(tmp_path, apiserver_up=False) as (server, kubeconfig),
            OtlpReceiver() as rx,
            m.Processor(config(kubeconfig, rx.endpoint)) as proc,
        ):
            assert proc.watcher is not None
            # Flows while the APIServer is away: accepted, resolved as well as possible (external).
            await send(proc.ingest.port, server_batch())
            await eventually(lambda: proc.aggregator.counters()["external_remote"] >= 1, "unresolved flow")
            await eventually(lambda: proc.watcher is not None and proc.watcher.stats()["Pod"].errors > 0, "retry")
            await server.start()
            populate(server)
            assert await proc.watcher.wait_synced(8)
            await send(proc.ingest.port, server_batch())
            sg = "traces_service_graph_request_total"
            await eventually(lambda: latest(rx, sg, client="a", server="b") == 1, "a -> b once the index is back")

    run(body())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_mtls_flags_serve_mtls_end_to_end(tmp_path: Path, certs: Certs) -> None:
    """The chart's TLS flags, parsed by the CLI, give an ingest that takes the agent's client
    certificate and refuses a client without one."""

    async def body() -> None:
        async with cluster(tmp_path) as (_, kubeconfig), OtlpReceiver() as rx:
            argv = [
                "--listen=127.0.0.1:0",
                f"--kubeconfig={kubeconfig}",
                f"--tls-ca={certs.ca}",
                f"--tls-cert={certs.server_cert}",
                f"--tls-key={certs.server_key}",
            ]
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{rx.endpoint}"}
            parsed = m.config_from_args(m._parser().parse_args(argv), env)
            cfg = config(kubeconfig, parsed.otlp.endpoint, ingest=parsed.ingest)
            async with m.Processor(cfg) as proc:
                assert proc.watcher is not None and await proc.watcher.wait_synced(5)
                ca, key, cert = certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes()
                await send(proc.ingest.port, server_batch(), creds=grpc.ssl_channel_credentials(ca, key, cert))
                with pytest.raises(grpc.aio.AioRpcError):
                    await send(proc.ingest.port, server_batch(), creds=grpc.ssl_channel_credentials(ca))
                sg = "traces_service_graph_request_total"
                await eventually(lambda: latest(rx, sg, client="a", server="b") == 1, "the mTLS batch, once")

    run(body())


# ---- the command line -------------------------------------------------------------------------------


def chart_container(values: dict[str, Any] | None) -> tuple[list[str], dict[str, str]]:
    """The processor's args and env as the chart renders them (secret references filled in)."""
    helm = pytest.importorskip("helm_python")
    from tests.charts.test_chart import CHART, container, only, render

    with helm.Chart.load(CHART) as chart:
        docs = render(chart, values)
    proc = container(only(docs, "Deployment"))
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"}
    env: dict[str, str] = {}
    for item in proc.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    assert proc["command"] == ["kscope-processor"]
    return list(proc["args"]), env


@pytest.mark.parametrize(
    ("values", "endpoint", "insecure", "mtls"),
    [
        (None, "otel-collector.observability.svc.cluster.local:4317", True, False),
        (
            {
                "tls": {"enabled": True, "secretName": "kscope-mtls"},
                "otlp": {"endpoint": "https://collector.example:4317", "insecure": False, "headers": {"x-t": "a b"}},
                "processor": {"extraArgs": ["--interval=5"]},
            },
            "collector.example:4317",
            False,
            True,
        ),
    ],
    ids=["defaults", "tls-headers-extra-args"],
)
def test_chart_args_and_env_parse(values: dict[str, Any] | None, endpoint: str, insecure: bool, mtls: bool) -> None:
    args, env = chart_container(values)
    env |= {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_IP": "10.1.0.7"}  # the latter from the downward API
    cfg = m.config_from_args(m._parser().parse_args(args), env)
    assert cfg.ingest.listen == "0.0.0.0:9440" and cfg.metrics_port == 9441
    assert (cfg.trace_listen, cfg.trace_self, cfg.trace.wait_s) == ("0.0.0.0:9442", "10.1.0.7:9442", 30)
    assert cfg.trace_peer_service.endswith("/kscope-processor")
    assert cfg.otlp.endpoint == endpoint and cfg.otlp_insecure is insecure
    assert (cfg.ingest.tls is not None and cfg.ingest.tls.client_ca_file is not None) is mtls
    assert cfg.aggregator.default_interval_ns == int(cfg.interval_s * 1e9)
    if values:
        assert cfg.interval_s == 5 and cfg.otlp.headers == (("x-t", "a b"),)


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"}, ("c:4317", True)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317"}, ("c:4317", False)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, ("c:4317", True)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://[fd00::1]:4318/"}, ("[fd00::1]:4318", False)),
        ({}, ("localhost:4317", True)),
    ],
)
def test_otlp_endpoint_from_env(env: dict[str, str], want: tuple[str, bool]) -> None:
    t = m.otlp_from_env(env)
    assert (t.endpoint, t.insecure) == want


def test_headers_are_percent_decoded_and_lowercased() -> None:
    h = m.parse_headers("Authorization=Bearer%20abc%2Bd, x-tenant=team-a,")
    assert h == (("authorization", "Bearer abc+d"), ("x-tenant", "team-a"))


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--kubeconfig=k"], {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "only grpc"),
        (["--kubeconfig=k", "--tls-cert=c"], {}, "--tls-cert and --tls-key"),
        (["--kubeconfig=k", "--interval=0"], {}, "--interval"),
        (["--kubeconfig=k"], {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "not key=value"),
        (
            ["--kubeconfig=k"],
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "maybe"},
            "true or false",
        ),
        (["--kubeconfig=/nonexistent/kubeconfig"], {}, "Kubernetes configuration"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert m.main(["--listen=127.0.0.1:0", *argv], env=env) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kscope-processor: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_unreadable_tls_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = FakeApiServer()
    server.reserve()
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    argv = ["--listen=127.0.0.1:0", f"--kubeconfig={kubeconfig}", "--tls-cert=/no/cert", "--tls-key=/no/key"]
    assert m.main(argv, env={"OTEL_EXPORTER_OTLP_INSECURE": "true"}) == 2
    assert "cannot read TLS" in capsys.readouterr().err.strip().splitlines()[-1]
    run(server.close())


def _processor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed kscope-processor, outside any cluster unless ``env`` says otherwise."""
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    base = {k: v for k, v in base.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
    base |= {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **(env or {})}
    cmd = [str(REPO / ".venv" / "bin" / "kscope-processor"), *args]
    return subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=60)


def _exits(proc: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("kscope-processor: error: ")]
    assert message in line


def test_a_bad_setting_exits_2_as_a_subprocess() -> None:
    _exits(_processor("--kubeconfig=k", "--interval=0"), EXIT_USAGE, "--interval must be > 0")
    same = _processor("--kubeconfig=k", "--metrics-port=9441", "--prometheus-port=9441")
    _exits(same, EXIT_USAGE, "--prometheus-port and --metrics-port must differ")


def test_outside_a_cluster_without_kubeconfig_exits_3() -> None:
    _exits(_processor("--listen=127.0.0.1:0"), EXIT_ENVIRONMENT, "no Kubernetes configuration")


def test_in_a_pod_without_its_service_account_exits_3() -> None:
    assert not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()  # what this test relies on
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "9"}
    _exits(_processor("--listen=127.0.0.1:0", env=env), EXIT_ENVIRONMENT, "no usable in-cluster service account")


@pytest.mark.parametrize(
    "flag",
    ["--listen=127.0.0.1:{port}", "--metrics-port={port}", "--prometheus-port={port}",
     "--trace-listen=127.0.0.1:{port}"],
)  # fmt: skip
def test_an_address_in_use_exits_3(flag: str, tmp_path: Path) -> None:
    server = FakeApiServer()
    server.reserve()
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _processor("--listen=127.0.0.1:0", f"--kubeconfig={kubeconfig}", flag.format(port=port))
    want = {"trace": "cannot serve the trace join", "listen": "cannot listen", "metrics": "cannot serve metrics",
            "prometheus": "cannot serve Prometheus"}  # fmt: skip
    _exits(proc, EXIT_ENVIRONMENT, next(v for k, v in want.items() if k in flag))


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    server = FakeApiServer()
    port = server.reserve()  # an APIServer that never answers: shutdown must not wait for it
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "KUBERNETES_SERVICE_HOST"}
    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cluster_processor.main", "--listen=127.0.0.1:0", f"--kubeconfig={kubeconfig}"]
    proc = subprocess.Popen([*cmd, "--interval=0.2"], env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stderr is not None
        started = False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            with contextlib.suppress(ValueError):
                if json.loads(line).get("event") == "processor_started":
                    started = True
                    break
        assert started, f"processor did not start (apiserver port {port})"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        rest = proc.stderr.read()
        events = [json.loads(x).get("event") for x in rest.splitlines() if x.startswith("{")]
        assert "processor_stopping" in events and "processor_stopped" in events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_agent_stats_are_bounded_per_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "MAX_AGENT_NODES", 2)

    async def body() -> None:
        async with OtlpReceiver() as rx:
            proc = m.Processor(config(tmp_path / "no-kubeconfig", rx.endpoint))
            for node in ("n1", "n2", "n3", "n1"):
                b = pb.FlowBatch(schema_version=1, node_name=node)
                b.stats.counters["ring_lost"] = 1
                await proc.consume(b)
            assert proc.agent_stats_dropped == 1  # n3; n1 again only replaces its own report
            assert proc.tick() >= 1  # the two remembered reports are exported, then forgotten
            assert proc._agent_stats == {}
            await proc.exporter.stop(0.1)

    run(body())
