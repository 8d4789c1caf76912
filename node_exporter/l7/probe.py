"""What both L7 probes' collectors share: loading the object, its chunk ring ``l7_ring``
and shared counters ``l7_stats`` (the same names in l7.bpf.o and l7_syscalls.bpf.o,
declared once in bpf_src/l7_proto.h), turning the ring's records into :class:`Chunk`s, and
closing. :class:`~node_exporter.l7.collector.L7Collector` and
:class:`~node_exporter.l7.syscalls.SyscallL7Collector` add their own maps in ``_open``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from node_exporter.bpf.abi import L7_MAX_CAPTURE
from node_exporter.bpf.loader import BpfObject, LoadReport
from node_exporter.bpf.ringbuf import RingReader
from node_exporter.l7.chunks import Chunk, decode_chunk


def clamp_capture_bytes(n: int) -> int:
    """The capture_bytes knob as both objects accept it: 1 .. KSCOPE_L7_MAX_CAPTURE."""
    return max(1, min(n, L7_MAX_CAPTURE))


def own_process_knobs() -> dict[str, int]:
    """The knobs that make both objects leave this process's own sockets alone (l7_own_call in
    bpf_src/l7_proto.h): its pid as its pid namespace numbers it, and that namespace's identity,
    so the test holds with or without hostPID."""
    ns = os.stat("/proc/self/ns/pid")
    return {"own_tgid": os.getpid(), "own_pidns_dev": ns.st_dev, "own_pidns_ino": ns.st_ino}


@dataclass
class L7Stats:
    chunks: int = 0
    exchanges: int = 0  # exchange records received
    decode_errors: int = 0
    sweeps: int = 0


class L7Probe:
    def __init__(
        self,
        path: Path,
        capabilities: Mapping[str, str],
        knobs: Mapping[str, int],
        map_sizes: dict[str, int],
        off: Mapping[str, str] | None = None,
    ) -> None:
        self.obj = BpfObject(
            path,
            capabilities=capabilities,
            required=frozenset({"l7.capture"}),
            knobs=knobs,
            map_sizes=map_sizes or None,
            off=off,
        )
        try:
            _, _, size = self.obj.map_info("l7_ring")
            self._ring = RingReader(self.obj.map_fd("l7_ring"), size)
            self._stats_fd = self.obj.map_fd("l7_stats")
            self._open()
        except BaseException:
            self.close()
            raise
        self.stats = L7Stats()

    def _open(self) -> None:
        """Open the object's other maps and links; a failure closes the object."""

    @property
    def report(self) -> LoadReport:
        return self.obj.report

    def _chunks(self) -> list[Chunk]:
        """The chunk ring's records in ring order; the malformed ones counted, not raised."""
        out: list[Chunk] = []
        for raw in self._ring.drain():
            chunk = decode_chunk(raw)
            if chunk is None:
                self.stats.decode_errors += 1
            else:
                out.append(chunk)
        self.stats.chunks += len(out)
        return out

    def stop_capture(self) -> None:
        """Before the last drain: no more calls are captured (iterators and rings stay)."""
        self.obj.stop_capture()

    def final_sweep(self) -> None:
        """After stop_capture: make the kernel send what it holds back (read by the next poll)."""

    def close(self) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
