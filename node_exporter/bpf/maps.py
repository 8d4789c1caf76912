"""Batch reads of BPF maps: per-CPU counters and drain-by-batch of hash maps."""

from __future__ import annotations

import ctypes
import errno

from node_exporter.bpf import libbpf as lb


def read_percpu_u64_array(fd: int, entries: int) -> list[int]:
    """Sum over CPUs of every slot of a BPF_MAP_TYPE_PERCPU_ARRAY of __u64."""
    ncpu = lb.check_int(lb.lib().libbpf_num_possible_cpus(), "possible cpus")
    values = (ctypes.c_uint64 * ncpu)()
    out = []
    for idx in range(entries):
        key = ctypes.c_uint32(idx)
        lb.check_int(lb.lib().bpf_map_lookup_elem(fd, ctypes.byref(key), values), "read per-CPU counter")
        out.append(sum(values))
    return out


def read_u32_array(fd: int, idx: int) -> int:
    """Slot ``idx`` of a BPF_MAP_TYPE_ARRAY of __u32."""
    key, val = ctypes.c_uint32(idx), ctypes.c_uint32(0)
    lb.check_int(lb.lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(val)), "read array slot")
    return val.value


def write_u32_array(fd: int, idx: int, value: int) -> None:
    """Set slot ``idx`` of a BPF_MAP_TYPE_ARRAY of __u32."""
    key, val = ctypes.c_uint32(idx), ctypes.c_uint32(value)
    lb.check_int(lb.lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(val), 0), "write array slot")


def drain_hash(fd: int, key_size: int, value_size: int, max_entries: int, batch: int = 1024) -> list[bytes]:
    """Look up and delete every entry of a hash map, in batches; returns the values."""
    lib = lb.lib()
    batch = max(1, min(batch, max_entries))
    keys = ctypes.create_string_buffer(key_size * batch)
    values = ctypes.create_string_buffer(value_size * batch)
    in_batch = ctypes.c_uint64(0)
    out_batch = ctypes.c_uint64(0)
    opts = lb.BatchOpts(sz=ctypes.sizeof(lb.BatchOpts))
    out: list[bytes] = []
    first = True
    while True:
        count = ctypes.c_uint32(batch)
        ret = lib.bpf_map_lookup_and_delete_batch(
            fd,
            None if first else ctypes.byref(in_batch),
            ctypes.byref(out_batch),
            keys,
            values,
            ctypes.byref(count),
            ctypes.byref(opts),
        )
        err = ctypes.get_errno() if ret < 0 else 0
        raw = values.raw
        out.extend(raw[i * value_size : (i + 1) * value_size] for i in range(count.value))
        if ret < 0:
            if err == errno.ENOENT:
                return out
            raise lb.LibbpfError(err, f"drain map: {errno.errorcode.get(err, err)}")
        in_batch.value = out_batch.value
        first = False
