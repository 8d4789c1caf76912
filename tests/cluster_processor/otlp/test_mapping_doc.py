"""docs/otel-mapping.md is checked against the code, not hand-synced: every name it must carry is
the code's, and the DNS failure rule it states is the one ``semconv`` applies."""

from __future__ import annotations

import re
from pathlib import Path

from cluster_processor.otlp import encode, model, rpc, semconv
from cluster_processor.resolved import WORKLOAD_KEYS, Side

DOC = (Path(__file__).resolve().parents[3] / "docs" / "otel-mapping.md").read_text()


def test_the_doc_names_what_the_code_emits() -> None:
    events = [v for k, v in vars(model).items() if k.startswith("EVENT_")]
    names = [
        *events,
        semconv.SERVICE_PEER_NAME,
        semconv.SERVICE_PEER_NAMESPACE,
        semconv.DNS_RESPONSE_CODE,
        semconv.ERROR_TYPE,
        semconv.OVERFLOW,
        encode.SERVICE_INSTANCE_ID,
        encode.LOG_COUNT,
        encode.LOG_FIRST,
        encode.LOG_LAST,
        *WORKLOAD_KEYS,
        semconv.SG_REQUESTS.name.removesuffix("_request_total"),
        semconv.RPC_SERVER_DURATION.name,
        semconv.RPC_CLIENT_DURATION.name,
        rpc.RPC_SYSTEM_NAME,
        rpc.RPC_METHOD,
        rpc.RPC_METHOD_ORIGINAL,
        rpc.RPC_RESPONSE_STATUS_CODE,
    ]
    assert len(events) == 6
    missing = [n for n in names if f"`{n}" not in DOC]
    assert not missing, missing


def test_the_doc_states_the_dns_rule_the_code_applies() -> None:
    row = next(line for line in DOC.splitlines() if line.startswith("| DNS, both sides |"))
    failed = re.findall(r"`([A-Z]+)`", row)
    assert failed == ["SERVFAIL", "REFUSED", "FORMERR", "NOTIMP"]
    assert all(semconv.dns_error_type(code, False) == code.lower() for code in failed)
    assert semconv.dns_error_type("", True) == "timeout"
    answered = next(line for line in DOC.splitlines() if line.startswith("| DNS | **not**"))
    assert re.findall(r"`([A-Z]+)`", answered) == ["NOERROR", "NXDOMAIN"]
    assert all(semconv.dns_error_type(code, False) == "" for code in ("NOERROR", "NXDOMAIN"))


def test_the_doc_states_the_grpc_rules_the_code_applies() -> None:
    lines = DOC.splitlines()
    server = next(line for line in lines if line.startswith("| gRPC, server side |"))
    named = re.findall(r"`([A-Z_]+)`", server)
    assert {rpc.CODES.index(n) for n in named} == rpc.SERVER_ERRORS
    assert all(rpc.failed(Side.SERVER, c, "") == (c in rpc.SERVER_ERRORS) for c in range(len(rpc.CODES)))
    assert next(line for line in lines if line.startswith("| gRPC, client side |")).count("every code but `OK`")
    assert [c for c in range(len(rpc.CODES)) if not rpc.failed(Side.CLIENT, c, "")] == [0]
