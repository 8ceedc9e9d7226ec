"""``mtrank bench``: engine limit, service, naive server and embedding lookups, side by side in one run.

``mtrank bench --repo REPO --model NAME --out DIR [--redis URL] [--quick] [--prepare]``

1. engine: ONNX Runtime alone, in process, rows/s at batch sizes 1 … 4096 (:mod:`loadtests.engine`);
2. embedding lookups: the service's Redis lookup of 500 ids against redis-benchmark's ``MGET`` of
   the same keys (:mod:`loadtests.lookups`);
3. service: ``mtrank serve`` with the Redis store and dynamic batching, a closed-loop concurrency
   sweep per request size, each point held until stable (:mod:`loadtests.loadgen`), then an
   open-loop point at 70 % of each size's best throughput for the tail-latency target;
4. naive server: the same service with ``MTRANK_BATCHING=false`` (one inference per request).

The model's embedding tables are loaded into Redis under a key prefix of this run's own, deleted
at the end. Writes ``DIR/bench.json`` (every figure and the target ratios), ``DIR/bench.md`` and
PNG plots. Every figure that matters is a ratio of two measurements taken minutes apart on the
same machine; absolute numbers depend on what else the machine is doing (recorded: load average).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadtests.engine import bench_engine, rows_per_s_at
from loadtests.loadgen import PointSpec, run_point, write_bodies
from loadtests.lookups import bench_lookups
from loadtests.server import RemoteServer
from loadtests.workload import Catalog, RequestFactory
from mtrank import store_keys
from mtrank.manifest import ALL_GROUPS, load_manifest, version_dir

TARGETS = {
    "service_vs_engine_500_c16": (">=", 0.6),
    "batching_vs_naive_20_c32": (">=", 3.0),
    "p99_over_p50_at_70pct": ("<=", 3.0),
    "lookup_vs_redis_benchmark_500": ("<=", 2.0),
}
TARGET_TEXT = {
    "service_vs_engine_500_c16": "service rows/s ÷ engine rows/s, 500-candidate requests at concurrency 16",
    "batching_vs_naive_20_c32": "batching on ÷ naive server, requests/s, 20 candidates at concurrency 32",
    "p99_over_p50_at_70pct": "p99 ÷ p50 at 70 % of the best throughput (open loop; worst request size)",
    "lookup_vs_redis_benchmark_500": "service Redis lookup ÷ redis-benchmark MGET, 500 ids (p50 per call)",
}


@dataclass
class BenchConfig:
    """What one run measures; :meth:`quick` is the CI smoke check (under 2 minutes)."""

    sizes: list[int] = field(default_factory=lambda: [20, 100, 500, 1000])
    concurrencies: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    naive_points: list[tuple[int, int]] | None = None
    """(size, concurrency) of the naive server; None = the same sweep as the service."""
    tail_sizes: list[int] = field(default_factory=lambda: [20, 100, 500, 1000])
    """Sizes with an open-loop point at 70 % of their best throughput."""
    bodies_per_size: int = 64
    warmup_s: float = 1.0
    window_s: float = 1.0
    max_windows: int = 8
    min_requests_per_window: int = 30
    engine_min_time_s: float = 0.4
    lookup_ids: int = 500
    lookup_calls: int = 2000
    lookup_rounds: int = 3
    intra_op_threads: int = 1
    """ORT intra-op threads of the server and the engine: 1 leaves the second core to the event loop."""
    request_timeout_ms: int = 30_000
    """Generous, so saturation shows as latency, not as 504s."""

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            sizes=[20, 500], concurrencies=[1, 16, 32], naive_points=[(20, 32), (500, 16)], tail_sizes=[500],
            bodies_per_size=16, warmup_s=0.3, window_s=0.3, max_windows=3, min_requests_per_window=8,
            engine_min_time_s=0.03, lookup_calls=200, lookup_rounds=1,
        )


# -- machine ---------------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        for key in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                    "Hypervisor vendor", "L2 cache", "L3 cache", "Flags"):
            if key in fields:
                value = fields[key].strip()
                if key == "Flags":
                    value = " ".join(f for f in value.split() if f.startswith(("avx", "fma", "amx")))
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = value
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text()
        kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))
        info["ram_gib"] = round(kb / 1024**2, 1)
    except (OSError, AttributeError):
        pass
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    info["numpy"] = np.__version__
    return info


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the server under test ------------------------------------------------------------------


_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([^ ]+)")


def scrape(text: str) -> dict[str, float]:
    """Prometheus text → metric name (labels summed over) → value, for the few the bench reads."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        if name.startswith("mtrank_request_duration_seconds") and labels and 'route="/v1/rank"' not in labels:
            continue
        out[name] = out.get(name, 0.0) + float(value)
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def measure_point(server, bodies_file: Path, size: int, cfg: BenchConfig, concurrency: int = 0,
                  rate: float = 0.0) -> dict[str, Any]:
    """One load point, with what the server's own metrics and CPU time say about it."""
    spec = PointSpec(host="127.0.0.1", port=server.port, bodies_file=str(bodies_file), concurrency=concurrency,
                     rate=rate, warmup_s=cfg.warmup_s, window_s=cfg.window_s, max_windows=cfg.max_windows,
                     min_requests=cfg.min_requests_per_window)
    before, cpu0, t0 = scrape(server.metrics()), _cpu_seconds(server.proc.pid), time.perf_counter()
    result = run_point(spec)
    after, cpu1, t1 = scrape(server.metrics()), _cpu_seconds(server.proc.pid), time.perf_counter()
    batches = _delta(after, before, "mtrank_batch_rows_count")
    wall = t1 - t0
    point = asdict(result) | {
        "size": size,
        "rows_per_s": result.throughput_rps * size,
        "mean_batch_rows": _delta(after, before, "mtrank_batch_rows_sum") / batches if batches else 0.0,
        "mean_batch_requests": _delta(after, before, "mtrank_batch_requests_sum") / batches if batches else 0.0,
        "inference_busy": _delta(after, before, "mtrank_inference_duration_seconds_sum") / wall,
        "server_cpu_cores": (cpu1 - cpu0) / wall,
        "rows_per_server_cpu_s": result.throughput_rps * size / ((cpu1 - cpu0) / wall) if cpu1 > cpu0 else 0.0,
        "client_cpu_cores": result.client_cpu_s / result.seconds if result.seconds else 0.0,
        "load": _load(),
    }
    lookups = _delta(after, before, "mtrank_embedding_lookup_duration_seconds_count")
    if lookups:
        point["mean_lookup_ms"] = 1000 * _delta(after, before, "mtrank_embedding_lookup_duration_seconds_sum") / lookups
    queued = _delta(after, before, "mtrank_queue_wait_seconds_count")
    if queued:
        point["mean_queue_wait_ms"] = 1000 * _delta(after, before, "mtrank_queue_wait_seconds_sum") / queued
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in point.items()}


