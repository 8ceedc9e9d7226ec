"""``mtrank bench``: engine limit, service, naive server, overload and embedding lookups, side by side in one run.

``mtrank bench --repo REPO --model NAME --out DIR [--redis URL|none] [--device cpu|cuda] [--quick]
[--sizes 20,500] [--concurrencies 1,16] [--prepare]``

1. engine: ONNX Runtime alone, in process, with its default session options (all cores), rows/s
   at batch sizes 1 … 4096; its best batch size is the *engine peak* of the targets
   (:mod:`mtrank.bench.engine`);
2. embedding lookups: the service's Redis lookup of 500 ids against redis-benchmark's ``MGET`` of
   the same keys (:mod:`mtrank.bench.lookups`; informational);
3. service and naive server: ``mtrank serve`` with the settings a user gets by default, and the
   same service with ``MTRANK_BATCHING=false`` (one inference per request), both running; a
   closed-loop concurrency sweep per request size, each point held until stable
   (:mod:`mtrank.bench.loadgen`) and measured on both servers back to back, so that the two sweeps see
   the same moments of the host and each size is compared at each server's best concurrency;
4. tail: on the batching server, an open-loop point at 70 % of each size's best throughput for the
   tail-latency target;
5. overload: a fresh server with ``MTRANK_REQUEST_TIMEOUT_MS`` at a realistic value, open loop at
   4 × the best closed-loop throughput of 500-candidate requests: goodput, 503 latency, accepted
   p99, the server's RSS through the point and the ERROR lines of its log.

The model's embedding tables are loaded into Redis under a key prefix of this run's own, deleted
at the end. Writes ``DIR/bench.json`` (every figure, the target ratios and the load average before
and after each section), ``DIR/bench.md`` and PNG plots. Every target is a ratio of two
measurements of the same run on the same machine; absolute numbers depend on what else the
machine is doing.
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
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from mtrank import store_keys
from mtrank.bench.engine import bench_engine, rows_per_s_at
from mtrank.bench.floor import FloorServer
from mtrank.bench.loadgen import PointSpec, run_point, write_bodies
from mtrank.bench.lookups import bench_lookups
from mtrank.bench.server import RemoteServer
from mtrank.bench.workload import Catalog, RequestFactory
from mtrank.manifest import ALL_GROUPS, load_manifest, version_dir

# name → (comparison, target, what); target None: the run's MTRANK_REQUEST_TIMEOUT_MS of the overload point.
TARGETS: dict[str, tuple[str, float | None, str]] = {
    "batching_vs_naive_p50_20_c1": ("<=", 1.05, "batching p50 ÷ naive p50, 20 candidates at concurrency 1"),
    "service_vs_engine_20_c32": (">=", 0.6, "service rows/s ÷ engine peak rows/s, 20 candidates at concurrency 32"),
    "service_vs_engine_500_c16": (">=", 0.85, "service rows/s ÷ engine peak rows/s, 500 candidates at concurrency 16"),
    "overload_goodput": (">=", 0.8, "200 answers/s at 4 × the best closed-loop throughput ÷ that throughput"),
    "overload_503_p99_ms": ("<=", 20.0, "p99 latency of the 503 answers under that overload, ms"),
    "overload_accepted_p99_ms": ("<=", None, "p99 latency of the 200 answers under that overload, ms "
                                                 "(target: the server's MTRANK_REQUEST_TIMEOUT_MS)"),
    "overload_rss_growth": ("<=", 1.1, "server RSS at the end ÷ after the first second of the overload point"),
    "overload_error_lines": ("<=", 0, "ERROR and Traceback lines in the overload server's log"),
}
# One target per request size of the run: "{size}" is filled in.
PER_SIZE_TARGETS: dict[str, tuple[str, float | None, str]] = {
    "batching_vs_naive_{size}": (">=", 1.0, "best batching req/s ÷ best naive req/s, {size} candidates "
                                            "(each at its best concurrency)"),
    "p99_over_p50_at_70pct_{size}": ("<=", 3.0, "p99 ÷ p50, open loop at 70 % of the best closed-loop "
                                                "throughput, {size} candidates"),
}
TAIL_KEPT_UP = 0.95
"""A tail point counts only when it answered at least this share of the rate it offered, and when it
held no more requests in flight (answers/s × mean latency, Little's law) than the closed-loop point
of the best throughput ran with: more than that at 70 % of the rate is a standing queue (the host got
slower since the sweep), whose every answer is late alike, so that p99 ÷ p50 looks fine while p50 is
hundreds of milliseconds (100 candidates at 17:54: 99 in flight against 8, p50 203 ms, 1.50)."""
INFORMATIONAL: dict[str, tuple[str, float, str]] = {
    "lookup_vs_redis_benchmark_500": ("<=", 2.0, "service Redis lookup ÷ redis-benchmark MGET, 500 ids "
                                                 "(p50 per call)"),
    "floor_vs_engine_20_c32": (">=", 0.6, "the serving floor (HTTP, batching and ONNX Runtime on a fixed feed, no "
                                          "ranking path) rows/s ÷ engine peak rows/s, 20 candidates at concurrency 32: "
                                          "the most any ranking path could reach here (the service's target "
                                          "beside it)"),
    "floor_vs_engine_500_c16": (">=", 0.85, "the serving floor rows/s ÷ engine peak rows/s, 500 candidates at "
                                            "concurrency 16 (the service's target beside it)"),
    "retry_storm_goodput": (">=", 0.8, "200 answers/s of closed-loop clients that resend at once on a 503, 4 × "
                                       "as many as the deadline's 40 % holds at the best throughput ÷ that "
                                       "throughput"),
}
ERROR_LINE = re.compile(r"\bERROR\b|\bCRITICAL\b|Traceback")


def target_names(sizes: list[int]) -> list[str]:
    """Every target a run over request ``sizes`` reports."""
    return [*TARGETS, *(name.format(size=n) for n in sorted(sizes) for name in PER_SIZE_TARGETS)]


class BenchError(ValueError):
    """A bad option or an unusable device; the message is one line (the CLI exits with status 2)."""


@dataclass
class BenchConfig:
    """What one run measures; :meth:`quick` is the CI smoke check (under 2 minutes)."""

    sizes: list[int] = field(default_factory=lambda: [20, 100, 500, 1000])
    """Candidates per request; every size gets the service and naive sweeps and a tail point."""
    concurrencies: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """Closed-loop concurrencies of both sweeps (1 for the p50 target, 16 and 32 for the engine targets)."""
    bodies_per_size: int = 64
    warmup_s: float = 1.0
    window_s: float = 1.0
    max_windows: int = 8
    min_requests_per_window: int = 30
    engine_min_time_s: float = 0.4
    engine_service_threads: bool = True
    """Also measure the service's own session at 1 intra-op thread (informational, CPU only)."""
    engine_twice: bool = True
    """Measure the engine peak again after the batching server's sections and at the end, and keep
    the best run: a peak measured while the host was busy or slow (once 63k rows/s, below the 66k of
    one thread, against 104-112k that hour; once 78k at both the start and the end of a run, against
    120k in the runs before and after) would inflate every ratio to it."""
    lookup_ids: int = 500
    lookup_calls: int = 2000
    lookup_rounds: int = 3
    floor_points: list[tuple[int, int]] = field(default_factory=lambda: [(20, 32), (500, 16)])
    """(candidates, concurrency) of the serving floor (:mod:`mtrank.bench.floor`), CPU runs only: the
    points of the two engine targets, measured with nothing but HTTP, batching and ONNX Runtime."""
    c1_pairs: int = 3
    """Pairs of concurrency-1 points at 20 candidates (batching, naive, back to back, which first
    alternating), the sweep's pair included; the target takes the median of the pairs' p50 ratios.
    Both p50s are 1.2-1.8 ms here and the host's speed moves by more than their difference between
    minutes: one pair read 1.19 where three more read 0.95-1.04."""
    request_timeout_ms: int = 30_000
    """Server deadline in the sweeps: generous, so saturation shows as latency, not as rejections."""
    tail_fraction: float = 0.7
    tail_repeats: int = 3
    """Open-loop tail points per size; the target takes the one with the median p99 ÷ p50, and all are
    recorded (on a shared 2-core machine one stall in a point's ~1 000 answers moves its p99 5-fold)."""
    overload_size: int = 500
    """Request size of the overload point (the largest size of the run when it has no 500)."""
    overload_factor: float = 4.0
    """Open-loop rate of the overload point ÷ the best closed-loop throughput at its size."""
    overload_s: float = 20.0
    overload_warmup_s: float = 1.0
    overload_timeout_ms: int = 500
    """The overload server's MTRANK_REQUEST_TIMEOUT_MS (a realistic deadline for a ranking call)."""
    overload_client_timeout_s: float = 2.0
    """The load generator gives up after this (above the server's deadline, so the server decides)."""
    overload_repeats: int = 3
    """Open-loop overload points, one after the other on the same server; the targets take each figure's
    median over them, and all are recorded (goodput moved 0.70-0.82 and the 503 p99 61-102 ms between
    single points of three runs of the same code)."""
    overload_pause_s: float = 2.0
    """Idle time between overload repeats (the queue drains within the 500 ms deadline)."""
    retry_storm_s: float = 10.0
    """The retry-storm point on the overload server: a closed loop whose clients resend at once on a 503
    (ignoring Retry-After), :func:`storm_clients` of them, measured this long."""
    rss_interval_s: float = 0.2

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            sizes=[20, 500], concurrencies=[1, 16, 32], bodies_per_size=16, warmup_s=0.3, window_s=0.3,
            max_windows=3, min_requests_per_window=8, engine_min_time_s=0.03, engine_service_threads=False,
            engine_twice=False, c1_pairs=1,
            lookup_calls=200, lookup_rounds=1, overload_s=3.0, overload_warmup_s=0.5, tail_repeats=1,
            overload_repeats=1, retry_storm_s=2.0,
        )

    @property
    def overload_at(self) -> int:
        return self.overload_size if self.overload_size in self.sizes else max(self.sizes)


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


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _spec(port: int, bodies_file: Path, cfg: BenchConfig, **fields: Any) -> PointSpec:
    """A load point against 127.0.0.1:``port`` with the run's warm-up and windows; ``fields`` set the rest."""
    spec = PointSpec(host="127.0.0.1", port=port, bodies_file=str(bodies_file), warmup_s=cfg.warmup_s,
                     window_s=cfg.window_s, max_windows=cfg.max_windows, min_requests=cfg.min_requests_per_window)
    return replace(spec, **fields)


