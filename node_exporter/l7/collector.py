"""The L7 probe: load, attach the OpenSSL uprobes, drain payload heads on the agent's timer."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from node_exporter.bpf.abi import L7Stat
from node_exporter.bpf.loader import BpfObject, LoadReport
from node_exporter.bpf.maps import read_percpu_u64_array
from node_exporter.bpf.ringbuf import RingReader
from node_exporter.l4.collector import default_bpf_dir
from node_exporter.l7.chunks import Chunk, decode_chunk
from node_exporter.l7.tls import TlsAttacher

OBJECT_NAME = "l7.bpf.o"
FULL_TLS_SCAN_S = 60.0  # between scans of every process's maps; new processes are read every tls_rescan_s
CAPABILITIES = {
    "l7_send": "l7.capture",
    "l7_recv": "l7.capture",
    "ssl_write_enter": "l7.tls",
    "ssl_read_enter": "l7.tls",
    "ssl_write_ex_enter": "l7.tls",
    "ssl_read_ex_enter": "l7.tls",
    "ssl_exit": "l7.tls",
}


@dataclass
class L7Stats:
    chunks: int = 0
    decode_errors: int = 0


class L7Collector:
    def __init__(
        self,
        object_path: str | os.PathLike[str] | None = None,
        *,
        netns_ino: int = 0,
        capture_bytes: int = 1024,
        ring_bytes: int | None = None,
        tls: bool = True,
        tls_rescan_s: float = 5.0,
        proc_root: str = "/proc",
    ) -> None:
        path = Path(object_path) if object_path else default_bpf_dir() / OBJECT_NAME
        self.obj = BpfObject(
            path,
            capabilities=CAPABILITIES,
            required=frozenset({"l7.capture"}),
            knobs={"capture_bytes": max(1, min(capture_bytes, 4096)), "filter_netns_ino": netns_ino},
            map_sizes={"l7_ring": ring_bytes} if ring_bytes else None,
        )
        try:
            _, _, size = self.obj.map_info("l7_ring")
            self._ring = RingReader(self.obj.map_fd("l7_ring"), size)
            self._stats_fd = self.obj.map_fd("l7_stats")
        except BaseException:
            self.obj.close()
            raise
        self.stats = L7Stats()
        self.tls: TlsAttacher | None = None
        if tls and "l7.tls" in self.obj.report.enabled:
            self.tls = TlsAttacher(self._attach_uprobe, proc_root=proc_root)
            self.tls.scan()
        self._tls_rescan_s = tls_rescan_s
        self._last_scan = self._last_full_scan = time.monotonic()

    @property
    def report(self) -> LoadReport:
        return self.obj.report

    def _attach_uprobe(self, program: str, binary: str, symbol: str, retprobe: bool) -> object:
        return self.obj.attach_uprobe(program, binary, symbol, retprobe=retprobe)

    def poll(self) -> list[Chunk]:
        now = time.monotonic()
        if self.tls is not None and now - self._last_scan >= self._tls_rescan_s:
            full = now - self._last_full_scan >= FULL_TLS_SCAN_S
            self._last_scan = now
            if full:
                self._last_full_scan = now
            self.tls.scan(full=full)
        out = []
        for raw in self._ring.drain():
            chunk = decode_chunk(raw)
            if chunk is None:
                self.stats.decode_errors += 1
            else:
                out.append(chunk)
        self.stats.chunks += len(out)
        return out

    def kernel_stats(self) -> dict[str, int]:
        values = read_percpu_u64_array(self._stats_fd, int(L7Stat.KSCOPE_L7_STATS))
        names = [s.name.removeprefix("KSCOPE_L7_STAT_").lower() for s in L7Stat if s != L7Stat.KSCOPE_L7_STATS]
        return dict(zip(names, values, strict=False))

    def close(self) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()
        self.obj.close()
