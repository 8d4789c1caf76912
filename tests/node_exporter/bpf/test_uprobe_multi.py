"""The OpenSSL probes of l7.bpf.o on both attach paths: uprobe_multi links (Linux 6.6+) and
the perf-event uprobes kept as the fallback, each attached to this process's libssl and
fired by a real TLS exchange (Python's ssl module: SSL_write_ex/SSL_read_ex; the e2e tests
drive SSL_write/SSL_read through curl and nginx)."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_exporter.bpf.abi import L7Direction, L7Flags
from node_exporter.bpf.elf import symbol_offsets
from node_exporter.bpf.loader import BpfObject, FdLink
from node_exporter.bpf.ringbuf import RingReader
from node_exporter.errors import HookUnavailableError
from node_exporter.l7.chunks import decode_chunk
from node_exporter.l7.collector import CAPABILITIES
from node_exporter.l7.tls import COOKIES, EXIT_PROGRAM, MULTI_ENTRY_PROGRAM, MULTI_EXIT_PROGRAM, PROBES

pytestmark = pytest.mark.bpf

REQUEST = b"GET /kscope-uprobe-path HTTP/1.1\r\nHost: t\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _own_libssl() -> str:
    with open("/proc/self/maps") as fh:
        for line in fh:
            path = line.split()[-1]
            if "libssl.so" in path:
                return path
    pytest.fail("this process maps no libssl (the ssl module is imported)")


def _load(bpf_dir: Path, use_uprobe_multi: bool | None) -> BpfObject:
    knobs = {"capture_bytes": 256, "exchanges": 0, "filter_netns_ino": os.stat("/proc/self/ns/net").st_ino}
    return BpfObject(
        bpf_dir / "l7.bpf.o",
        capabilities=CAPABILITIES,
        required=frozenset({"l7.capture", "l7.tls"}),
        knobs=knobs,
        use_uprobe_multi=use_uprobe_multi,
    )


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    key, crt = str(d / "k.pem"), str(d / "c.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", crt, "-days", "1", "-subj", "/CN=kscope"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


def _tls_exchange(cert: tuple[str, str]) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*cert)
    with socket.create_server(("127.0.0.1", 0)) as srv:

        def serve() -> None:
            conn, _ = srv.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                if s.recv(4096) == REQUEST:
                    s.sendall(RESPONSE)

        th = threading.Thread(target=serve)
        th.start()
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        with client_ctx.wrap_socket(socket.create_connection(srv.getsockname())) as c:
            c.sendall(REQUEST)
            assert c.recv(4096) == RESPONSE
        th.join(5)


def _tls_chunks(obj: BpfObject) -> set[tuple[L7Direction, bytes]]:
    _, _, size = obj.map_info("l7_ring")
    ring = RingReader(obj.map_fd("l7_ring"), size)
    try:
        chunks = [decode_chunk(raw) for raw in ring.drain()]
    finally:
        ring.close()
    return {(c.direction, c.data) for c in chunks if c is not None and c.flags & L7Flags.KSCOPE_L7_TLS}


@pytest.fixture(params=["uprobe_multi", "perf_event"])
def attached(request: pytest.FixtureRequest, bpf_dir: Path) -> Iterator[BpfObject]:
    lib = _own_libssl()
    obj = _load(bpf_dir, None if request.param == "uprobe_multi" else False)
    try:
        if request.param == "uprobe_multi":
            assert obj.uprobe_multi, "this kernel (6.6+) has uprobe_multi links"
            found = symbol_offsets(lib, PROBES)
            offsets = [found[s] or 0 for s in PROBES]
            cookies = [COOKIES[s] for s in PROBES]
            obj.attach_uprobe_multi(MULTI_ENTRY_PROGRAM, lib, offsets, cookies)
            obj.attach_uprobe_multi(MULTI_EXIT_PROGRAM, lib, offsets, cookies, retprobe=True)
        else:
            assert not obj.uprobe_multi
            for symbol, program in PROBES.items():
                obj.attach_uprobe(program, lib, symbol)
                obj.attach_uprobe(EXIT_PROGRAM, lib, symbol, retprobe=True)
        yield obj
    finally:
        obj.close()


def test_both_paths_capture_both_directions_of_a_tls_exchange(attached: BpfObject, cert: tuple[str, str]) -> None:
    _tls_exchange(cert)
    got = _tls_chunks(attached)
    # the client's SSL_write_ex and the server's SSL_read_ex of the request, and the reverse
    for direction, data in [
        (L7Direction.KSCOPE_DIR_EGRESS, REQUEST),
        (L7Direction.KSCOPE_DIR_INGRESS, REQUEST),
        (L7Direction.KSCOPE_DIR_EGRESS, RESPONSE),
        (L7Direction.KSCOPE_DIR_INGRESS, RESPONSE),
    ]:
        assert (direction, data) in got, got


def test_perf_event_path_does_not_load_the_multi_programs(bpf_dir: Path) -> None:
    with _load(bpf_dir, False) as obj, pytest.raises(HookUnavailableError, match="not loaded for uprobe_multi"):
        obj.attach_uprobe_multi(MULTI_ENTRY_PROGRAM, _own_libssl(), [0], [0])


def test_multi_link_errors_are_clear_and_links_close(bpf_dir: Path, tmp_path: Path) -> None:
    lib = _own_libssl()
    with _load(bpf_dir, None) as obj:
        with pytest.raises(HookUnavailableError, match=r"uprobe_multi .*missing\.so.*No such file"):
            obj.attach_uprobe_multi(MULTI_ENTRY_PROGRAM, str(tmp_path / "missing.so"), [0x1000], [0])
        with pytest.raises(HookUnavailableError, match="one cookie per offset"):
            obj.attach_uprobe_multi(MULTI_ENTRY_PROGRAM, lib, [0x1000, 0x2000], [0])
        offset = symbol_offsets(lib, ["SSL_write"])["SSL_write"]
        assert offset is not None
        link = obj.attach_uprobe_multi(MULTI_ENTRY_PROGRAM, lib, [offset], [COOKIES["SSL_write"]])
        assert isinstance(link, FdLink) and os.fstat(link.fd)
        obj.detach(link)
        with pytest.raises(OSError):
            os.fstat(link.fd)  # the fd (and with it the link) is gone
        obj.detach(link)  # idempotent


def test_close_destroys_many_multi_links(bpf_dir: Path) -> None:
    lib = _own_libssl()
    found = symbol_offsets(lib, PROBES)
    obj = _load(bpf_dir, None)
    links = [
        obj.attach_uprobe_multi(program, lib, [found[s] or 0], [COOKIES[s]], retprobe=program == MULTI_EXIT_PROGRAM)
        for s in PROBES
        for program in (MULTI_ENTRY_PROGRAM, MULTI_EXIT_PROGRAM)
    ]
    assert len(links) == 2 * len(PROBES)
    obj.close()  # concurrently, past two links
    for link in links:
        with pytest.raises(OSError):
            os.fstat(link.fd)
    obj.close()  # idempotent