def measure_point(server, bodies_file: Path, size: int, cfg: BenchConfig, concurrency: int = 0,
                  rate: float = 0.0, **spec_overrides: Any) -> dict[str, Any]:
    """One load point, with what the server's own metrics and CPU time say about it.

    ``spec_overrides`` replace fields of the :class:`PointSpec` (e.g. a fixed-length window).
    """
    spec = _spec(server.port, bodies_file, cfg, concurrency=concurrency, rate=rate, **spec_overrides)
    before, cpu0, t0 = scrape(server.metrics()), _cpu_seconds(server.pids()), time.perf_counter()
    result = run_point(spec)
    after, cpu1, t1 = scrape(server.metrics()), _cpu_seconds(server.pids()), time.perf_counter()
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


def sweeps(servers: dict[str, RemoteServer], bodies: dict[int, Path], points: list[tuple[int, int]],
           cfg: BenchConfig) -> dict[str, list[dict[str, Any]]]:
    """Every point on every server, one server right after the other, which goes first alternating
    from point to point. This host's speed moves by half within minutes (ONNX Runtime at 78k and
    at 117-120k rows/s in one run), so sweeps run one after the other compared the moments they
    ran in as much as the servers."""
    out: dict[str, list[dict[str, Any]]] = {label: [] for label in servers}
    labels = list(servers)
    for i, (size, concurrency) in enumerate(points):
        for label in labels if i % 2 == 0 else labels[::-1]:
            p = measure_point(servers[label], bodies[size], size, cfg, concurrency=concurrency)
            _say(f"{label:7s} size={size:4d} c={concurrency:3d}: {p['throughput_rps']:8.1f} req/s "
                 f"{p['rows_per_s']:9.0f} rows/s p50={p['p50_ms']:7.2f} p99={p['p99_ms']:7.2f} ms "
                 f"batch={p['mean_batch_rows']:6.0f} rows{'' if p['stable'] else ' (unstable)'}"
                 f"{' errors=' + str(p['errors']) if p['errors'] else ''}")
            out[label].append(p)
    return out


