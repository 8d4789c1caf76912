"""The ctypes mirror of bpf_src/abi/*.h against the compiled object's BTF.

Needs no root: opening an object and reading its BTF are unprivileged.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_exporter.bpf import abi
from node_exporter.bpf import libbpf as lb
from node_exporter.bpf.btf import Btf

OBJECTS = ["l4.bpf.o"]


@pytest.fixture(params=OBJECTS)
def obj_btf(request: pytest.FixtureRequest, bpf_dir: Path) -> Iterator[Btf]:
    path = bpf_dir / request.param
    if not path.exists():
        pytest.fail(f"{path} not built: run make setup")
    btf_ptr = lb.lib().btf__parse(str(path).encode(), None)
    btf = Btf(lb.check_ptr(btf_ptr, f"parse BTF of {path}"), owned=True)
    yield btf
    btf.close()


@pytest.mark.parametrize("struct_name", sorted(abi.STRUCTS))
def test_struct_layout_matches_btf(obj_btf: Btf, struct_name: str) -> None:
    mirror = abi.STRUCTS[struct_name]
    members = obj_btf.members(struct_name)
    assert obj_btf.struct_size(struct_name) == ctypes.sizeof(mirror)
    assert [m.name for m in members] == [f[0] for f in mirror._fields_]
    for m in members:
        field = getattr(mirror, m.name)
        assert field.offset == m.offset_bytes, m.name
        assert field.size == m.size_bytes, m.name
        ctype = dict(mirror._fields_)[m.name]
        expected_len = getattr(ctype, "_length_", 0)
        assert m.array_len == expected_len, m.name


@pytest.mark.parametrize("enum_name", sorted(abi.ENUMS))
def test_enum_values_match_btf(obj_btf: Btf, enum_name: str) -> None:
    mirror = abi.ENUMS[enum_name]
    assert obj_btf.enum_values(enum_name) == {e.name: int(e.value) for e in mirror}


def test_record_starts_with_type_byte() -> None:
    assert abi.KscopeL4Record.type.offset == 0
    assert abi.KscopeL4Record.type.size == 1
    assert ctypes.sizeof(abi.KscopeL4Record) % 8 == 0
