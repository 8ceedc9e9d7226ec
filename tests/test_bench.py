"""`mtrank bench --quick` end to end: the CI smoke check that keeps the harness from rotting.

No thresholds on speed: the figures depend on the machine. The test holds the shape of
bench.json (every section, every target of issue 17 computed with a boolean ``met``, the load
average around each section) and that every figure is finite and positive.
"""

from __future__ import annotations

import http.server
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mtrank.bench.config import target_names
from mtrank.bench.loadgen import PointSpec, run_point, write_bodies
from mtrank.bench.report import EnginePoint, EngineRun, Report, from_json, read_report, to_json
from mtrank.bench.scoring import compute_ratios
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
POINT_FIGURES = ("throughput_rps", "rows_per_s", "p50_ms", "p90_ms", "p99_ms", "requests")
SECTIONS = ("engine", "lookups", "sweeps", "tail", "impressions", "overload")
"""Timed sections of a run (``sections`` in bench.json); the sweeps fill ``service`` and ``naive``."""


def _finite_positive(value: object, where: str) -> None:
    assert isinstance(value, int | float) and math.isfinite(value) and value > 0, f"{where} = {value!r}"


def _check_points(report: dict, section: str) -> None:
    assert report[section], f"{section}: no load points"
    for p in report[section]:
        for name in POINT_FIGURES:
            _finite_positive(p[name], f"{section} size={p['size']} c={p['concurrency']} {name}")
        assert p["errors"] == 0, f"{section} size={p['size']} c={p['concurrency']}: {p['statuses']}"


