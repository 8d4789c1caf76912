"""The node agent's exception hierarchy: each one carries a message a user can act on."""


class KscopeError(Exception):
    """Base of every error kscope reports to a user (printed without a traceback)."""


class HostError(KscopeError):
    """The command is fine but this host cannot run it (the CLIs exit 3, not 2): what to change is
    the host, the pod or its privileges."""


class BpfUnavailableError(HostError):
    """eBPF cannot be used here at all: no privilege, no BTF, no libbpf."""


class ObjectFileError(HostError):
    """A BPF object file is missing, unreadable or not a valid BPF ELF object (an incomplete install)."""


class HookUnavailableError(HostError):
    """A hook a required capability needs does not exist or will not load on this kernel."""
