"""deploy/Dockerfile, parsed with BuildKit's own parser (the ``dockerfile`` package wraps moby/buildkit's
Go parser) and cross-checked against the Makefile, the chart and pyproject, so drift between them
shows up without a build (tests/deploy/ build and run it, where podman is at hand).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import dockerfile
import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "deploy" / "Dockerfile"
IGNORE = REPO / "deploy" / "Dockerfile.dockerignore"


@pytest.fixture(scope="module")
def commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(RECIPE)))


def stages(commands: list[dockerfile.Command]) -> list[list[dockerfile.Command]]:
    result: list[list[dockerfile.Command]] = []
    for cmd in commands:
        if cmd.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(cmd)
    return result


def apt_packages(stage: list[dockerfile.Command]) -> set[str]:
    packages: set[str] = set()
    for cmd in stage:
        if cmd.cmd == "RUN":
            match = re.search(r"apt-get install ([^&]*)", cmd.value[0])
            if match:
                packages |= {w for w in match.group(1).split() if not w.startswith("-")}
    return packages


def test_header_says_how_it_is_built() -> None:
    header = RECIPE.read_text().split("\nARG ", 1)[0]
    assert "make image" in header
    assert "tests/deploy/" in header


def test_two_stages_on_one_debian_bookworm_base(commands: list[dockerfile.Command]) -> None:
    # Both stages on the same base: the virtualenv copied across needs the same Debian python3.
    args = [c.value[0] for c in commands if c.cmd == "ARG"]
    assert "BASE=debian:bookworm" in args
    froms = [c.value[0] for c in commands if c.cmd == "FROM"]
    assert froms == ["${BASE}", "${BASE}"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^IMAGE_RELEASE := bookworm$", makefile, re.M), "make image builds another Debian release"


def test_build_stage_uses_the_makefile_toolchain(commands: list[dockerfile.Command]) -> None:
    makefile = (REPO / "Makefile").read_text()
    clang = re.search(r"^CLANG\s*\?=\s*(\S+)", makefile, re.M)
    assert clang is not None
    build, runtime = stages(commands)
    assert {clang.group(1), "libbpf-dev", "bpftool", "make", "python3", "python3-venv"} <= apt_packages(build)
    assert {"python3", "libbpf1"} <= apt_packages(runtime)
    assert not apt_packages(runtime) & {clang.group(1), "libbpf-dev", "bpftool", "make"}


def test_copied_sources_exist_and_reach_the_context(commands: list[dockerfile.Command]) -> None:
    allowed = {line[1:].rstrip("/") for line in IGNORE.read_text().splitlines() if line.startswith("!")}
    sources = [src for c in commands if c.cmd == "COPY" and not c.flags for src in c.value[:-1]]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert src.rstrip("/") in allowed, f"{src} is excluded by {IGNORE.name}"


def test_every_python_package_is_copied(commands: list[dockerfile.Command]) -> None:
    # pip installs the packages pyproject names; a package missing from the image fails only at run time.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in patterns} - {"kscope"}  # kscope.v1 is generated from proto/ in the image
    sources = {src.rstrip("/") for c in commands if c.cmd == "COPY" and not c.flags for src in c.value[:-1]}
    assert packages <= sources, f"not copied into the image: {packages - sources}"


def test_image_matches_the_chart(commands: list[dockerfile.Command]) -> None:
    with helm.Chart.load(REPO / "charts" / "kscope") as chart:
        rendered = chart.render(None, name="kscope", namespace="kscope")
    manifests = [text for path, text in rendered.items() if not path.endswith("NOTES.txt")]
    docs = [d for text in manifests for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    workloads = {d["kind"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")}
    agent = workloads["DaemonSet"]["containers"][0]
    bpf_dir = next(a.split("=", 1)[1] for a in agent["args"] if a.startswith("--bpf-dir="))
    copies = {c.value[-1].rstrip("/") for c in commands if c.cmd == "COPY"}
    assert bpf_dir in copies
    # The image defaults to the processor's non-root user; the chart runs the processor as it.
    user = next(c.value[0] for c in commands if c.cmd == "USER")
    assert user == "65532:65532"
    assert workloads["Deployment"]["securityContext"]["runAsUser"] == 65532


@pytest.mark.parametrize(
    "command",
    [
        "kscope-agent",
        "kscope-processor",
    ],
)
def test_chart_commands_are_installed_scripts(command: str) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert command in scripts