def _check_impressions(report: dict) -> None:
    """The impression-log point: each point once per round, the order rotating; the log-on server logged
    exactly the requests whose ids it samples; the read-only server answered every request and counted
    each record dropped."""
    imp, cfg = report["impressions"], report["config"]
    names = ["log_on", "sampled_out", "log_off", "log_read_only"]
    servers = ["log_off", "log_on", "log_read_only"]
    assert (imp["size"], imp["concurrency"]) == (cfg["impressions_size"], cfg["impressions_concurrency"])
    assert imp["orders"] == [names[i % 4:] + names[: i % 4] for i in range(cfg["impressions_rounds"])]
    assert set(imp["points"]) == set(names) and set(servers) <= set(report["servers"])
    for label, points in imp["points"].items():
        assert len(points) == cfg["impressions_rounds"], label
        for p in points:
            assert p["size"] == 100 and p["concurrency"] == imp["concurrency"] and p["errors"] == 0, (label, p)
            _finite_positive(p["throughput_rps"], f"impressions {label} req/s")

    def ratios_of(a: str, b: str) -> list[float]:
        return [round(x["throughput_rps"] / y["throughput_rps"], 4)
                for x, y in zip(imp["points"][a], imp["points"][b], strict=True)]

    assert imp["on_vs_off"] == ratios_of("log_on", "sampled_out")
    assert imp["on_vs_off_server"] == ratios_of("log_on", "log_off")
    assert imp["sampled_out_vs_off_server"] == ratios_of("sampled_out", "log_off")
    env = {label: report["servers"][label]["env"] for label in servers}
    assert "MTRANK_IMPRESSION_LOG" not in env["log_off"]
    assert (env["log_on"]["MTRANK_IMPRESSION_SAMPLE"], env["log_read_only"]["MTRANK_IMPRESSION_SAMPLE"]) == (
        str(imp["sample"]), "1.0")
    assert imp["read_only"]["mode"] == "0555" and imp["read_only"]["probe_error"] in ("EACCES", "EROFS")
    on, ro = imp["servers"]["log_on"], imp["servers"]["log_read_only"]
    # Both copies were answered, and only the logged copy's ids are in the files, every one of them kept.
    assert 0 < on["records_in_files"] < on["statuses"]["200"] and on["records_sampled_out"] == 0
    assert on["records_in_files"] == on["answered_logged"] and sum(on["dropped"].values()) == 0
    assert set(ro["statuses"]) <= {"200", "499"} and ro["statuses"]["200"] > 0
    assert ro["dropped"] == {"queue_full": 0, "write_error": ro["statuses"]["200"]} and ro["logged"] == 0
    ratios = report["ratios"]
    assert ratios["impression_log_on_vs_off"]["value"] == round(sorted(imp["on_vs_off"])[len(imp["on_vs_off"]) // 2],
                                                                3)
    assert ratios["impression_log_read_only_failures"]["value"] == 0
    assert ratios["impression_log_read_only_failures"]["met"] is True


def check_bench_json(report: dict) -> None:
    """Every section is there with finite, positive figures; every target ratio is computed."""
    for section in ("machine", "config", "service_defaults", "servers", "engine", "lookups", "service", "naive",
                    "tail", "overload", "ratios", "informational"):
        assert section in report, f"bench.json has no {section!r}"
    for section in SECTIONS:
        loads = report["sections"][section]
        assert len(loads["load_before"]) == 3 and len(loads["load_after"]) == 3, section
    engine = report["engine"]
    assert engine["session_options"] == "default" and engine["provider"] == "CPUExecutionProvider"
    assert [p["batch"] for p in engine["curve"]][:1] == [1] and engine["curve"][-1]["batch"] == 4096
    for p in engine["curve"]:
        _finite_positive(p["rows_per_s"], f"engine rows/s at batch {p['batch']}")
    assert engine["peak"]["rows_per_s"] == max(p["rows_per_s"] for p in engine["curve"])
    for section in ("service", "tail", "naive"):
        _check_points(report, section)
    sizes = report["config"]["sizes"]
    for section in ("service", "naive"):
        assert {(p["size"], p["concurrency"]) for p in report[section]} == {
            (s, c) for s in sizes for c in report["config"]["concurrencies"]}, section
    assert sorted(p["size"] for p in report["tail"]) == sorted(sizes)
    assert {"service", "naive", "overload"} <= set(report["servers"])
    for name, server in report["servers"].items():
        assert server["provider"] == "CPUExecutionProvider", name
        assert isinstance(server["error_lines"], int) and server["error_lines"] >= 0, name
    assert report["servers"]["overload"]["env"]["MTRANK_REQUEST_TIMEOUT_MS"] == "500"

    ov = report["overload"]
    _finite_positive(ov["rate_rps"], "overload rate")
    assert ov["rate_rps"] == pytest.approx(4 * ov["best_closed_loop"]["throughput_rps"], rel=0.01)
    assert sum(ov["statuses"].values()) > 0
    assert len(ov["repeats"]) == ov["repeats_n"] == report["config"]["overload_repeats"]
    assert ov["goodput_rps"] == sorted(r["goodput_rps"] for r in ov["repeats"])[len(ov["repeats"]) // 2]
    for key in ("start", "after_first_second", "end", "max"):
        _finite_positive(ov["rss_kib"][key], f"overload RSS {key}")
    assert ov["rss_kib"]["max"] >= max(ov["rss_kib"]["start"], ov["rss_kib"]["end"])
    storm = ov["retry_storm"]
    cfg = report["config"]  # 4 x what 40 % of the 500 ms deadline holds at the best throughput (Little's law)
    assert storm["clients"] == max(2, round(cfg["overload_factor"] * ov["best_closed_loop"]["throughput_rps"] * 0.4
                                            * cfg["overload_timeout_ms"] / 1000))
    assert sum(storm["statuses"].values()) > 0 and storm["refused_per_s"] >= 0
    storm_ratio = report["informational"]["retry_storm_goodput"]
    assert storm_ratio["value"] == pytest.approx(
        storm["goodput_rps"] / ov["best_closed_loop"]["throughput_rps"], abs=1e-3)

    floor = {(q["size"], q["concurrency"]): q for q in report["floor"]}
    assert set(floor) == {(s, c) for s, c in ((20, 32), (500, 16)) if s in sizes}
    for q in floor.values():
        for key in ("throughput_rps", "rows_per_s", "p50_ms", "server_cpu_cores", "rows_per_server_cpu_s"):
            _finite_positive(q[key], f"floor {key}")
        assert q["errors"] == 0 and q["rows_per_s"] == pytest.approx(q["throughput_rps"] * q["size"], rel=1e-3)
        informational = report["informational"][f"floor_vs_engine_{q['size']}_c{q['concurrency']}"]
        assert informational["value"] == round(q["rows_per_s"] / report["engine"]["peak"]["rows_per_s"], 3)

    _check_impressions(report)

    ratios = report["ratios"]
    assert list(ratios) == target_names(sizes) == report["target_names"]
    pairs = report["c1_pairs"]
    assert len(pairs) == report["config"]["c1_pairs"] and pairs[0]["batching_p50_ms"] == next(
        p["p50_ms"] for p in report["service"] if (p["size"], p["concurrency"]) == (20, 1))
    assert ratios["batching_vs_naive_p50_20_c1"]["pairs"] == [
        round(q["batching_p50_ms"] / q["naive_p50_ms"], 3) for q in pairs]
    assert {"batching_vs_naive_p50_20_c1", "service_vs_engine_20_c32", "service_vs_engine_500_c16",
            "batching_vs_naive_20", "batching_vs_naive_500", "p99_over_p50_at_70pct_20",
            "p99_over_p50_at_70pct_500", "overload_goodput", "overload_503_p99_ms", "overload_accepted_p99_ms",
            "overload_rss_growth", "overload_error_lines"} <= set(ratios)
    for name, ratio in ratios.items():
        assert isinstance(ratio["met"], bool), name
        assert ratio["op"] in ("<=", ">=") and math.isfinite(ratio["target"]), name
        if name == "overload_error_lines":
            assert ratio["value"] == report["servers"]["overload"]["error_lines"]
        elif name == "impression_log_read_only_failures":
            assert ratio["value"] == 0  # a count: zero is the figure of a healthy run
        elif name == "overload_503_p99_ms" and ratio["value"] is None:
            # A server that answered every request of the overload point has no 503 to time.
            assert "503" not in ov["statuses"] and ratio["met"] is False
        elif name == "overload_goodput" and ov["goodput_rps"] == 0:
            assert ratio["value"] == 0 and ratio["met"] is False
        else:
            _finite_positive(ratio["value"], f"ratio {name}")
    assert ratios["overload_accepted_p99_ms"]["target"] == 500.0

    # redis-benchmark comes with redis-server (CI installs it); elsewhere its part may be recorded missing.
    has_redis_benchmark = IN_CI or shutil.which("redis-benchmark") is not None
    for name in ("service", "redis_benchmark", "bare_async") if has_redis_benchmark else ("service", "bare_async"):
        _finite_positive(report["lookups"][name]["p50_ms"], f"lookups.{name}.p50_ms")
    lookup = report["informational"]["lookup_vs_redis_benchmark_500"]
    if has_redis_benchmark:
        _finite_positive(lookup["value"], "lookup_vs_redis_benchmark_500")
    else:
        assert lookup["value"] is None and lookup["met"] is False
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
    report = json.loads((out / "bench.json").read_text())
    check_bench_json(report)
    # The typed report reads bench.json back to the same keys, in the same order, with the same values.
    typed = read_report(out / "bench.json")
    assert json.loads(json.dumps(to_json(typed))) == report
    assert json.dumps(to_json(typed)) == json.dumps(report)
    # A tail point that did not keep up with its offered rate never meets its target, whatever p99 ÷ p50 says.
    tail = typed.tail[0]
    name = f"p99_over_p50_at_70pct_{tail.size}"
    tail.throughput_rps = 0.8 * tail.rate
    tail.p99_ms = tail.p50_ms
    ratio = compute_ratios(typed)[name]
    assert ratio.value == 1.0 and ratio.parts["kept_up"] == 0.8 and ratio.met is False
    assert "did not keep up" in ratio.parts["not_at_load"]
    # Nor one that kept up behind a standing queue: more requests in flight than the best closed-loop point ran.
    best_c = max((p for p in typed.service if p.size == tail.size), key=lambda p: p.throughput_rps).concurrency
    tail.throughput_rps = tail.rate
    tail.mean_ms = 1000.0 * (best_c + 1) / tail.rate
    ratio = compute_ratios(typed)[name]
    assert ratio.value == 1.0 and ratio.parts["in_flight"] == round(best_c + 1, 1) and ratio.met is False
    assert "standing queue" in ratio.parts["not_at_load"]
    tail.mean_ms = 1000.0 * (best_c - 1) / tail.rate
    assert compute_ratios(typed)[name].met is True
    markdown = (out / "bench.md").read_text()
    for heading in ("## Targets", "## Sections and the machine's load", "## Naive server", "## Overload"):
        assert heading in markdown
    assert (out / "latency_throughput.png").stat().st_size > 0
    assert (out / "engine.png").stat().st_size > 0


def test_bench_device_cuda_without_a_usable_gpu_is_a_one_line_error(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider: the error path needs a CPU-only install")
    proc = subprocess.run(
        [sys.executable, "-m", "mtrank.cli", "bench", "--repo", str(tmp_path / "repo"), "--model", "ple",
         "--out", str(tmp_path / "out"), "--device", "cuda"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "CUDA" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_bench_sizes_must_be_positive_integers(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mtrank.cli", "bench", "--repo", str(tmp_path), "--model", "ple",
         "--out", str(tmp_path / "out"), "--sizes", "20,x"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "--sizes" in proc.stderr and "positive integers" in proc.stderr


def _hand_point(size: int, concurrency: int, rps: float, p50: float, p99: float, rate: float = 0.0) -> dict:
    return {"size": size, "concurrency": concurrency, "rate": rate, "throughput_rps": rps, "rows_per_s": rps * size,
            "p50_ms": p50, "p99_ms": p99, "mean_batch_rows": float(size), "rows_per_server_cpu_s": 1.0,
            "errors": 0}


def test_target_ratios_from_hand_made_figures():
    """Each target is the quotient the issue names, compared the way it names; missing points are None."""
    curve = [{"batch": b, "rows_per_s": r, "rows_per_cpu_s": r} for b, r in ((1, 1000.0), (512, 100_000.0))]
    report = {
        "config": {"sizes": [500, 1000]},
        "engine": {"curve": curve, "peak": curve[1]},
        "service": [_hand_point(500, 1, 30.0, 10.0, 20.0), _hand_point(500, 16, 170.0, 90.0, 200.0),
                    _hand_point(1000, 16, 80.0, 190.0, 400.0)],
        "naive": [_hand_point(500, 16, 200.0, 80.0, 100.0), _hand_point(1000, 4, 80.0, 50.0, 60.0)],
        "tail": [_hand_point(500, 0, 119.0, 10.0, 40.0, rate=119.0), _hand_point(1000, 0, 56.0, 20.0, 30.0, rate=56.0)],
        "overload": {"size": 500, "rate_rps": 680.0, "best_closed_loop": {"throughput_rps": 170.0},
                     "goodput_rps": 136.0, "statuses": {"200": 2720, "503": 10_000}, "request_timeout_ms": 500,
                     "non_200": {"503": {"count": 10_000, "p50_ms": 1.0, "p99_ms": 25.0, "max_ms": 40.0}},
                     "rejected_503_p99_ms": 25.0, "accepted_p50_ms": 200.0, "accepted_p99_ms": 480.0,
                     "rss_kib": {"start": 100_000, "after_first_second": 200_000, "end": 230_000, "max": 240_000},
                     "error_lines": 2},
        "servers": {"overload": {"error_lines": 2, "error_examples": ["x ERROR y"]}, "service": {"error_lines": 0}},
        "impressions": {  # three rounds; the ratios 0.9, 1.0 and 0.96: the median round is the third
            "size": 100, "concurrency": 16, "on_vs_off": [0.9, 1.0, 0.96],
            "points": {"sampled_out": [_hand_point(100, 16, r, 20.0, 40.0) for r in (500.0, 480.0, 500.0)],
                       "log_off": [_hand_point(100, 16, r, 20.0, 40.0) for r in (510.0, 490.0, 490.0)],
                       "log_on": [_hand_point(100, 16, r, 21.0, 45.0) for r in (450.0, 480.0, 480.0)],
                       "log_read_only": [_hand_point(100, 16, r, 21.0, 45.0) for r in (470.0, 470.0, 470.0)]},
            "servers": {"log_read_only": {"statuses": {"200": 9000, "499": 16, "503": 1},
                                          "dropped": {"queue_full": 0, "write_error": 9000}}}},
    }
    ratios = compute_ratios(from_json(Report, report))
    assert list(ratios) == target_names([500, 1000])
    expected = {  # name: (value, met)
        "batching_vs_naive_p50_20_c1": (None, False),
        "service_vs_engine_20_c32": (None, False),
        "service_vs_engine_500_c16": (0.85, True),  # 170 × 500 rows/s ÷ the 100 000 rows/s peak
        "overload_goodput": (0.8, True),
        "overload_503_p99_ms": (25.0, False),
        "overload_accepted_p99_ms": (480.0, True),
        "overload_rss_growth": (1.15, False),
        "overload_error_lines": (2, False),
        "batching_vs_naive_500": (0.85, False),  # best batching 170 ÷ best naive 200 req/s
        "p99_over_p50_at_70pct_500": (4.0, False),
        "batching_vs_naive_1000": (1.0, True),
        "p99_over_p50_at_70pct_1000": (1.5, True),
        "impression_log_on_vs_off": (0.96, True),  # the median of the rounds' on ÷ off, not a ratio of medians
        "impression_log_read_only_failures": (1, False),  # the 503; a client leaving (499) is not a failure
    }
    assert {name: (r.value, r.met) for name, r in ratios.items()} == expected
    assert (ratios["impression_log_on_vs_off"].parts["on_rps"], ratios["impression_log_on_vs_off"].parts["off_rps"]) \
        == (480.0, 500.0)
    assert ratios["impression_log_read_only_failures"].parts["failed"] == {"503": 1}
    assert ratios["overload_accepted_p99_ms"].target == 500.0
    del report["impressions"]  # a run from before the impression log was measured: no such targets
    assert list(compute_ratios(from_json(Report, report))) == target_names([500, 1000], impressions=False)
    assert ratios["batching_vs_naive_p50_20_c1"].parts["missing"] == "no 20-candidate point at concurrency 1"


def test_the_concurrency_1_ratio_is_the_median_of_its_pairs():
    """Each pair's p50s were measured back to back; the target is the middle pair's ratio, not a ratio of
    medians taken minutes apart."""
    curve = [{"batch": 1, "rows_per_s": 1000.0, "rows_per_cpu_s": 1000.0}]
    report = {
        "config": {"sizes": [20]},
        "engine": {"curve": curve, "peak": curve[0]},
        "service": [_hand_point(20, 1, 500.0, 1.8, 3.0)],
        "naive": [_hand_point(20, 1, 600.0, 1.5, 3.0)],
        "c1_pairs": [{"batching_p50_ms": 1.8, "naive_p50_ms": 1.5}, {"batching_p50_ms": 1.3, "naive_p50_ms": 1.4},
                     {"batching_p50_ms": 2.0, "naive_p50_ms": 2.0}],
        "tail": [_hand_point(20, 0, 350.0, 2.0, 4.0, rate=350.0)],
        "overload": {"size": 20, "rate_rps": 2000.0, "best_closed_loop": {"throughput_rps": 500.0},
                     "goodput_rps": 400.0, "statuses": {"200": 100}, "request_timeout_ms": 500,
                     "rejected_503_p99_ms": None, "accepted_p50_ms": 2.0, "accepted_p99_ms": 9.0,
                     "rss_kib": {"start": 1, "after_first_second": 1, "end": 1, "max": 1}, "error_lines": 0},
        "servers": {"overload": {"error_lines": 0, "error_examples": []}},
    }
    c1 = compute_ratios(from_json(Report, report))["batching_vs_naive_p50_20_c1"]
    assert (c1.value, c1.met, c1.parts["pairs"]) == (1.0, True, [1.2, 0.929, 1.0])
    assert (c1.parts["batching_p50_ms"], c1.parts["naive_p50_ms"]) == (2.0, 2.0)
    del report["c1_pairs"]  # a report without pairs (older runs): the sweep's own pair
    c1 = compute_ratios(from_json(Report, report))["batching_vs_naive_p50_20_c1"]
    assert (c1.value, c1.met, c1.parts["pairs"]) == (1.2, False, [1.2])


def test_the_engine_reference_is_the_best_of_its_measurements():
    from mtrank.bench.harness import record_engine_again

    def engine(peak: float) -> EngineRun:
        return EngineRun(peak=EnginePoint(batch=1024, rows_per_s=peak))

    report = Report(engine=engine(63_000.0))
    record_engine_again(report, engine(110_000.0))  # the first was measured while the host was busy
    assert report.engine.peak.rows_per_s == 110_000.0
    assert [p.rows_per_s for p in report.engine_peaks] == [63_000.0, 110_000.0]
    record_engine_again(report, engine(90_000.0))
    assert report.engine.peak.rows_per_s == 110_000.0
    assert [p.rows_per_s for p in report.engine_peaks] == [63_000.0, 110_000.0, 90_000.0]


def test_the_run_of_record_reads_back_as_it_was_written():
    """docs/bench/bench.json through the typed report and back: the same keys in the same order and the same
    values, except the configuration fields added since it ran (at their defaults)."""
    recorded = json.loads((ROOT / "docs" / "bench" / "bench.json").read_text())
    written = json.loads(json.dumps(to_json(from_json(Report, recorded))))
    added = [k for k in written["config"] if k not in recorded["config"]]
    assert added == ["floor_points", "c1_pairs", "impressions_size", "impressions_concurrency", "impressions_rounds",
                     "history_sizes", "history_concurrency", "history_requests", "history_engine_min_time_s"]
    assert {k: v for k, v in written["config"].items() if k not in added} == recorded["config"]
    assert {**written, "config": recorded["config"]} == recorded
    assert list(written) == list(recorded)


def test_scoring_the_run_of_record_again_gives_its_recorded_targets():
    """Every target's value and verdict, recomputed from the recorded figures, is what the run wrote."""
    recorded = json.loads((ROOT / "docs" / "bench" / "bench.json").read_text())
    ratios = compute_ratios(from_json(Report, recorded))
    assert {n: (r.value, r.target, r.met) for n, r in ratios.items()} == {
        n: (r["value"], r["target"], r["met"]) for n, r in recorded["ratios"].items()}
    assert sum(r.met for r in ratios.values()) == 12


# -- the load generator ------------------------------------------------------------------------


class _Answer(http.server.BaseHTTPRequestHandler):
    """Reads the body and answers 200 with a small JSON body, kept alive; ``/slow`` first waits 0.5 s."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/slow":
            time.sleep(0.5)
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _PlainServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out closed its connection before the slow answer: expected here


@pytest.fixture
def plain_server():
    server = _PlainServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _spec(port: int, tmp_path: Path, **kw: object) -> PointSpec:
    bodies = tmp_path / "bodies.jsonl"
    write_bodies(bodies, [b'{"n":%d}' % i for i in range(5)])
    return PointSpec("127.0.0.1", port, str(bodies), warmup_s=0.3, window_s=0.5, stable_windows=2, max_windows=4,
                     **kw)


def test_the_open_loop_keeps_its_schedule(plain_server, tmp_path):
    result = run_point(_spec(plain_server, tmp_path, rate=200.0))
    assert result.mode == "open" and result.errors == 0 and result.statuses == {"200": result.requests}
    assert 170 <= result.throughput_rps <= 230, result
    assert result.p50_ms < 15, result  # latency counts from the scheduled start: a late send shows here


def test_an_answer_later_than_the_timeout_counts_as_a_failure(plain_server, tmp_path):
    result = run_point(_spec(plain_server, tmp_path, concurrency=2, path="/slow", timeout_s=0.2, min_requests=1))
    assert result.requests == 0 and result.errors > 0 and set(result.statuses) == {"0"}, result
    assert 150 <= result.non_200["0"]["p50_ms"] <= 400, result


# -- the history workload ------------------------------------------------------------------------

HISTORY_LEN = 50


@pytest.fixture(scope="module")
def history_bench_repo(tmp_path_factory) -> Path:
    """A bench repository path whose history repository beside it holds a small history model (PLE on
    ``mtrank synth --history`` data, made as ``--prepare`` makes it)."""
    from mtrank.bench.prepare import ensure_history_model

    repo = tmp_path_factory.mktemp("bench") / "repo"
    ensure_history_model(repo, rows=3000, seed=5)
    return repo


def test_history_workload_requests_carry_full_50_entry_histories(history_bench_repo, tmp_path):
    from mtrank.bench.history import history_bodies
    from mtrank.bench.loadgen import read_bodies
    from mtrank.bench.prepare import HISTORY_MODEL, history_repo_for
    from mtrank.bench.workload import Catalog, RequestFactory

    catalog = Catalog.from_repo(history_repo_for(history_bench_repo), HISTORY_MODEL)
    files, lengths = history_bodies(RequestFactory(catalog), [3, 7], 5, tmp_path)
    assert lengths == {"hist_item_id": [HISTORY_LEN, HISTORY_LEN], "hist_category": [HISTORY_LEN, HISTORY_LEN]}
    items, categories = set(catalog.items), set(catalog.ids("category"))
    for size, path in files.items():
        bodies = [json.loads(b) for b in read_bodies(path)]
        assert len(bodies) == 5
        for body in bodies:
            user = body["user"]["features"]
            assert len(user["hist_item_id"]) == len(user["hist_category"]) == HISTORY_LEN
            assert set(user["hist_item_id"]) <= items and set(user["hist_category"]) <= categories
            assert len(body["candidates"]) == size
            assert all(1 <= len(c["features"]["tags"]) <= 8 for c in body["candidates"])


def test_the_history_section_runs_alone_and_reports_its_keys(history_bench_repo, tmp_path):
    out = tmp_path / "history"
    proc = subprocess.run(
        [sys.executable, "-m", "mtrank.bench.run_history", "--repo", str(history_bench_repo), "--out", str(out),
         "--redis", "none", "--quick", "--sizes", "20,500"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["mode"] == "history" and list(report["sections"]) == ["history"]
    assert len(report["sections"]["history"]["load_before"]) == 3
    h = report["history"]
    assert h["model"]["name"] == "ple_history" and h["concurrency"] == 16
    assert h["history_lengths"] == {"hist_item_id": [HISTORY_LEN] * 2, "hist_category": [HISTORY_LEN] * 2}
    assert [(p["size"], p["concurrency"], p["errors"]) for p in h["service"]] == [(20, 16, 0), (500, 16, 0)]
    for p in h["service"]:
        _finite_positive(p["rows_per_s"], f"history service rows/s at {p['size']}")
    # The engine before and after the service's points, each size on batches of 1 and 4 whole requests.
    assert [c["candidates"] for c in h["engine"]] == [20, 500, 20, 500]
    for c in h["engine"]:
        assert [(p["requests"], p["batch"]) for p in c["curve"]] == [(k, k * c["candidates"]) for k in (1, 4)]
        assert c["peak"]["rows_per_s"] == max(p["rows_per_s"] for p in c["curve"])
    assert report["servers"]["history"]["provider"] == "CPUExecutionProvider"
    assert report["servers"]["history"]["error_lines"] == 0
    assert list(report["ratios"]) == report["target_names"] == ["history_service_over_engine_500"]
    assert list(report["informational"]) == ["history_service_over_engine_20"]
    for size, r in ((500, report["ratios"]["history_service_over_engine_500"]),
                    (20, report["informational"]["history_service_over_engine_20"])):
        engine = max(c["peak"]["rows_per_s"] for c in h["engine"] if c["candidates"] == size)
        service = next(p["rows_per_s"] for p in h["service"] if p["size"] == size)
        assert r["engine_rows_per_s"] == engine and r["service_rows_per_s"] == service
        assert r["value"] == round(service / engine, 3) and r["target"] == 0.8 and isinstance(r["met"], bool)
    assert "## History workload" in (out / "bench.md").read_text()
    # In a full run's report the history target comes after the others, scored the same way.
    full = from_json(Report, json.loads((ROOT / "docs" / "bench" / "bench.json").read_text()))
    full.history, full.config.history_sizes = read_report(out / "bench.json").history, [20, 500]
    ratios = compute_ratios(full)
    assert list(ratios)[-1] == "history_service_over_engine_500" and list(ratios) == target_names(
        full.config.sizes, impressions=False, history=True)
    assert ratios["history_service_over_engine_500"].value == report["ratios"]["history_service_over_engine_500"][
        "value"]
