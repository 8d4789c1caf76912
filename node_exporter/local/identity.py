"""Who a process is on one host without Kubernetes: parsed from text only (sans-I/O).

``kscope run`` names an endpoint by where the process runs: a container (the runtime's cgroup scope,
``metadata/cgroup.py`` already finds its id; its name comes from the runtime's own state files), else
the systemd unit the cgroup path shows (``/system.slice/nginx.service``), else the host. The process
name and executable are always kept. ``namer.py`` does the reading.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from cluster_processor.otlp.model import CONTAINER_ID, SERVICE_NAME, Attrs, AttrValue, attrs
from node_exporter.metadata.cgroup import MAX_LINE_CHARS, parse_cgroup_path

CONTAINER_NAME: Final = "container.name"
CONTAINER_RUNTIME: Final = "container.runtime"
PROCESS_EXECUTABLE_NAME: Final = "process.executable.name"
PROCESS_EXECUTABLE_PATH: Final = "process.executable.path"
SYSTEMD_UNIT: Final = "kscope.systemd.unit"  # no semantic convention names a systemd unit
HOST: Final = "host"

# systemd unit names (systemd.unit(5)): letters, digits, ":-_.\\", up to 255 chars, and a unit type.
# Only services are named: a scope is a session or a container, a slice a group of units.
_SERVICE: Final = re.compile(r"[A-Za-z0-9:_.\\@-]{1,248}\.service")
# Runtime prefixes of container scopes (metadata/cgroup.py); "" (podman's libpod) reads as podman.
_RUNTIME_OF_SCOPE: Final = re.compile(r"(cri-containerd|crio|docker|nerdctl|libpod)-[0-9a-f]{64}")
_RUNTIME_NAMES: Final = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker",
                         "nerdctl": "containerd", "libpod": "podman"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a process runs, from its cgroup path."""

    container_id: str = ""
    runtime: str = ""  # docker, podman, containerd, cri-o, or "" when the path does not say
    unit: str = ""  # a systemd service, e.g. "nginx.service"


def placement(cgroup_text: str) -> Placement:
    """``/proc/PID/cgroup`` text -> its container (innermost) or systemd service. The v2 line (``0::``)
    is read first; on a hybrid host where it is ``/`` the ``name=systemd`` v1 line says the unit."""
    paths: list[str] = []
    for line in cgroup_text.splitlines()[:256]:
        if len(line) > MAX_LINE_CHARS:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        if parts[0] == "0":
            paths.insert(0, parts[2])
        elif parts[1] == "name=systemd":
            paths.append(parts[2])
    for path in paths:
        found = placement_of_path(path)
        if found != Placement():
            return found
    return Placement()


def placement_of_path(path: str) -> Placement:
    container = parse_cgroup_path(path)
    segments = path.split("/")
    if container.container_id:
        runtime = container.runtime
        for segment in segments:
            m = _RUNTIME_OF_SCOPE.match(segment)
            if m is not None and container.container_id in segment:
                runtime = _RUNTIME_NAMES[m.group(1)]
        return Placement(container.container_id, runtime)
    for segment in reversed(segments):  # innermost: a service's own sub-cgroups sit below it
        if _SERVICE.fullmatch(segment):
            return Placement(unit=segment)
    return Placement()


def podman_names(containers_json: str) -> dict[str, str]:
    """containers/storage's ``containers.json`` (a list of ``{"id", "names"}``) -> id: first name.
    Bad input gives what could be read (possibly nothing), never an exception."""
    try:
        entries = json.loads(containers_json)
    except ValueError:
        return {}
    out: dict[str, str] = {}
    if isinstance(entries, list):
        for e in entries:
            if isinstance(e, dict) and isinstance(e.get("id"), str):
                names = e.get("names")
                if isinstance(names, list) and names and isinstance(names[0], str):
                    out[e["id"]] = names[0]
    return out


def docker_name(config_v2_json: str) -> str:
    """Docker's ``containers/<id>/config.v2.json`` -> its ``Name`` without the leading ``/``."""
    try:
        doc = json.loads(config_v2_json)
    except ValueError:
        return ""
    name = doc.get("Name") if isinstance(doc, dict) else None
    return name.lstrip("/") if isinstance(name, str) else ""


def process_attributes(comm: str, exe: str, where: Placement, container_name: str = "") -> Attrs:
    """An endpoint's identity: ``service.name`` is the container's name (else its short id), else
    the systemd unit, else the process name; the process name and executable are always there. No pid:
    every run of ``curl`` is one endpoint, as every pod of a Deployment is one workload."""
    pairs: dict[str, AttrValue] = {PROCESS_EXECUTABLE_NAME: comm or "?"}
    if exe:
        pairs[PROCESS_EXECUTABLE_PATH] = exe
    if where.container_id:
        name = container_name or where.container_id[:12]
        pairs.update({CONTAINER_ID: where.container_id, SERVICE_NAME: name})
        if container_name:
            pairs[CONTAINER_NAME] = container_name
        if where.runtime:
            pairs[CONTAINER_RUNTIME] = where.runtime
    elif where.unit:
        pairs.update({SYSTEMD_UNIT: where.unit, SERVICE_NAME: where.unit})
    else:
        pairs[SERVICE_NAME] = comm or HOST
    return attrs(pairs)


@lru_cache(maxsize=65_536)  # per point of every interval: the same few endpoints again and again
def short_label(endpoint: Attrs) -> str:
    """``label`` without where the process runs (``nginx:8080``): for narrow terminals."""
    d = dict(endpoint)
    port = f":{d['server.port']}" if d.get("server.port") else ""
    comm = d.get(PROCESS_EXECUTABLE_NAME)
    return f"{comm if comm is not None else d.get('server.address') or d.get('client.address') or '?'}{port}"


@lru_cache(maxsize=65_536)
def label(endpoint: Attrs) -> str:
    """How the map shows an endpoint: ``process@where`` (``nginx@nginx.service``, ``redis@web``,
    ``curl@host``), or its address when it is not a local process."""
    d = dict(endpoint)
    port = f":{d['server.port']}" if d.get("server.port") else ""
    comm = d.get(PROCESS_EXECUTABLE_NAME)
    if comm is None:
        return f"{d.get('server.address') or d.get('client.address') or '?'}{port}"
    where = d.get(CONTAINER_NAME) or (str(d[CONTAINER_ID])[:12] if CONTAINER_ID in d else None)
    return f"{comm}@{where or d.get(SYSTEMD_UNIT) or HOST}{port}"
