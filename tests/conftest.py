"""Suite-wide rules.

Kernel tests are marked ``bpf``. Where BPF cannot run (not root, no BTF) they skip,
except under ``KSCOPE_REQUIRE_BPF=1`` (CI), where any skip at all fails the run:
a kernel test that silently did not run is a failure, not a pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests check behaviour, not speed (bench/ measures speed): on a 2-core machine busy with
# kernel tests, one slow example must not fail them (hypothesis' 200 ms deadline, its too_slow check).
settings.register_profile("kscope", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("kscope")

REPO = Path(__file__).resolve().parents[1]
BPF_DIR = REPO / "build" / "bpf"
REQUIRE_BPF = os.environ.get("KSCOPE_REQUIRE_BPF") == "1"


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF"
    if not (BPF_DIR / "l4.bpf.o").exists():
        return "BPF objects not built (run make setup)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("bpf") is None:
        return
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_BPF:
        pytest.fail(f"KSCOPE_REQUIRE_BPF=1 but BPF is unavailable: {reason}")
    pytest.skip(f"BPF unavailable: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REQUIRE_BPF:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        if reporter:
            reporter.write_line(f"KSCOPE_REQUIRE_BPF=1: {skipped} test(s) skipped; a skip is a failure here", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def bpf_dir() -> Path:
    return BPF_DIR
