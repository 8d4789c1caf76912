"""The processor's event logs through its real gRPC ingest, aggregator, exporter and a test OTLP
receiver: a flood of failing lookups leaves as a few counted records, the cap as a self-metric."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from cluster_processor import main as m
from cluster_processor.aggregate import AggregatorSettings
from kscope.v1 import flow_pb2 as pb
from tests.cluster_processor.otlp.receiver import OtlpReceiver
from tests.cluster_processor.test_main import A_IP, MS, _kv, _scrape, cluster, config, eventually, run, send

NAMES, EACH, MAX_LOGS = 5, 10, 2


def lookups(t: int) -> pb.FlowBatch:
    """node-1: a-1 asks an outside resolver for five names, ten times each; all SERVFAIL."""
    reqs = [
        pb.L7Request(
            socket_cookie=500 + i,
            netns_inode=4026532000,
            side=pb.ROLE_CLIENT,
            protocol="dns",
            local_ip=A_IP,
            local_port=50000 + i,
            remote_ip="198.18.0.53",
            remote_port=53,
            ip_family=4,
            process=pb.ProcessIdentity(pid=100, pod_uid="uid-a1"),
            start_time_unix_nano=t + i * MS,
            latency_ns=MS,
            dns=pb.DnsInfo(id=i, question_name=f"n{i % NAMES}.example.", question_type="A", rcode="SERVFAIL"),
        )
        for i in range(NAMES * EACH)
    ]
    return pb.FlowBatch(schema_version=1, node_name="node-1", time_unix_nano=t, l7=reqs)


def log_records(rx: OtlpReceiver) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(_kv(rl.resource.attributes), _kv(lr.attributes)) for req in rx.received["logs"]
            for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records]  # fmt: skip


def test_a_flood_of_failed_lookups_is_a_few_counted_records(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (_, kubeconfig), OtlpReceiver() as rx:
            cfg = config(kubeconfig, rx.endpoint, aggregator=AggregatorSettings(max_logs=MAX_LOGS))
            async with m.Processor(cfg) as proc:
                assert proc.watcher is not None and await proc.watcher.wait_synced(5)
                await send(proc.ingest.port, lookups(time.time_ns()))
                await eventually(lambda: len(log_records(rx)) == MAX_LOGS, "two log records")
                records = log_records(rx)
                # Each record stands for its name's ten lookups, under the caller's resource.
                assert [a["log_count"] for _, a in records] == [EACH] * MAX_LOGS
                assert {r["service.name"] for r, _ in records} == {"a"}
                assert {a["dns.question.name"] for _, a in records} == {"n0.example.", "n1.example."}
                # The other names' lookups did not fit: counted, on the self-metrics endpoint.
                dropped = (NAMES - MAX_LOGS) * EACH
                text = await asyncio.to_thread(_scrape, proc.metrics_port)
                assert f'kscope_processor_aggregator_total{{counter="logs_overflowed"}} {dropped}.0' in text
                assert f'kscope_processor_aggregator_total{{counter="log_events"}} {MAX_LOGS * EACH}.0' in text
                await asyncio.sleep(0.5)  # two more intervals: nothing else arrives
                assert len(log_records(rx)) == MAX_LOGS

    run(body())
