"""Dynamic symbol -> file offset, checked against readelf on the system libssl; bad files."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from node_exporter.bpf.elf import ElfError, symbol_offsets

LIBSSL = next(
    (
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/lib/x86_64-linux-gnu/libssl.so.3",
            "/usr/lib/aarch64-linux-gnu/libssl.so.3",
        )
        if os.path.exists(p)
    ),
    None,
)
needs_libssl = pytest.mark.skipif(LIBSSL is None or shutil.which("readelf") is None, reason="no libssl.so.3/readelf")
FUNCS = ("SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex", "SSL_CTX_new", "SSL_get_fd")


def _readelf_offsets(path: str) -> dict[str, int]:
    """Versioned name (as readelf prints it) -> file offset, from readelf's own output."""
    segments = []
    for line in subprocess.run(
        ["readelf", "-lW", path], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":  # LOAD Offset VirtAddr PhysAddr FileSiz MemSiz ...
            segments.append((int(f[2], 16), int(f[5], 16), int(f[1], 16)))
    out = {}
    syms = subprocess.run(["readelf", "-sW", "--dyn-syms", path], capture_output=True, text=True, check=True).stdout
    for line in syms.splitlines():
        m = re.match(r"\s*\d+:\s+([0-9a-f]+)\s+\d+\s+(FUNC|IFUNC)\s+\S+\s+\S+\s+(\d+)\s+(\S+)", line)
        if not m:
            continue  # UND symbols have "UND" as their section, not a number
        value = int(m.group(1), 16)
        for vaddr, memsz, offset in segments:
            if vaddr <= value < vaddr + memsz:
                out[m.group(4)] = value - vaddr + offset
    return out


@needs_libssl
def test_offsets_match_readelf() -> None:
    assert LIBSSL is not None
    expected = _readelf_offsets(LIBSSL)
    by_base = {name.split("@")[0]: off for name, off in expected.items() if "@@" in name}
    got = symbol_offsets(LIBSSL, FUNCS)
    assert got == {name: by_base[name] for name in FUNCS}
    # every exported function, not only the ones kscope probes
    every = symbol_offsets(LIBSSL, list(by_base))
    assert every == by_base


@needs_libssl
def test_versioned_names() -> None:
    assert LIBSSL is not None
    versioned = next(n for n in _readelf_offsets(LIBSSL) if n.startswith("SSL_write@@"))
    names = ["SSL_write", versioned, "SSL_write@" + versioned.split("@@")[1], "SSL_write@@OPENSSL_0.0.0_NO_SUCH"]
    plain, *rest = symbol_offsets(LIBSSL, names).values()
    assert plain is not None
    assert rest == [plain, plain, None]


@needs_libssl
def test_missing_and_undefined_symbols_are_none() -> None:
    assert LIBSSL is not None
    got = symbol_offsets(LIBSSL, ["kscope_no_such_symbol", "memcpy", ""])
    assert got == {"kscope_no_such_symbol": None, "memcpy": None, "": None}  # memcpy is imported (UND)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not an ELF file at all",
        b"\x7fELF",
        b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\xff" * 48,  # header fields pointing past the end
        b"\x7fELF\x07\x09" + b"\0" * 200,  # unknown class and byte order
        b"\x7fELF\x02\x01\x01" + b"\0" * 200,  # no program or section headers
    ],
)
def test_garbage_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "libssl.so.3"
    path.write_bytes(content)
    with pytest.raises(ElfError, match=str(path)):
        symbol_offsets(str(path), ["SSL_write"])


def test_unreadable_paths_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ElfError, match="cannot read"):
        symbol_offsets(str(tmp_path / "missing.so"), ["SSL_write"])
    with pytest.raises(ElfError, match="cannot read"):
        symbol_offsets(str(tmp_path), ["SSL_write"])


@needs_libssl
def test_truncated_and_corrupted_copies_never_raise_anything_else(tmp_path: Path) -> None:
    assert LIBSSL is not None
    data = Path(LIBSSL).read_bytes()
    path = tmp_path / "libssl.so.3"
    cuts = [16, 64, 100, 4096, len(data) // 2, len(data) - 4096, len(data) - 1]
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(ElfError):
            symbol_offsets(str(path), FUNCS)
    for pos in range(16, 64):  # every byte of the header after e_ident, set to 0xff in turn
        path.write_bytes(data[:pos] + b"\xff" + data[pos + 1 :])
        with contextlib.suppress(ElfError):
            symbol_offsets(str(path), FUNCS)
