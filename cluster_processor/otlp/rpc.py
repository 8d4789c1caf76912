"""gRPC calls in OpenTelemetry's RPC conventions: the names, the failure rule, the attributes.

The conventions as they stand (RPC semantic conventions, release candidate; checked 2026-12):
``rpc.system.name`` ("grpc"), a fully-qualified ``rpc.method`` ("package.Service/Method", ``_OTHER``
when the server did not know it), ``rpc.response.status_code`` as the code's name ("NOT_FOUND"),
``error.type`` set to that name when the call failed, and ``rpc.server.call.duration`` /
``rpc.client.call.duration`` in seconds. They replace ``rpc.system``, ``rpc.service``,
``rpc.grpc.status_code`` (an int) and the millisecond ``rpc.server.duration`` the issue named.

Which codes fail a call depends on the side: a server fails only on the codes that say it could not
serve (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS); NOT_FOUND or
INVALID_ARGUMENT are answers to the caller's mistake, as an HTTP 404 is. A client fails on every code
but OK.
"""

from __future__ import annotations

from typing import Final

from cluster_processor.resolved import AttrValue, Side

RPC_SYSTEM_NAME: Final = "rpc.system.name"
RPC_METHOD: Final = "rpc.method"
RPC_METHOD_ORIGINAL: Final = "rpc.method_original"
RPC_RESPONSE_STATUS_CODE: Final = "rpc.response.status_code"
GRPC: Final = "grpc"
_ERROR_TYPE: Final = "error.type"  # semconv.ERROR_TYPE (semconv imports this module)
_OTHER: Final = "_OTHER"

# gRPC status codes by number (grpc/doc/statuscodes.md)
CODES: Final = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
UNIMPLEMENTED: Final = 12
SERVER_ERRORS: Final = frozenset({2, 4, 12, 13, 14, 15})
# What a gRPC client makes of an HTTP status that came without a grpc-status (a proxy's answer):
# grpc/doc/http-grpc-status-mapping.md. Any other non-200 status is UNKNOWN.
_FROM_HTTP: Final = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def code_name(code: int) -> str:
    """A code's name; a number no version of gRPC defines stays a number (never a guessed name)."""
    return CODES[code] if 0 <= code < len(CODES) else str(code)


def status_of(grpc_status: int | None, http_status: int) -> int | None:
    """The call's grpc code: its grpc-status, else what the HTTP status maps to when it is an error;
    None when neither tells (a trailer the agent could not decode)."""
    if grpc_status is not None:
        return grpc_status
    if http_status and http_status != 200:
        return _FROM_HTTP.get(http_status, 2)
    return None


def failed(side: Side, status_code: int | None, error_type: str) -> bool:
    if status_code is None:
        return bool(error_type)
    return status_code in SERVER_ERRORS if side is Side.SERVER else status_code != 0


def attributes(
    side: Side, method: str, route: str, status_code: int | None, error_type: str
) -> list[tuple[str, AttrValue]]:
    # A method the server said it does not have is the caller's text: _OTHER keeps it bounded.
    known = method and status_code != UNIMPLEMENTED
    out: list[tuple[str, AttrValue]] = [(RPC_SYSTEM_NAME, GRPC), (RPC_METHOD, method if known else _OTHER)]
    if status_code is not None:
        out.append((RPC_RESPONSE_STATUS_CODE, code_name(status_code)))
    if failed(side, status_code, error_type):
        out.append((_ERROR_TYPE, code_name(status_code) if status_code is not None else error_type))
    return out


def span_name(side: Side, method: str, route: str) -> str:
    return method or GRPC
