"""Targets → ratios: every target of a run and the figures beside them, from its :class:`Report`.

Each ratio is computed from figures of the same run; a target whose points the run lacks (e.g.
``--sizes 1000`` has no 20-candidate point) has value None and ``met`` False, with the reason under
``missing``.
"""

from __future__ import annotations

import math
from typing import Any

from mtrank.bench.config import (
    ENGINE_POINTS,
    HISTORY_RATIO,
    HISTORY_SPEC,
    IMPRESSION_TARGETS,
    INFORMATIONAL,
    PER_SIZE_TARGETS,
    TAIL_KEPT_UP,
    TARGETS,
    TargetSpec,
    history_target_names,
    target_names,
)
from mtrank.bench.engine import rows_per_s_at
from mtrank.bench.report import C1Pair, Ratio, Report, best_point, middle, point_at


def ratio(spec: TargetSpec, value: float | None, target: float | None = None, **parts: Any) -> Ratio:
    """``value`` against ``spec`` (or against ``target`` where given), rounded to 3 digits."""
    threshold = spec.threshold if target is None else target
    ok = value is not None and math.isfinite(value) and (value >= threshold if spec.op == ">=" else value <= threshold)
    return Ratio(value=None if value is None else round(value, 3), op=spec.op, target=threshold, met=bool(ok),
                 what=spec.what, parts=parts)


def compute_ratios(report: Report) -> dict[str, Ratio]:
    """Every target of :func:`~mtrank.bench.config.target_names`, each with the figures it is made of
    (a run of the history workload alone: its target only)."""
    history = history_ratios(report) if report.history is not None else {}
    if report.mode == "history":
        return {name: history[name] for name in history_target_names()}
    ratios = {"batching_vs_naive_p50_20_c1": _c1_ratio(report), **_engine_ratios(report), **_overload_ratios(report)}
    for size in report.config.sizes:
        ratios[f"batching_vs_naive_{size}"] = _batching_ratio(report, size)
        ratios[f"p99_over_p50_at_70pct_{size}"] = _tail_ratio(report, size)
    if report.impressions is not None:
        ratios |= _impression_ratios(report)
    ratios |= history
    return {name: ratios[name] for name in target_names(report.config.sizes, report.impressions is not None,
                                                        report.history is not None)}


def _c1_ratio(report: Report) -> Ratio:
    """The median of the concurrency-1 pairs' p50 ratios (the sweep's own pair for reports without pairs)."""
    spec = TARGETS["batching_vs_naive_p50_20_c1"]
    on, off = point_at(report.service, 20, 1), point_at(report.naive, 20, 1)
    if not (on and off):
        return ratio(spec, None, missing="no 20-candidate point at concurrency 1")
    pairs = report.c1_pairs or [C1Pair(batching_p50_ms=on.p50_ms, naive_p50_ms=off.p50_ms)]
    mid = middle(pairs, key=lambda q: q.batching_p50_ms / q.naive_p50_ms)
    return ratio(spec, mid.batching_p50_ms / mid.naive_p50_ms, batching_p50_ms=mid.batching_p50_ms,
                 naive_p50_ms=mid.naive_p50_ms, pairs=[round(q.batching_p50_ms / q.naive_p50_ms, 3) for q in pairs])


def _engine_ratios(report: Report) -> dict[str, Ratio]:
    """Service rows/s ÷ the engine peak at the two engine targets' points, with the engine at the
    service's own batch size and both per CPU-second beside it."""
    out = {}
    peak = report.engine.peak
    curve = report.engine.curve
    for size, c in ENGINE_POINTS:
        name, svc = f"service_vs_engine_{size}_c{c}", point_at(report.service, size, c)
        if svc is None:
            out[name] = ratio(TARGETS[name], None, missing=f"no {size}-candidate point at concurrency {c}")
            continue
        at = rows_per_s_at([p.batch for p in curve], [p.rows_per_s for p in curve], max(svc.mean_batch_rows, 1.0))
        out[name] = ratio(
            TARGETS[name], svc.rows_per_s / peak.rows_per_s, service_rows_per_s=svc.rows_per_s,
            engine_peak_rows_per_s=peak.rows_per_s, engine_peak_batch=peak.batch,
            service_mean_batch_rows=svc.mean_batch_rows, engine_rows_per_s_at_that_batch=round(at, 1),
            vs_engine_at_that_batch=round(svc.rows_per_s / at, 3),
            service_rows_per_server_cpu_s=svc.rows_per_server_cpu_s, engine_peak_rows_per_cpu_s=peak.rows_per_cpu_s)
    return out


