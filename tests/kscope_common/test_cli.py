"""The contract every kscope command line keeps, checked on the installed entry points as a user
runs them: ``--version`` prints the installed package's version, ``--help`` documents the exit
codes, and a bad command line exits 2 (argparse's code), distinct from environment errors (3)."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from kscope_common.cli import EXIT_ENVIRONMENT, EXIT_OK, EXIT_USAGE

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
# (argv, the name --version and usage lines print)
COMMANDS = [(["kscope"], "kscope"), (["kscope", "run"], "kscope run"), (["kscope-agent"], "kscope-agent"),
            (["kscope-processor"], "kscope-processor")]  # fmt: skip
IDS = [name for _, name in COMMANDS]


def _run(argv: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:], *args], capture_output=True, text=True, timeout=60)


def test_the_codes_are_distinct() -> None:
    assert len({EXIT_OK, 1, EXIT_USAGE, EXIT_ENVIRONMENT}) == 4 and EXIT_USAGE == 2  # 2 is argparse's


@pytest.mark.parametrize(("argv", "name"), COMMANDS, ids=IDS)
def test_version_is_the_installed_package_version(argv: list[str], name: str) -> None:
    proc = _run(argv, "--version")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.strip() == f"{name} {metadata.version('kscope')}"


@pytest.mark.parametrize(("argv", "name"), COMMANDS, ids=IDS)
def test_help_documents_the_exit_codes(argv: list[str], name: str) -> None:
    proc = _run(argv, "--help")
    assert proc.returncode == EXIT_OK, proc.stderr
    epilog = proc.stdout.split("exit status:\n", 1)[1]
    assert f"  {EXIT_USAGE}  usage error" in epilog
    assert f"  {EXIT_ENVIRONMENT}  environment error" in epilog


@pytest.mark.parametrize(("argv", "name"), COMMANDS, ids=IDS)
def test_a_bad_command_line_is_a_usage_error(argv: list[str], name: str) -> None:
    proc = _run(argv, "--no-such-flag")
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" not in proc.stderr and f"{argv[0]}: error: " in proc.stderr
