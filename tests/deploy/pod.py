"""Run kscope's image with podman as the Helm chart would have Kubernetes run it.

Everything the chart decides about a container (command, args, env, security context, host
namespaces, volumes) is read from the rendered workload and translated into podman flags here;
nothing of it is restated. A field this module does not know how to translate is an error, so a
chart change cannot slip past the image tests unnoticed. What only a cluster provides (the values
of ``fieldRef`` variables, where a Service name resolves, the pod network) the caller supplies.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
IMAGE_REF = REPO / "build" / "image.ref"
# The Makefile builds with these settings (runc, no raised rlimits); runs use the same.
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"

Manifest = dict[str, Any]

# Fields that do not change what the container may do on the node, or that a single host has no
# counterpart for: scheduling, probes, ports (host network or published by the caller), resources.
_IGNORED_POD = {"serviceAccountName", "automountServiceAccountToken", "dnsPolicy", "terminationGracePeriodSeconds",
                "nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"}  # fmt: skip
_IGNORED_CONTAINER = {"name", "image", "imagePullPolicy", "ports", "readinessProbe", "livenessProbe", "resources"}


class Untranslatable(ValueError):
    """The rendered manifest holds something this module cannot express as podman flags."""


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env())
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def built_image() -> str:
    """The tag `make image` built last (build/image.ref), checked to be the current sources' and to
    exist in podman's store."""
    if not IMAGE_REF.exists():
        raise RuntimeError(f"{IMAGE_REF} missing: run `make image` (make test does)")
    ref = IMAGE_REF.read_text().strip()
    want = subprocess.run(["make", "-s", "--no-print-directory", "image-tag"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    if ref != want:
        raise RuntimeError(f"{ref} was built from other sources than these ({want}): run `make image`")
    if podman("image", "exists", ref, check=False).returncode != 0:
        raise RuntimeError(f"{ref} (from {IMAGE_REF}) is not in podman's store: run `make image`")
    return ref


def _size_option(limit: str) -> str:
    """A Kubernetes quantity (``64Mi``) as a tmpfs size (``64m``)."""
    for suffix, unit in (("Ki", "k"), ("Mi", "m"), ("Gi", "g")):
        if limit.endswith(suffix):
            return limit[: -len(suffix)] + unit
    if limit.isdigit():
        return limit
    raise Untranslatable(f"emptyDir sizeLimit {limit!r}")


def _security_flags(pod_ctx: Mapping[str, Any], ctr_ctx: Mapping[str, Any]) -> list[str]:
    known_pod = {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "seccompProfile", "supplementalGroups"}
    known_ctr = {"runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile", "privileged", "allowPrivilegeEscalation",
                 "readOnlyRootFilesystem", "capabilities"}  # fmt: skip
    for ctx, known in ((pod_ctx, known_pod), (ctr_ctx, known_ctr)):
        if unknown := set(ctx) - known:
            raise Untranslatable(f"securityContext fields {sorted(unknown)}")
    # The container's settings win over the pod's (Kubernetes' precedence).
    merged = {**pod_ctx, **ctr_ctx}
    flags: list[str] = []
    uid, gid = merged.get("runAsUser"), merged.get("runAsGroup")
    if merged.get("runAsNonRoot") and not uid:
        raise Untranslatable("runAsNonRoot without a non-zero runAsUser: the kubelet would refuse to start it")
    if uid is not None:
        flags.append(f"--user={uid}" + (f":{gid}" if gid is not None else ""))
    for group in [*merged.get("supplementalGroups", []), *([merged["fsGroup"]] if "fsGroup" in merged else [])]:
        flags.append(f"--group-add={group}")
    if merged.get("privileged"):
        flags.append("--privileged")
    if merged.get("allowPrivilegeEscalation") is False:
        flags.append("--security-opt=no-new-privileges")
    if merged.get("readOnlyRootFilesystem"):
        # Exactly the chart's writable paths: podman would otherwise add tmpfs on /tmp, /run, /var/tmp.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    caps = merged.get("capabilities", {})
    if unknown := set(caps) - {"add", "drop"}:
        raise Untranslatable(f"capabilities fields {sorted(unknown)}")
    flags += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])]
    flags += [f"--cap-add={c}" for c in caps.get("add", [])]
    seccomp = merged.get("seccompProfile", {"type": "RuntimeDefault"})
    if seccomp["type"] == "Unconfined":
        flags.append("--security-opt=seccomp=unconfined")
    elif seccomp["type"] != "RuntimeDefault":  # RuntimeDefault: podman's own default profile, no flag
        raise Untranslatable(f"seccompProfile {seccomp}")
    return flags


def _volume_flags(volumes: list[Manifest], mounts: list[Manifest]) -> list[str]:
    by_name = {v["name"]: v for v in volumes}
    flags: list[str] = []
    for mount in mounts:
        if unknown := set(mount) - {"name", "mountPath", "readOnly"}:
            raise Untranslatable(f"volumeMount fields {sorted(unknown)}")
        vol, target, ro = by_name[mount["name"]], mount["mountPath"], bool(mount.get("readOnly"))
        if "hostPath" in vol:
            src, kind = vol["hostPath"]["path"], vol["hostPath"].get("type", "")
            if kind == "Directory" and not Path(src).is_dir():  # the kubelet's check for this type
                raise Untranslatable(f"hostPath {src} is not a directory on this host")
            flags.append(f"--volume={src}:{target}:{'ro' if ro else 'rw'}")
        elif "emptyDir" in vol:
            opts = ["ro" if ro else "rw"]
            if "sizeLimit" in vol["emptyDir"]:
                opts.append(f"size={_size_option(vol['emptyDir']['sizeLimit'])}")
            flags.append(f"--tmpfs={target}:{','.join(opts)}")
        else:
            raise Untranslatable(f"volume {vol}")
    return flags


