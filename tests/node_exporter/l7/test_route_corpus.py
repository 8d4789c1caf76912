"""The kernel's summary key against user space's route template, over a shared corpus.

The kernel sums requests past the record rate by a hash of method and route template
(bpf_src/l7_route.h); user space names a summary by templating its first request's head
(route_template). Summing is right only if two requests share a key exactly when user space gives
them the same route. tests/bpf_fixtures/route.bpf.c runs the very header l7.bpf.c runs on each
request line of route_corpus.txt (BPF_PROG_TEST_RUN); here its keys are compared with the routes
the agent's head parser gives. tests/e2e/test_l7_routes.py sends the same corpus through nginx.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_exporter.bpf.abi import L7_SUMMARY_HEAD
from node_exporter.bpf.loader import BpfObject
from node_exporter.l7.exchanges import HeadParser
from node_exporter.protocols.http_fields import MAX_SEGMENTS

CORPUS = Path(__file__).with_name("route_corpus.txt")
VERSION_TAIL = len(b" HTTP/1.1\r")  # a summary's head must hold the request line up to here
METHODS = {b"GET": 1, b"HEAD": 2, b"POST": 3, b"PUT": 4, b"DELETE": 5, b"PATCH": 6, b"OPTIONS": 7, b"TRACE": 9}
_BYTE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def corpus() -> list[bytes]:
    """The corpus's request targets, ``\\xNN`` turned into the byte."""
    out = []
    for line in CORPUS.read_bytes().splitlines():
        if line and not line.startswith(b"#"):
            out.append(_BYTE.sub(lambda m: bytes([int(m[1], 16)]), line))
    return out


def request_head(method: bytes, target: bytes) -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"


class Args(ctypes.Structure):
    """struct route_args of tests/bpf_fixtures/route.bpf.c."""

    _fields_ = [
        ("line", ctypes.c_uint8 * L7_SUMMARY_HEAD),
        ("n", ctypes.c_uint32),
        ("method", ctypes.c_uint32),
        ("hash", ctypes.c_uint64),
    ]


@pytest.fixture(scope="module")
def route_obj(bpf_dir: Path) -> Iterator[BpfObject]:
    obj = BpfObject(bpf_dir / "fixtures" / "route.bpf.o")
    yield obj
    obj.close()


def kernel_key(obj: BpfObject, method: bytes, target: bytes) -> int:
    """l7_route_hash on the head as the exchange path holds it: its first bytes, zero-padded."""
    head = request_head(method, target)[:L7_SUMMARY_HEAD]
    a = Args()
    a.line[: len(head)] = list(head)
    a.n, a.method = len(head), METHODS[method]
    ctx = bytearray(bytes(a))
    assert obj.test_run("route_hash", ctx) == 0
    return int(Args.from_buffer(ctx).hash)


def templated_part(target: bytes) -> bytes:
    """The bytes of a path route_template looks at: before the query, up to the {rest} cut."""
    path = re.split(rb"[?#]", target, maxsplit=1)[0]
    return b"/".join(path.split(b"/", MAX_SEGMENTS + 1)[: MAX_SEGMENTS + 1])


def must_refuse(method: bytes, target: bytes) -> bool:
    """Where the kernel cannot be sure to agree (bpf_src/l7_route.h), written independently of it."""
    too_long = len(method) + 1 + len(target) + VERSION_TAIL > L7_SUMMARY_HEAD
    control = any(c < 0x20 or c == 0x7F for c in target)
    return too_long or control or any(c >= 0x80 for c in templated_part(target))


def keys_and_routes(obj: BpfObject, method: bytes) -> dict[bytes, tuple[int, str | None]]:
    parser = HeadParser()
    out = {}
    for target in corpus():
        head = parser.parse(request_head(method, target)[:L7_SUMMARY_HEAD])
        out[target] = (kernel_key(obj, method, target), None if head is None else head[2])
    return out


def test_the_corpus_has_what_it_must() -> None:
    targets = corpus()
    assert len(targets) >= 400 and len(set(targets)) == len(targets)
    assert b"/caf\xc3\xa9" in targets and b"/x/\xff" in targets  # the escapes are bytes


@pytest.mark.bpf
@pytest.mark.parametrize("method", [b"GET", b"POST", b"DELETE", b"OPTIONS"])
def test_kernel_keys_agree_with_route_template(route_obj: BpfObject, method: bytes) -> None:
    got = keys_and_routes(route_obj, method)
    summed = {t: (k, r) for t, (k, r) in got.items() if k}
    # The kernel refuses exactly what it cannot be sure of, and nothing else.
    refused = {t for t, (k, _) in got.items() if not k}
    expected = {t for t in got if must_refuse(method, t)}
    assert (refused - expected, expected - refused) == (set(), set())
    # A summed request's head parses: else its summary would be dropped with every request in it.
    assert not [t for t, (_, r) in summed.items() if r is None]
    # One key, one route: never two routes summed together.
    by_key: dict[int, set[str | None]] = {}
    for k, r in summed.values():
        by_key.setdefault(k, set()).add(r)
    assert not {k: rs for k, rs in by_key.items() if len(rs) > 1}
    # One route, one key, for paths (a target hashed whole may share a route with a path, apart)
    by_route: dict[str | None, set[int]] = {}
    for t, (k, r) in summed.items():
        if t.startswith(b"/"):
            by_route.setdefault(r, set()).add(k)
    assert not {r: ks for r, ks in by_route.items() if len(ks) > 1}
    # and the corpus is mostly ids over few routes: the key is what makes summing pay
    assert len(by_route) < len(summed) / 2, (len(by_route), len(summed))


@pytest.mark.bpf
def test_the_method_is_part_of_the_key(route_obj: BpfObject) -> None:
    for target in (b"/api/users/1", b"/", b"*", b"/a/b/c/d/e/f/g/h/i"):
        keys = {m: kernel_key(route_obj, m, target) for m in METHODS}
        assert all(keys.values()) and len(set(keys.values())) == len(METHODS), keys


@pytest.mark.bpf
@pytest.mark.parametrize(
    "line", [b"GET /a HTTP/2.0\r\n", b"GET /a HTTP/1.1x\r\n", b"GET /a?q HTTP/1.2\r\n", b"GET  HTTP/1.1\r\n"]
)
def test_a_line_user_space_rejects_is_not_summed(route_obj: BpfObject, line: bytes) -> None:
    """Its summary would be dropped (summary_bad_head) with every request in it."""
    assert HeadParser().parse(line) is None
    a = Args()
    a.line[: len(line)] = list(line)
    a.n, a.method = len(line), METHODS[b"GET"]
    ctx = bytearray(bytes(a))
    route_obj.test_run("route_hash", ctx)
    assert Args.from_buffer(ctx).hash == 0


@pytest.mark.bpf
def test_a_request_line_the_capture_cut_is_not_summed(route_obj: BpfObject) -> None:
    """The version after the path must be among the captured bytes (n), not only in the buffer."""
    head = request_head(b"GET", b"/api/users/1")
    for n, summed in ((len(head), True), (len(b"GET /api/users/1 HTTP/1.1\r"), True),
                      (len(b"GET /api/users/1 HTTP/1.1"), False), (len(b"GET /api/users/1"), False)):  # fmt: skip
        a = Args()
        a.line[: len(head)] = list(head)
        a.n, a.method = n, METHODS[b"GET"]
        ctx = bytearray(bytes(a))
        route_obj.test_run("route_hash", ctx)
        assert bool(Args.from_buffer(ctx).hash) is summed, n
