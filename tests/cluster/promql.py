"""Just enough PromQL reading for tests: which metric names does an expression use?"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "cluster" / "monitoring"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
KEYWORDS |= {"inf", "nan", "e"}


def metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names in a PromQL expression."""
    text = expr
    for variable, value in GRAFANA_VARIABLES.items():
        text = text.replace(variable, value)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", text):
        name, is_call = match.group(1), match.group(2)
        if not is_call and name.lower() not in KEYWORDS:
            names.add(name)
    return names


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        if panel["type"] != "row"
        for target in panel.get("targets", [])
    ]


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for rule in group["rules"]
    ]


def expand_recording_rules(names: set[str]) -> set[str]:
    """Replace recording-rule names by the metrics their expressions read (recursively)."""
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    out: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in recorded:
            pending.extend(metric_names(recorded[name]))
        elif name not in out:
            out.add(name)
    return out - {"vector"}


def with_grafana_variables_replaced(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr
