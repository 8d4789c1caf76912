"""Read BPF Type Format through libbpf's own BTF API.

Used for three things: setting ``const volatile`` knobs in ``.rodata`` by name,
checking that a hook's attach target exists in the running kernel, and the ABI test
that compares our ctypes mirrors with the compiled object's structs.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from node_exporter.bpf.libbpf import check_ptr, lib

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_VAR, KIND_DATASEC, KIND_TYPE_TAG, KIND_ENUM64 = 14, 15, 18, 19
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}
_HDR = struct.Struct("<III")  # name_off, info, size/type


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    type_id: int
    offset_bytes: int
    size_bytes: int
    array_len: int  # 0 when not an array


@dataclass(frozen=True, slots=True)
class DataVar:
    name: str
    offset: int
    size: int


class Btf:
    """A BTF blob owned by libbpf (an object's, or the kernel's when ``owned``)."""

    def __init__(self, ptr: int, *, owned: bool) -> None:
        self._ptr = ptr
        self._owned = owned

    @classmethod
    def vmlinux(cls) -> Btf:
        return cls(check_ptr(lib().btf__load_vmlinux_btf(), "load kernel BTF"), owned=True)

    def close(self) -> None:
        if self._owned and self._ptr:
            lib().btf__free(self._ptr)
        self._ptr = 0

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, name: str, kind: int) -> int:
        """Type id of ``name`` of ``kind``, or -1."""
        ret: int = lib().btf__find_by_name_kind(self._ptr, name.encode(), kind)
        return ret if ret > 0 else -1

    def _header(self, type_id: int) -> tuple[int, int, int, int]:
        ptr = lib().btf__type_by_id(self._ptr, type_id)
        if not ptr:
            raise KeyError(f"no BTF type {type_id}")
        name_off, info, size_or_type = _HDR.unpack(ctypes.string_at(ptr, _HDR.size))
        return ptr, name_off, info, size_or_type

    def _tail(self, ptr: int, count: int, width: int) -> bytes:
        return ctypes.string_at(ptr + _HDR.size, count * width)

    def name_of(self, offset: int) -> str:
        raw = lib().btf__name_by_offset(self._ptr, offset)
        return raw.decode() if raw else ""

    def kind(self, type_id: int) -> int:
        return (self._header(type_id)[2] >> 24) & 0x1F

    def size_of(self, type_id: int) -> int:
        size: int = lib().btf__resolve_size(self._ptr, type_id)
        if size < 0:
            raise KeyError(f"BTF type {type_id} has no size")
        return size

    def strip(self, type_id: int) -> int:
        """Follow typedef/const/volatile to the underlying type."""
        while True:
            _, _, info, target = self._header(type_id)
            if (info >> 24) & 0x1F not in _MODIFIERS:
                return type_id
            type_id = target

    def members(self, struct_name: str) -> list[Member]:
        type_id = self.find(struct_name, KIND_STRUCT)
        if type_id < 0:
            raise KeyError(f"struct {struct_name} is not in BTF")
        ptr, _, info, _ = self._header(type_id)
        vlen = info & 0xFFFF
        kind_flag = info >> 31
        out = []
        for name_off, mtype, offset in struct.iter_unpack("<III", self._tail(ptr, vlen, 12)):
            bits = offset & 0xFFFFFF if kind_flag else offset
            real = self.strip(mtype)
            array_len = 0
            if self.kind(real) == KIND_ARRAY:
                aptr, _, _, _ = self._header(real)
                _, _, array_len = struct.unpack("<III", self._tail(aptr, 1, 12))
            out.append(Member(self.name_of(name_off), mtype, bits // 8, self.size_of(mtype), array_len))
        return out

    def struct_size(self, struct_name: str) -> int:
        type_id = self.find(struct_name, KIND_STRUCT)
        if type_id < 0:
            raise KeyError(f"struct {struct_name} is not in BTF")
        return self.size_of(type_id)

    def enum_values(self, enum_name: str) -> dict[str, int]:
        type_id = self.find(enum_name, KIND_ENUM)
        if type_id < 0:
            raise KeyError(f"enum {enum_name} is not in BTF")
        ptr, _, info, _ = self._header(type_id)
        vlen = info & 0xFFFF
        return {
            self.name_of(name_off): value for name_off, value in struct.iter_unpack("<Ii", self._tail(ptr, vlen, 8))
        }

    def datasec_vars(self, section: str) -> dict[str, DataVar]:
        type_id = self.find(section, KIND_DATASEC)
        if type_id < 0:
            return {}
        ptr, _, info, _ = self._header(type_id)
        vlen = info & 0xFFFF
        out = {}
        for var_id, offset, size in struct.iter_unpack("<III", self._tail(ptr, vlen, 12)):
            _, name_off, _, _ = self._header(var_id)
            name = self.name_of(name_off)
            out[name] = DataVar(name, offset, size)
        return out
