"""Checks before any BPF call, each failing with a message a user can act on."""

from __future__ import annotations

import os
from pathlib import Path

from node_exporter.errors import BpfUnavailableError

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
_CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON",
              CAP_BPF: "CAP_BPF"}  # fmt: skip
DEFAULT_BTF = "/sys/kernel/btf/vmlinux"


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_capabilities(caps: int) -> list[str]:
    """Names of what is missing to load and attach our probes (empty if nothing)."""
    has = {bit for bit in _CAP_NAMES if caps & (1 << bit)}
    missing = []
    # CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON on every kernel; the split ones need 5.8+.
    if CAP_SYS_ADMIN not in has:
        missing += [_CAP_NAMES[c] for c in (CAP_BPF, CAP_PERFMON) if c not in has]
    if CAP_NET_ADMIN not in has:
        missing.append(_CAP_NAMES[CAP_NET_ADMIN])
    return missing


def btf_path() -> Path:
    return Path(os.environ.get("KSCOPE_VMLINUX_BTF", DEFAULT_BTF))


def check(status_path: str = "/proc/self/status") -> None:
    """Raise BpfUnavailableError unless this process can load kscope's probes."""
    missing = missing_capabilities(effective_capabilities(status_path))
    if missing:
        raise BpfUnavailableError(
            f"kscope needs root, or the capabilities {', '.join(missing)} "
            f"(running as uid {os.geteuid()}); try: sudo kscope run"
        )
    btf = btf_path()
    if not btf.exists():
        raise BpfUnavailableError(
            f"kernel BTF not found at {btf}: kscope needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (Linux >= 6.3)"
        )
