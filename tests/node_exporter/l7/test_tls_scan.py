"""Finding libssl in process maps: one attachment per file, failures counted, bounded."""

from __future__ import annotations

import os
from pathlib import Path

from node_exporter.bpf.elf import symbol_offsets
from node_exporter.errors import HookUnavailableError
from node_exporter.l7.tls import COOKIES, EXIT_PROGRAM, PROBES, TlsAttacher


def _proc(tmp: Path, pid: int, maps: str) -> None:
    d = tmp / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "maps").write_text(maps)
    os.symlink("/", d / "root")


LINE = "7f1c2e000000-7f1c2e05a000 r--p 00000000 fe:00 339900 {path}\n"


def test_each_library_file_is_attached_once(tmp_path: Path) -> None:
    lib = next(p for p in ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "/lib/x86_64-linux-gnu/libssl.so.3",
                           "/usr/lib/aarch64-linux-gnu/libssl.so.3") if os.path.exists(p))  # fmt: skip
    _proc(tmp_path, 10, LINE.format(path=lib) * 3 + LINE.format(path="/usr/lib/libc.so.6"))
    _proc(tmp_path, 11, LINE.format(path=lib))
    calls: list[tuple[str, str, str, bool]] = []
    att = TlsAttacher(lambda *a: calls.append(a), proc_root=str(tmp_path / "proc"))
    assert att.scan() == 1
    assert att.scan() == 0  # already attached
    assert len(att.attached) == 1
    assert {(c[0], c[2], c[3]) for c in calls} == {(p, s, False) for s, p in PROBES.items()} | {
        (EXIT_PROGRAM, s, True) for s in PROBES
    }


def test_a_library_without_the_symbols_is_recorded_as_failed(tmp_path: Path) -> None:
    _proc(tmp_path, 12, LINE.format(path="/bin/true").replace("/bin/true", "/usr/bin/libssl.so.99"))

    def refuse(*_: object) -> None:
        raise HookUnavailableError("no such symbol")

    (tmp_path / "proc/12/root").unlink()
    fake_root = tmp_path / "root12"
    (fake_root / "usr/bin").mkdir(parents=True)
    (fake_root / "usr/bin/libssl.so.99").write_bytes(b"not a library")
    os.symlink(fake_root, tmp_path / "proc/12/root")
    att = TlsAttacher(refuse, proc_root=str(tmp_path / "proc"))
    assert att.scan() == 0
    assert len(att.failed) == 1 and "no such symbol" in next(iter(att.failed.values()))


def test_vanished_processes_and_garbage_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "99").mkdir()  # no maps file
    (tmp_path / "proc" / "self").mkdir()
    att = TlsAttacher(lambda *a: None, proc_root=str(tmp_path / "proc"))
    assert att.scan() == 0
    assert TlsAttacher(lambda *a: None, proc_root=str(tmp_path / "nope")).scan() == 0


def test_quick_scans_read_only_new_processes(tmp_path: Path) -> None:
    lib = next(p for p in ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "/lib/x86_64-linux-gnu/libssl.so.3",
                           "/usr/lib/aarch64-linux-gnu/libssl.so.3") if os.path.exists(p))  # fmt: skip
    _proc(tmp_path, 20, "")
    calls: list[object] = []
    att = TlsAttacher(lambda *a: calls.append(a), proc_root=str(tmp_path / "proc"))
    assert att.scan() == 0
    (tmp_path / "proc/20/maps").write_text(LINE.format(path=lib))  # the old process dlopen()s libssl
    assert att.scan(full=False) == 0  # not re-read by a quick scan
    _proc(tmp_path, 21, "")
    assert att.scan(full=False) == 0
    assert att.scan(full=True) == 1 and calls


