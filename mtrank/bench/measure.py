"""Measurement: load points against a server with what its Prometheus metrics and CPU time say, the
sweeps, the tail, the serving floor, and the overload point with its RSS sampler and retry storm.

Every function returns typed records of :mod:`mtrank.bench.report`; times are in milliseconds,
throughputs per second, RSS in KiB.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Protocol

from mtrank.bench.config import BenchConfig, BenchError
from mtrank.bench.floor import FloorServer
from mtrank.bench.loadgen import PointSpec, run_point
from mtrank.bench.report import (
    BestClosedLoop,
    C1Pair,
    FloorPoint,
    LoadPoint,
    Overload,
    OverloadFigures,
    Report,
    RetryStorm,
    RssFigures,
    ServerRecord,
    TailPoint,
    TailRepeat,
    best_point,
    from_json,
    middle,
    point_at,
)
from mtrank.bench.server import RemoteServer

ERROR_LINE = re.compile(r"\bERROR\b|\bCRITICAL\b|Traceback")
_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([^ ]+)")
_STARTED = time.monotonic()


class ServerUnderTest(Protocol):
    """What a load point needs of a server: its port, its metrics text and its process ids."""

    port: int

    def metrics(self) -> str: ...

    def pids(self) -> list[int]: ...


def say(message: str) -> None:
    """A progress line on stderr, with the seconds since the bench started."""
    print(f"bench [{time.monotonic() - _STARTED:5.0f} s]: {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    """The machine's load average over 1, 5 and 15 minutes."""
    return [round(x, 2) for x in os.getloadavg()]


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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes ``pids`` so far (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def point_spec(port: int, bodies_file: Path, cfg: BenchConfig, **fields: Any) -> PointSpec:
    """A load point against 127.0.0.1:``port`` with the run's warm-up and windows; ``fields`` set the rest."""
    spec = PointSpec(host="127.0.0.1", port=port, bodies_file=str(bodies_file), warmup_s=cfg.warmup_s,
                     window_s=cfg.window_s, max_windows=cfg.max_windows, min_requests=cfg.min_requests_per_window)
    return replace(spec, **fields)


def measure_point(server: ServerUnderTest, bodies_file: Path, size: int, cfg: BenchConfig, concurrency: int = 0,
                  rate: float = 0.0, **spec_overrides: Any) -> LoadPoint:
    """One load point, with what the server's own metrics and CPU time say about it.

    ``spec_overrides`` replace fields of the :class:`PointSpec` (e.g. a fixed-length window).
    """
    spec = point_spec(server.port, bodies_file, cfg, concurrency=concurrency, rate=rate, **spec_overrides)
    before, cpu0, t0 = scrape(server.metrics()), cpu_seconds(server.pids()), time.perf_counter()
    result = run_point(spec)
    after, cpu1, t1 = scrape(server.metrics()), cpu_seconds(server.pids()), time.perf_counter()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches, wall, cores = delta("mtrank_batch_rows_count"), t1 - t0, (cpu1 - cpu0) / (t1 - t0)
    point = asdict(result) | {
        "size": size,
        "rows_per_s": result.throughput_rps * size,
        "mean_batch_rows": delta("mtrank_batch_rows_sum") / batches if batches else 0.0,
        "mean_batch_requests": delta("mtrank_batch_requests_sum") / batches if batches else 0.0,
        "inference_busy": delta("mtrank_inference_duration_seconds_sum") / wall,
        "server_cpu_cores": cores,
        "rows_per_server_cpu_s": result.throughput_rps * size / cores if cpu1 > cpu0 else 0.0,
        "client_cpu_cores": result.client_cpu_s / result.seconds if result.seconds else 0.0,
        "load": load_average(),
    }
    if lookups := delta("mtrank_embedding_lookup_duration_seconds_count"):
        point["mean_lookup_ms"] = 1000 * delta("mtrank_embedding_lookup_duration_seconds_sum") / lookups
    if queued := delta("mtrank_queue_wait_seconds_count"):
        point["mean_queue_wait_ms"] = 1000 * delta("mtrank_queue_wait_seconds_sum") / queued
    return from_json(LoadPoint, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in point.items()})


