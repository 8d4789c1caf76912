"""The terminal view of `kscope run`: the busiest connections of the last interval."""

from __future__ import annotations

from collections import defaultdict

from cachetools import LRUCache
from rich.console import Group
from rich.table import Table

from kscope_common.latency import LATENCY_BOUNDS_NS
from node_exporter.bpf.abi import ConnectStatus, Role
from node_exporter.l4.records import L4Record
from node_exporter.l7.pipeline import L7Event
from node_exporter.protocols import DbRecord, HttpRecord
from node_exporter.protocols.http1 import HttpSummary

_ROLE = {Role.KSCOPE_ROLE_CLIENT: "client", Role.KSCOPE_ROLE_SERVER: "server", Role.KSCOPE_ROLE_LISTENER: "listen"}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _summary_latencies(s: HttpSummary) -> list[tuple[int, int]]:
    """(latency ns, requests) per non-empty bucket of a summary: the bucket's upper bound, kept within
    the summary's min and max (so its largest is the max, which is exact)."""
    out = []
    for i, n in enumerate(s.buckets):
        if n:
            bound = LATENCY_BOUNDS_NS[i] if i < len(LATENCY_BOUNDS_NS) else s.latency_max_ns
            out.append((min(max(bound, s.latency_min_ns), s.latency_max_ns), n))
    return out


def _weighted_median(lat: list[tuple[int, int]], n: int) -> int:
    """The latency of request n // 2 (0-based) in ``lat``, sorted (latency, requests) pairs of n requests."""
    seen = 0
    for value, k in lat:
        seen += k
        if seen > n // 2:
            return value
    return lat[-1][0]


class LiveView:
    """Keeps the latest record per open connection (bounded) and renders a table."""

    def __init__(self, max_connections: int = 10_000, rows: int = 25) -> None:
        self._conns: LRUCache[int, L4Record] = LRUCache(maxsize=max_connections)
        self._recent: list[L4Record] = []
        self._requests: list[L7Event] = []
        self.rows = rows
        self.closed = 0
        self.failed_connects = 0

    def update(self, records: list[L4Record], requests: list[L7Event] | None = None) -> None:
        self._recent = records
        self._requests = requests or []
        for rec in records:
            if rec.is_close:
                self._conns.pop(rec.sock_cookie, None)
                self.closed += 1
                if rec.connect_status not in (ConnectStatus.KSCOPE_CONNECT_OK, ConnectStatus.KSCOPE_CONNECT_NONE):
                    self.failed_connects += 1
            else:
                self._conns[rec.sock_cookie] = rec

    def render(self, interval_s: float) -> Table | Group:
        table = self._render_l4(interval_s)
        if not self._requests:
            return table
        return Group(table, self._render_l7(interval_s))

    def _render_l7(self, interval_s: float) -> Table:
        """Requests of the last interval grouped by who served what: rate, errors, latency. A summary
        counts as its ``count`` requests; in the p50 its requests sit at their bucket's upper bound
        (kept within the summary's min and max), the max is exact."""
        groups: dict[tuple[str, str, str, str], list[tuple[int, int]]] = defaultdict(list)  # (latency ns, n)
        errors: dict[tuple[str, str, str, str], int] = defaultdict(int)
        for ev in self._requests:
            r = ev.record
            if isinstance(r, HttpRecord):
                key = (ev.conn.comm, ev.conn.side.value, ev.conn.protocol, f"{r.method} {r.route}")
                failed = int(r.status >= 500 or r.status == 0)
                s = r.summary
                if s is None:
                    groups[key].append((r.latency_ns, 1))
                else:
                    groups[key].extend(_summary_latencies(s))
                    failed *= s.count  # all of a summary's requests have its status
            elif isinstance(r, DbRecord):
                key = (ev.conn.comm, ev.conn.side.value, ev.conn.protocol, r.query_summary or r.operation)
                groups[key].append((r.latency_ns, 1))
                failed = int(bool(r.error_type))
            else:
                key = (ev.conn.comm, ev.conn.side.value, ev.conn.protocol, f"{r.qtype} {r.name}")
                groups[key].append((r.latency_ns, 1))
                failed = int(r.timed_out or r.rcode not in ("NOERROR", "NXDOMAIN"))
            errors[key] += failed
        table = Table(title=f"requests in the last {interval_s:g} s", expand=True)
        for col in ("process", "side", "protocol", "request", "req/s", "errors", "p50 ms", "max ms"):
            table.add_column(col, no_wrap=True)
        counted = [(key, sum(n for _, n in lat), lat) for key, lat in groups.items()]
        busiest = sorted(counted, key=lambda g: g[1], reverse=True)[: self.rows]
        for key, n, lat in busiest:
            proc, side, proto, what = key
            lat.sort()
            table.add_row(proc, side, proto, what[:60], f"{n / interval_s:.1f}", str(errors[key]),
                          f"{_weighted_median(lat, n) / 1e6:.2f}", f"{lat[-1][0] / 1e6:.2f}")  # fmt: skip
        return table

    def _render_l4(self, interval_s: float) -> Table:
        table = Table(
            title=f"kscope — {len(self._conns)} open TCP sockets, {self.closed} closed, "
            f"{self.failed_connects} failed connects",
            expand=True,
        )
        for col in ("process", "role", "local", "remote", "tx/s", "rx/s", "retrans", "rst", "rtt ms", "state"):
            table.add_column(col, no_wrap=True)
        busiest = sorted(
            (r for r in self._recent if r.role != Role.KSCOPE_ROLE_LISTENER),
            key=lambda r: r.delta.bytes_sent + r.delta.bytes_received,
            reverse=True,
        )[: self.rows]
        for r in busiest:
            status = r.tcp_state_name
            if r.connect_status not in (ConnectStatus.KSCOPE_CONNECT_OK, ConnectStatus.KSCOPE_CONNECT_NONE):
                status = r.connect_status.name.removeprefix("KSCOPE_CONNECT_").lower()
            table.add_row(
                f"{r.comm}[{r.tgid}]",
                _ROLE.get(r.role, "?"),
                f"{r.local_ip}:{r.local_port}",
                f"{r.remote_ip}:{r.remote_port}",
                _human(r.delta.bytes_sent / interval_s),
                _human(r.delta.bytes_received / interval_s),
                str(r.total.retransmits + r.total.syn_retransmits),
                str(r.total.resets_sent + r.total.resets_received),
                f"{r.srtt_us / 1000:.2f}",
                status,
            )
        return table
