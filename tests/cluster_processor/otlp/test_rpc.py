"""gRPC calls' names and failure rules (``rpc``), and how ``semconv`` applies them to RED points and
spans."""

from __future__ import annotations

import pytest

from cluster_processor.otlp import rpc, semconv
from cluster_processor.otlp.model import Protocol
from cluster_processor.resolved import Side

OK, NOT_FOUND, UNIMPLEMENTED, INTERNAL, UNAUTHENTICATED = 0, 5, 12, 13, 16


@pytest.mark.parametrize(
    ("code", "server_failed"),
    [(0, False), (1, False), (2, True), (3, False), (4, True), (5, False), (7, False), (8, False), (12, True),
     (13, True), (14, True), (15, True), (16, False)],
)  # fmt: skip
def test_a_server_fails_only_on_its_own_codes_a_client_on_all_but_ok(code: int, server_failed: bool) -> None:
    assert rpc.failed(Side.SERVER, code, "") is server_failed
    assert rpc.failed(Side.CLIENT, code, "") is (code != OK)


def test_code_names_and_a_code_no_grpc_defines() -> None:
    assert [rpc.code_name(c) for c in (OK, NOT_FOUND, UNAUTHENTICATED)] == ["OK", "NOT_FOUND", "UNAUTHENTICATED"]
    assert rpc.code_name(17) == "17" and rpc.code_name(-3) == "-3"


def test_status_from_grpc_status_else_from_an_http_error_else_none() -> None:
    assert rpc.status_of(NOT_FOUND, 200) == NOT_FOUND
    assert rpc.status_of(OK, 503) == OK  # grpc-status wins
    assert [rpc.status_of(None, h) for h in (503, 404, 401, 400, 418)] == [14, UNIMPLEMENTED, UNAUTHENTICATED, 13, 2]
    # no grpc-status and a 200 (a trailer we could not decode): unknown, never a guessed OK
    assert rpc.status_of(None, 200) is None and rpc.status_of(None, 0) is None
    assert not rpc.failed(Side.SERVER, None, "") and not rpc.failed(Side.CLIENT, None, "")


def test_attributes_of_ok_caller_error_and_server_error() -> None:
    m = "demo.v1.Echo/Ping"
    ok = dict(rpc.attributes(Side.SERVER, m, "", OK, ""))
    assert ok == {"rpc.system.name": "grpc", "rpc.method": m, "rpc.response.status_code": "OK"}
    assert "error.type" not in dict(rpc.attributes(Side.SERVER, m, "", NOT_FOUND, ""))
    assert dict(rpc.attributes(Side.CLIENT, m, "", NOT_FOUND, ""))["error.type"] == "NOT_FOUND"
    assert dict(rpc.attributes(Side.SERVER, m, "", INTERNAL, ""))["error.type"] == "INTERNAL"
    assert "rpc.response.status_code" not in dict(rpc.attributes(Side.SERVER, m, "", None, ""))


def test_a_method_the_server_does_not_have_is_other_and_the_span_keeps_its_text() -> None:
    m = "demo.v1.Echo/Guess"
    red = dict(semconv.PROTOCOLS[Protocol.RPC].attributes(Side.SERVER, m, "", UNIMPLEMENTED, ""))
    assert red["rpc.method"] == "_OTHER" and red["error.type"] == "UNIMPLEMENTED"
    span = dict(semconv.span_protocol_attributes(Side.SERVER, Protocol.RPC, m, "", UNIMPLEMENTED, ""))
    assert span["rpc.method_original"] == m and span["rpc.method"] == "_OTHER"
    assert "rpc.method_original" not in dict(semconv.span_protocol_attributes(Side.SERVER, Protocol.RPC, m, "", OK, ""))


def test_instruments_and_span_names() -> None:
    spec = semconv.PROTOCOLS[Protocol.RPC]
    assert (spec.server.name, spec.server.unit) == ("rpc.server.call.duration", "s")
    assert (spec.client.name, spec.client.unit) == ("rpc.client.call.duration", "s")
    assert spec.span_name(Side.CLIENT, "demo.v1.Echo/Ping", "") == "demo.v1.Echo/Ping"
    assert spec.span_name(Side.SERVER, "", "") == "grpc"