@contextmanager
def server_under_test(report: Report, label: str, repo: Path, env: dict[str, str],
                      device: str, wrapper: Sequence[str] = ()) -> Iterator[RemoteServer]:
    """A server under test, recorded under ``report.servers[label]``: its provider and, once stopped,
    the ERROR lines of its log. ``wrapper``: a command prefix that execs the server."""
    server = RemoteServer(repo, env=env, ready_timeout_s=180, wrapper=wrapper)
    entry = ServerRecord(env=env, pid=server.proc.pid)
    report.servers[label] = entry
    try:
        version = server.get("/v1/models").json()["models"][0]["versions"][-1]
        entry.provider, entry.device = version["provider"], version["device"]
        if device == "cuda" and version["provider"] != "CUDAExecutionProvider":
            raise BenchError(f"--device cuda: the {label} server runs on {version['provider']}, not CUDA")
        yield server
    finally:
        entry.exit_status = server.stop()
        errors = [line.rstrip() for line in server.output().splitlines() if ERROR_LINE.search(line)]
        entry.log_lines, entry.error_lines, entry.error_examples = len(server.log_lines()), len(errors), errors[:5]


def sweeps(servers: dict[str, RemoteServer], bodies: dict[int, Path], points: list[tuple[int, int]],
           cfg: BenchConfig) -> dict[str, list[LoadPoint]]:
    """Every point on every server, one server right after the other, which goes first alternating
    from point to point. This host's speed moves by half within minutes (ONNX Runtime at 78k and
    at 117-120k rows/s in one run), so sweeps run one after the other compared the moments they
    ran in as much as the servers."""
    out: dict[str, list[LoadPoint]] = {label: [] for label in servers}
    labels = list(servers)
    for i, (size, concurrency) in enumerate(points):
        for label in labels if i % 2 == 0 else labels[::-1]:
            p = measure_point(servers[label], bodies[size], size, cfg, concurrency=concurrency)
            say(f"{label:7s} size={size:4d} c={concurrency:3d}: {p.throughput_rps:8.1f} req/s "
                f"{p.rows_per_s:9.0f} rows/s p50={p.p50_ms:7.2f} p99={p.p99_ms:7.2f} ms "
                f"batch={p.mean_batch_rows:6.0f} rows{'' if p.stable else ' (unstable)'}"
                f"{' errors=' + str(p.errors) if p.errors else ''}")
            out[label].append(p)
    return out


def c1_pairs(servers: dict[str, RemoteServer], bodies: dict[int, Path], report: Report,
             cfg: BenchConfig) -> list[C1Pair]:
    """The p50s of 20 candidates at concurrency 1 on both servers, ``cfg.c1_pairs`` pairs: the sweep's
    and more, measured back to back, which server first alternating; [] without that point."""
    on, off = point_at(report.service, 20, 1), point_at(report.naive, 20, 1)
    if on is None or off is None:
        return []
    pairs = [C1Pair(batching_p50_ms=on.p50_ms, naive_p50_ms=off.p50_ms)]
    for i in range(1, cfg.c1_pairs):
        first = ("naive", "service") if i % 2 else ("service", "naive")
        p50 = {label: measure_point(servers[label], bodies[20], 20, cfg, concurrency=1).p50_ms for label in first}
        pairs.append(C1Pair(batching_p50_ms=p50["service"], naive_p50_ms=p50["naive"]))
    for pair in pairs:
        pair.ratio = round(pair.batching_p50_ms / pair.naive_p50_ms, 4)
    say("20 candidates at concurrency 1, batching ÷ naive p50: "
        + ", ".join(f"{q.ratio:.2f} ({q.batching_p50_ms:.2f}/{q.naive_p50_ms:.2f} ms)" for q in pairs))
    return pairs


def tail_point(server: RemoteServer, bodies: dict[int, Path], size: int, service: list[LoadPoint],
               cfg: BenchConfig) -> TailPoint:
    """``cfg.tail_repeats`` open-loop points at ``cfg.tail_fraction`` of the size's best throughput;
    the one with the median p99 ÷ p50, with every repeat's figures under ``repeats``."""
    best = best_point(service, size)
    rate = cfg.tail_fraction * best.throughput_rps
    points = [measure_point(server, bodies[size], size, cfg, rate=rate) for _ in range(max(1, cfg.tail_repeats))]
    repeats = [TailRepeat(p50_ms=q.p50_ms, p99_ms=q.p99_ms, errors=q.errors, throughput_rps=q.throughput_rps,
                          p99_over_p50=round(q.p99_ms / q.p50_ms, 3) if q.p50_ms else float("inf"), load=q.load)
               for q in points]
    chosen = middle(list(range(len(points))), key=lambda i: repeats[i].p99_over_p50)
    measured = {f.name: getattr(points[chosen], f.name) for f in fields(LoadPoint)}
    p = TailPoint(**measured, p99_over_p50=repeats[chosen].p99_over_p50, target_fraction=cfg.tail_fraction,
                  max_throughput_rps=best.throughput_rps, repeats=repeats)
    ratios = ", ".join(f"{q.p99_over_p50:.2f}" for q in repeats)
    say(f"tail size={size} at {rate:.0f} req/s ({cfg.tail_fraction:.0%} of {best.throughput_rps:.0f}): "
        f"p50={p.p50_ms:.2f} p99={p.p99_ms:.2f} ms, {p.throughput_rps:.0f} req/s done "
        f"(the median of p99/p50 {ratios})")
    return p


