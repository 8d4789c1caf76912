"""Find every libssl that processes map and attach the OpenSSL uprobes to it, once per file.

Uprobes attach to a file's inode, so one attachment covers every process (present and
future) that maps that file, whatever mount namespace it lives in; the file is reached
through ``/proc/PID/root`` so containers' own libssl copies are found too. New libraries
are picked up by :meth:`TlsAttacher.scan`, which the agent calls every few seconds.

Where the kernel has uprobe_multi links (Linux 6.6+) a file takes two links (one entry link
over the four functions, one return link) instead of eight perf-event uprobes: destroying
each perf-event link waits out an RCU grace period (~0.1 s), which made the agent's exit
take ~0.9 s per libssl file. The multi links need file offsets, read from the library's
ELF here; a file the multi path fails on falls back to the perf-event uprobes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from node_exporter.bpf.elf import ElfError, symbol_offsets
from node_exporter.errors import HookUnavailableError

log = structlog.get_logger("kscope.tls")

_LIBSSL = re.compile(r"\s(/\S*libssl\.so[.\d]*)$")
# symbol -> entry program of the perf-event path; all its return probes run `ssl_exit`.
# In this order, each symbol's index is its cookie on the multi path (enum kscope_tls_fn).
PROBES: dict[str, str] = {
    "SSL_write": "ssl_write_enter",
    "SSL_read": "ssl_read_enter",
    "SSL_write_ex": "ssl_write_ex_enter",
    "SSL_read_ex": "ssl_read_ex_enter",
}
EXIT_PROGRAM = "ssl_exit"
MULTI_ENTRY_PROGRAM = "ssl_enter"
MULTI_EXIT_PROGRAM = "ssl_exit_multi"
COOKIES = {symbol: i for i, symbol in enumerate(PROBES)}

Attach = Callable[[str, str, str, bool], object]  # (program, binary, symbol, retprobe)
# (binary, offsets, cookies): the entry and return links over those offsets, both or neither
AttachMulti = Callable[[str, Sequence[int], Sequence[int]], object]


@dataclass
class TlsAttacher:
    attach: Attach
    attach_multi: AttachMulti | None = None
    proc_root: str = "/proc"
    max_libraries: int = 256
    attached: dict[tuple[int, int], str] = field(default_factory=dict)
    failed: dict[tuple[int, int], str] = field(default_factory=dict)
    scans: int = 0
    multi_fallbacks: int = 0  # files the multi path failed on, attached (or not) per symbol instead
    _seen: set[str] = field(default_factory=set)

    def scan(self, *, full: bool = True) -> int:
        """Attach to libssl files mapped by processes; returns how many files were new.

        ``full=False`` reads only processes not seen by an earlier scan: reading every
        process's maps is the expensive part, and a file already attached covers every
        process that maps it. A full scan now and then catches a library dlopen()ed late.
        """
        self.scans += 1
        new = 0
        try:
            pids = {p for p in os.listdir(self.proc_root) if p.isdigit()}
        except OSError:
            return 0
        todo = pids if full else pids - self._seen
        self._seen = pids
        for pid in todo:
            for path in self._libssl_paths(pid):
                host_path = f"{self.proc_root}/{pid}/root{path}"
                try:
                    st = os.stat(host_path)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in self.attached or key in self.failed:
                    continue
                if len(self.attached) + len(self.failed) >= self.max_libraries:
                    return new
                if self._attach_file(key, host_path, path):
                    new += 1
        return new

    def _libssl_paths(self, pid: str) -> set[str]:
        out = set()
        try:
            with open(f"{self.proc_root}/{pid}/maps") as fh:
                for line in fh:
                    if "libssl" in line:
                        m = _LIBSSL.search(line.rstrip("\n"))
                        if m:
                            out.add(m.group(1))
        except OSError:
            pass
        return out

    def _attach_file(self, key: tuple[int, int], host_path: str, shown: str) -> bool:
        errors: list[str] = []
        if self.attach_multi is not None:
            done = self._attach_multi(host_path, errors)
            if done:
                self.attached[key] = shown
                log.info("tls_library_attached", library=shown, symbols=done, links="uprobe_multi")
                return True
            self.multi_fallbacks += 1
            log.info("tls_uprobe_multi_fallback", library=shown, reason="; ".join(errors)[:300])
        done = 0
        for symbol, program in PROBES.items():
            try:
                self.attach(program, host_path, symbol, False)
                self.attach(EXIT_PROGRAM, host_path, symbol, True)
                done += 1
            except HookUnavailableError as exc:  # e.g. OpenSSL 1.1 has no SSL_write_ex
                errors.append(str(exc))
        if done:
            self.attached[key] = shown
            log.info("tls_library_attached", library=shown, symbols=done)
            return True
        self.failed[key] = "; ".join(errors)[:500]
        log.warning("tls_library_not_attached", library=shown, reason=self.failed[key])
        return False

    def _attach_multi(self, host_path: str, errors: list[str]) -> int:
        """Both multi links over every SSL_* function the file has; how many functions (0: failed)."""
        assert self.attach_multi is not None
        try:
            found = symbol_offsets(host_path, PROBES)
        except ElfError as exc:
            errors.append(str(exc))
            return 0
        symbols = [s for s, off in found.items() if off is not None]
        if not symbols:
            errors.append(f"{host_path} exports none of {', '.join(PROBES)}")
            return 0
        offsets = [found[s] or 0 for s in symbols]
        try:
            self.attach_multi(host_path, offsets, [COOKIES[s] for s in symbols])
        except HookUnavailableError as exc:
            errors.append(str(exc))
            return 0
        return len(symbols)