def _overload_ratios(report: Report) -> dict[str, Ratio]:
    """The five overload targets: goodput, the 503s' p99, the accepted p99, RSS growth and ERROR lines."""
    ov = report.overload
    best = ov.best_closed_loop.throughput_rps
    out = {"overload_goodput": ratio(
        TARGETS["overload_goodput"], ov.goodput_rps / best, goodput_rps=ov.goodput_rps, best_closed_loop_rps=best,
        rate_rps=ov.rate_rps, size=ov.size, statuses=ov.statuses, repeats=[r.goodput_rps for r in ov.repeats])}
    if ov.rejected_503_p99_ms is None:
        out["overload_503_p99_ms"] = ratio(TARGETS["overload_503_p99_ms"], None,
                                           missing="no 503 answers in the overload point")
    else:
        out["overload_503_p99_ms"] = ratio(
            TARGETS["overload_503_p99_ms"], ov.rejected_503_p99_ms, answers_503=ov.statuses.get("503", 0),
            p50_ms=ov.rejected_503_p50_ms, repeats=[r.rejected_503_p99_ms for r in ov.repeats])
    out["overload_accepted_p99_ms"] = ratio(
        TARGETS["overload_accepted_p99_ms"], ov.accepted_p99_ms, target=float(ov.request_timeout_ms),
        accepted_p50_ms=ov.accepted_p50_ms, accepted=ov.statuses.get("200", 0),
        repeats=[r.accepted_p99_ms for r in ov.repeats])
    rss = ov.rss_kib
    out["overload_rss_growth"] = ratio(
        TARGETS["overload_rss_growth"], rss.end / rss.after_first_second if rss.after_first_second else None,
        start_kib=rss.start, after_first_second_kib=rss.after_first_second, end_kib=rss.end, max_kib=rss.max,
        max_over_start=round(rss.max / rss.start, 3) if rss.start else None)
    out["overload_error_lines"] = ratio(
        TARGETS["overload_error_lines"], ov.error_lines, examples=report.servers["overload"].error_examples,
        other_servers={k: s.error_lines for k, s in report.servers.items() if k != "overload"})
    return out


def _impression_ratios(report: Report) -> dict[str, Ratio]:
    """The log on ÷ off in one process (the median round) and the failed requests of the server with a
    read-only log."""
    imp = report.impressions
    on, off = imp.points.get("log_on", []), imp.points.get("sampled_out", [])
    spec = IMPRESSION_TARGETS["impression_log_on_vs_off"]
    if not imp.on_vs_off:
        on_vs_off = ratio(spec, None, missing="no round of the impression-log point")
    else:
        mid = middle(list(range(len(imp.on_vs_off))), key=lambda i: imp.on_vs_off[i])
        log_on = imp.servers.get("log_on")
        on_vs_off = ratio(
            spec, imp.on_vs_off[mid], size=imp.size, concurrency=imp.concurrency, rounds=imp.on_vs_off,
            on_rps=on[mid].throughput_rps, off_rps=off[mid].throughput_rps,
            cpu_per_row_on_vs_off=round(off[mid].rows_per_server_cpu_s / on[mid].rows_per_server_cpu_s, 3)
            if on[mid].rows_per_server_cpu_s else None,
            load=on[mid].load, dropped_with_log_on=log_on.dropped if log_on else None,
            writer_cpu_share=round(log_on.writer_cpu_s / log_on.cpu_s, 3) if log_on and log_on.cpu_s else None,
            on_vs_off_server_median=_median_or_none(imp.on_vs_off_server),
            sampled_out_vs_off_server_median=_median_or_none(imp.sampled_out_vs_off_server))
    ro = imp.servers.get("log_read_only")
    points = imp.points.get("log_read_only", [])
    spec = IMPRESSION_TARGETS["impression_log_read_only_failures"]
    if ro is None or not points:
        failures = ratio(spec, None, missing="no read-only server in the impression-log point")
    else:
        # 499: the load generator closed its connections at the end of a point, requests in flight.
        failed = {status: n for status, n in ro.statuses.items() if status not in ("200", "499")}
        client_errors = sum(p.errors for p in points)
        # The server's count covers warm-ups too; the client's covers connections the server never answered.
        failures = ratio(spec, max(sum(failed.values()), client_errors), answered_200=ro.statuses.get("200", 0),
                         failed=failed, client_closed_499=ro.statuses.get("499", 0), client_errors=client_errors,
                         dropped=ro.dropped, logged=ro.logged, read_only=imp.read_only)
    return {"impression_log_on_vs_off": on_vs_off, "impression_log_read_only_failures": failures}


