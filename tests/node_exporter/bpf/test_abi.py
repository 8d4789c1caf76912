"""The ctypes mirrors of bpf_src/abi/*.h against the compiled objects' BTF.

Needs no root: opening an object and reading its BTF are unprivileged.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_exporter.bpf import abi
from node_exporter.bpf import libbpf as lb
from node_exporter.bpf.btf import KIND_STRUCT, Btf
from tests.node_exporter.bpf.mirrors import ENUMS, STRUCTS

_cache: dict[str, Btf] = {}


@pytest.fixture(scope="module")
def btf_of(bpf_dir: Path) -> Iterator[dict[str, Btf]]:
    for name in {obj for obj, _ in [*STRUCTS.values(), *ENUMS.values()]}:
        path = bpf_dir / name
        if not path.exists():
            pytest.fail(f"{path} not built: run make setup")
        _cache[name] = Btf(lb.check_ptr(lb.lib().btf__parse(str(path).encode(), None), f"BTF of {path}"), owned=True)
    yield _cache
    for btf in _cache.values():
        btf.close()
    _cache.clear()


@pytest.mark.parametrize("struct_name", sorted(STRUCTS))
def test_struct_layout_matches_btf(btf_of: dict[str, Btf], struct_name: str) -> None:
    obj, mirror = STRUCTS[struct_name]
    btf = btf_of[obj]
    members = btf.members(struct_name)
    assert btf.size_of(btf.find(struct_name, KIND_STRUCT)) == ctypes.sizeof(mirror)
    assert [m.name for m in members] == [f[0] for f in mirror._fields_]
    for m in members:
        field = getattr(mirror, m.name)
        assert field.offset == m.offset_bytes, m.name
        assert field.size == m.size_bytes, m.name
        ctype = {f[0]: f[1] for f in mirror._fields_}[m.name]
        assert m.array_len == getattr(ctype, "_length_", 0), m.name


@pytest.mark.parametrize("enum_name", sorted(ENUMS))
def test_enum_values_match_btf(btf_of: dict[str, Btf], enum_name: str) -> None:
    obj, mirror = ENUMS[enum_name]
    assert btf_of[obj].enum_values(enum_name) == {e.name: int(e.value) for e in mirror}


@pytest.mark.parametrize("struct_name", sorted(STRUCTS))
def test_records_start_with_type_byte(struct_name: str) -> None:
    _, mirror = STRUCTS[struct_name]
    assert mirror.type.offset == 0 and mirror.type.size == 1
    assert ctypes.sizeof(mirror) % 8 == 0


def test_l7_capture_bound_matches_header(btf_of: dict[str, Btf]) -> None:
    # struct chunk's payload is twice the bound (masking trick in l7.bpf.c)
    members = {m.name: m for m in btf_of["l7.bpf.o"].members("chunk")}
    assert members["data"].array_len == 2 * abi.L7_MAX_CAPTURE


def test_l7_exchange_head_bound_matches_kernel_state(btf_of: dict[str, Btf]) -> None:
    # the socket's exchange state holds two heads (the current exchange's, the next request's), each
    # exactly the head the record carries (copied whole)
    state = {m.name: m for m in btf_of["l7.bpf.o"].members("l7_xchg")}
    record = {m.name: m for m in btf_of["l7.bpf.o"].members("kscope_l7_exchange")}
    assert record["head"].array_len == abi.L7_HEAD
    assert state["head"].array_len == 2 and state["head"].size_bytes == 2 * record["head"].size_bytes
    assert abi.KscopeL7Exchange.head.offset + abi.L7_HEAD == abi.KscopeL7Exchange.tcp_req_seq.offset
