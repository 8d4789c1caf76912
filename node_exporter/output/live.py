"""The terminal view of `kscope run`: the busiest connections of the last interval."""

from __future__ import annotations

from collections import defaultdict

from cachetools import LRUCache
from rich.console import Group
from rich.table import Table

from node_exporter.bpf.abi import ConnectStatus, Role
from node_exporter.l4.records import L4Record
from node_exporter.l7.pipeline import L7Event
from node_exporter.protocols import HttpRecord

_ROLE = {Role.KSCOPE_ROLE_CLIENT: "client", Role.KSCOPE_ROLE_SERVER: "server", Role.KSCOPE_ROLE_LISTENER: "listen"}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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
        """Requests of the last interval grouped by who served what: rate, errors, latency."""
        groups: dict[tuple[str, str, str, str], list[L7Event]] = defaultdict(list)
        for ev in self._requests:
            r = ev.record
            what = f"{r.method} {r.route}" if isinstance(r, HttpRecord) else f"{r.qtype} {r.name}"
            groups[(ev.conn.comm, ev.conn.side.value, ev.conn.protocol, what)].append(ev)
        table = Table(title=f"requests in the last {interval_s:g} s", expand=True)
        for col in ("process", "side", "protocol", "request", "req/s", "errors", "p50 ms", "max ms"):
            table.add_column(col, no_wrap=True)
        busiest = sorted(groups.items(), key=lambda kv: len(kv[1]), reverse=True)[: self.rows]
        for (proc, side, proto, what), evs in busiest:
            lat = sorted(e.record.latency_ns for e in evs)
            errors = sum(
                (e.record.status >= 500 or e.record.status == 0)
                if isinstance(e.record, HttpRecord)
                else (e.record.timed_out or e.record.rcode not in ("NOERROR", "NXDOMAIN"))
                for e in evs
            )
            table.add_row(proc, side, proto, what[:60], f"{len(evs) / interval_s:.1f}", str(errors),
                          f"{lat[len(lat) // 2] / 1e6:.2f}", f"{lat[-1] / 1e6:.2f}")  # fmt: skip
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
