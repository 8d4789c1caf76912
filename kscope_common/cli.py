"""What every kscope command line shares: its exit codes (documented in each one's --help) and
``--version``.

A usage error and an environment error need different fixes (change the command, or change the
host, pod or its privileges), so they exit differently; an orchestrator or script can tell them
apart without reading the message.
"""

from __future__ import annotations

import argparse
from importlib import metadata
from typing import Final

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2  # argparse's own code for a bad command line; flag values we reject use it too
EXIT_ENVIRONMENT: Final = 3  # the command is fine, where it runs is not (privilege, kernel, ports, cluster)
DISTRIBUTION: Final = "kscope"


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def exit_status_epilog(environment: str) -> str:
    """The --help epilog listing the exit codes; ``environment`` names this command's environment
    failures."""
    return (
        "exit status:\n"
        f"  {EXIT_OK}  stopped normally\n"
        f"  {EXIT_USAGE}  usage error: a bad flag or value, or a file it names cannot be read\n"
        f"  {EXIT_ENVIRONMENT}  environment error: {environment}\n"
        "  1  anything else (a bug: the traceback says where)"
    )


def parser(prog: str, description: str, environment: str) -> argparse.ArgumentParser:
    """An ArgumentParser with ``--version`` and the exit codes in its epilog (kept as written)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=exit_status_epilog(environment),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(p)
    return p
