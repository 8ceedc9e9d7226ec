"""`mtrank bench --quick` end to end: the CI smoke check that keeps the harness from rotting.

No thresholds: the figures depend on the machine. The test holds the shape of bench.json (every
section, every target ratio computed) and that every figure is finite and positive.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
POINT_FIGURES = ("throughput_rps", "rows_per_s", "p50_ms", "p90_ms", "p99_ms", "requests")


def _finite_positive(value: object, where: str) -> None:
    assert isinstance(value, int | float) and math.isfinite(value) and value > 0, f"{where} = {value!r}"


def check_bench_json(report: dict) -> None:
    """Every section is there with finite, positive figures; the four ratios are computed."""
    for section in ("machine", "config", "engine", "lookups", "service", "tail", "naive", "ratios"):
        assert section in report, f"bench.json has no {section!r}"
    curve = report["engine"]["curve"]
    assert [p["batch"] for p in curve][:1] == [1] and curve[-1]["batch"] == 4096
    for p in curve:
        _finite_positive(p["rows_per_s"], f"engine rows/s at batch {p['batch']}")
    for section in ("service", "tail", "naive"):
        assert report[section], f"{section}: no load points"
        for p in report[section]:
            for name in POINT_FIGURES:
                _finite_positive(p[name], f"{section} size={p['size']} c={p['concurrency']} {name}")
            assert p["errors"] == 0, f"{section} size={p['size']} c={p['concurrency']}: {p['statuses']}"
    assert {p["size"] for p in report["service"]} >= {20, 500}
    # redis-benchmark comes with redis-server (CI installs it); elsewhere its part may be recorded missing.
    has_redis_benchmark = IN_CI or shutil.which("redis-benchmark") is not None
    for name in ("service", "redis_benchmark", "bare_async") if has_redis_benchmark else ("service", "bare_async"):
        _finite_positive(report["lookups"][name]["p50_ms"], f"lookups.{name}.p50_ms")
    assert set(report["ratios"]) == {
        "service_vs_engine_500_c16", "batching_vs_naive_20_c32", "p99_over_p50_at_70pct",
        "lookup_vs_redis_benchmark_500",
    }
    for name, ratio in report["ratios"].items():
        if name == "lookup_vs_redis_benchmark_500" and not has_redis_benchmark:
            assert ratio["value"] is None and ratio["met"] is False
            continue
        _finite_positive(ratio["value"], f"ratio {name}")
        assert isinstance(ratio["met"], bool)
    assert report["redis_keys_deleted"] > 0


@pytest.mark.slow
@pytest.mark.redis
def test_bench_quick_writes_every_section_with_finite_figures(exported_repo, redis_url, tmp_path):
    repo = exported_repo("ple")
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "mtrank.cli", "bench", "--repo", str(repo), "--model", "ple", "--out", str(out),
         "--redis", redis_url, "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_bench_json(json.loads((out / "bench.json").read_text()))
    markdown = (out / "bench.md").read_text()
    assert "## Targets" in markdown and "## Naive server" in markdown
    assert (out / "latency_throughput.png").stat().st_size > 0
    assert (out / "engine.png").stat().st_size > 0
