"""The service map drawn with rich (``map_view``, ``edge_view``) and as plain JSON (``snapshot``).

Columns follow the width: at 80 columns an edge shows its rate, errors, the client's p99, bytes and
the network counters; from 110 the protocol, both sides' p50/p99 and connect latency; from 160 each
figure in a column of its own. Rows follow the height; a header carries the totals and the agent's
non-zero drop counters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from node_exporter.local.servicemap import EdgeRow, ServiceMap

# Self-metric names that count something lost, dropped or cut short: shown in the header when not 0.
_DROPS: Final = re.compile(r"drop|lost|overflow|evicted|_full|failed|missing|unknown|decode_bad|errors")
# Counters whose name matches but that count the watched traffic, not kscope's losses.
_NOT_DROPS: Final = frozenset(
    {
        "kernel_drops_no_socket",  # packets the kernel dropped with no socket to charge: traffic, not ours
        "close_records_via_overflow_map",  # records that took the overflow path: delivered
    }
)
KEYS_HELP: Final = "q quit · p pause · ↑↓ select · enter open · esc back"


def drops(values: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in sorted(values.items()) if v and _DROPS.search(k) and k not in _NOT_DROPS}


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    v = seconds * 1000
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def per_s(n: float) -> str:
    if n == 0:
        return "0"
    return f"{n:.0f}" if n >= 100 else f"{n:.1f}" if n >= 1 else f"{n:.2f}"


def size(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.0f}T"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def _count(n: int) -> str:
    return str(n) if n else "·"


def _cells(r: EdgeRow, layout: str) -> list[str]:
    c, s = r.latency("client"), r.latency("server")
    cq50, cq99, sq50, sq99 = c.q(0.5), c.q(0.99), s.q(0.5), s.q(0.99)
    edge = r.short if layout == "narrow" and r.short else f"{r.client} → {r.server}"
    net = [
        size(r.rate("bytes")),
        _count(r.total("retransmits")),
        _count(r.total("failures")),
        _count(r.total("resets")),
    ]
    base = [edge, per_s(r.rate("requests")), pct(r.error_pct)]
    if layout == "narrow":
        return [*base, ms(cq99 if cq99 is not None else sq99), *net]
    if layout == "medium":
        return [*base[:1], r.protocol, *base[1:], f"{ms(cq50)}/{ms(cq99)}", f"{ms(sq50)}/{ms(sq99)}", net[0],
                ms(r.connect_ms / 1000 if r.connect_ms is not None else None), *net[1:]]  # fmt: skip
    return [*base[:1], r.protocol, *base[1:], ms(cq50), ms(cq99), ms(sq50), ms(sq99), net[0],
            ms(r.connect_ms / 1000 if r.connect_ms is not None else None), *net[1:]]  # fmt: skip


_COLUMNS: Final = {
    "narrow": ["client → server", "req/s", "err%", "p99ms", "B/s", "retr", "fail", "rst"],
    "medium": [
        "client → server",
        "proto",
        "req/s",
        "err%",
        "p50/p99 cli",
        "p50/p99 srv",
        "B/s",
        "conn",
        "retr",
        "fail",
        "rst",
    ],
    "wide": [
        "client → server",
        "proto",
        "req/s",
        "err%",
        "p50 cli",
        "p99 cli",
        "p50 srv",
        "p99 srv",
        "B/s",
        "conn ms",
        "retr",
        "fail",
        "rst",
    ],
}


# Widest value a numeric column shows (wider ones are cut on the left, which never happens in practice).
_WIDTH: Final = {"req/s": 6, "err%": 4, "p99ms": 6, "B/s": 6, "retr": 4, "fail": 4, "rst": 4, "proto": 5,
                 "p50/p99 cli": 11, "p50/p99 srv": 11, "conn": 6, "p50 cli": 7, "p99 cli": 7, "p50 srv": 7,
                 "p99 srv": 7, "conn ms": 7}  # fmt: skip


def _line(mark: str, cells: list[str], edge_w: int, widths: list[int]) -> str:
    edge = cells[0] if len(cells[0]) <= edge_w else cells[0][: edge_w - 1] + "…"
    rest = " ".join(c[-w:].rjust(w) for c, w in zip(cells[1:], widths, strict=True))
    return f"{mark} {edge.ljust(edge_w)} {rest}"


def layout_of(width: int) -> str:
    return "narrow" if width < 110 else "medium" if width < 160 else "wide"


def header(m: ServiceMap, now: float, counters: Mapping[str, int], paused: bool) -> Text:
    tot = m.totals(now)
    n = tot.requests
    t = Text()
    t.append("kscope run", style="bold")
    t.append(f"  {tot.active}/{len(m.edges)} edges · {per_s(tot.request_rate)} req/s · "
             f"{pct(100 * tot.errors / n if n else None)}% err · {size(tot.byte_rate)}B/s")  # fmt: skip
    if paused:
        t.append("  PAUSED", style="bold yellow")
    lost = drops({**counters, **{f"map_{k}": v for k, v in m.counters.items()}})
    if lost:
        t.append("\ndrops: ", style="bold red")
        t.append(" ".join(f"{k}={v}" for k, v in lost.items()), style="red")
    return t


def map_view(
    m: ServiceMap,
    now: float,
    width: int,
    height: int,
    selected: tuple[str, str] | None,
    counters: Mapping[str, int],
    paused: bool,
) -> RenderableType:
    """The map in ``width`` x ``height``; ``selected`` (an edge's key) is highlighted and kept in view."""
    layout = layout_of(width)
    head = header(m, now, counters, paused)
    ordered = m.ordered(now)
    dns = _dns_lines(ordered, width)[: max(0, (height - 8) // 4)]
    room = max(1, height - len(head.plain.splitlines()) - 3 - (len(dns) + 1 if dns else 0))
    at = next((i for i, r in enumerate(ordered) if (r.client, r.server) == selected), 0)
    start = max(0, at - room + 1)
    # Rows are laid out here, one Text per line: a rich Table measures every cell of every column on
    # each draw, which cost ~40 ms a frame for 44 rows.
    names = _COLUMNS[layout]
    widths = [max(len(n), _WIDTH.get(n, 5)) for n in names[1:]]
    edge_w = max(16, width - 2 - sum(w + 1 for w in widths))
    lines = [Text(_line(" ", names, edge_w, widths), style="bold", no_wrap=True, overflow="crop")]
    for r in ordered[start : start + room]:
        problems = r.problems()
        style = "dim" if m.faded(r, now) else ("red" if problems else "")
        if (r.client, r.server) == selected:
            style += " reverse"
        line = _line("!" if problems else " ", _cells(r, layout), edge_w, widths)
        lines.append(Text(line, style=style.strip(), no_wrap=True, overflow="crop"))
    parts: list[RenderableType] = [head, *lines]
    if dns:
        parts.append(Text("DNS  " + dns[0], no_wrap=True, overflow="ellipsis"))
        parts += [Text("     " + line, no_wrap=True, overflow="ellipsis") for line in dns[1:]]
    parts.append(Text(KEYS_HELP + f"  ({len(ordered)} edges)", style="dim", no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


def _dns_lines(rows: list[EdgeRow], width: int) -> list[str]:
    """Response codes per DNS server, summed over its clients."""
    per: dict[str, dict[str, int]] = {}
    for r in rows:
        for code, n in r.rcodes.items():
            d = per.setdefault(r.server, {})
            d[code] = d.get(code, 0) + n
    return [f"{server}  " + " ".join(f"{c}={n}" for c, n in sorted(codes.items())) for server, codes in per.items()]


def edge_view(r: EdgeRow, now: float, faded: bool) -> RenderableType:
    c, s = r.latency("client"), r.latency("server")
    title = Text(f"{r.client} → {r.server}", style="bold")
    if faded:
        title.append("  (idle)", style="dim")
    facts = Text(
        f"{r.protocol}  {per_s(r.rate('requests'))} req/s  errors {pct(r.error_pct)}%  "
        f"client p50/p99 {ms(c.q(0.5))}/{ms(c.q(0.99))} ms  server p50/p99 {ms(s.q(0.5))}/{ms(s.q(0.99))} ms\n"
        f"{size(r.rate('bytes'))}B/s  connects {r.total('connects')} (mean {ms((r.connect_ms or 0) / 1000)} ms)  "
        f"failed {r.total('failures')}  retransmits {r.total('retransmits')}  resets {r.total('resets')}"
    )
    if r.problems():
        facts.append("\nproblems: " + ", ".join(r.problems()), style="red")
    routes = Table(title="routes (since the edge appeared)", box=None, expand=True, header_style="bold",
                   title_justify="left")  # fmt: skip
    for name in ("method", "route", "status", "count", "p50 ms", "p99 ms"):
        routes.add_column(name, no_wrap=True, overflow="ellipsis")
    for (method, route), rs in sorted(r.routes.items(), key=lambda kv: -sum(kv[1].statuses.values())):
        statuses = " ".join(f"{k}×{v}" for k, v in sorted(rs.statuses.items()))
        routes.add_row(method or "-", route or "-", statuses, str(sum(rs.statuses.values())),
                       ms(rs.latency.q(0.5)), ms(rs.latency.q(0.99)))  # fmt: skip
    slow = Table(title="slowest recent requests", box=None, expand=True, header_style="bold", title_justify="left")
    for name in ("ms", "side", "method", "what", "status"):
        slow.add_column(name, no_wrap=True, overflow="ellipsis")
    for _, _, x in sorted(r.slowest, key=lambda t: -t[0]):
        slow.add_row(ms(x.seconds), x.side, x.method or "-", x.what or "-", x.status or "-")
    return Group(title, facts, routes, slow, Text("esc back · q quit", style="dim"))


def snapshot(m: ServiceMap, now: float, counters: Mapping[str, int], limit: int = 50) -> dict[str, Any]:
    """The map as one JSON object (the output when stdout is not a terminal)."""
    edges = []
    for r in m.ordered(now)[:limit]:
        c, s = r.latency("client"), r.latency("server")
        edges.append({
            "client": r.client, "server": r.server, "protocol": r.protocol,
            "requests_per_s": round(r.rate("requests"), 3), "error_pct": r.error_pct,
            "client_p50_ms": _r(c.q(0.5)), "client_p99_ms": _r(c.q(0.99)),
            "server_p50_ms": _r(s.q(0.5)), "server_p99_ms": _r(s.q(0.99)),
            "bytes_per_s": round(r.rate("bytes"), 1), "retransmits": r.total("retransmits"),
            "connect_ms": r.connect_ms, "connect_failures": r.total("failures"), "resets": r.total("resets"),
            "dns_rcodes": dict(r.rcodes), "problems": r.problems(), "idle": m.faded(r, now),
        })  # fmt: skip
    lost = drops({**counters, **{f"map_{k}": v for k, v in m.counters.items()}})
    return {"edges": edges, "edge_count": len(m.edges), "drops": lost}


def _r(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
