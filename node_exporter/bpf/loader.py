"""Open, configure, load and attach a BPF object; degrade per capability.

Each program belongs to a *capability* (a named feature such as ``l4.drops``). A
program whose hook this kernel lacks, or that the verifier rejects, disables its
capability with one log line; the object is then loaded without it and the agent
keeps running with the rest. Only a *required* capability failing is fatal.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from node_exporter.bpf import libbpf as lb
from node_exporter.bpf import preflight
from node_exporter.bpf.btf import KIND_STRUCT, KIND_TYPEDEF, Btf
from node_exporter.errors import BpfUnavailableError, HookUnavailableError, ObjectFileError

log = structlog.get_logger("kscope.bpf")

CGROUP2_CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_FAILED_PROG = re.compile(r"prog '([^']+)': failed to (?:load|attach|prepare)")
_ELF_MAGIC = b"\x7fELF"
# Sections without a target are attached by the caller (per library, per process).
_MANUAL_ATTACH = frozenset(
    {"uprobe", "uretprobe", "usdt", "uprobe.s", "uretprobe.s", "uprobe.multi", "uretprobe.multi", "syscall"}
)  # "syscall": never attached, only run (test_run)
# libbpf 1.3's section names for uprobe_multi programs; libbpf 1.1 does not know them
_MULTI_SECTIONS = frozenset({"uprobe.multi", "uretprobe.multi"})
_BPF_PROG_TYPE_KPROBE = 2
_EM_BPF = 247
_DESTROY_THREADS = 32


@dataclass(frozen=True, slots=True)
class Program:
    name: str
    section: str
    capability: str


@dataclass(frozen=True, slots=True, eq=False)
class FdLink:
    """A link libbpf does not know (a uprobe_multi link made by a raw bpf(2) call): its fd.

    Closing the fd destroys the link. Compared by identity, like libbpf's link pointers.
    """

    fd: int
    what: str


Link = int | FdLink  # a libbpf ``struct bpf_link *``, or an FdLink


def kernel_has_uprobe_multi(vmlinux: Btf) -> bool:
    """uprobe_multi links (Linux 6.6+): the kernel's BTF then has their link struct."""
    return vmlinux.find("bpf_uprobe_multi_link", KIND_STRUCT) >= 0


@dataclass
class LoadReport:
    """What loaded, and what was disabled and why (exported as self-metrics)."""

    enabled: set[str] = field(default_factory=set)
    disabled: dict[str, str] = field(default_factory=dict)


def find_cgroup2_root() -> str:
    for path in CGROUP2_CANDIDATES:
        if os.path.exists(os.path.join(path, "cgroup.controllers")):
            return path
    raise HookUnavailableError("no cgroup v2 hierarchy mounted (looked in /sys/fs/cgroup/unified, /sys/fs/cgroup)")


def find_tracefs() -> str | None:
    for path in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    # Classic tracepoints need tracefs for their ids; mount it if we may.
    try:
        os.makedirs(TRACEFS_CANDIDATES[0], exist_ok=True)
        ret = os.system(f"mount -t tracefs nodev {TRACEFS_CANDIDATES[0]} >/dev/null 2>&1")
    except OSError:
        return None
    if ret == 0 and os.path.isdir(os.path.join(TRACEFS_CANDIDATES[0], "events")):
        return TRACEFS_CANDIDATES[0]
    return None