def c1_pairs(servers: dict[str, RemoteServer], bodies: dict[int, Path], report: dict[str, Any],
             cfg: BenchConfig) -> list[dict[str, float]]:
    """The p50s of 20 candidates at concurrency 1 on both servers, ``cfg.c1_pairs`` pairs: the sweep's
    and more, measured back to back, which server first alternating; [] without that point."""
    on, off = _point(report["service"], 20, 1), _point(report["naive"], 20, 1)
    if on is None or off is None:
        return []
    pairs = [{"batching_p50_ms": on["p50_ms"], "naive_p50_ms": off["p50_ms"]}]
    for i in range(1, cfg.c1_pairs):
        first = ("naive", "service") if i % 2 else ("service", "naive")
        p50 = {label: measure_point(servers[label], bodies[20], 20, cfg, concurrency=1)["p50_ms"] for label in first}
        pairs.append({"batching_p50_ms": p50["service"], "naive_p50_ms": p50["naive"]})
    for pair in pairs:
        pair["ratio"] = round(pair["batching_p50_ms"] / pair["naive_p50_ms"], 4)
    _say("20 candidates at concurrency 1, batching ÷ naive p50: "
         + ", ".join(f"{q['ratio']:.2f} ({q['batching_p50_ms']:.2f}/{q['naive_p50_ms']:.2f} ms)" for q in pairs))
    return pairs


def floor_points(vdir: Path, graph: str, bodies: dict[int, Path], workers: int,
                 cfg: BenchConfig) -> list[dict[str, Any]]:
    """The serving floor at ``cfg.floor_points`` (those whose size the run has): closed loop, as the
    sweeps measure, with the floor server's CPU time."""
    points = []
    server = FloorServer(vdir, graph, workers)
    try:
        for size, concurrency in cfg.floor_points:
            if size not in bodies:
                continue
            cpu0, t0 = _cpu_seconds(server.pids()), time.perf_counter()
            result = run_point(_spec(server.port, bodies[size], cfg, concurrency=concurrency))
            cores = (_cpu_seconds(server.pids()) - cpu0) / (time.perf_counter() - t0)
            rows_per_s = result.throughput_rps * size
            points.append({"size": size, "concurrency": concurrency, "throughput_rps": round(result.throughput_rps, 2),
                           "rows_per_s": round(rows_per_s, 1), "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                           "errors": result.errors, "server_cpu_cores": round(cores, 3),
                           "rows_per_server_cpu_s": round(rows_per_s / cores, 1) if cores > 0 else 0.0,
                           "load": _load()})
            _say(f"floor   size={size:4d} c={concurrency:3d}: {result.throughput_rps:8.1f} req/s "
                 f"{rows_per_s:9.0f} rows/s p50={result.p50_ms:7.2f} ms (HTTP, batching and ONNX Runtime only)")
    finally:
        server.stop()
    return points


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


@contextmanager
def _section(report: dict[str, Any], name: str) -> Iterator[None]:
    """Records the section's load average (1/5/15 min) before and after, and its duration."""
    before, started = _load(), time.perf_counter()
    _say(f"{name}: load {before}")
    try:
        yield
    finally:
        report["sections"][name] = {"load_before": before, "load_after": _load(),
                                    "seconds": round(time.perf_counter() - started, 1)}


def server_env(device: str, redis_url: str | None, prefix: str, request_timeout_ms: int) -> dict[str, str]:
    """The environment of the servers under test: the service's defaults, except what the bench must set."""
    from mtrank.service.settings import Settings

    defaults = Settings.model_fields
    env = {
        "MTRANK_DEVICE": device,
        # RemoteServer pins one intra-op thread, one worker and quiet logs for the tests; the bench
        # measures what a user gets, so all three go back to the service's defaults.
        "MTRANK_INTRA_OP_THREADS": str(defaults["intra_op_threads"].default),
        "MTRANK_WORKERS": str(defaults["workers"].default),
        "MTRANK_LOG_LEVEL": str(defaults["log_level"].default),
        "MTRANK_REQUEST_TIMEOUT_MS": str(request_timeout_ms),
    }
    if redis_url:
        env |= {"MTRANK_REDIS_URL": redis_url, "MTRANK_REDIS_PREFIX": prefix}
    return env


def _workers(asked: int) -> dict[str, int]:
    """MTRANK_WORKERS of the servers under test (0: the service's default) and the count it means here."""
    from mtrank.service.settings import Settings

    return {"asked": asked, "count": Settings.model_construct(workers=asked).worker_count()}


