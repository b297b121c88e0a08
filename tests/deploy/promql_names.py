"""Metric names queried by the deploy files: the PromQL of dashboard panels and alert rules.

A metric name in PromQL is an identifier that is not a function or aggregation (those are
followed by ``(``), not a keyword, and not a label name (label names only appear inside
``{...}`` matchers and ``by/without/on/ignoring/group_*(...)`` clauses, which are removed first).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
ALERTS = ROOT / "deploy/prometheus/alerts.yml"

# Grafana's interval variables become a range; other template variables a match-all regex.
GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2"}
# Series Prometheus itself writes for every target (not exported by the server).
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def grafana_to_promql(expr: str, rate_interval: str = "5m") -> str:
    """Substitute Grafana template variables so the expression is plain PromQL."""
    for var in GRAFANA_RANGES:
        expr = expr.replace(var, rate_interval)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', grafana_to_promql(expr))
    text = re.sub(r"\{[^}]*\}", " ", text)          # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)          # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_queries() -> dict[str, str]:
    """``{"<dashboard>/<panel>/<refId>": expr}`` for every panel target and query variable."""
    out = {}
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        panels = list(dash.get("panels", []))
        for p in list(panels):
            panels.extend(p.get("panels", []))  # panels inside collapsed rows
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out[f"{path.name}/{p['title']}/{t['refId']}"] = t["expr"]
        for var in dash.get("templating", {}).get("list", []):
            query = var.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            if var.get("type") == "query" and query:
                # label_values(metric, label) names the metric as its first argument
                m = re.match(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,", query)
                out[f"{path.name}/${var['name']}"] = m.group(1) if m else query
    return out


def alert_queries() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {r.get("alert") or r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def exported_names(metrics_text: str) -> set[str]:
    """Every sample name a ``/metrics`` page declares (a histogram exports _bucket/_sum/_count;
    a counter with no labelled child yet still declares its ``_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names