def _median_or_none(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def _batching_ratio(report: Report, size: int) -> Ratio:
    """Best batching req/s ÷ best naive req/s at ``size``, each at its best concurrency."""
    b, n = best_point(report.service, size), best_point(report.naive, size)
    return ratio(PER_SIZE_TARGETS["batching_vs_naive_{size}"].for_size(size), b.throughput_rps / n.throughput_rps,
                 batching_rps=b.throughput_rps, batching_concurrency=b.concurrency, naive_rps=n.throughput_rps,
                 naive_concurrency=n.concurrency)


def _tail_ratio(report: Report, size: int) -> Ratio:
    """p99 ÷ p50 of the size's tail point; not met when the point did not keep up or queued."""
    t = next(p for p in report.tail if p.size == size)
    tail = ratio(PER_SIZE_TARGETS["p99_over_p50_at_70pct_{size}"].for_size(size), t.p99_ms / t.p50_ms,
                 p50_ms=t.p50_ms, p99_ms=t.p99_ms, rate_rps=t.rate, done_rps=t.throughput_rps, errors=t.errors,
                 repeats=[q.p99_over_p50 for q in t.repeats])
    kept_up = t.throughput_rps / t.rate if t.rate else 0.0
    in_flight = t.throughput_rps * (t.mean_ms or t.p50_ms) / 1000.0
    best_concurrency = best_point(report.service, size).concurrency
    tail.parts |= {"kept_up": round(kept_up, 3), "in_flight": round(in_flight, 1),
                   "best_closed_loop_concurrency": best_concurrency}
    # Past its capacity the queue grows for the whole point: every answer is late alike and p99 ÷ p50
    # can look fine while p50 is hundreds of milliseconds. Such a point is not at 70 % of anything.
    if kept_up < TAIL_KEPT_UP:
        tail.met = False
        tail.parts["not_at_load"] = (f"answered {t.throughput_rps:.0f} of the {t.rate:.0f} req/s offered: "
                                     "the server did not keep up (the machine was slower than in the sweep)")
    elif in_flight > best_concurrency:
        tail.met = False
        tail.parts["not_at_load"] = (f"{in_flight:.0f} requests in flight on average, more than the "
                                     f"{best_concurrency} of the best closed-loop point: a standing queue (the "
                                     "machine was slower than in the sweep)")
    return tail


def history_ratios(report: Report) -> dict[str, Ratio]:
    """The history workload at each of its sizes: the service's rows/s ÷ the best engine rows/s on
    batches of requests of that size (the best of the run's measurements), with the engine at the
    service's own batch size and both per CPU-second beside it."""
    h, out = report.history, {}
    for size in report.config.history_sizes:
        name, spec = HISTORY_RATIO.format(size=size), HISTORY_SPEC.for_size(size)
        svc = point_at(h.service, size, h.concurrency)
        curves = [c for c in h.engine if c.candidates == size]
        if svc is None or not curves:
            out[name] = ratio(spec, None, missing=f"no history point or engine curve at {size} candidates")
            continue
        best = max(curves, key=lambda c: c.peak.rows_per_s)
        peak = best.peak
        at = rows_per_s_at([p.batch for p in best.curve], [p.rows_per_s for p in best.curve],
                           max(svc.mean_batch_rows, 1.0))
        out[name] = ratio(
            spec, svc.rows_per_s / peak.rows_per_s, service_rows_per_s=svc.rows_per_s, concurrency=svc.concurrency,
            engine_rows_per_s=peak.rows_per_s, engine_batch=peak.batch, engine_requests=peak.requests,
            engine_peaks=[c.peak.rows_per_s for c in curves], service_mean_batch_rows=svc.mean_batch_rows,
            engine_rows_per_s_at_that_batch=round(at, 1), vs_engine_at_that_batch=round(svc.rows_per_s / at, 3),
            service_rows_per_server_cpu_s=svc.rows_per_server_cpu_s, engine_rows_per_cpu_s=peak.rows_per_cpu_s,
            service_p50_ms=svc.p50_ms, load=svc.load)
    return out


def compute_informational(report: Report) -> dict[str, Ratio]:
    """Figures beside the targets: the Redis lookup against redis-benchmark, the retry storm's goodput,
    the serving floor against the engine and the history workload's sizes other than its target's."""
    history = {name: r for name, r in (history_ratios(report) if report.history is not None else {}).items()
               if name not in history_target_names()}
    if report.mode == "history":
        return history
    return {"lookup_vs_redis_benchmark_500": _lookup_ratio(report), "retry_storm_goodput": _storm_ratio(report),
            **{f"floor_vs_engine_{size}_c{c}": _floor_ratio(report, size, c) for size, c in ENGINE_POINTS}, **history}


def _floor_ratio(report: Report, size: int, concurrency: int) -> Ratio:
    spec = INFORMATIONAL[f"floor_vs_engine_{size}_c{concurrency}"]
    floor = point_at(report.floor or [], size, concurrency)
    if floor is None:
        return ratio(spec, None, missing=f"no floor point at {size} candidates, concurrency {concurrency} "
                                         "(CPU runs with that size only)")
    if not floor.rows_per_s:
        return ratio(spec, None, missing=f"the floor answered nothing at {size} candidates, concurrency "
                                         f"{concurrency} ({floor.errors} errors)")
    peak = report.engine.peak.rows_per_s
    service = point_at(report.service, size, concurrency)
    return ratio(spec, floor.rows_per_s / peak, floor_rows_per_s=floor.rows_per_s, engine_peak_rows_per_s=peak,
                 service_rows_per_s=service.rows_per_s if service else None,
                 service_vs_floor=round(service.rows_per_s / floor.rows_per_s, 3) if service else None,
                 floor_rows_per_server_cpu_s=floor.rows_per_server_cpu_s)


def _lookup_ratio(report: Report) -> Ratio:
    spec = INFORMATIONAL["lookup_vs_redis_benchmark_500"]
    lk = report.lookups
    if lk is None:
        return ratio(spec, None, missing="no Redis in this run (--redis none)")
    if lk.redis_benchmark is None or lk.service is None:
        return ratio(spec, None, missing="redis-benchmark is not installed")
    return ratio(spec, lk.service.p50_ms / lk.redis_benchmark.p50_ms, service_p50_ms=lk.service.p50_ms,
                 redis_benchmark_p50_ms=lk.redis_benchmark.p50_ms,
                 mean_ratio=round(lk.service.mean_ms / lk.redis_benchmark.mean_ms, 3))


def _storm_ratio(report: Report) -> Ratio:
    spec = INFORMATIONAL["retry_storm_goodput"]
    storm = report.overload.retry_storm
    if storm is None:
        return ratio(spec, None, missing="no retry-storm point in this run")
    best = report.overload.best_closed_loop.throughput_rps
    return ratio(spec, storm.goodput_rps / best if best else None, goodput_rps=storm.goodput_rps,
                 best_closed_loop_rps=best, clients=storm.clients, refused_per_s=storm.refused_per_s,
                 rejected_503_p99_ms=storm.rejected_503_p99_ms, accepted_p99_ms=storm.accepted_p99_ms)
