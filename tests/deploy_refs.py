"""The Prometheus metrics that deploy/ depends on: names and labels referenced by the Grafana
dashboard and the alert rules, checked against the metric contract (docs/architecture.md §7).

``tests/test_deploy.py`` holds the files to the contract; a service test compares a running
server's ``/metrics`` with :func:`referenced_series_names` (see :func:`missing_from_exposition`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mtrank.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Family names as the metric contract spells them (counters carry their ``_total``), with their labels.
COUNTERS: dict[str, frozenset[str]] = {
    "mtrank_requests_total": frozenset({"route", "status", "bucket"}),
    "mtrank_embedding_cache_hits_total": frozenset(),
    "mtrank_embedding_cache_misses_total": frozenset(),
    "mtrank_embedding_missing_total": frozenset({"table"}),
    "mtrank_rejected_total": frozenset({"reason"}),
    "mtrank_refusals_paced_total": frozenset(),
    "mtrank_redis_errors_total": frozenset(),
    "mtrank_impressions_logged_total": frozenset(),
    "mtrank_impressions_dropped_total": frozenset({"reason"}),
}
HISTOGRAMS: dict[str, frozenset[str]] = {
    "mtrank_request_duration_seconds": frozenset({"route", "bucket"}),
    "mtrank_candidates_per_request": frozenset(),
    "mtrank_queue_wait_seconds": frozenset({"model", "group"}),
    "mtrank_batch_rows": frozenset({"model", "group"}),
    "mtrank_inference_duration_seconds": frozenset({"model", "group", "device"}),
    "mtrank_embedding_lookup_duration_seconds": frozenset({"store"}),
    "mtrank_event_loop_lag_seconds": frozenset(),
    "mtrank_prediction": frozenset({"bucket", "task"}),
}
GAUGES: dict[str, frozenset[str]] = {
    "mtrank_inflight_requests": frozenset(),
    "mtrank_model_info": frozenset({"model", "version", "device"}),
    "mtrank_embedding_store_degraded": frozenset(),
    "mtrank_models_loaded": frozenset(),
}
METRIC_LABELS: dict[str, frozenset[str]] = {**COUNTERS, **HISTOGRAMS, **GAUGES}
HISTOGRAM_SERIES_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})

_SERIES = re.compile(r"(?<![\w:$.\"])mtrank_[A-Za-z0-9_]+")


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL string of the dashboard: panel targets and template-variable queries."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                # A "query" string is PromQL only in template variables; elsewhere it is a name.
                is_promql = key in ("expr", "definition") or (key == "query" and "mtrank_" in str(value))
                if is_promql and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(path.read_text()))
    return exprs


def alert_exprs(path: Path = ALERTS) -> dict[str, str]:
    """Alert (or recording rule) name → its PromQL expression."""
    rules = yaml.safe_load(path.read_text())
    return {rule.get("alert") or rule["record"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def referenced_exprs() -> list[str]:
    return dashboard_exprs() + list(alert_exprs().values())


def series_names(expr: str) -> set[str]:
    """``mtrank_*`` series names in one PromQL expression, as written (``_total``, ``_bucket``...)."""
    return set(_SERIES.findall(expr))


def series_occurrences(expr: str) -> Iterator[tuple[str, int]]:
    """(series name, start offset) of each ``mtrank_*`` name in ``expr``."""
    for match in _SERIES.finditer(expr):
        yield match.group(0), match.start()


def family_of(series: str) -> str | None:
    """The contract family a series name belongs to, or None when it is not a valid series name
    (unknown, a histogram without ``_bucket``/``_sum``/``_count``, a counter without ``_total``)."""
    if series in COUNTERS or series in GAUGES:
        return series
    for suffix in HISTOGRAM_SERIES_SUFFIXES:
        if series.endswith(suffix) and series[: -len(suffix)] in HISTOGRAMS:
            return series[: -len(suffix)]
    return None


def referenced_series_names() -> set[str]:
    """Series names the dashboard and the alerts query, exactly as ``/metrics`` must expose them."""
    return {name for expr in referenced_exprs() for name in series_names(expr)}


def referenced_metric_families() -> set[str]:
    """Metric families (the metric contract's spelling) the dashboard and the alerts depend on. A series name
    that belongs to no known family is returned unchanged, so a comparison flags it."""
    return {family_of(name) or name for name in referenced_series_names()}


def exposed_series_names(exposition: str) -> set[str]:
    """Sample names in a Prometheus text exposition (the body of ``GET /metrics``).

    Labelled metrics appear only once a child exists: send traffic before scraping.
    """
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


def missing_from_exposition(exposition: str) -> set[str]:
    """Referenced series names that ``exposition`` does not contain."""
    return referenced_series_names() - exposed_series_names(exposition)