def floor_points(vdir: Path, graph: str, bodies: dict[int, Path], workers: int, cfg: BenchConfig) -> list[FloorPoint]:
    """The serving floor at ``cfg.floor_points`` (those whose size the run has): closed loop, as the
    sweeps measure, with the floor server's CPU time."""
    points = []
    server = FloorServer(vdir, graph, workers)
    try:
        for size, concurrency in cfg.floor_points:
            if size not in bodies:
                continue
            cpu0, t0 = cpu_seconds(server.pids()), time.perf_counter()
            result = run_point(point_spec(server.port, bodies[size], cfg, concurrency=concurrency))
            cores = (cpu_seconds(server.pids()) - cpu0) / (time.perf_counter() - t0)
            rows_per_s = result.throughput_rps * size
            points.append(FloorPoint(
                size=size, concurrency=concurrency, throughput_rps=round(result.throughput_rps, 2),
                rows_per_s=round(rows_per_s, 1), p50_ms=result.p50_ms, p99_ms=result.p99_ms, errors=result.errors,
                server_cpu_cores=round(cores, 3),
                rows_per_server_cpu_s=round(rows_per_s / cores, 1) if cores > 0 else 0.0, load=load_average()))
            say(f"floor   size={size:4d} c={concurrency:3d}: {result.throughput_rps:8.1f} req/s "
                f"{rows_per_s:9.0f} rows/s p50={result.p50_ms:7.2f} ms (HTTP, batching and ONNX Runtime only)")
    finally:
        server.stop()
    return points


class RssSampler:
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

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def overload(report: Report, repo: Path, env: dict[str, str], bodies: dict[int, Path], cfg: BenchConfig,
             device: str) -> Overload:
    """Open loop at ``overload_factor`` × the best closed-loop throughput, on a fresh server with a realistic
    deadline, ``overload_repeats`` times, then the retry storm on the same server."""
    size = cfg.overload_at
    best = best_point(report.service, size)
    rate = cfg.overload_factor * best.throughput_rps
    env = env | {"MTRANK_REQUEST_TIMEOUT_MS": str(cfg.overload_timeout_ms)}
    repeats = max(1, cfg.overload_repeats)
    with server_under_test(report, "overload", repo, env, device) as server:
        # The same closed loop as the best sweep point first: warm caches and ORT's memory arena,
        # so the RSS below shows what overload adds, not the first requests' allocations.
        warm = measure_point(server, bodies[size], size, cfg, concurrency=best.concurrency)
        say(f"overload size={size}: warm closed loop c={best.concurrency} {warm.throughput_rps:.0f} req/s; "
            f"now open loop at {rate:.0f} req/s ({cfg.overload_factor:g} × {best.throughput_rps:.0f}) "
            f"for {cfg.overload_s:g} s, {repeats} × on the same server")
        points = []
        with RssSampler(server, cfg.rss_interval_s) as rss:
            for i in range(repeats):
                if i:
                    time.sleep(cfg.overload_pause_s)
                points.append(measure_point(
                    server, bodies[size], size, cfg, rate=rate, warmup_s=cfg.overload_warmup_s,
                    window_s=cfg.overload_s, max_windows=1, stable_windows=1, min_requests=1,
                    timeout_s=cfg.overload_client_timeout_s))
                f = overload_figures(points[-1])
                say(f"overload repeat {i + 1}/{repeats}: goodput {f.goodput_rps:.0f} req/s, accepted p99 "
                    f"{f.accepted_p99_ms:.1f} ms, 503 p99 {f.rejected_503_p99_ms} ms, statuses {f.statuses}")
        time.sleep(cfg.overload_pause_s)
        storm = retry_storm(server, bodies[size], size, cfg, best)
    out = _overload_record(points, rss.samples, cfg, size, rate, best)
    out.warm_point, out.retry_storm = warm, storm
    out.error_lines = report.servers["overload"].error_lines
    say(f"overload (median of {repeats}): goodput {out.goodput_rps:.0f} req/s, accepted p99 "
        f"{out.accepted_p99_ms:.1f} ms, 503 p99 {out.rejected_503_p99_ms} ms, statuses {out.statuses}, RSS "
        f"{out.rss_kib.start} → {out.rss_kib.end} KiB (max {out.rss_kib.max}), {out.error_lines} ERROR lines")
    return out


