"""The series selectors in PromQL expressions (dashboard panels, Grafana variables, alerting and recording rules).

A small lexer, enough for the names and label matchers these queries use: `metric{label="value"}` outside of
label lists (`by (...)`, `on (...)`), function names (followed by `(`), keywords, strings and range brackets. The
real Prometheus in test_live_monitoring.py parses every expression itself; this only finds what to ask it about.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<brace>[{}])
  | (?P<paren>[()])
  | (?P<other>\S)
    """,
    re.VERBOSE,
)
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"} | _LABEL_LIST_KEYWORDS
_LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)", re.DOTALL)


@dataclass(frozen=True)
class Selector:
    metric: str
    text: str
    """The selector as written, matchers included: `pipeweaver_plans_total{source="fallback"}`."""


def selectors(expr: str) -> list[Selector]:
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    out: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text in _LABEL_LIST_KEYWORDS and following == "(":
            i = _skip_group(tokens, i + 1, "(", ")")
            continue
        # A function or aggregation (`rate(`, `sum by (`), or a keyword: not a metric.
        if kind == "ident" and (following in ("(", "by", "without") or text.lower() in _KEYWORDS):
            i += 1
            continue
        if kind == "ident" or (kind == "brace" and text == "{"):
            metric = text if kind == "ident" else ""
            start = i + 1 if kind == "ident" else i
            end = _skip_group(tokens, start, "{", "}") if start < len(tokens) and tokens[start][1] == "{" else start
            out.append(Selector(metric, metric + "".join(t for _, t in tokens[start:end])))
            i = end
            continue
        i += 1
    return out


def _skip_group(tokens: list[tuple[str | None, str]], i: int, open_: str, close: str) -> int:
    """The index after the group that opens at tokens[i]."""
    assert tokens[i][1] == open_
    depth = 0
    for j in range(i, len(tokens)):
        depth += {open_: 1, close: -1}.get(tokens[j][1], 0)
        if depth == 0:
            return j + 1
    raise ValueError(f"unbalanced {open_}{close} in {''.join(t for _, t in tokens)}")


def label_values(query: str) -> tuple[str, str]:
    """(selector, label) of a Grafana `label_values(selector, label)` variable query."""
    match = _LABEL_VALUES.fullmatch(query.strip())
    assert match, f"not a label_values() query: {query}"
    return match["selector"], match["label"]


# ---- where the queries are ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    where: str
    expr: str


def dashboard_queries(path: Path) -> Iterator[Query]:
    """Every panel target's expression, and the selector of every `label_values` variable."""
    dashboard = json.loads(path.read_text())
    stack: list[dict[str, Any]] = list(dashboard["panels"])
    while stack:
        panel = stack.pop(0)
        stack += panel.get("panels", [])
        for target in panel.get("targets", []):
            yield Query(f"panel {panel['title']!r} {target['refId']}", target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            yield Query(f"variable {variable['name']}", label_values(query)[0])


def rule_queries(prometheus_rule: dict[str, Any]) -> Iterator[Query]:
    for group in prometheus_rule["spec"]["groups"]:
        for rule in group["rules"]:
            yield Query(f"rule {rule.get('alert') or rule.get('record')}", str(rule["expr"]))


def recorded_names(prometheus_rule: dict[str, Any]) -> set[str]:
    return {r["record"] for g in prometheus_rule["spec"]["groups"] for r in g["rules"] if "record" in r}
