"""Which container, pod and runtime a process belongs to, read from its ``/proc/PID/cgroup`` text.

The cgroup path is the one piece of container identity the kernel hands every process, on every
runtime, without asking the runtime: kubelet and the runtimes encode the pod UID and the container
ID in it. This module only parses text (sans-I/O) so it can be tested on every layout we know of
without a cluster; ``proc.py`` does the reading.

Layouts recognised (innermost container wins, so Kubernetes-in-Docker resolves to the pod's
container rather than the node container that holds it):

* kubelet, cgroupfs driver: ``/kubepods[/<qos>]/pod<uid>/<id>`` (runtime not encoded)
* kubelet, systemd driver: ``.../kubepods-<qos>-pod<uid_underscored>.slice/<prefix>-<id>.scope``
  with ``cri-containerd``, ``crio`` or ``docker`` as prefix
* Docker: ``/docker/<id>`` or ``/system.slice/docker-<id>.scope``
* containerd outside Kubernetes: ``/<namespace>/<id>`` (runtime "": the namespace is free-form,
  so the path alone does not prove containerd made it) or ``nerdctl-<id>.scope`` (containerd)
* podman: ``libpod-<id>.scope`` (runtime "": podman is outside the runtimes we label)

Runtime monitors that sit next to a container (``crio-conmon-<id>.scope``,
``libpod-conmon-<id>.scope``) are not the container: they run in the host's namespaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# A real cgroup file has one line per v1 hierarchy (about a dozen) plus the v2 line; the caps
# only exist so a hostile or corrupt input costs bounded time.
MAX_LINE_CHARS = 4096
MAX_LINES = 256
# The longest segment we recognise is "cri-containerd-<64 hex>.scope" (85 chars); longer ones are
# skipped before any regex runs, which keeps the pod pattern's backtracking small.
_MAX_SEGMENT_CHARS = 128

# Scope prefix -> runtime label. Unknown prefixes never match, so a new runtime shows up as a host
# process rather than as a wrongly labelled container.
_RUNTIME_BY_PREFIX = {
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "docker": "docker",
    "nerdctl": "containerd",
    "libpod": "",
}

# Container IDs are 64 lowercase hex characters for every runtime we label; requiring exactly that
# keeps other hex-named cgroups (systemd, 32-hex job IDs) from posing as containers.
_CONTAINER_SEGMENT = re.compile(r"(?:(cri-containerd|crio|docker|nerdctl|libpod)-)?([0-9a-f]{64})(?:\.scope)?")

# Pod UIDs are RFC 4122 UUIDs, except static pods, whose UID is a 32-hex config hash. systemd
# escapes "-" inside a unit name, so its driver writes the UUID with underscores.
_POD_SEGMENT = re.compile(
    r"(?:[a-z0-9_.-]*kubepods[a-z0-9_-]*-)?pod"
    r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})"
    r"(?:\.slice)?"
)

_HIERARCHY_ID = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class ContainerIdentity:
    """Who a process runs as, container-wise. All fields empty means a host process."""

    container_id: str = ""  # 64 lowercase hex
    pod_uid: str = ""  # dashed UUID (or a static pod's 32-hex hash); "" outside Kubernetes
    runtime: str = ""  # "containerd", "cri-o", "docker" or "" when the path does not say

    @property
    def is_host(self) -> bool:
        return not self.container_id


HOST = ContainerIdentity()


def parse_cgroup_file(text: str) -> ContainerIdentity:
    """Identity from the full text of ``/proc/PID/cgroup``; ``HOST`` when none can be found.

    Hybrid hosts list v1 hierarchies and the v2 one side by side, and they need not agree: with
    the cgroupfs driver the v2 line is often just ``0::/``. So every line is parsed and the most
    informative answer wins (a container with a pod over a bare container), ties going to the v2
    line, then to the earliest.
    """
    best = HOST
    best_rank = (False, False, False)
    for hierarchy_id, path in _cgroup_lines(text):
        identity = parse_cgroup_path(path)
        rank = (not identity.is_host, bool(identity.pod_uid), hierarchy_id == "0")
        if rank > best_rank:
            best, best_rank = identity, rank
    return best


def parse_cgroup_path(path: str) -> ContainerIdentity:
    """Identity from one cgroup path, e.g. ``/kubepods/besteffort/pod<uid>/<id>``.

    Paths may be relative to the reader's cgroup namespace (``/../../kubepods-...``) when the
    agent itself runs in a private cgroupns; segments are matched on their own, so the leading
    ``..`` do no harm.
    """
    segments = path.split("/")
    # Innermost first: a container can hold cgroups of its own (systemd's init.scope, nested
    # runtimes), and the innermost container is the one the process belongs to.
    for index in range(len(segments) - 1, -1, -1):
        segment = segments[index]
        match = _CONTAINER_SEGMENT.fullmatch(segment) if len(segment) <= _MAX_SEGMENT_CHARS else None
        if match is None:
            continue
        prefix, container_id = match.group(1), match.group(2)
        if prefix is not None:
            runtime = _RUNTIME_BY_PREFIX[prefix]
        else:
            runtime = "docker" if index > 0 and segments[index - 1] == "docker" else ""
        return ContainerIdentity(container_id, _pod_uid(segments, index), runtime)
    return HOST


def _pod_uid(segments: list[str], container_index: int) -> str:
    # The pod is the nearest enclosing pod cgroup: an outer one would belong to a node of a
    # nested cluster, not to this container.
    for index in range(container_index - 1, -1, -1):
        segment = segments[index]
        match = _POD_SEGMENT.fullmatch(segment) if len(segment) <= _MAX_SEGMENT_CHARS else None
        if match is not None:
            return match.group(1).replace("_", "-")
    return ""


def _cgroup_lines(text: str) -> Iterator[tuple[str, str]]:
    """(hierarchy id, path) of each well-formed line, skipping over-long and malformed ones."""
    start = 0
    for _ in range(MAX_LINES):
        if start >= len(text):
            return
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        # Measured before slicing, so an over-long line is never copied.
        line_start, start = start, end + 1
        if end - line_start > MAX_LINE_CHARS:
            continue
        parts = text[line_start:end].rstrip("\r").split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, _controllers, path = parts
        if _HIERARCHY_ID.fullmatch(hierarchy_id) and path.startswith("/"):
            yield hierarchy_id, path
