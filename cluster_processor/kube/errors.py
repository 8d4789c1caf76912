"""The kube package's exceptions. Bad objects from the API are counted, not raised; these are for
failures of the connection itself, which the watch loop catches, counts and retries."""

from __future__ import annotations


class KubeError(Exception):
    """Base of every error raised by ``cluster_processor.kube``."""


class KubeConfigError(KubeError):
    """No usable in-cluster service account or kubeconfig."""


class KubeInClusterError(KubeConfigError):
    """In a pod (KUBERNETES_SERVICE_HOST set) but its service account is not usable (not mounted)."""


class KubeApiError(KubeError):
    """The APIServer answered with a failure (an HTTP status or a watch ERROR event)."""

    def __init__(self, status: int, reason: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s  # the server's Retry-After, honoured by the backoff


class ResourceGoneError(KubeApiError):
    """410 Gone: the resourceVersion we would resume from (or a list continue token) has been
    compacted away. Only a fresh list can recover; resuming again would fail the same way."""
