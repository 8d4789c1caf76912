"""Checks a Grafana dashboard's PromQL against a real Prometheus holding kscope's metrics.

For every query: template variables substituted as Grafana does for "All" (the values the
variable's own ``label_values`` query returns, as a regular expression), Grafana's interval
variables given fixed windows; then it must parse, every metric it names must have series, every
label it groups by, matches on or copies from must exist on those metrics (or be made by the query
itself: ``label_replace``/``label_join``), every ``{{label}}`` of its legend must be on a result,
and it must return series naming at least one of the expected workloads. A query that names a
metric or label kscope does not export fails, even where PromQL would quietly return something
(``sum by (nosuchlabel)`` still returns a series)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.e2e.promserver import Prometheus, PromQLError

INTERVALS = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m"}
# Labels whose values name a workload (or a graph node): what "series for the expected workloads" reads.
NAMING_LABELS = ("job", "client", "server", "service_peer_name", "id", "source", "target", "instance")
_METRIC = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_FUNCS = re.compile(r"\b(label_replace|label_join)\s*\(")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
_SPECIAL = frozenset("\\.^$*+?()[]{}|")
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}")


@dataclass(frozen=True)
class Target:
    board: str
    panel: str
    expr: str
    legend: str = ""


def targets(board: dict[str, Any]) -> Iterator[Target]:
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            yield Target(board["uid"], panel["title"], t["expr"], t.get("legendFormat", ""))


def variables(board: dict[str, Any], prom: Prometheus, start: float, end: float) -> dict[str, str]:
    """Each query variable's values, evaluated in order (a variable's query may use earlier ones), as
    the regular expression Grafana substitutes for a multi-value selection."""
    out: dict[str, str] = {}
    for v in board["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", substitute(v["definition"], out).strip())
        assert m, f"{board['uid']}: variable {v['name']}: not a label_values(match, label) query"
        values = prom.label_values(m.group(2), m.group(1), start, end)
        assert values, f"{board['uid']}: variable {v['name']} ({v['definition']}) has no values"
        out[v["name"]] = "(" + "|".join(map(regex_escape, sorted(values))) + ")"
    return out


def regex_escape(value: str) -> str:
    """A value as a literal inside a PromQL regex string, as Grafana escapes it: the regex's
    backslash doubled for the string (``a.b`` -> ``a\\\\.b`` in the query text)."""
    return "".join("\\\\" + c if c in _SPECIAL else c for c in value)


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, window in INTERVALS.items():
        expr = expr.replace(name, window)

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name.isdigit():
            return m.group(0)  # a capture group in label_replace's replacement ("$1")
        if name not in values:
            raise KeyError(f"unknown template variable ${name}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def used_labels(expr: str) -> tuple[set[str], set[str]]:
    """(labels the query reads, labels it makes)."""
    read = set(_MATCHER.findall(expr))
    for group in _GROUPING.findall(expr):
        read |= {x.strip() for x in group.split(",") if x.strip()}
    made: set[str] = set()
    for func, args in label_calls(expr):
        strings = [a.strip().strip('"') for a in args[1:]]
        made.add(strings[0])  # label_replace(v, dst, replacement, src, regex); label_join(v, dst, sep, src...)
        read |= {strings[2]} if func == "label_replace" else set(strings[2:])
    return read - made, made


def label_calls(expr: str) -> Iterator[tuple[str, list[str]]]:
    """Each label_replace/label_join call's name and top-level arguments (as text)."""
    for m in _LABEL_FUNCS.finditer(expr):
        depth, args, current, quoted = 0, [], "", False
        for ch in expr[m.end() :]:
            if ch == '"':
                quoted = not quoted
            elif not quoted and ch in "([{":
                depth += 1
            elif not quoted and ch in ")]}":
                if depth == 0:
                    break
                depth -= 1
            elif not quoted and ch == "," and depth == 0:
                args.append(current)
                current = ""
                continue
            current += ch
        args.append(current)
        yield m.group(1), args


def metrics(expr: str) -> set[str]:
    names = set(_METRIC.findall(expr))
    return {n for n in names if n not in ("by", "without", "on", "ignoring", "group_left", "group_right")}


def problems(
    t: Target, values: dict[str, str], prom: Prometheus, at: float, start: float, expected: Iterable[str]
) -> list[str]:
    """What is wrong with one query ([] when nothing)."""
    where = f"{t.board} / {t.panel}: "
    try:
        expr = substitute(t.expr, values)
    except KeyError as exc:
        return [where + str(exc)]
    found = metrics(expr)
    if not found:
        return [where + f"names no metric: {expr}"]
    out: list[str] = []
    known: set[str] = set()
    for name in sorted(found):
        labels = prom.label_names(name, start, at)
        if not labels:
            out.append(where + f"metric {name} does not exist")
        known |= labels
    read, _ = used_labels(expr)
    out += [where + f"label {label} is on none of {sorted(found)}" for label in sorted(read - known)]
    try:
        result = prom.query(expr, at)
    except PromQLError as exc:
        return [*out, where + f"{exc}: {expr}"]
    if not result:
        return [*out, where + f"no series: {expr}"]
    on_result = set().union(*(r["metric"] for r in result))
    out += [where + f"legend label {label} is on no result" for label in _LEGEND.findall(t.legend)
            if label not in on_result]  # fmt: skip
    names = workloads(result)
    if not names & set(expected):
        out.append(where + f"no expected workload among {sorted(names)}: {expr}")
    return out


def workloads(result: list[dict[str, Any]]) -> set[str]:
    """The workload names in a query's result (``job`` is ``namespace/name``)."""
    return {
        str(r["metric"][label]).rsplit("/", 1)[-1] for r in result for label in NAMING_LABELS if label in r["metric"]
    }
