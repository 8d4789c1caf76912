"""Thin ctypes binding over the system libbpf (``libbpf.so.1``, 1.1.x).

Only what kscope uses is declared. libbpf 1.x reports errors as NULL/negative
returns with ``errno`` set; :func:`check_ptr` and :func:`check_int` turn those
into :class:`LibbpfError` with the errno name, so callers never see a bare NULL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import threading
from collections.abc import Callable
from typing import Any

from node_exporter.errors import BpfUnavailableError


class LibbpfError(OSError):
    """A libbpf call failed; ``errno`` holds the reason."""


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfUnavailableError(
            f"cannot load the system libbpf ({name}): {exc}; install libbpf1 (Debian) >= 1.1"
        ) from exc


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()

P = ctypes.c_void_p
c_int = ctypes.c_int
c_uint = ctypes.c_uint
c_size = ctypes.c_size_t
c_char_p = ctypes.c_char_p

# (name, restype, argtypes)
_SIGNATURES: list[tuple[str, Any, list[Any]]] = [
    ("libbpf_set_print", P, [P]),
    ("libbpf_num_possible_cpus", c_int, []),
    ("bpf_object__open_file", P, [c_char_p, P]),
    ("bpf_object__load", c_int, [P]),
    ("bpf_object__close", None, [P]),
    ("bpf_object__btf", P, [P]),
    ("bpf_object__next_program", P, [P, P]),
    ("bpf_object__next_map", P, [P, P]),
    ("bpf_object__find_map_by_name", P, [P, c_char_p]),
    ("bpf_program__name", c_char_p, [P]),
    ("bpf_program__section_name", c_char_p, [P]),
    ("bpf_program__set_autoload", c_int, [P, ctypes.c_bool]),
    ("bpf_program__autoload", ctypes.c_bool, [P]),
    ("bpf_program__attach", P, [P]),
    ("bpf_program__attach_cgroup", P, [P, c_int]),
    ("bpf_program__attach_iter", P, [P, P]),
    ("bpf_program__attach_uprobe_opts", P, [P, c_int, c_char_p, c_size, P]),
    ("bpf_program__set_type", c_int, [P, c_int]),
    ("bpf_program__set_expected_attach_type", c_int, [P, c_int]),
    ("bpf_program__fd", c_int, [P]),
    ("bpf_map__name", c_char_p, [P]),
    ("bpf_map__fd", c_int, [P]),
    ("bpf_map__set_max_entries", c_int, [P, ctypes.c_uint32]),
    ("bpf_map__max_entries", ctypes.c_uint32, [P]),
    ("bpf_map__value_size", ctypes.c_uint32, [P]),
    ("bpf_map__key_size", ctypes.c_uint32, [P]),
    ("bpf_map__initial_value", P, [P, ctypes.POINTER(c_size)]),
    ("bpf_link__destroy", c_int, [P]),
    ("bpf_link__fd", c_int, [P]),
    ("bpf_iter_create", c_int, [c_int]),
    ("bpf_map_lookup_elem", c_int, [c_int, P, P]),
    ("bpf_map_update_elem", c_int, [c_int, P, P, ctypes.c_uint64]),
    ("bpf_map_delete_elem", c_int, [c_int, P]),
    ("bpf_map_get_next_key", c_int, [c_int, P, P]),
    ("bpf_map_lookup_and_delete_batch", c_int, [c_int, P, P, P, P, ctypes.POINTER(ctypes.c_uint32), P]),
    ("bpf_prog_test_run_opts", c_int, [c_int, P]),
    ("btf__load_vmlinux_btf", P, []),
    ("btf__parse", P, [c_char_p, P]),
    ("btf__free", None, [P]),
    ("btf__find_by_name_kind", c_int, [P, c_char_p, ctypes.c_uint32]),
    ("btf__type_by_id", P, [P, ctypes.c_uint32]),
    ("btf__name_by_offset", c_char_p, [P, ctypes.c_uint32]),
    ("btf__type_cnt", ctypes.c_uint32, [P]),
    ("btf__resolve_size", ctypes.c_long, [P, ctypes.c_uint32]),
]


class ProgRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1 bpf.h)."""

    _fields_ = [
        ("sz", c_size),
        ("data_in", P),
        ("data_out", P),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", P),
        ("ctx_out", P),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with every function we use typed."""
    global _lib
    with _lib_lock:
        if _lib is None:
            handle = _load()
            for name, restype, argtypes in _SIGNATURES:
                try:
                    fn = getattr(handle, name)
                except AttributeError as exc:
                    raise BpfUnavailableError(f"system libbpf lacks {name}(): kscope needs libbpf >= 1.1") from exc
                fn.restype = restype
                fn.argtypes = argtypes
            _lib = handle
            _install_printer()
        return _lib


def check_ptr(ptr: int | None, what: str) -> int:
    """Raise LibbpfError if a libbpf pointer-returning call failed."""
    if not ptr:
        err = ctypes.get_errno() or errno.EINVAL
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return ptr


def check_int(ret: int, what: str) -> int:
    """Raise LibbpfError if a libbpf int-returning call failed (negative errno)."""
    if ret < 0:
        err = -ret if ret != -1 else (ctypes.get_errno() or errno.EINVAL)
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return ret


# ---- libbpf's log, routed to Python ---------------------------------------------------------

_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, P)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.restype = c_int
_libc.vsnprintf.argtypes = [c_char_p, c_size, c_char_p, P]

LogSink = Callable[[int, str], None]
_sinks: list[LogSink] = []
_sinks_lock = threading.Lock()


def _printer(level: int, fmt: bytes, args: int) -> int:
    buf = ctypes.create_string_buffer(2048)
    # On x86-64 and arm64 a va_list argument is passed as a pointer: vsnprintf takes it as is.
    _libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip("\n")
    with _sinks_lock:
        sinks = list(_sinks)
    for sink in sinks:
        sink(level, text)
    return 0


_printer_cb = _PRINT_FN(_printer)


def _install_printer() -> None:
    assert _lib is not None
    _lib.libbpf_set_print(ctypes.cast(_printer_cb, P))


class capture_log:
    """Context manager collecting libbpf's log lines emitted inside it (this thread's calls)."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def _sink(self, level: int, text: str) -> None:
        self.lines.append((level, text))

    def __enter__(self) -> capture_log:
        lib()
        with _sinks_lock:
            _sinks.append(self._sink)
        return self

    def __exit__(self, *exc: object) -> None:
        with _sinks_lock:
            _sinks.remove(self._sink)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