def test_number_of_libraries_is_bounded(tmp_path: Path) -> None:
    for pid in range(30, 36):  # six distinct "libssl" files
        root = tmp_path / f"root{pid}"
        (root / "lib").mkdir(parents=True)
        (root / "lib/libssl.so.3").write_bytes(b"x")
        d = tmp_path / "proc" / str(pid)
        d.mkdir(parents=True)
        (d / "maps").write_text(LINE.format(path="/lib/libssl.so.3"))
        os.symlink(root, d / "root")
    att = TlsAttacher(lambda *a: None, proc_root=str(tmp_path / "proc"), max_libraries=4)
    assert att.scan() == 4
    assert len(att.attached) + len(att.failed) == 4


# ---- the uprobe_multi path: two links per file, the perf-event path when it fails ----------


def _libssl() -> str:
    return next(p for p in ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "/lib/x86_64-linux-gnu/libssl.so.3",
                            "/usr/lib/aarch64-linux-gnu/libssl.so.3") if os.path.exists(p))  # fmt: skip


def test_multi_path_takes_offsets_and_cookies_in_probe_order(tmp_path: Path) -> None:
    lib = _libssl()
    _proc(tmp_path, 40, LINE.format(path=lib))
    multi: list[tuple[str, list[int], list[int]]] = []
    perf: list[object] = []
    att = TlsAttacher(
        lambda *a: perf.append(a),
        lambda binary, offsets, cookies: multi.append((binary, list(offsets), list(cookies))),
        proc_root=str(tmp_path / "proc"),
    )
    assert att.scan() == 1 and len(att.attached) == 1 and not perf
    expected = symbol_offsets(lib, PROBES)
    assert multi == [(f"{tmp_path}/proc/40/root{lib}", [expected[s] for s in PROBES], list(range(len(PROBES))))]
    assert COOKIES == {"SSL_write": 0, "SSL_read": 1, "SSL_write_ex": 2, "SSL_read_ex": 3}


def test_multi_failure_falls_back_to_perf_event_uprobes(tmp_path: Path) -> None:
    _proc(tmp_path, 41, LINE.format(path=_libssl()))
    perf: list[tuple[str, str, str, bool]] = []

    def refuse(*_: object) -> None:
        raise HookUnavailableError("uprobe_multi: Invalid argument")

    att = TlsAttacher(lambda *a: perf.append(a), refuse, proc_root=str(tmp_path / "proc"))
    assert att.scan() == 1 and len(att.attached) == 1 and att.multi_fallbacks == 1
    assert len(perf) == 2 * len(PROBES)


def test_garbage_library_on_the_multi_path_is_recorded_as_failed(tmp_path: Path) -> None:
    root = tmp_path / "root42"
    (root / "lib").mkdir(parents=True)
    (root / "lib/libssl.so.3").write_bytes(b"\x7fELF garbage")
    d = tmp_path / "proc" / "42"
    d.mkdir(parents=True)
    (d / "maps").write_text(LINE.format(path="/lib/libssl.so.3"))
    os.symlink(root, d / "root")
    multi: list[object] = []

    def refuse(*_: object) -> None:
        raise HookUnavailableError("no such symbol")

    att = TlsAttacher(refuse, lambda *a: multi.append(a), proc_root=str(tmp_path / "proc"))
    assert att.scan() == 0 and not multi and att.multi_fallbacks == 1
    assert "no such symbol" in next(iter(att.failed.values()))


def test_cookies_match_the_bpf_enum(bpf_dir: Path) -> None:
    from node_exporter.bpf import libbpf as lb
    from node_exporter.bpf.btf import Btf

    with Btf(lb.check_ptr(lb.lib().btf__parse(str(bpf_dir / "l7.bpf.o").encode(), None), "l7 BTF"), owned=True) as btf:
        values = btf.enum_values("kscope_tls_fn")
    names = {"SSL_write": "WRITE", "SSL_read": "READ", "SSL_write_ex": "WRITE_EX", "SSL_read_ex": "READ_EX"}
    assert {f"KSCOPE_TLS_FN_{names[s]}": c for s, c in COOKIES.items()} == values