def _service_defaults() -> dict[str, Any]:
    """The service settings that shape its performance, at their defaults (as the bench runs them)."""
    from mtrank.service.settings import Settings

    names = ("intra_op_threads", "max_concurrent_batches", "max_batch_rows", "max_queue_delay_ms",
             "max_queue_rows", "max_candidates", "request_timeout_ms", "embedding_cache_size", "log_level", "workers")
    out: dict[str, Any] = {n: Settings.model_fields[n].default for n in names if n in Settings.model_fields}
    if hasattr(Settings, "concurrency"):
        # What the defaults resolve to on this machine: (batches in flight per graph, intra-op threads each).
        out["batches_and_threads_here"] = list(Settings.model_construct().concurrency())
    return out


@contextmanager
def _server(report: dict[str, Any], label: str, repo: Path, env: dict[str, str], device: str) -> Iterator[RemoteServer]:
    """A server under test; records its provider and, once stopped, the ERROR lines of its log."""
    server = RemoteServer(repo, env=env, ready_timeout_s=180)
    entry: dict[str, Any] = {"env": env, "pid": server.proc.pid}
    report["servers"][label] = entry
    try:
        version = server.get("/v1/models").json()["models"][0]["versions"][-1]
        entry |= {"provider": version["provider"], "device": version["device"]}
        if device == "cuda" and version["provider"] != "CUDAExecutionProvider":
            raise BenchError(f"--device cuda: the {label} server runs on {version['provider']}, not CUDA")
        yield server
    finally:
        entry["exit_status"] = server.stop()
        errors = [line.rstrip() for line in server.output().splitlines() if ERROR_LINE.search(line)]
        entry |= {"log_lines": len(server.log_lines()), "error_lines": len(errors), "error_examples": errors[:5]}


def _best(points: list[dict[str, Any]], size: int) -> dict[str, Any] | None:
    """The point of highest throughput at ``size``."""
    at = [p for p in points if p["size"] == size]
    return max(at, key=lambda p: p["throughput_rps"]) if at else None


class _RssSampler:
    """The server's RSS every ``interval_s`` seconds, in a thread: ``[(seconds since start, KiB)]``."""

    def __init__(self, server: RemoteServer, interval_s: float):
        self.server, self.interval_s = server, interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.perf_counter()
        while True:
            self.samples.append((round(time.perf_counter() - started, 3), self.server.rss_kib()))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _overload(report: dict[str, Any], repo: Path, env: dict[str, str], bodies: dict[int, Path],
              cfg: BenchConfig, device: str) -> dict[str, Any]:
    """Open loop at ``overload_factor`` × the best closed-loop throughput, on a server with a realistic
    deadline, ``overload_repeats`` times; the top-level figures are each one's median over the repeats."""
    size = cfg.overload_at
    best = _best(report["service"], size)
    rate = cfg.overload_factor * best["throughput_rps"]
    env = env | {"MTRANK_REQUEST_TIMEOUT_MS": str(cfg.overload_timeout_ms)}
    repeats = max(1, cfg.overload_repeats)
    with _server(report, "overload", repo, env, device) as server:
        # The same closed loop as the best sweep point first: warm caches and ORT's memory arena,
        # so the RSS below shows what overload adds, not the first requests' allocations.
        warm = measure_point(server, bodies[size], size, cfg, concurrency=best["concurrency"])
        _say(f"overload size={size}: warm closed loop c={best['concurrency']} {warm['throughput_rps']:.0f} req/s; "
             f"now open loop at {rate:.0f} req/s ({cfg.overload_factor:g} × {best['throughput_rps']:.0f}) "
             f"for {cfg.overload_s:g} s, {repeats} × on the same server")
        points, figures = [], []
        with _RssSampler(server, cfg.rss_interval_s) as rss:
            for i in range(repeats):
                if i:
                    time.sleep(cfg.overload_pause_s)
                point = measure_point(server, bodies[size], size, cfg, rate=rate, warmup_s=cfg.overload_warmup_s,
                                      window_s=cfg.overload_s, max_windows=1, stable_windows=1, min_requests=1,
                                      timeout_s=cfg.overload_client_timeout_s)
                points.append(point)
                f = _overload_summary(point)
                figures.append(f)
                _say(f"overload repeat {i + 1}/{repeats}: goodput {f['goodput_rps']:.0f} req/s, accepted p99 "
                     f"{f['accepted_p99_ms']:.1f} ms, 503 p99 {f['rejected_503_p99_ms']} ms, statuses {f['statuses']}")
        time.sleep(cfg.overload_pause_s)
        storm = _retry_storm(server, bodies[size], size, cfg, best)
    samples = rss.samples
    # The load generator's own start-up and warm-up come first; "after the first second" is past both.
    settled_at = cfg.overload_warmup_s + 1.0
    settled = next((kib for t, kib in samples if t >= settled_at), samples[-1][1])
    end = next((kib for _, kib in reversed(samples) if kib > 0), 0)

    def median(key: str) -> float | None:
        values = [f[key] for f in figures if f[key] is not None]
        return _middle(values) if values else None

    # The repeat whose goodput is the median: its statuses and latency table stand for the point.
    point = _middle(points, key=lambda q: q["throughput_rps"])
    statuses = dict(sum((Counter(q["statuses"]) for q in points), Counter()))
    out = {
        "size": size, "factor": cfg.overload_factor, "rate_rps": round(rate, 2), "seconds": point["seconds"],
        "repeats_n": repeats,
        "best_closed_loop": {k: best[k] for k in ("concurrency", "throughput_rps", "rows_per_s", "p50_ms", "p99_ms")},
        "request_timeout_ms": cfg.overload_timeout_ms, "client_timeout_s": cfg.overload_client_timeout_s,
        "goodput_rps": median("goodput_rps"), "accepted_p50_ms": median("accepted_p50_ms"),
        "accepted_p99_ms": median("accepted_p99_ms"), "statuses": statuses, "non_200": point["non_200"],
        "rejected_503_p99_ms": median("rejected_503_p99_ms"),
        "rejected_503_p50_ms": median("rejected_503_p50_ms"),
        "rss_kib": {"start": samples[0][1], "after_first_second": settled, "end": end,
                    "max": max(kib for _, kib in samples), "samples": len(samples)},
        "rss_samples": samples,
        "error_lines": report["servers"]["overload"]["error_lines"],
        "repeats": figures, "warm_point": warm, "point": point, "retry_storm": storm,
    }
    _say(f"overload (median of {repeats}): goodput {out['goodput_rps']:.0f} req/s, accepted p99 "
         f"{out['accepted_p99_ms']:.1f} ms, 503 p99 {out['rejected_503_p99_ms']} ms, statuses {statuses}, RSS "
         f"{out['rss_kib']['start']} → {out['rss_kib']['end']} KiB (max {out['rss_kib']['max']}), "
         f"{out['error_lines']} ERROR lines")
    return out


