"""The node agent's exception hierarchy: each one carries a message a user can act on."""


class KscopeError(Exception):
    """Base of every error kscope reports to a user (printed without a traceback)."""


class BpfUnavailableError(KscopeError):
    """eBPF cannot be used here at all: no privilege, no BTF, no libbpf."""


class ObjectFileError(KscopeError):
    """A BPF object file is missing, unreadable or not a valid BPF ELF object."""


class HookUnavailableError(KscopeError):
    """A hook a required capability needs does not exist or will not load on this kernel."""