def check_object_file(path: Path) -> None:
    """Clear errors for a missing or non-BPF file, before libbpf's terser ones."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except FileNotFoundError:
        raise ObjectFileError(f"BPF object {path} does not exist (run `make` to build bpf_src/)") from None
    except OSError as exc:
        raise ObjectFileError(f"cannot read BPF object {path}: {exc.strerror}") from None
    if len(head) < 20 or head[:4] != _ELF_MAGIC:
        raise ObjectFileError(f"{path} is not an ELF file (corrupt or wrong file?)")
    machine = int.from_bytes(head[18:20], "little")
    if machine != _EM_BPF:
        raise ObjectFileError(f"{path} is an ELF file for machine {machine}, not BPF ({_EM_BPF})")


def hook_missing(section: str, vmlinux: Btf) -> str | None:
    """Why the hook named by a program's section is unavailable here, or None if it exists.

    Only what can be checked cheaply and exactly is checked; anything else is left
    to the verifier/attach step, whose failure also disables the capability.
    """
    kind, _, target = section.partition("/")
    if kind in ("tp_btf", "raw_tp", "raw_tracepoint"):
        if vmlinux.find(f"btf_trace_{target}", KIND_TYPEDEF) < 0:
            return f"kernel has no tracepoint {target}"
    elif kind in ("tracepoint", "tp"):
        tracefs = find_tracefs()
        if tracefs is None:
            return "tracefs is not mounted and cannot be mounted"
        if not os.path.isdir(os.path.join(tracefs, "events", target)):
            return f"kernel has no tracepoint {target}"
    elif kind in ("kprobe", "kretprobe", "ksyscall", "kretsyscall"):
        tracefs = find_tracefs()
        if tracefs is None or not os.path.exists(os.path.join(tracefs, "kprobe_events")):
            return "kernel built without kprobes (CONFIG_KPROBES)"
    elif kind in ("fentry", "fexit", "fmod_ret", "lsm"):
        return None  # only the load can tell (EPERM on our kernels): handled there
    elif kind == "iter" and vmlinux.find(f"bpf_iter__{target}", KIND_STRUCT) < 0:
        # every BPF iterator target has its context struct, bpf_iter__<target>, in the kernel's BTF
        return f"kernel has no BPF iterator {target}"
    return None


class BpfObject:
    """One BPF object file, loaded and attached, with per-capability degradation.

    ``capabilities`` maps program name -> capability; programs not listed belong to
    capability ``"core"``. ``required`` capabilities failing raise HookUnavailableError.
    ``knobs`` set ``const volatile`` globals in ``.rodata`` before load; ``map_sizes``
    override max_entries. ``iter/`` programs are loaded but attached on demand.
    ``SEC("uprobe.multi")``/``SEC("uretprobe.multi")`` programs are for :meth:`attach_uprobe_multi`:
    loaded for uprobe_multi links where the kernel has them (``use_uprobe_multi=None``: ask
    the kernel's BTF; False forces them off, True skips the check) and not loaded at all
    elsewhere, or when the verifier refuses them; :attr:`uprobe_multi` says which. Their
    capability is untouched either way: the object keeps perf-event programs for the same
    hooks as the fallback.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        capabilities: Mapping[str, str] | None = None,
        required: frozenset[str] = frozenset({"core"}),
        knobs: Mapping[str, int] | None = None,
        map_sizes: Mapping[str, int] | None = None,
        cgroup_root: str | None = None,
        use_uprobe_multi: bool | None = None,
        off: Mapping[str, str] | None = None,
    ) -> None:
        """``off``: capabilities not to load at all, with the reason reported for each."""
        self.path = Path(path)
        self._capabilities = dict(capabilities or {})
        self._required = required
        self._knobs = dict(knobs or {})
        self._map_sizes = dict(map_sizes or {})
        self._cgroup_root = cgroup_root
        self._obj = 0
        self._links: list[tuple[str, Link]] = []
        self._iter_links: set[int] = set()  # kept by stop_capture: they read maps, they capture nothing
        self._multi_programs: frozenset[str] = frozenset()
        self.uprobe_multi = use_uprobe_multi is not False
        self._multi_forced = use_uprobe_multi is True
        self._cgroup_fd = -1
        self.report = LoadReport(disabled=dict(off or {}))
        self.programs: dict[str, Program] = {}
        check_object_file(self.path)
        self._load_with_degrade()
        try:
            self._attach_all()
        except BaseException:
            self.close()
            raise

    # ---- load ------------------------------------------------------------------------------

    def _capability(self, prog_name: str) -> str:
        return self._capabilities.get(prog_name, "core")

    def _disable(self, capability: str, reason: str) -> None:
        if capability in self._required:
            raise HookUnavailableError(f"required capability {capability} unavailable: {reason}")
        if capability not in self.report.disabled:
            log.warning("capability_disabled", capability=capability, reason=reason, object=self.path.name)
            self.report.disabled[capability] = reason

    def _open(self) -> int:
        with lb.capture_log() as cap:
            obj = lb.lib().bpf_object__open_file(str(self.path).encode(), None)
        if not obj:
            err = ctypes.get_errno()
            detail = cap.text().strip().splitlines()[-1:] or [os.strerror(err)]
            raise ObjectFileError(f"{self.path} is not a valid BPF object: {detail[0]}")
        return int(obj)

    def _iter_programs(self) -> list[tuple[int, Program]]:
        out = []
        prog = lb.lib().bpf_object__next_program(self._obj, None)
        while prog:
            name = lb.lib().bpf_program__name(prog).decode()
            section = lb.lib().bpf_program__section_name(prog).decode()
            out.append((prog, Program(name, section, self._capability(name))))
            prog = lb.lib().bpf_object__next_program(self._obj, prog)
        return out

    def _configure(self) -> None:
        lib = lb.lib()
        for name, size in self._map_sizes.items():
            m = lib.bpf_object__find_map_by_name(self._obj, name.encode())
            if not m:
                raise ObjectFileError(f"{self.path.name} has no map {name}")
            lb.check_int(lib.bpf_map__set_max_entries(m, size), f"resize map {name}")
        if self._knobs:
            self._set_knobs()

    def _set_knobs(self) -> None:
        lib = lb.lib()
        rodata = None
        m = lib.bpf_object__next_map(self._obj, None)
        while m:
            if lib.bpf_map__name(m).decode().endswith(".rodata"):
                rodata = m
                break
            m = lib.bpf_object__next_map(self._obj, m)
        if rodata is None:
            raise ObjectFileError(f"{self.path.name} has no .rodata but knobs were given")
        btf = Btf(lb.check_ptr(lib.bpf_object__btf(self._obj), "object BTF"), owned=False)
        variables = btf.datasec_vars(".rodata")
        size = ctypes.c_size_t()
        base = lb.check_ptr(lib.bpf_map__initial_value(rodata, ctypes.byref(size)), ".rodata contents")
        for name, value in self._knobs.items():
            var = variables.get(name)
            if var is None:
                raise ObjectFileError(f"{self.path.name} has no knob {name} (const volatile global)")
            ctypes.memmove(base + var.offset, value.to_bytes(var.size, "little", signed=value < 0), var.size)

    def _load_with_degrade(self) -> None:
        with Btf.vmlinux() as vmlinux:
            if self.uprobe_multi and not self._multi_forced and not kernel_has_uprobe_multi(vmlinux):
                self.uprobe_multi = False
            for _ in range(64):  # each round disables at least one capability or returns
                self._obj = self._open()
                progs = self._iter_programs()
                self.programs = {p.name: p for _, p in progs}
                self._multi_programs = frozenset(p.name for _, p in progs if p.section in _MULTI_SECTIONS)
                self.uprobe_multi = self.uprobe_multi and bool(self._multi_programs)
                for handle, prog in progs:
                    if prog.capability in self.report.disabled:
                        lb.lib().bpf_program__set_autoload(handle, False)
                        continue
                    reason = hook_missing(prog.section, vmlinux)
                    if reason:
                        self._disable(prog.capability, f"{prog.section}: {reason}")
                        lb.lib().bpf_program__set_autoload(handle, False)
                # a capability disabled late in the loop must not keep earlier programs
                for handle, prog in progs:
                    if prog.capability in self.report.disabled:
                        lb.lib().bpf_program__set_autoload(handle, False)
                self._set_multi(progs)
                self._configure()
                with lb.capture_log() as cap:
                    ret = lb.lib().bpf_object__load(self._obj)
                if ret == 0:
                    self.report.enabled = {
                        p.capability for p in self.programs.values() if p.capability not in self.report.disabled
                    }
                    return
                failed = _FAILED_PROG.findall(cap.text())
                lb.lib().bpf_object__close(self._obj)
                self._obj = 0
                culprit = next((self.programs[n] for n in failed if n in self.programs), None)
                if culprit is not None and culprit.name in self._multi_programs and self.uprobe_multi:
                    # only the fast path is lost: the perf-event programs still cover the hooks
                    log.warning("uprobe_multi_disabled", program=culprit.name, reason=_tail(cap.text(), 1))
                    self.uprobe_multi = False
                    continue
                if culprit is None and -ret == errno.EPERM:  # not one program: bpf() itself (libbpf's first probe)
                    raise BpfUnavailableError(f"loading {self.path.name} failed: {preflight.refused_reason()}")
                if culprit is None:
                    raise ObjectFileError(f"loading {self.path.name} failed: {os.strerror(-ret)}\n{_tail(cap.text())}")
                self._disable(
                    culprit.capability,
                    f"{culprit.section}: kernel refused program {culprit.name} ({os.strerror(-ret)})",
                )
        raise ObjectFileError(f"loading {self.path.name}: too many load attempts")

    def _set_multi(self, progs: list[tuple[int, Program]]) -> None:
        for handle, prog in progs:
            if prog.name not in self._multi_programs:
                continue
            if self.uprobe_multi:
                lib = lb.lib()
                lb.check_int(lib.bpf_program__set_type(handle, _BPF_PROG_TYPE_KPROBE), f"type of {prog.name}")
                ret = lib.bpf_program__set_expected_attach_type(handle, lb.BPF_TRACE_UPROBE_MULTI)
                lb.check_int(ret, f"set uprobe_multi attach type of {prog.name}")
            else:
                lb.lib().bpf_program__set_autoload(handle, False)

    # ---- attach ----------------------------------------------------------------------------

    def _attach_all(self) -> None:
        lib = lb.lib()
        for handle, prog in self._iter_programs():
            if not lib.bpf_program__autoload(handle) or prog.capability in self.report.disabled:
                continue
            kind, _, target = prog.section.partition("/")
            if kind == "iter" or (kind in _MANUAL_ATTACH and not target):
                continue  # attached on demand: attach_iter(), attach_uprobe()
            with lb.capture_log() as cap:
                if kind == "sockops" or kind.startswith("cgroup"):
                    link = lib.bpf_program__attach_cgroup(handle, self._cgroup_fd_for_attach())
                else:
                    link = lib.bpf_program__attach(handle)
            if not link:
                err = ctypes.get_errno()
                self._detach_capability(prog.capability)
                self._disable(
                    prog.capability,
                    f"{prog.section}: attach failed ({os.strerror(err)}) {_tail(cap.text(), 1)}".strip(),
                )
                continue
            self._links.append((prog.capability, int(link)))
        self.report.enabled -= set(self.report.disabled)

    def _cgroup_fd_for_attach(self) -> int:
        if self._cgroup_fd < 0:
            root = self._cgroup_root or find_cgroup2_root()
            self._cgroup_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        return self._cgroup_fd

    def attach_uprobe(self, prog_name: str, binary: str, symbol: str, *, pid: int = -1, retprobe: bool = False) -> int:
        """Attach an uprobe program to ``symbol`` in ``binary``; returns a link handle."""
        handle = self._program_handle(prog_name)
        opts = lb.BpfUprobeOpts(sz=ctypes.sizeof(lb.BpfUprobeOpts), retprobe=retprobe, func_name=symbol.encode())
        with lb.capture_log() as cap:
            link = lb.lib().bpf_program__attach_uprobe_opts(handle, pid, binary.encode(), 0, ctypes.byref(opts))
        if not link:
            err = ctypes.get_errno()
            raise HookUnavailableError(
                f"uprobe {binary}:{symbol} failed: {os.strerror(err)} {_tail(cap.text(), 1)}".strip()
            )
        self._links.append((self._capability(prog_name), int(link)))
        return int(link)

    def attach_uprobe_multi(
        self, prog_name: str, binary: str, offsets: list[int], cookies: list[int], *, retprobe: bool = False
    ) -> FdLink:
        """One uprobe_multi link of ``prog_name`` on ``offsets`` (file offsets) in ``binary``;
        each offset's ``bpf_get_attach_cookie()`` is its cookie. Every process mapping the
        file is probed. Needs ``prog_name`` loaded for it (:attr:`uprobe_multi`)."""
        kind = "uretprobe" if retprobe else "uprobe"
        if prog_name not in self._multi_programs or not self.uprobe_multi:
            raise HookUnavailableError(f"{kind}_multi {binary}: {prog_name} is not loaded for uprobe_multi links")
        fd = lb.check_int(lb.lib().bpf_program__fd(self._program_handle(prog_name)), f"fd of {prog_name}")
        try:
            link_fd = lb.link_create_uprobe_multi(fd, binary, offsets, cookies, retprobe=retprobe)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, OSError) and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                reason += " (kernel without uprobe_multi links, or a bad offset)"
            raise HookUnavailableError(f"{kind}_multi {binary} ({len(offsets)} offsets): {reason}") from None
        link = FdLink(link_fd, f"{kind}_multi {binary}")
        self._links.append((self._capability(prog_name), link))
        return link

    def _detach_capability(self, capability: str) -> None:
        keep = []
        for cap, link in self._links:
            if cap == capability:
                _destroy(link)
            else:
                keep.append((cap, link))
        self._links = keep

    def test_run(self, prog_name: str, ctx: bytearray) -> int:
        """Run a ``SEC("syscall")`` program once on ``ctx`` (BPF_PROG_TEST_RUN), which it may
        rewrite in place; its return value. Test fixtures use it to run kernel code on given bytes."""
        fd = lb.check_int(lb.lib().bpf_program__fd(self._program_handle(prog_name)), f"fd of {prog_name}")
        buf = (ctypes.c_char * len(ctx)).from_buffer(ctx)
        # a syscall program writes its context back to ctx_in (the kernel refuses a ctx_out)
        opts = lb.ProgRunOpts(sz=ctypes.sizeof(lb.ProgRunOpts), ctx_in=ctypes.addressof(buf), ctx_size_in=len(ctx))
        lb.check_int(lb.lib().bpf_prog_test_run_opts(fd, ctypes.byref(opts)), f"test run of {prog_name}")
        return int(opts.retval)

    def _program_handle(self, name: str) -> int:
        for handle, prog in self._iter_programs():
            if prog.name == name:
                return handle
        raise KeyError(f"{self.path.name} has no program {name}")

    # ---- maps and iterators ----------------------------------------------------------------

    def map_handle(self, name: str) -> int:
        m = lb.lib().bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise KeyError(f"{self.path.name} has no map {name}")
        return int(m)

    def map_fd(self, name: str) -> int:
        return lb.check_int(lb.lib().bpf_map__fd(self.map_handle(name)), f"fd of map {name}")

    def map_info(self, name: str) -> tuple[int, int, int]:
        """(key_size, value_size, max_entries)."""
        m = self.map_handle(name)
        lib = lb.lib()
        return lib.bpf_map__key_size(m), lib.bpf_map__value_size(m), lib.bpf_map__max_entries(m)

    def attach_iter(self, prog_name: str) -> int:
        """Attach an iterator that takes no map (``iter/task_file``, ``iter/tcp``, ...); returns the link."""
        handle = self._program_handle(prog_name)
        with lb.capture_log() as cap:
            link = lb.lib().bpf_program__attach_iter(handle, None)
        if not link:
            err = ctypes.get_errno()
            raise HookUnavailableError(f"attach {prog_name}: {os.strerror(err)} {_tail(cap.text(), 1)}".strip())
        self._links.append((self._capability(prog_name), int(link)))
        self._iter_links.add(int(link))
        return int(link)

    def stop_capture(self) -> None:
        """Detach every program that captures (tracepoints, uprobes, cgroup hooks); iterators and
        maps stay, so what the kernel holds can still be swept and drained, and nothing new arrives
        after that last drain (an agent stopping this way loses no record it does not count)."""
        stopping = [link for _, link in self._links if not self._is_iter(link)]
        self._links = [(cap, link) for cap, link in self._links if self._is_iter(link)]
        _destroy_all(list(reversed(stopping)))

    def _is_iter(self, link: Link) -> bool:
        return isinstance(link, int) and link in self._iter_links

    def detach(self, link: Link) -> None:
        """Destroy one link made by an attach_* method (idempotent for links already gone)."""
        kept = [(cap, lnk) for cap, lnk in self._links if lnk is not link and lnk != link]
        if len(kept) != len(self._links):
            _destroy(link)
            self._links = kept
            if isinstance(link, int):
                self._iter_links.discard(link)  # a freed link's address may be a new link's

    @staticmethod
    def new_iter(link: int) -> int:
        """A fresh fd of an attached iterator; reading it runs the iterator once. An ``iter/tcp``
        one shows the network namespace of the thread that makes it. The caller closes it."""
        link_fd = lb.check_int(lb.lib().bpf_link__fd(link), "iterator link fd")
        return lb.check_int(lb.lib().bpf_iter_create(link_fd), "create iterator")

    @staticmethod
    def read_iters(fds: Sequence[int], chunk: int = 1 << 16) -> bytes:
        """Each iterator read to its end, in order, and closed (all of them, even on error);
        everything they wrote, in one bytes object."""
        parts = []
        try:
            for fd in fds:
                while True:
                    data = os.read(fd, chunk)
                    if not data:
                        break
                    parts.append(data)
        finally:
            for fd in fds:
                os.close(fd)
        return b"".join(parts)

    @staticmethod
    def run_iter(link: int) -> bytes:
        """Run an iterator once, in this thread's network namespace; everything it wrote."""
        return BpfObject.read_iters([BpfObject.new_iter(link)])

    def close(self) -> None:
        """Detach every link and unload the object (idempotent)."""
        _destroy_all([link for _, link in reversed(self._links)])
        self._links = []
        self._iter_links.clear()
        if self._obj:
            lb.lib().bpf_object__close(self._obj)
            self._obj = 0
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _destroy_all(links: list[Link]) -> None:
    """Destroy links, the uprobe_multi ones concurrently: each waits for an RCU grace period
    in the kernel (~0.04 s), and threads waiting at once share grace periods, so exit time no
    longer grows with the number of libssl files (31 files: 0.14 s, not 0.9 s). os.close
    releases the GIL. Perf-event uprobe links gain little from it (they serialize in the
    kernel), so libbpf's links are destroyed one by one, in reverse order as before."""
    fd_links = [link for link in links if isinstance(link, FdLink)]
    if len(fd_links) > 2:
        with ThreadPoolExecutor(min(_DESTROY_THREADS, len(fd_links)), thread_name_prefix="bpf-detach") as pool:
            for _ in pool.map(_destroy, fd_links):
                pass
    else:
        for fd_link in fd_links:
            _destroy(fd_link)
    for link in links:
        if not isinstance(link, FdLink):
            _destroy(link)


def _destroy(link: Link) -> None:
    if isinstance(link, FdLink):
        os.close(link.fd)
    else:
        lb.lib().bpf_link__destroy(link)


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