def storm_clients(cfg: BenchConfig, best_rps: float) -> int:
    """Clients of the retry-storm point: ``overload_factor`` × the requests that can be in flight at the
    best throughput for each to be answered within the admission's share of the deadline (Little's law),
    so that some are always being refused."""
    from mtrank.service.admission import LATENCY_SHARE

    return max(2, round(cfg.overload_factor * best_rps * LATENCY_SHARE * cfg.overload_timeout_ms / 1000))


def _retry_storm(server, bodies_file: Path, size: int, cfg: BenchConfig, best: dict[str, Any]) -> dict[str, Any]:
    """Clients that resend the moment they are refused (:func:`storm_clients` of them, closed loop)."""
    clients = storm_clients(cfg, best["throughput_rps"])
    point = measure_point(server, bodies_file, size, cfg, concurrency=clients, warmup_s=cfg.overload_warmup_s,
                          window_s=cfg.retry_storm_s, max_windows=1, stable_windows=1, min_requests=1,
                          timeout_s=cfg.overload_client_timeout_s)
    f = _overload_summary(point)
    seconds = point["seconds"] or 1.0
    out = {"clients": clients, "seconds": point["seconds"], "goodput_rps": f["goodput_rps"],
           "refused_per_s": round(point["statuses"].get("503", 0) / seconds, 1),
           "accepted_p99_ms": f["accepted_p99_ms"], "rejected_503_p50_ms": f["rejected_503_p50_ms"],
           "rejected_503_p99_ms": f["rejected_503_p99_ms"], "statuses": f["statuses"], "load": point["load"],
           "server_cpu_cores": point["server_cpu_cores"], "client_cpu_cores": point["client_cpu_cores"]}
    _say(f"retry storm: {clients} clients resending at once on a 503: goodput {out['goodput_rps']:.0f} req/s "
         f"(best closed loop {best['throughput_rps']:.0f}), {out['refused_per_s']:.0f} refusals/s, 503 p50/p99 "
         f"{out['rejected_503_p50_ms']}/{out['rejected_503_p99_ms']} ms")
    return out


