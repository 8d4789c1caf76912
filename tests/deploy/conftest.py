"""The end-to-end tests' scene, shared: a node namespace routing two pods' namespaces (198.18.N.0/24,
N random per test), and a kubelet-style container cgroup for pod b's server."""

from tests.e2e.conftest import cgroups, pod_cgroup
from tests.e2e.test_cluster import nat_topo

__all__ = ["cgroups", "nat_topo", "pod_cgroup"]