def _env(env: list[Manifest], field_refs: Mapping[str, str]) -> dict[str, str]:
    values = {}
    for item in env:
        if "value" in item:
            value = item["value"]
        elif "fieldRef" in item.get("valueFrom", {}):
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in field_refs:
                raise Untranslatable(f"env {item['name']}: no value given for fieldRef {path}")
            value = field_refs[path]
        else:
            raise Untranslatable(f"env {item}")
        values[item["name"]] = value
    return values


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(arg: str, env: Mapping[str, str]) -> str:
    """The kubelet's expansion of ``$(VAR)`` in command and args from the container's env (``$$``
    escapes a ``$``; a variable the env does not define stays as written)."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(one, arg)


def run_args(
    workload: Manifest,
    image: str,
    *,
    field_refs: Mapping[str, str],
    network: str | None = None,
    extra: tuple[str, ...] = (),
    args: list[str] | None = None,
) -> list[str]:
    """``podman run`` arguments (after ``run``) for the workload's one container.

    ``network``: the pod network for a pod without hostNetwork (a cluster's CNI decides it).
    ``args``: the container's args after the caller resolved what only a cluster resolves."""
    pod = workload["spec"]["template"]["spec"]
    if unknown := set(pod) - _IGNORED_POD - {"hostPID", "hostNetwork", "hostIPC", "securityContext", "containers",
                                             "volumes"}:  # fmt: skip
        raise Untranslatable(f"pod fields {sorted(unknown)}")
    (ctr,) = pod["containers"]
    if unknown := set(ctr) - _IGNORED_CONTAINER - {"command", "args", "env", "securityContext", "volumeMounts"}:
        raise Untranslatable(f"container fields {sorted(unknown)}")
    # --http-proxy=false: a pod gets no proxy variables from its node; podman would pass the host's.
    flags = [f"--pid={'host' if pod.get('hostPID') else 'private'}",
             f"--ipc={'host' if pod.get('hostIPC') else 'private'}", "--http-proxy=false"]  # fmt: skip
    if pod.get("hostNetwork"):
        flags.append("--network=host")
    elif network is None:
        raise Untranslatable("the pod has no hostNetwork: the caller must say which network stands for the pod's")
    else:
        flags.append(f"--network={network}")
    flags += _security_flags(pod.get("securityContext", {}), ctr.get("securityContext", {}))
    flags += _volume_flags(pod.get("volumes", []), ctr.get("volumeMounts", []))
    env = _env(ctr.get("env", []), field_refs)
    flags += [f"--env={name}={value}" for name, value in env.items()]
    (command,) = ctr["command"]
    argv = [_expand(arg, env) for arg in (ctr.get("args", []) if args is None else args)]
    return [*flags, *extra, f"--entrypoint={_expand(command, env)}", image, *argv]


class Container:
    """One ``podman run`` in the foreground; its output (a container's stderr comes through the
    client's) read by a thread into :attr:`lines`, so waits have deadlines."""

    def __init__(self, name: str, run: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(["podman", "run", f"--name={name}", *run], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=podman_env())  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.proc.wait()
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        """The first line holding ``needle``; AssertionError (with the output) if the container
        exits or the deadline passes first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if needle in line), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if self.proc.returncode is not None or left <= 0:
                    state = f"exit {self.proc.returncode}" if self.proc.returncode is not None else f"{timeout}s"
                    raise AssertionError(f"{self.name}: no {needle!r} ({state}):\n{''.join(self.lines)[-4000:]}")
                self._changed.wait(left)

    def wait(self, timeout: float = 60) -> int:
        """The exit code once the container ended and its output is all read."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as the kubelet stops a pod; the exit code."""
        podman("stop", "--time=20", self.name, timeout=timeout)
        return self.wait(timeout)

    def pid(self, timeout: float = 30) -> int:
        """The host pid of the container's first process, once it runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = podman("inspect", "--format", "{{.State.Pid}}", self.name, check=False).stdout.strip()
            if out.isdigit() and int(out) > 0:
                return int(out)
            time.sleep(0.1)
        raise TimeoutError(f"container {self.name} has no process after {timeout}s")


@dataclass
class Containers:
    """Containers a test starts, each under a fresh name; :meth:`close` removes them all, whatever
    happened (never the image)."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    started: list[Container] = field(default_factory=list)

    def start(self, role: str, run: list[str]) -> Container:
        ctr = Container(f"kscope-test-{self.tag}-{role}", run)
        self.started.append(ctr)
        return ctr

    def close(self) -> None:
        for ctr in reversed(self.started):
            podman("rm", "--force", "--time=5", "--ignore", ctr.name, check=False, timeout=60)
            with contextlib.suppress(Exception):
                ctr.wait(10)
        self.started.clear()

    def __enter__(self) -> Containers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