def _middle(items: list, key: Callable[[Any], Any] | None = None) -> Any:
    """The median item of ``items`` by ``key`` (the upper one of an even count)."""
    return sorted(items, key=key)[len(items) // 2]


def _overload_summary(point: dict[str, Any]) -> dict[str, Any]:
    """The figures of one overload repeat that the targets read."""
    rejected = point["non_200"].get("503")
    return {"goodput_rps": point["throughput_rps"], "accepted_p50_ms": point["p50_ms"],
            "accepted_p99_ms": point["p99_ms"], "rejected_503_p50_ms": rejected["p50_ms"] if rejected else None,
            "rejected_503_p99_ms": rejected["p99_ms"] if rejected else None, "statuses": point["statuses"],
            "load": point["load"]}


def _check_device(device: str) -> None:
    import onnxruntime

    if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise BenchError(f"--device cuda: this ONNX Runtime ({onnxruntime.__version__}) has no CUDA provider "
                         "(install the gpu extra: onnxruntime-gpu[cuda,cudnn])")


def config_for(args) -> BenchConfig:
    """The run's :class:`BenchConfig`: ``--quick`` or the full one, with ``--sizes`` / ``--concurrencies``."""
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if getattr(args, "sizes", None):
        cfg.sizes = sorted(set(args.sizes))
    if getattr(args, "concurrencies", None):
        cfg.concurrencies = sorted(set(args.concurrencies))
    return cfg


def run_bench(args) -> dict[str, Any]:
    """Everything above; returns what it wrote to ``DIR/bench.json``."""
    cfg = config_for(args)
    device = getattr(args, "device", "cpu")
    redis_url = None if str(args.redis).lower() in ("", "none") else args.redis
    repo, model, out = Path(args.repo), args.model, Path(args.out)
    _check_device(device)
    if getattr(args, "prepare", False):
        from mtrank.bench.prepare import ensure_model

        ensure_model(repo, model)
    vdir = version_dir(repo, model)
    manifest = load_manifest(vdir, verify=False)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "device": device,
        "store": "redis" if redis_url else "in-process",
        "model": {"repo": str(repo), "name": model, "version": manifest.version, "kind": manifest.kind,
                  "graphs": sorted(manifest.graphs)},
        "machine": describe_machine(),
        "config": asdict(cfg),
        "service_defaults": _service_defaults(),
        "workers": _workers(getattr(args, "workers", 0)),
        "target_names": target_names(cfg.sizes),
        "load_at_start": _load(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sections": {},
        "servers": {},
    }
    _say(f"{report['mode']} run on {model} v{manifest.version} ({vdir}), device {device}; "
         f"load {report['load_at_start']}")

    catalog = Catalog.from_repo(repo, model, manifest.version)
    factory = RequestFactory(catalog)
    prefix = f"mtrank-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="mtrank-bench-") as tmp:
        bodies = _write_bodies(factory, cfg.sizes, cfg.bodies_per_size, Path(tmp))
        graph = _main_graph(manifest)

        def measure_engine_again(section: str) -> None:
            if cfg.engine_twice:
                with _section(report, section):
                    _engine_again(report, bench_engine(vdir, manifest, graph, None, cfg.engine_min_time_s,
                                                       device=device))

        with _section(report, "engine"):
            from mtrank.service.runner import DeviceError

            try:
                report["engine"] = bench_engine(vdir, manifest, graph, None, cfg.engine_min_time_s, device=device)
            except DeviceError as e:
                raise BenchError(f"--device cuda: {e}") from None
            if cfg.engine_service_threads and device == "cpu":
                report["engine_1_thread"] = bench_engine(vdir, manifest, graph, 1, cfg.engine_min_time_s)
            _say(f"engine peak (default session options, {report['engine']['provider']}): "
                 f"{report['engine']['peak']['rows_per_s']:.0f} rows/s at batch {report['engine']['peak']['batch']}")

        try:
            if redis_url:
                from mtrank.export.redis_loader import load_embeddings

                with _section(report, "lookups"):
                    report["redis_load"] = load_embeddings(repo, model, redis_url, version=manifest.version,
                                                           prefix=prefix, progress=False)
                    item_table = _local_table(manifest, vdir, model, "item_id")
                    ids = catalog.items[: cfg.lookup_ids]
                    report["lookups"] = bench_lookups(redis_url, prefix, item_table, ids, cfg.lookup_calls,
                                                      rounds=cfg.lookup_rounds)

            env = server_env(device, redis_url, prefix, cfg.request_timeout_ms) | {
                "MTRANK_WORKERS": str(report["workers"]["asked"])}  # 0: the service's default
            points = [(s, c) for s in cfg.sizes for c in cfg.concurrencies]
            with _server(report, "service", repo, env | {"MTRANK_BATCHING": "true"}, device) as server:
                with (_server(report, "naive", repo, env | {"MTRANK_BATCHING": "false"}, device) as naive,
                      _section(report, "sweeps")):
                    both = sweeps({"service": server, "naive": naive}, bodies, points, cfg)
                    report["service"], report["naive"] = both["service"], both["naive"]
                    report["c1_pairs"] = c1_pairs({"service": server, "naive": naive}, bodies, report, cfg)
                with _section(report, "tail"):
                    report["tail"] = [_tail_point(server, bodies, size, report["service"], cfg) for size in cfg.sizes]
            if device == "cpu":
                with _section(report, "floor"):
                    report["floor"] = floor_points(vdir, graph, bodies, report["workers"]["count"], cfg)
            measure_engine_again("engine_middle")
            with _section(report, "overload"):
                report["overload"] = _overload(report, repo, env | {"MTRANK_BATCHING": "true"}, bodies, cfg, device)
            measure_engine_again("engine_again")
        finally:
            if redis_url:
                report["redis_keys_deleted"] = _clean_redis(redis_url, prefix)

    report["load_at_end"] = _load()
    report["seconds"] = round(time.time() - started, 1)
    report["ratios"] = compute_ratios(report)
    report["informational"] = compute_informational(report)
    (out / "bench.json").write_text(json.dumps(report, indent=1, allow_nan=False, default=_finite))
    from mtrank.bench.report import write_markdown, write_plots

    report["plots"] = write_plots(report, out)
    (out / "bench.json").write_text(json.dumps(report, indent=1, allow_nan=False, default=_finite))
    write_markdown(report, out / "bench.md")
    for name, r in report["ratios"].items():
        _say(f"{name}: {r['value']} (target {r['op']} {r['target']}: {'met' if r['met'] else 'NOT met'})")
    _say(f"wrote {out}/bench.json, bench.md and plots in {report['seconds']} s")
    return report


def _engine_again(report: dict[str, Any], again: dict[str, Any]) -> None:
    """The engine measured once more: the run with the highest peak so far becomes ``engine`` (the
    reference of the targets); every peak stays in ``engine_peaks``, in the order measured."""
    peaks = report.setdefault("engine_peaks", [report["engine"]["peak"]])
    peaks.append(again["peak"])
    if again["peak"]["rows_per_s"] > report["engine"]["peak"]["rows_per_s"]:
        report["engine"] = again
    _say(f"engine peak again: {again['peak']['rows_per_s']:.0f} rows/s at batch {again['peak']['batch']} "
         f"(so far {', '.join(str(round(p['rows_per_s'])) for p in peaks[:-1])}); "
         f"the reference is {report['engine']['peak']['rows_per_s']:.0f}")


def _tail_point(server: RemoteServer, bodies: dict[int, Path], size: int, service: list[dict[str, Any]],
                cfg: BenchConfig) -> dict[str, Any]:
    """``cfg.tail_repeats`` open-loop points at ``cfg.tail_fraction`` of the size's best throughput;
    the one with the median p99 ÷ p50, with every repeat's figures under ``repeats``."""
    best = _best(service, size)
    rate = cfg.tail_fraction * best["throughput_rps"]
    points = [measure_point(server, bodies[size], size, cfg, rate=rate) for _ in range(max(1, cfg.tail_repeats))]
    for q in points:
        q["p99_over_p50"] = round(q["p99_ms"] / q["p50_ms"], 3) if q["p50_ms"] else math.inf
    p = dict(_middle(points, key=lambda q: q["p99_over_p50"]))
    p["target_fraction"] = cfg.tail_fraction
    p["max_throughput_rps"] = best["throughput_rps"]
    p["repeats"] = [{k: q[k] for k in ("p50_ms", "p99_ms", "p99_over_p50", "throughput_rps", "errors", "load")}
                    for q in points]
    ratios = ", ".join(f"{q['p99_over_p50']:.2f}" for q in points)
    _say(f"tail size={size} at {rate:.0f} req/s ({cfg.tail_fraction:.0%} of {best['throughput_rps']:.0f}): "
         f"p50={p['p50_ms']:.2f} p99={p['p99_ms']:.2f} ms, {p['throughput_rps']:.0f} req/s done "
         f"(the median of p99/p50 {ratios})")
    return p


def _finite(v: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _local_table(manifest, vdir: Path, model: str, field_name: str):
    from mtrank.service.stores import LocalTable

    name = field_name if field_name in manifest.tables else next(iter(manifest.tables))
    return LocalTable(model, manifest.version, manifest.tables[name], vdir)


def _point(points: list[dict], size: int, concurrency: int) -> dict | None:
    return next((p for p in points if p["size"] == size and p["concurrency"] == concurrency), None)


def _ratio(spec: tuple[str, float | None, str], value: float | None, target: float | None = None,
           what: str | None = None, **parts: Any) -> dict[str, Any]:
    op, default_target, default_what = spec
    target = default_target if target is None else target
    ok = value is not None and math.isfinite(value) and (value >= target if op == ">=" else value <= target)
    return {"value": None if value is None else round(value, 3), "op": op, "target": target, "met": bool(ok),
            "what": what or default_what, **parts}


def compute_ratios(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every target of :func:`target_names`, each with the figures it is made of; a target whose
    points the run lacks (e.g. ``--sizes 1000`` has no 20-candidate point) has value None, ``met`` False."""
    ratios: dict[str, dict[str, Any]] = {}
    service, naive = report["service"], report["naive"]
    peak = report["engine"]["peak"]["rows_per_s"]

    def put(name: str, value: float | None, **parts: Any) -> None:
        ratios[name] = _ratio(TARGETS[name], value, **parts)

    def missing(name: str, why: str) -> None:
        ratios[name] = _ratio(TARGETS[name], None, missing=why)

    on, off = _point(service, 20, 1), _point(naive, 20, 1)
    if on and off:
        pairs = report.get("c1_pairs") or [{"batching_p50_ms": on["p50_ms"], "naive_p50_ms": off["p50_ms"]}]
        middle = _middle(pairs, key=lambda q: q["batching_p50_ms"] / q["naive_p50_ms"])
        put("batching_vs_naive_p50_20_c1", middle["batching_p50_ms"] / middle["naive_p50_ms"],
            batching_p50_ms=middle["batching_p50_ms"], naive_p50_ms=middle["naive_p50_ms"],
            pairs=[round(q["batching_p50_ms"] / q["naive_p50_ms"], 3) for q in pairs])
    else:
        missing("batching_vs_naive_p50_20_c1", "no 20-candidate point at concurrency 1")
    for size, c in ((20, 32), (500, 16)):
        name, svc = f"service_vs_engine_{size}_c{c}", _point(service, size, c)
        if svc is None:
            missing(name, f"no {size}-candidate point at concurrency {c}")
            continue
        curve = report["engine"]["curve"]
        at = rows_per_s_at(curve, max(svc["mean_batch_rows"], 1.0))
        put(name, svc["rows_per_s"] / peak, service_rows_per_s=svc["rows_per_s"], engine_peak_rows_per_s=peak,
            engine_peak_batch=report["engine"]["peak"]["batch"], service_mean_batch_rows=svc["mean_batch_rows"],
            engine_rows_per_s_at_that_batch=round(at, 1), vs_engine_at_that_batch=round(svc["rows_per_s"] / at, 3),
            service_rows_per_server_cpu_s=svc["rows_per_server_cpu_s"],
            engine_peak_rows_per_cpu_s=report["engine"]["peak"]["rows_per_cpu_s"])

    ov = report["overload"]
    best = ov["best_closed_loop"]
    put("overload_goodput", ov["goodput_rps"] / best["throughput_rps"], goodput_rps=ov["goodput_rps"],
        best_closed_loop_rps=best["throughput_rps"], rate_rps=ov["rate_rps"], size=ov["size"], statuses=ov["statuses"],
        repeats=[r["goodput_rps"] for r in ov.get("repeats", [])])
    if ov["rejected_503_p99_ms"] is None:
        missing("overload_503_p99_ms", "no 503 answers in the overload point")
    else:
        put("overload_503_p99_ms", ov["rejected_503_p99_ms"], answers_503=ov["statuses"].get("503", 0),
            p50_ms=ov.get("rejected_503_p50_ms"),
            repeats=[r["rejected_503_p99_ms"] for r in ov.get("repeats", [])])
    put("overload_accepted_p99_ms", ov["accepted_p99_ms"], target=float(ov["request_timeout_ms"]),
        accepted_p50_ms=ov["accepted_p50_ms"], accepted=ov["statuses"].get("200", 0),
        repeats=[r["accepted_p99_ms"] for r in ov.get("repeats", [])])
    rss = ov["rss_kib"]
    put("overload_rss_growth", rss["end"] / rss["after_first_second"] if rss["after_first_second"] else None,
        start_kib=rss["start"], after_first_second_kib=rss["after_first_second"], end_kib=rss["end"],
        max_kib=rss["max"], max_over_start=round(rss["max"] / rss["start"], 3) if rss["start"] else None)
    put("overload_error_lines", ov["error_lines"],
        examples=report["servers"]["overload"]["error_examples"],
        other_servers={k: s["error_lines"] for k, s in report["servers"].items() if k != "overload"})

    for size in report["config"]["sizes"]:
        spec = PER_SIZE_TARGETS["batching_vs_naive_{size}"]
        spec = (spec[0], spec[1], spec[2].format(size=size))
        b, n = _best(service, size), _best(naive, size)
        ratios[f"batching_vs_naive_{size}"] = _ratio(
            spec, b["throughput_rps"] / n["throughput_rps"], batching_rps=b["throughput_rps"],
            batching_concurrency=b["concurrency"], naive_rps=n["throughput_rps"], naive_concurrency=n["concurrency"])
        spec = PER_SIZE_TARGETS["p99_over_p50_at_70pct_{size}"]
        spec = (spec[0], spec[1], spec[2].format(size=size))
        t = next(p for p in report["tail"] if p["size"] == size)
        tail = _ratio(
            spec, t["p99_ms"] / t["p50_ms"], p50_ms=t["p50_ms"], p99_ms=t["p99_ms"], rate_rps=t["rate"],
            done_rps=t["throughput_rps"], errors=t["errors"],
            repeats=[q["p99_over_p50"] for q in t.get("repeats", [])])
        kept_up = t["throughput_rps"] / t["rate"] if t["rate"] else 0.0
        in_flight = t["throughput_rps"] * t.get("mean_ms", t["p50_ms"]) / 1000.0
        best_concurrency = b["concurrency"]
        tail |= {"kept_up": round(kept_up, 3), "in_flight": round(in_flight, 1),
                 "best_closed_loop_concurrency": best_concurrency}
        # Past its capacity the queue grows for the whole point: every answer is late alike and p99 ÷ p50
        # can look fine while p50 is hundreds of milliseconds. Such a point is not at 70 % of anything.
        if kept_up < TAIL_KEPT_UP:
            tail["met"] = False
            tail["not_at_load"] = (f"answered {t['throughput_rps']:.0f} of the {t['rate']:.0f} req/s offered: "
                                   "the server did not keep up (the machine was slower than in the sweep)")
        elif in_flight > best_concurrency:
            tail["met"] = False
            tail["not_at_load"] = (f"{in_flight:.0f} requests in flight on average, more than the "
                                   f"{best_concurrency} of the best closed-loop point: a standing queue (the "
                                   "machine was slower than in the sweep)")
        ratios[f"p99_over_p50_at_70pct_{size}"] = tail
    return {name: ratios[name] for name in target_names(report["config"]["sizes"])}


def compute_informational(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Figures beside the targets: the Redis lookup against redis-benchmark, the retry storm's goodput and
    the serving floor against the engine."""
    return {"lookup_vs_redis_benchmark_500": _lookup_ratio(report), "retry_storm_goodput": _storm_ratio(report),
            **{f"floor_vs_engine_{size}_c{c}": _floor_ratio(report, size, c) for size, c in ((20, 32), (500, 16))}}


def _floor_ratio(report: dict[str, Any], size: int, concurrency: int) -> dict[str, Any]:
    spec = INFORMATIONAL[f"floor_vs_engine_{size}_c{concurrency}"]
    floor = _point(report.get("floor") or [], size, concurrency)
    if floor is None:
        return _ratio(spec, None, missing=f"no floor point at {size} candidates, concurrency {concurrency} "
                                          "(CPU runs with that size only)")
    if not floor["rows_per_s"]:
        return _ratio(spec, None, missing=f"the floor answered nothing at {size} candidates, concurrency "
                                          f"{concurrency} ({floor['errors']} errors)")
    peak = report["engine"]["peak"]["rows_per_s"]
    service = _point(report.get("service") or [], size, concurrency)
    return _ratio(spec, floor["rows_per_s"] / peak, floor_rows_per_s=floor["rows_per_s"], engine_peak_rows_per_s=peak,
                  service_rows_per_s=service["rows_per_s"] if service else None,
                  service_vs_floor=round(service["rows_per_s"] / floor["rows_per_s"], 3) if service else None,
                  floor_rows_per_server_cpu_s=floor["rows_per_server_cpu_s"])


def _lookup_ratio(report: dict[str, Any]) -> dict[str, Any]:
    spec = INFORMATIONAL["lookup_vs_redis_benchmark_500"]
    lk = report.get("lookups") or {}
    if not lk:
        return _ratio(spec, None, missing="no Redis in this run (--redis none)")
    if not lk.get("redis_benchmark"):
        return _ratio(spec, None, missing="redis-benchmark is not installed")
    return _ratio(
        spec, lk["service"]["p50_ms"] / lk["redis_benchmark"]["p50_ms"], service_p50_ms=lk["service"]["p50_ms"],
        redis_benchmark_p50_ms=lk["redis_benchmark"]["p50_ms"],
        mean_ratio=round(lk["service"]["mean_ms"] / lk["redis_benchmark"]["mean_ms"], 3))


def _storm_ratio(report: dict[str, Any]) -> dict[str, Any]:
    spec = INFORMATIONAL["retry_storm_goodput"]
    ov = report.get("overload") or {}
    storm = ov.get("retry_storm")
    if not storm:
        return _ratio(spec, None, missing="no retry-storm point in this run")
    best = ov["best_closed_loop"]["throughput_rps"]
    return _ratio(spec, storm["goodput_rps"] / best if best else None, goodput_rps=storm["goodput_rps"],
                  best_closed_loop_rps=best, clients=storm["clients"], refused_per_s=storm["refused_per_s"],
                  rejected_503_p99_ms=storm["rejected_503_p99_ms"], accepted_p99_ms=storm["accepted_p99_ms"])
