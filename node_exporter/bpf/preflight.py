"""Checks before any BPF call, each failing with a message a user can act on."""

from __future__ import annotations

import os
from pathlib import Path

from node_exporter.errors import BpfUnavailableError

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
_CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON",
              CAP_BPF: "CAP_BPF"}  # fmt: skip
DEFAULT_BTF = "/sys/kernel/btf/vmlinux"


def _status_field(name: str, status_path: str) -> str:
    with open(status_path) as fh:
        for line in fh:
            if line.startswith(f"{name}:"):
                return line.split()[1]
    return ""


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    return int(_status_field("CapEff", status_path) or "0", 16)


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
        uid = os.geteuid()
        # uid 0 without them: a container (or capability bounding set) that did not grant them.
        hint = "try: sudo kscope run" if uid else "grant them to its container (charts/kscope adds them)"
        raise BpfUnavailableError(
            f"missing {'capability' if len(missing) == 1 else 'capabilities'} {', '.join(missing)} "
            f"(running as uid {uid}): kscope needs {'root, or ' if uid else ''}CAP_BPF and CAP_PERFMON "
            f"(or CAP_SYS_ADMIN for both) and CAP_NET_ADMIN to load and attach its probes; {hint}"
        )
    btf = btf_path()
    if not btf.exists():
        raise BpfUnavailableError(
            f"kernel BTF not found at {btf}: kscope needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (Linux >= 6.3)"
        )


def refused_reason(status_path: str = "/proc/self/status") -> str:
    """Why bpf() said EPERM although :func:`check` passed, as one line a user can act on."""
    filtered = _status_field("Seccomp", status_path) == "2"
    if filtered and not effective_capabilities(status_path) & (1 << CAP_SYS_ADMIN):
        # Measured with podman 4.3's default profile: bpf() refused to a process holding CAP_BPF and
        # CAP_PERFMON but not CAP_SYS_ADMIN (older containerd profiles do the same).
        return (
            "bpf() was refused (EPERM) under a seccomp filter without CAP_SYS_ADMIN: some container "
            "runtimes' default profiles (RuntimeDefault; podman's among them) allow bpf() only with "
            "CAP_SYS_ADMIN; add SYS_ADMIN (charts/kscope does) or use a seccomp profile that allows bpf()"
        )
    return (
        f"bpf() was refused (EPERM) with the needed capabilities present (seccomp filter: "
        f"{'yes' if filtered else 'no'}): a seccomp profile or an LSM policy (SELinux, AppArmor) denies it"
    )
