"""``mtrank bench``: engine limit, service, naive server, impression log, overload and embedding lookups, side by
side in one run.

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
5. impression log: the service with the log off, on and in a read-only directory, one
   100-candidate point on each per round, the order rotating (:mod:`mtrank.bench.impressions`);
6. overload: a fresh server with ``MTRANK_REQUEST_TIMEOUT_MS`` at a realistic value, open loop at
   4 × the best closed-loop throughput of 500-candidate requests: goodput, 503 latency, accepted
   p99, the server's RSS through the point and the ERROR lines of its log;
7. history workload, when the history model is there (or ``--prepare`` makes it): a model with
   50-entry behaviour histories, the service against the engine on the same graph
   (:mod:`mtrank.bench.history`; :func:`run_history_bench` runs it alone).

This module runs those sections in order and writes the files; what a run measures is in
:mod:`mtrank.bench.config`, the measuring in :mod:`mtrank.bench.measure`, the targets' arithmetic in
:mod:`mtrank.bench.scoring` and the typed report in :mod:`mtrank.bench.report`.

The model's embedding tables are loaded into Redis under a key prefix of this run's own, deleted
at the end. Writes ``DIR/bench.json`` (every figure, the target ratios and the load average before
and after each section), ``DIR/bench.md`` and PNG plots. Every target is a ratio of two
measurements of the same run on the same machine; absolute numbers depend on what else the
machine is doing.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from mtrank import store_keys
from mtrank.bench.config import BenchConfig, BenchError, config_for, history_target_names, target_names
from mtrank.bench.engine import bench_engine
from mtrank.bench.history import has_history_model, measure_history
from mtrank.bench.impressions import impression_log_point
from mtrank.bench.loadgen import write_bodies
from mtrank.bench.lookups import bench_lookups
from mtrank.bench.markdown import write_markdown
from mtrank.bench.measure import (
    c1_pairs,
    floor_points,
    load_average,
    overload,
    say,
    server_under_test,
    sweeps,
    tail_point,
)
from mtrank.bench.plots import write_plots
from mtrank.bench.prepare import HISTORY_MODEL, history_repo_for
from mtrank.bench.report import EngineRun, Lookups, ModelInfo, Report, Section, Workers, from_json, write_json
from mtrank.bench.scoring import compute_informational, compute_ratios
from mtrank.bench.workload import Catalog, RequestFactory
from mtrank.manifest import ALL_GROUPS, Manifest, load_manifest, version_dir


@dataclass
class _Run:
    """What the sections of one run share: its options, the model version and the request bodies."""

    cfg: BenchConfig
    device: str
    redis_url: str | None
    repo: Path
    model: str
    vdir: Path
    manifest: Manifest
    graph: str
    prefix: str
    """This run's own Redis key prefix."""
    catalog: Catalog
    bodies: dict[int, Path]
    """Request size → a file of request bodies."""
    scratch: Path
    """The run's temporary directory (request bodies, impression logs)."""
    history: bool = False
    """Whether the run measures the history workload."""


def describe_machine() -> dict[str, Any]:
    """The machine of the run: platform, CPUs (lscpu's model, topology, caches and vector flags), RAM in GiB
    and the versions of ONNX Runtime and numpy."""
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
        env |= {"MTRANK_STORE_URL": redis_url, "MTRANK_STORE_PREFIX": prefix}
    return env


def _workers(asked: int) -> Workers:
    """MTRANK_WORKERS of the servers under test (0: the service's default) and the count it means here."""
    from mtrank.service.settings import Settings

    return Workers(asked=asked, count=Settings.model_construct(workers=asked).worker_count())


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
def _section(report: Report, name: str) -> Iterator[None]:
    """Records the section's load average (1/5/15 min) before and after, and its duration in seconds."""
    before, started = load_average(), time.perf_counter()
    say(f"{name}: load {before}")
    try:
        yield
    finally:
        report.sections[name] = Section(load_before=before, load_after=load_average(),
                                        seconds=round(time.perf_counter() - started, 1))