_STARTED = time.monotonic()


def _say(message: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:5.0f} s]: {message}", file=sys.stderr, flush=True)


def sweep(server, bodies: dict[int, Path], points: list[tuple[int, int]], cfg: BenchConfig,
          label: str) -> list[dict[str, Any]]:
    out = []
    for size, concurrency in points:
        p = measure_point(server, bodies[size], size, cfg, concurrency=concurrency)
        _say(f"{label} size={size:4d} c={concurrency:3d}: {p['throughput_rps']:8.1f} req/s "
             f"{p['rows_per_s']:9.0f} rows/s p50={p['p50_ms']:7.2f} p99={p['p99_ms']:7.2f} ms "
             f"batch={p['mean_batch_rows']:6.0f} rows{'' if p['stable'] else ' (unstable)'}"
             f"{' errors=' + str(p['errors']) if p['errors'] else ''}")
        out.append(p)
    return out


# -- the run --------------------------------------------------------------------------------


def _clean_redis(url: str, prefix: str) -> int:
    client = store_keys.connect(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
        return len(keys)
    finally:
        client.close()


def _write_bodies(factory: RequestFactory, sizes: list[int], per_size: int, tmp: Path) -> dict[int, Path]:
    rng = np.random.default_rng(1)
    files = {}
    for n in sizes:
        bodies = [orjson.dumps(factory.request(rng, n)) for _ in range(per_size)]
        files[n] = tmp / f"bodies-{n}.jsonl"
        write_bodies(files[n], bodies)
    return files


def _main_graph(manifest) -> str:
    return ALL_GROUPS if ALL_GROUPS in manifest.graphs else next(iter(manifest.graphs))


def run_bench(args) -> dict[str, Any]:
    """Everything above; returns what it wrote to ``DIR/bench.json``."""
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    repo, model, out = Path(args.repo), args.model, Path(args.out)
    if getattr(args, "prepare", False):
        from loadtests.prepare import ensure_model

        ensure_model(repo, model)
    vdir = version_dir(repo, model)
    manifest = load_manifest(vdir, verify=False)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "model": {"repo": str(repo), "name": model, "version": manifest.version, "kind": manifest.kind,
                  "graphs": sorted(manifest.graphs)},
        "machine": describe_machine(),
        "config": asdict(cfg),
        "load_at_start": _load(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _say(f"{report['mode']} run on {model} v{manifest.version} ({vdir}); load {report['load_at_start']}")

    catalog = Catalog.from_repo(repo, model, manifest.version)
    factory = RequestFactory(catalog)
    prefix = f"mtrank-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="mtrank-bench-") as tmp:
        bodies = _write_bodies(factory, sorted(set(cfg.sizes)), cfg.bodies_per_size, Path(tmp))
        graph = _main_graph(manifest)

        _say(f"engine: ONNX Runtime alone, graph {graph!r}, {cfg.intra_op_threads} thread(s)")
        report["engine"] = bench_engine(vdir, manifest, graph, cfg.intra_op_threads, cfg.engine_min_time_s)
        if not args.quick and cfg.intra_op_threads != 0:
            report["engine_all_threads"] = bench_engine(vdir, manifest, graph, 0, cfg.engine_min_time_s)
        _say(f"engine peak {report['engine']['peak']['rows_per_s']:.0f} rows/s at batch "
             f"{report['engine']['peak']['batch']}")

        from export.redis_loader import load_embeddings

        try:
            report["redis_load"] = load_embeddings(repo, model, args.redis, version=manifest.version,
                                                   prefix=prefix, progress=False)
            item_table = _local_table(manifest, vdir, model, "item_id")
            ids = catalog.items[: cfg.lookup_ids]
            _say(f"lookups: {len(ids)} ids, service vs redis-benchmark MGET")
            report["lookups"] = bench_lookups(args.redis, prefix, item_table, ids, cfg.lookup_calls,
                                              rounds=cfg.lookup_rounds)

            env = {"MTRANK_REDIS_URL": args.redis, "MTRANK_REDIS_PREFIX": prefix,
                   "MTRANK_INTRA_OP_THREADS": str(cfg.intra_op_threads),
                   "MTRANK_REQUEST_TIMEOUT_MS": str(cfg.request_timeout_ms), "MTRANK_LOG_LEVEL": "warning"}
            service_points = [(s, c) for s in cfg.sizes for c in cfg.concurrencies]
            with RemoteServer(repo, env=env | {"MTRANK_BATCHING": "true"}, ready_timeout_s=120) as server:
                report["service"] = sweep(server, bodies, service_points, cfg, "service")
                report["tail"] = []
                for size in cfg.tail_sizes:
                    best = max((p for p in report["service"] if p["size"] == size), key=lambda p: p["throughput_rps"])
                    rate = 0.7 * best["throughput_rps"]
                    p = measure_point(server, bodies[size], size, cfg, rate=rate)
                    p["target_fraction"] = 0.7
                    p["max_throughput_rps"] = best["throughput_rps"]
                    _say(f"tail size={size} at {rate:.0f} req/s (70 % of {best['throughput_rps']:.0f}): "
                         f"p50={p['p50_ms']:.2f} p99={p['p99_ms']:.2f} ms, {p['throughput_rps']:.0f} req/s done")
                    report["tail"].append(p)
            naive_points = cfg.naive_points if cfg.naive_points is not None else service_points
            with RemoteServer(repo, env=env | {"MTRANK_BATCHING": "false"}, ready_timeout_s=120) as server:
                report["naive"] = sweep(server, bodies, naive_points, cfg, "naive  ")
        finally:
            report["redis_keys_deleted"] = _clean_redis(args.redis, prefix)

    report["load_at_end"] = _load()
    report["seconds"] = round(time.time() - started, 1)
    report["ratios"] = compute_ratios(report)
    (out / "bench.json").write_text(json.dumps(report, indent=1, allow_nan=False, default=_finite))
    from loadtests.report import write_markdown, write_plots

    report["plots"] = write_plots(report, out)
    (out / "bench.json").write_text(json.dumps(report, indent=1, allow_nan=False, default=_finite))
    write_markdown(report, out / "bench.md")
    for name, r in report["ratios"].items():
        _say(f"{name}: {r['value']} (target {r['op']} {r['target']}: {'met' if r['met'] else 'NOT met'})")
    _say(f"wrote {out}/bench.json, bench.md and plots in {report['seconds']} s")
    return report


def _finite(v: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _local_table(manifest, vdir: Path, model: str, field_name: str):
    from service.stores import LocalTable

    name = field_name if field_name in manifest.tables else next(iter(manifest.tables))
    return LocalTable(model, manifest.version, manifest.tables[name], vdir)


def _point(points: list[dict], size: int, concurrency: int) -> dict | None:
    return next((p for p in points if p["size"] == size and p["concurrency"] == concurrency), None)


def compute_ratios(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The four target ratios, each with the figures it is made of."""
    ratios: dict[str, dict[str, Any]] = {}

    def put(name: str, value: float | None, **parts: Any) -> None:
        op, target = TARGETS[name]
        ok = value is not None and math.isfinite(value) and (value >= target if op == ">=" else value <= target)
        ratios[name] = {"value": None if value is None else round(value, 3), "op": op, "target": target,
                        "met": bool(ok), "what": TARGET_TEXT[name], **parts}

    svc = _point(report["service"], 500, 16)
    if svc:
        engine_at = rows_per_s_at(report["engine"]["curve"], max(svc["mean_batch_rows"], 1.0))
        peak = report["engine"]["peak"]["rows_per_s"]
        engine_cpu_at = rows_per_s_at(report["engine"]["curve"], max(svc["mean_batch_rows"], 1.0), "rows_per_cpu_s")
        put("service_vs_engine_500_c16", svc["rows_per_s"] / engine_at, service_rows_per_s=svc["rows_per_s"],
            service_mean_batch_rows=svc["mean_batch_rows"], engine_rows_per_s_at_that_batch=round(engine_at, 1),
            engine_peak_rows_per_s=peak, vs_engine_peak=round(svc["rows_per_s"] / peak, 3),
            cpu_efficiency=round(svc["rows_per_server_cpu_s"] / engine_cpu_at, 3),
            service_rows_per_server_cpu_s=svc["rows_per_server_cpu_s"],
            engine_rows_per_cpu_s_at_that_batch=round(engine_cpu_at, 1))
    on, off = _point(report["service"], 20, 32), _point(report["naive"], 20, 32)
    if on and off:
        put("batching_vs_naive_20_c32", on["throughput_rps"] / off["throughput_rps"],
            batching_rps=on["throughput_rps"], naive_rps=off["throughput_rps"],
            per_server_cpu_s=round(on["rows_per_server_cpu_s"] / off["rows_per_server_cpu_s"], 3)
            if off["rows_per_server_cpu_s"] else None)
    if report.get("tail"):
        per_size = {str(p["size"]): round(p["p99_ms"] / p["p50_ms"], 3) for p in report["tail"]}
        worst = max(report["tail"], key=lambda p: p["p99_ms"] / p["p50_ms"])
        put("p99_over_p50_at_70pct", worst["p99_ms"] / worst["p50_ms"], worst_size=worst["size"],
            p50_ms=worst["p50_ms"], p99_ms=worst["p99_ms"], rate_rps=worst["rate"], per_size=per_size)
    lk = report.get("lookups") or {}
    if lk.get("redis_benchmark"):
        put("lookup_vs_redis_benchmark_500", lk["service"]["p50_ms"] / lk["redis_benchmark"]["p50_ms"],
            service_p50_ms=lk["service"]["p50_ms"], redis_benchmark_p50_ms=lk["redis_benchmark"]["p50_ms"],
            mean_ratio=round(lk["service"]["mean_ms"] / lk["redis_benchmark"]["mean_ms"], 3))
    else:
        put("lookup_vs_redis_benchmark_500", None, missing="redis-benchmark is not installed")
    return ratios