# ---- option structs -------------------------------------------------------------------------


class BpfUprobeOpts(ctypes.Structure):
    """struct bpf_uprobe_opts as of libbpf 1.1."""

    _fields_ = [
        ("sz", c_size),
        ("ref_ctr_offset", c_size),
        ("bpf_cookie", ctypes.c_uint64),
        ("retprobe", ctypes.c_bool),
        ("func_name", c_char_p),
    ]


class BatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts."""

    _fields_ = [("sz", c_size), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


# ---- uprobe_multi links: libbpf 1.1 predates them (Linux 6.6), so a raw bpf(2) call -------

BPF_LINK_CREATE = 28
BPF_TRACE_UPROBE_MULTI = 48
BPF_F_UPROBE_MULTI_RETURN = 1
_NR_BPF = {"x86_64": 321, "aarch64": 280}


class BpfLinkCreateUprobeMulti(ctypes.Structure):
    """union bpf_attr, its link_create member with the uprobe_multi arm (include/uapi/linux/bpf.h).

    128 bytes, the tail zero: the kernel accepts a shorter or longer attr if the bytes it does
    not know are zero.
    """

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("path", ctypes.c_uint64),  # const char *
        ("offsets", ctypes.c_uint64),  # const unsigned long *: file offsets
        ("ref_ctr_offsets", ctypes.c_uint64),
        ("cookies", ctypes.c_uint64),  # const __u64 *: bpf_get_attach_cookie() per offset
        ("cnt", ctypes.c_uint32),
        ("uprobe_flags", ctypes.c_uint32),  # BPF_F_UPROBE_MULTI_RETURN
        ("pid", ctypes.c_uint32),  # 0: every process
        ("_pad", ctypes.c_uint8 * 68),
    ]


def link_create_uprobe_multi(
    prog_fd: int, path: str, offsets: list[int], cookies: list[int], *, retprobe: bool, pid: int = 0
) -> int:
    """Create a uprobe_multi link; returns its fd (closing it destroys the link).

    Raises OSError with the kernel's errno on failure.
    """
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    if len(offsets) != len(cookies) or not offsets:
        raise ValueError("uprobe_multi needs one cookie per offset, and at least one offset")
    c_path = ctypes.create_string_buffer(os.fsencode(path))
    c_offsets = (ctypes.c_uint64 * len(offsets))(*offsets)
    c_cookies = (ctypes.c_uint64 * len(cookies))(*cookies)
    attr = BpfLinkCreateUprobeMulti(
        prog_fd=prog_fd,
        attach_type=BPF_TRACE_UPROBE_MULTI,
        path=ctypes.addressof(c_path),
        offsets=ctypes.addressof(c_offsets),
        cookies=ctypes.addressof(c_cookies),
        cnt=len(offsets),
        uprobe_flags=BPF_F_UPROBE_MULTI_RETURN if retprobe else 0,
        pid=pid,
    )
    _libc.syscall.restype = ctypes.c_long
    size = c_uint(ctypes.sizeof(attr))
    fd = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_long(BPF_LINK_CREATE), ctypes.byref(attr), size))
    if fd < 0:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, os.strerror(err))
    return fd