def record_engine_again(report: Report, again: EngineRun) -> None:
    """The engine measured once more: the run with the highest peak so far becomes ``report.engine`` (the
    reference of the targets); every peak stays in ``report.engine_peaks``, in the order measured."""
    if report.engine_peaks is None:
        report.engine_peaks = [report.engine.peak]
    peaks = report.engine_peaks
    peaks.append(again.peak)
    if again.peak.rows_per_s > report.engine.peak.rows_per_s:
        report.engine = again
    say(f"engine peak again: {again.peak.rows_per_s:.0f} rows/s at batch {again.peak.batch} "
        f"(so far {', '.join(str(round(p.rows_per_s)) for p in peaks[:-1])}); "
        f"the reference is {report.engine.peak.rows_per_s:.0f}")


def _clean_redis(url: str, prefix: str) -> int:
    """Deletes the run's keys (``prefix:*``); returns how many."""
    client = store_keys.connect(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
        return len(keys)
    finally:
        client.close()


def _write_bodies(factory: RequestFactory, sizes: list[int], per_size: int, tmp: Path) -> dict[int, Path]:
    """``per_size`` request bodies of each size (seeded), one file per size."""
    rng = np.random.default_rng(1)
    files = {}
    for n in sizes:
        bodies = [orjson.dumps(factory.request(rng, n)) for _ in range(per_size)]
        files[n] = tmp / f"bodies-{n}.jsonl"
        write_bodies(files[n], bodies)
    return files


def _check_device(device: str) -> None:
    import onnxruntime

    if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise BenchError(f"--device cuda: this ONNX Runtime ({onnxruntime.__version__}) has no CUDA provider "
                         "(install the gpu extra: onnxruntime-gpu[cuda,cudnn])")


def _new_report(args: argparse.Namespace, run: _Run) -> Report:
    """The report's header: what runs, where, with which settings."""
    manifest = run.manifest
    return Report(
        mode="quick" if args.quick else "full", device=run.device, store="redis" if run.redis_url else "in-process",
        model=ModelInfo(repo=str(run.repo), name=run.model, version=manifest.version, kind=manifest.kind,
                        graphs=sorted(manifest.graphs)),
        machine=describe_machine(), config=run.cfg, service_defaults=_service_defaults(),
        workers=_workers(getattr(args, "workers", 0)), target_names=target_names(run.cfg.sizes, history=run.history),
        load_at_start=load_average(), started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _engine_run(run: _Run, threads: int | None = None) -> EngineRun:
    """The engine curve: ONNX Runtime's default session options (``threads`` None) or the service's session."""
    from mtrank.service.runner import DeviceError

    try:
        return from_json(EngineRun, bench_engine(run.vdir, run.manifest, run.graph, threads,
                                                 run.cfg.engine_min_time_s, device=run.device))
    except DeviceError as e:
        raise BenchError(f"--device cuda: {e}") from None


def _measure_engine(report: Report, run: _Run) -> None:
    """The first engine section: the reference and, on CPU, the service's 1-thread session beside it."""
    with _section(report, "engine"):
        report.engine = _engine_run(run)
        if run.cfg.engine_service_threads and run.device == "cpu":
            report.engine_1_thread = _engine_run(run, threads=1)
        say(f"engine peak (default session options, {report.engine.provider}): "
            f"{report.engine.peak.rows_per_s:.0f} rows/s at batch {report.engine.peak.batch}")


def _measure_engine_again(report: Report, run: _Run, section: str) -> None:
    """The engine once more, when the run measures it more than once (``cfg.engine_twice``)."""
    if run.cfg.engine_twice:
        with _section(report, section):
            record_engine_again(report, _engine_run(run))


def _measure_lookups(report: Report, run: _Run) -> None:
    """Loads the model's embeddings under the run's prefix and times the lookups of ``cfg.lookup_ids`` ids."""
    from mtrank.export.store_loader import load_embeddings
    from mtrank.service.stores import LocalTable

    with _section(report, "lookups"):
        report.redis_load = load_embeddings(run.repo, run.model, run.redis_url, version=run.manifest.version,
                                            prefix=run.prefix, progress=False)
        tables = run.manifest.tables
        name = "item_id" if "item_id" in tables else next(iter(tables))
        item_table = LocalTable(run.model, run.manifest.version, tables[name], run.vdir)
        ids = run.catalog.items[: run.cfg.lookup_ids]
        report.lookups = from_json(Lookups, bench_lookups(run.redis_url, run.prefix, item_table, ids,
                                                          run.cfg.lookup_calls, rounds=run.cfg.lookup_rounds))


def _measure_servers(report: Report, run: _Run) -> None:
    """The sweeps and concurrency-1 pairs on both servers, the tail, the impression log off, on and
    read-only, the floor, the engine again and the overload point."""
    cfg = run.cfg
    env = server_env(run.device, run.redis_url, run.prefix, cfg.request_timeout_ms) | {
        "MTRANK_WORKERS": str(report.workers.asked)}  # 0: the service's default
    points = [(s, c) for s in cfg.sizes for c in cfg.concurrencies]
    with server_under_test(report, "service", run.repo, env | {"MTRANK_BATCHING": "true"}, run.device) as server:
        with (server_under_test(report, "naive", run.repo, env | {"MTRANK_BATCHING": "false"}, run.device) as naive,
              _section(report, "sweeps")):
            both = sweeps({"service": server, "naive": naive}, run.bodies, points, cfg)
            report.service, report.naive = both["service"], both["naive"]
            report.c1_pairs = c1_pairs({"service": server, "naive": naive}, run.bodies, report, cfg)
        with _section(report, "tail"):
            report.tail = [tail_point(server, run.bodies, size, report.service, cfg) for size in cfg.sizes]
    with _section(report, "impressions"):
        report.impressions = impression_log_point(report, run.repo, env | {"MTRANK_BATCHING": "true"},
                                                  run.bodies[cfg.impressions_size], cfg, run.device,
                                                  run.scratch / "impressions")
    if run.device == "cpu":
        with _section(report, "floor"):
            report.floor = floor_points(run.vdir, run.graph, run.bodies, report.workers.count, cfg)
    _measure_engine_again(report, run, "engine_middle")
    with _section(report, "overload"):
        report.overload = overload(report, run.repo, env | {"MTRANK_BATCHING": "true"}, run.bodies, cfg, run.device)
    _measure_engine_again(report, run, "engine_again")


def _measure_history(report: Report, repo: Path, cfg: BenchConfig, device: str, redis_url: str | None, prefix: str,
                     scratch: Path) -> None:
    """The history workload (:mod:`mtrank.bench.history`) with the servers' settings of the other sections."""
    env = server_env(device, redis_url, prefix, cfg.request_timeout_ms) | {"MTRANK_WORKERS": str(report.workers.asked)}
    with _section(report, "history"):
        report.history = measure_history(report, repo, env, redis_url, prefix, cfg, device, scratch)


def _write_outputs(report: Report, out: Path) -> None:
    """``bench.json`` first (so that a failing plot leaves the figures), then the plots and ``bench.md``."""
    write_json(report, out / "bench.json")
    if report.mode != "history":
        report.plots = write_plots(report, out)
        write_json(report, out / "bench.json")
    write_markdown(report, out / "bench.md")
    for name, r in report.ratios.items():
        say(f"{name}: {r.value} (target {r.op} {r.target}: {'met' if r.met else 'NOT met'})")
    say(f"wrote {out}/bench.json, bench.md and plots in {report.seconds} s")


def run_bench(args: argparse.Namespace) -> Report:
    """Everything above; returns what it wrote to ``DIR/bench.json``."""
    cfg = config_for(args)
    device = getattr(args, "device", "cpu")
    redis_url = None if str(args.redis).lower() in ("", "none") else args.redis
    repo, model, out = Path(args.repo), args.model, Path(args.out)
    _check_device(device)
    if getattr(args, "prepare", False):
        from mtrank.bench.prepare import ensure_history_model, ensure_model

        ensure_model(repo, model)
        ensure_history_model(repo)
    vdir = version_dir(repo, model)
    manifest = load_manifest(vdir, verify=False)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    graph = ALL_GROUPS if ALL_GROUPS in manifest.graphs else next(iter(manifest.graphs))
    catalog = Catalog.from_repo(repo, model, manifest.version)
    with tempfile.TemporaryDirectory(prefix="mtrank-bench-") as tmp:
        run = _Run(cfg=cfg, device=device, redis_url=redis_url, repo=repo, model=model, vdir=vdir, manifest=manifest,
                   graph=graph, prefix=f"mtrank-bench-{uuid.uuid4().hex[:8]}", catalog=catalog,
                   bodies=_write_bodies(RequestFactory(catalog), sorted({*cfg.sizes, cfg.impressions_size}),
                                        cfg.bodies_per_size, Path(tmp)), scratch=Path(tmp),
                   history=has_history_model(repo))
        report = _new_report(args, run)
        say(f"{report.mode} run on {model} v{manifest.version} ({vdir}), device {device}; "
            f"load {report.load_at_start}")
        _measure_engine(report, run)
        try:
            if redis_url:
                _measure_lookups(report, run)
            _measure_servers(report, run)
            if run.history:
                _measure_history(report, repo, cfg, device, redis_url, run.prefix, run.scratch)
            else:
                say(f"no history workload: {history_repo_for(repo)} has no {HISTORY_MODEL} (--prepare makes it)")
        finally:
            if redis_url:
                report.redis_keys_deleted = _clean_redis(redis_url, run.prefix)
    return _finish(report, out, started)


def _finish(report: Report, out: Path, started: float) -> Report:
    """Close a run: the load at its end, its duration, the scored ratios; bench.json and bench.md."""
    report.load_at_end = load_average()
    report.seconds = round(time.time() - started, 1)
    report.ratios = compute_ratios(report)
    report.informational = compute_informational(report)
    _write_outputs(report, out)
    return report


def run_history_bench(args: argparse.Namespace) -> Report:
    """The history workload alone (``python -m mtrank.bench.run_history``): a report of ``mode`` "history" with
    its section, its target and its other sizes, written to ``DIR/bench.json`` and ``bench.md``."""
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if getattr(args, "sizes", None):
        cfg.history_sizes = sorted(set(args.sizes))
    device = getattr(args, "device", "cpu")
    redis_url = None if str(args.redis).lower() in ("", "none") else args.redis
    repo, out = Path(args.repo), Path(args.out)
    _check_device(device)
    if getattr(args, "prepare", False):
        from mtrank.bench.prepare import ensure_history_model

        ensure_history_model(repo)
    if not has_history_model(repo):
        raise BenchError(f"{history_repo_for(repo)} has no {HISTORY_MODEL} (run with --prepare to make it)")
    manifest = load_manifest(version_dir(history_repo_for(repo), HISTORY_MODEL), verify=False)
    out.mkdir(parents=True, exist_ok=True)
    started, prefix = time.time(), f"mtrank-bench-{uuid.uuid4().hex[:8]}"
    report = Report(
        mode="history", device=device, store="redis" if redis_url else "in-process",
        model=ModelInfo(repo=str(history_repo_for(repo)), name=HISTORY_MODEL, version=manifest.version,
                        kind=manifest.kind, graphs=sorted(manifest.graphs)),
        machine=describe_machine(), config=cfg, service_defaults=_service_defaults(),
        workers=_workers(getattr(args, "workers", 0)), target_names=history_target_names(),
        load_at_start=load_average(), started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    say(f"history workload alone, device {device}; load {report.load_at_start}")
    with tempfile.TemporaryDirectory(prefix="mtrank-bench-") as tmp:
        try:
            _measure_history(report, repo, cfg, device, redis_url, prefix, Path(tmp))
        finally:
            if redis_url:
                report.redis_keys_deleted = _clean_redis(redis_url, prefix)
    return _finish(report, out, started)