def _overload_record(points: list[LoadPoint], samples: list[tuple[float, int]], cfg: BenchConfig, size: int,
                     rate: float, best: LoadPoint) -> Overload:
    """The overload repeats as one record: each figure's median over them, their statuses summed, and
    the RSS samples read at the start, after the first second, at the end and at their highest."""
    figures = [overload_figures(q) for q in points]
    # The load generator's own start-up and warm-up come first; "after the first second" is past both.
    settled_at = cfg.overload_warmup_s + 1.0
    settled = next((kib for t, kib in samples if t >= settled_at), samples[-1][1])
    end = next((kib for _, kib in reversed(samples) if kib > 0), 0)

    def median(key: str) -> float | None:
        values = [getattr(f, key) for f in figures if getattr(f, key) is not None]
        return middle(values) if values else None

    # The repeat whose goodput is the median: its statuses and latency table stand for the point.
    point = middle(points, key=lambda q: q.throughput_rps)
    return Overload(
        size=size, factor=cfg.overload_factor, rate_rps=round(rate, 2), seconds=point.seconds, repeats_n=len(points),
        best_closed_loop=BestClosedLoop(concurrency=best.concurrency, throughput_rps=best.throughput_rps,
                                        rows_per_s=best.rows_per_s, p50_ms=best.p50_ms, p99_ms=best.p99_ms),
        request_timeout_ms=cfg.overload_timeout_ms, client_timeout_s=cfg.overload_client_timeout_s,
        goodput_rps=median("goodput_rps"), accepted_p50_ms=median("accepted_p50_ms"),
        accepted_p99_ms=median("accepted_p99_ms"),
        statuses=dict(sum((Counter(q.statuses) for q in points), Counter())), non_200=point.non_200,
        rejected_503_p99_ms=median("rejected_503_p99_ms"), rejected_503_p50_ms=median("rejected_503_p50_ms"),
        rss_kib=RssFigures(start=samples[0][1], after_first_second=settled, end=end,
                           max=max(kib for _, kib in samples), samples=len(samples)),
        rss_samples=samples, repeats=figures, point=point)


def overload_figures(point: LoadPoint) -> OverloadFigures:
    """The figures of one overload repeat that the targets read."""
    rejected = point.non_200.get("503")
    return OverloadFigures(goodput_rps=point.throughput_rps, accepted_p50_ms=point.p50_ms,
                           accepted_p99_ms=point.p99_ms, rejected_503_p50_ms=rejected.p50_ms if rejected else None,
                           rejected_503_p99_ms=rejected.p99_ms if rejected else None, statuses=point.statuses,
                           load=point.load)


def storm_clients(cfg: BenchConfig, best_rps: float) -> int:
    """Clients of the retry-storm point: ``overload_factor`` × the requests that can be in flight at the
    best throughput for each to be answered within the admission's share of the deadline (Little's law),
    so that some are always being refused."""
    from mtrank.service.admission import LATENCY_SHARE

    return max(2, round(cfg.overload_factor * best_rps * LATENCY_SHARE * cfg.overload_timeout_ms / 1000))


def retry_storm(server: RemoteServer, bodies_file: Path, size: int, cfg: BenchConfig, best: LoadPoint) -> RetryStorm:
    """Clients that resend the moment they are refused (:func:`storm_clients` of them, closed loop)."""
    clients = storm_clients(cfg, best.throughput_rps)
    point = measure_point(server, bodies_file, size, cfg, concurrency=clients, warmup_s=cfg.overload_warmup_s,
                          window_s=cfg.retry_storm_s, max_windows=1, stable_windows=1, min_requests=1,
                          timeout_s=cfg.overload_client_timeout_s)
    f = overload_figures(point)
    out = RetryStorm(clients=clients, seconds=point.seconds, goodput_rps=f.goodput_rps,
                     refused_per_s=round(point.statuses.get("503", 0) / (point.seconds or 1.0), 1),
                     accepted_p99_ms=f.accepted_p99_ms, rejected_503_p50_ms=f.rejected_503_p50_ms,
                     rejected_503_p99_ms=f.rejected_503_p99_ms, statuses=f.statuses, load=point.load,
                     server_cpu_cores=point.server_cpu_cores, client_cpu_cores=point.client_cpu_cores)
    say(f"retry storm: {clients} clients resending at once on a 503: goodput {out.goodput_rps:.0f} req/s "
        f"(best closed loop {best.throughput_rps:.0f}), {out.refused_per_s:.0f} refusals/s, 503 p50/p99 "
        f"{out.rejected_503_p50_ms}/{out.rejected_503_p99_ms} ms")
    return out
