"""The checks before any BPF call: each failure is one line that names what is missing and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_exporter.bpf import preflight
from node_exporter.errors import BpfUnavailableError

BPF, PERFMON, NET_ADMIN, SYS_ADMIN = (1 << preflight.CAP_BPF, 1 << preflight.CAP_PERFMON,
                                      1 << preflight.CAP_NET_ADMIN, 1 << preflight.CAP_SYS_ADMIN)  # fmt: skip


def status(tmp_path: Path, caps: int, seccomp: int) -> str:
    path = tmp_path / "status"
    path.write_text(f"Name:\tkscope-agent\nCapEff:\t{caps:016x}\nNoNewPrivs:\t1\nSeccomp:\t{seccomp}\n")
    return str(path)


@pytest.mark.parametrize(
    ("caps", "named"),
    [
        (BPF | PERFMON, "missing capability CAP_NET_ADMIN "),
        (PERFMON | NET_ADMIN, "missing capability CAP_BPF "),
        (NET_ADMIN, "missing capabilities CAP_BPF, CAP_PERFMON "),
        (0, "missing capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN "),
    ],
)
def test_missing_capabilities_are_named_in_one_line(tmp_path: Path, caps: int, named: str) -> None:
    with pytest.raises(BpfUnavailableError) as err:
        preflight.check(status(tmp_path, caps, 0))
    message = str(err.value)
    assert message.startswith(named) and "\n" not in message, message


def test_sys_admin_stands_for_bpf_and_perfmon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = status(tmp_path, SYS_ADMIN | NET_ADMIN, 0)
    monkeypatch.setenv("KSCOPE_VMLINUX_BTF", path)  # any file: BTF is not what this test is about
    preflight.check(path)  # no error


def test_refused_under_seccomp_without_sys_admin_names_it(tmp_path: Path) -> None:
    reason = preflight.refused_reason(status(tmp_path, BPF | PERFMON | NET_ADMIN, 2))
    assert "seccomp filter without CAP_SYS_ADMIN" in reason and "add SYS_ADMIN" in reason and "\n" not in reason


@pytest.mark.parametrize(("caps", "seccomp"), [(BPF | PERFMON | NET_ADMIN, 0), (SYS_ADMIN | NET_ADMIN, 2)])
def test_refused_otherwise_does_not_blame_a_capability(tmp_path: Path, caps: int, seccomp: int) -> None:
    reason = preflight.refused_reason(status(tmp_path, caps, seccomp))
    assert "with the needed capabilities present" in reason and "CAP_SYS_ADMIN" not in reason, reason
    assert f"seccomp filter: {'yes' if seccomp else 'no'}" in reason
