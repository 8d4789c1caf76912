"""Dynamic symbol -> file offset in a shared library, for uprobe_multi links.

A uprobe_multi link takes file offsets, not names (libbpf 1.1 has no API that resolves
them for it). The offset of a symbol is its address minus the address of the PT_LOAD
segment holding it, plus that segment's file offset. Only ``.dynsym`` is read: the OpenSSL
entry points are exported, and a stripped library keeps no ``.symtab``. Every read is
bounded by the file's size and a cap, so a garbage or truncated file is an :class:`ElfError`
with a message, never a struct.error or an unbounded read.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from node_exporter.errors import KscopeError

_MAX_TABLE = 64 << 20  # no .dynsym/.dynstr/program header table is near this; a bigger one is garbage
_SHT_DYNSYM = 11
_SHT_GNU_VERDEF = 0x6FFFFFFD
_SHT_GNU_VERSYM = 0x6FFFFFFF
_PT_LOAD = 1
_SHN_UNDEF = 0
_VERSYM_HIDDEN = 0x8000  # a non-default version (``name@V``, not ``name@@V``)
_STT_FUNC, _STT_GNU_IFUNC = 2, 10


class ElfError(KscopeError):
    """A file is not an ELF shared object this reader can use (garbage, truncated, foreign)."""


@dataclass(frozen=True, slots=True)
class _Layout:
    """struct formats for one ELF class and byte order."""

    ehdr: str  # e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum (after e_ident)
    phdr: str
    shdr: str
    sym: str


_ELF64 = _Layout(ehdr="HHIQQQIHHHHHH", phdr="IIQQQQQQ", shdr="IIQQQQIIQQ", sym="IBBHQQ")
_ELF32 = _Layout(ehdr="HHIIIIIHHHHHH", phdr="IIIIIIII", shdr="IIIIIIIIII", sym="IIIBBH")


@dataclass(frozen=True, slots=True)
class _Section:
    type: int
    offset: int
    size: int
    link: int
    entsize: int


class _Reader:
    def __init__(self, fh: BinaryIO, path: str, size: int) -> None:
        self._fh = fh
        self.path = path
        self.size = size

    def read(self, offset: int, length: int, what: str) -> bytes:
        if length < 0 or length > _MAX_TABLE or offset < 0 or offset + length > self.size:
            raise ElfError(f"{self.path}: {what} lies outside the file (truncated or not an ELF file?)")
        self._fh.seek(offset)
        data = self._fh.read(length)
        if len(data) != length:
            raise ElfError(f"{self.path}: short read of {what}")
        return data


def symbol_offsets(path: str, names: Iterable[str]) -> dict[str, int | None]:
    """File offset of each dynamic function symbol in ``names`` (None if the file lacks it).

    A name may carry a version: ``SSL_write@@OPENSSL_3.0.0`` or ``SSL_write@OPENSSL_3.0.0``
    matches only that version; a bare name matches the default version (or the only one).
    Raises :class:`ElfError` for a file that cannot be read or is not a usable ELF file.
    """
    try:
        with open(path, "rb") as fh:
            reader = _Reader(fh, path, os.fstat(fh.fileno()).st_size)
            return _resolve(reader, list(names))
    except OSError as exc:
        raise ElfError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (struct.error, UnicodeDecodeError, ValueError) as exc:  # a bound we did not foresee
        raise ElfError(f"{path}: malformed ELF file ({exc})") from None


def _resolve(r: _Reader, names: list[str]) -> dict[str, int | None]:
    ident = r.read(0, 16, "ELF header")
    if ident[:4] != b"\x7fELF":
        raise ElfError(f"{r.path} is not an ELF file")
    if ident[4] not in (1, 2) or ident[5] not in (1, 2):
        raise ElfError(f"{r.path}: unknown ELF class {ident[4]} or byte order {ident[5]}")
    layout = _ELF64 if ident[4] == 2 else _ELF32
    order = "<" if ident[5] == 1 else ">"
    ehdr_fmt = order + layout.ehdr
    (_, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = struct.unpack(
        ehdr_fmt, r.read(16, struct.calcsize(ehdr_fmt), "ELF header")
    )
    segments = _load_segments(r, order + layout.phdr, layout is _ELF64, phoff, phentsize, phnum)
    sections = _sections(r, order + layout.shdr, shoff, shentsize, shnum)
    dynsym = next((s for s in sections if s.type == _SHT_DYNSYM), None)
    if dynsym is None or not 0 <= dynsym.link < len(sections):
        raise ElfError(f"{r.path} has no dynamic symbol table (not a shared library?)")
    strtab = r.read(sections[dynsym.link].offset, sections[dynsym.link].size, ".dynstr")
    sym_fmt = order + layout.sym
    entsize = dynsym.entsize or struct.calcsize(sym_fmt)
    if entsize < struct.calcsize(sym_fmt):
        raise ElfError(f"{r.path}: .dynsym entry size {entsize} is too small")
    count = dynsym.size // entsize
    table = r.read(dynsym.offset, count * entsize, ".dynsym")
    versym = next((s for s in sections if s.type == _SHT_GNU_VERSYM), None)
    versions = r.read(versym.offset, min(versym.size, count * 2), ".gnu.version") if versym else b""
    verdef = next((s for s in sections if s.type == _SHT_GNU_VERDEF), None)
    version_names = _version_names(r, order, verdef, sections) if verdef else {}

    wanted = {n: n.partition("@") for n in names}
    bases = {base for base, _, _ in wanted.values()}
    out: dict[str, int | None] = dict.fromkeys(names)
    best: dict[str, int] = {}  # name -> 2 for an exact version/default match, 1 for any
    for i in range(1, count):
        raw = table[i * entsize : i * entsize + struct.calcsize(sym_fmt)]
        if layout is _ELF64:
            st_name, st_info, _, st_shndx, st_value, _ = struct.unpack(sym_fmt, raw)
        else:
            st_name, st_value, _, st_info, _, st_shndx = struct.unpack(sym_fmt, raw)
        if st_shndx == _SHN_UNDEF or (st_info & 0xF) not in (_STT_FUNC, _STT_GNU_IFUNC):
            continue
        base = _cstr(strtab, st_name)
        if base not in bases:
            continue
        vs = int.from_bytes(versions[2 * i : 2 * i + 2], "little" if order == "<" else "big") if versions else 0
        hidden = bool(vs & _VERSYM_HIDDEN)
        vname = version_names.get(vs & 0x7FFF, "")
        offset = _file_offset(segments, st_value)
        for name, (want_base, at, want_ver) in wanted.items():
            if want_base != base or offset is None:
                continue
            if at:  # "name@V" (non-default) or "name@@V" (default)
                default = want_ver.startswith("@")
                if vname != want_ver.lstrip("@") or (default and hidden):
                    continue
                score = 2
            else:
                score = 1 if hidden else 2
            if score > best.get(name, 0):
                best[name] = score
                out[name] = offset
    return out


def _load_segments(
    r: _Reader, fmt: str, is64: bool, phoff: int, phentsize: int, phnum: int
) -> list[tuple[int, int, int]]:
    """(p_vaddr, p_memsz, p_offset) of every PT_LOAD segment."""
    if phnum == 0:
        raise ElfError(f"{r.path} has no program headers (an object file, not a shared library?)")
    if phentsize < struct.calcsize(fmt):
        raise ElfError(f"{r.path}: program header size {phentsize} is too small")
    table = r.read(phoff, phnum * phentsize, "program headers")
    out = []
    for i in range(phnum):
        fields = struct.unpack(fmt, table[i * phentsize : i * phentsize + struct.calcsize(fmt)])
        if is64:  # p_flags moved up to keep the 64-bit fields aligned
            p_type, _, p_offset, p_vaddr, _, _, p_memsz, _ = fields
        else:
            p_type, p_offset, p_vaddr, _, _, p_memsz, _, _ = fields
        if p_type == _PT_LOAD:
            out.append((p_vaddr, p_memsz, p_offset))
    return out


def _sections(r: _Reader, fmt: str, shoff: int, shentsize: int, shnum: int) -> list[_Section]:
    if shnum == 0 or shoff == 0:
        raise ElfError(f"{r.path} has no section headers")
    if shentsize < struct.calcsize(fmt):
        raise ElfError(f"{r.path}: section header size {shentsize} is too small")
    table = r.read(shoff, shnum * shentsize, "section headers")
    out = []
    for i in range(shnum):
        _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize = struct.unpack(
            fmt, table[i * shentsize : i * shentsize + struct.calcsize(fmt)]
        )
        out.append(_Section(sh_type, sh_offset, sh_size, sh_link, sh_entsize))
    return out


def _version_names(r: _Reader, order: str, verdef: _Section, sections: list[_Section]) -> dict[int, str]:
    """Version index -> name from .gnu.version_d (Elf_Verdef chain; same layout in both classes)."""
    if not 0 <= verdef.link < len(sections):
        return {}
    strtab = r.read(sections[verdef.link].offset, sections[verdef.link].size, ".dynstr")
    data = r.read(verdef.offset, verdef.size, ".gnu.version_d")
    out: dict[int, str] = {}
    pos = 0
    for _ in range(4096):  # a library defines a few dozen versions; the bound stops a loop in garbage
        if pos + 20 > len(data):
            break
        _, _, ndx, cnt, _, aux, nxt = struct.unpack(order + "HHHHIII", data[pos : pos + 20])
        if cnt and pos + aux + 8 <= len(data):
            (name_off,) = struct.unpack(order + "I", data[pos + aux : pos + aux + 4])
            out[ndx] = _cstr(strtab, name_off)
        if not nxt:
            break
        pos += nxt
    return out


def _cstr(table: bytes, offset: int) -> str:
    if not 0 <= offset < len(table):
        return ""
    end = table.find(b"\0", offset)
    return table[offset : end if end >= 0 else len(table)].decode("utf-8", "replace")


def _file_offset(segments: list[tuple[int, int, int]], vaddr: int) -> int | None:
    for p_vaddr, p_memsz, p_offset in segments:
        if p_vaddr <= vaddr < p_vaddr + p_memsz:
            return vaddr - p_vaddr + p_offset
    return None


def section_names(path: str) -> set[str]:
    """The names of an ELF file's sections. Raises :class:`ElfError` like :func:`symbol_offsets`."""
    try:
        with open(path, "rb") as fh:
            r = _Reader(fh, path, os.fstat(fh.fileno()).st_size)
            ident = r.read(0, 16, "ELF header")
            if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
                raise ElfError(f"{path} is not an ELF file")
            layout = _ELF64 if ident[4] == 2 else _ELF32
            order = "<" if ident[5] == 1 else ">"
            ehdr_fmt = order + layout.ehdr
            (_, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx) = struct.unpack(
                ehdr_fmt, r.read(16, struct.calcsize(ehdr_fmt), "ELF header")
            )
            fmt = order + layout.shdr
            sections = _sections(r, fmt, shoff, shentsize, shnum)
            if not 0 <= shstrndx < len(sections):
                raise ElfError(f"{path}: no section name table")
            names = r.read(sections[shstrndx].offset, sections[shstrndx].size, ".shstrtab")
            table = r.read(shoff, shnum * shentsize, "section headers")
            return {_cstr(names, struct.unpack_from(order + "I", table, i * shentsize)[0]) for i in range(shnum)}
    except OSError as exc:
        raise ElfError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ElfError(f"{path}: malformed ELF file ({exc})") from None
