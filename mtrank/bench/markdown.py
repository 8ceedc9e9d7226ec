"""``bench.md``: every table of a run, from its :class:`~mtrank.bench.report.Report`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtrank.bench.report import EngineRun, HistoryWorkload, ImpressionLogPoint, LoadPoint, Overload, Ratio, Report


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _short(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}".rstrip("0").rstrip(".")


def engine_label(e: EngineRun) -> str:
    """How the engine ran: its session options and provider."""
    options = "default session options" if e.session_options == "default" else e.session_options
    return f"{options}, {e.provider}"


def _points_table(points: list[LoadPoint]) -> str:
    rows = [
        [p.size, p.concurrency or f"rate {p.rate:.0f}/s", p.throughput_rps, p.rows_per_s, f"{p.p50_ms:.2f}",
         f"{p.p90_ms:.2f}", f"{p.p99_ms:.2f}", p.mean_batch_rows, f"{p.server_cpu_cores:.2f}",
         p.rows_per_server_cpu_s, f"{p.client_cpu_cores:.2f}", ("yes" if p.stable else "no") + f" ({p.windows})",
         p.errors]
        for p in points
    ]
    return _table(["cands", "conc.", "req/s", "rows/s", "p50 ms", "p90 ms", "p99 ms", "rows/batch",
                   "server CPU (cores)", "rows per server CPU-s", "client CPU (cores)", "stable (windows)",
                   "errors"], rows)


def _ratio_rows(ratios: dict[str, Ratio]) -> list[list[Any]]:
    return [[name, _short(r.value), f"{r.op} {r.target}", "yes" if r.met else "**no**",
             r.what + "".join(f" ({r.parts[k]})" for k in ("missing", "not_at_load") if r.parts.get(k))]
            for name, r in ratios.items()]


def _peaks(report: Report) -> str:
    peaks = report.engine_peaks
    if not peaks:
        return ""
    values = ", ".join(f"{p.rows_per_s:,.0f}" for p in peaks)
    when = "at the start and at the end" if len(peaks) == 2 else \
        "at the start, after the batching server's sections and at the end"
    return f"; the best of {len(peaks)} measurements, {when} of the run ({values})"


def _header(report: Report) -> list[str]:
    m, model = report.machine, report.model
    return [
        f"# mtrank bench ({report.mode} run, {report.started_at})",
        "",
        f"Model `{model.name}` v{model.version} ({model.kind}, graphs {', '.join(model.graphs)}). Machine: "
        f"{m.get('model_name', '?')}, {m.get('cpus')} CPUs, {m.get('ram_gib', '?')} GiB RAM, "
        f"{m.get('hypervisor_vendor', 'bare metal?')}; ONNX Runtime {m['onnxruntime']}, Python {m['python']}. "
        f"Device `{report.device}`, {report.store} embedding store. Load average (1/5/15 min) at start "
        f"{report.load_at_start}, at end {report.load_at_end}; the run took {report.seconds} s. Server, load "
        "generator and Redis share the machine's cores.",
        "",
        "## Targets",
        "",
        _table(["ratio", "value", "target", "met", "what"], _ratio_rows(report.ratios)),
        "",
        "Informational:",
        "",
        _table(["ratio", "value", "reference", "met", "what"], _ratio_rows(report.informational)),
        "",
        "## Sections and the machine's load",
        "",
        _table(["section", "seconds", "load before (1/5/15 min)", "load after"],
               [[name, s.seconds, str(s.load_before), str(s.load_after)] for name, s in report.sections.items()]),
        "",
    ]


def _servers(report: Report) -> list[str]:
    workers = report.workers
    asked = "the default, one per available core" if not workers.asked else f"MTRANK_WORKERS={workers.asked}"
    parts = [
        "## Servers",
        "",
        "Service settings at their defaults (the bench sets only device, store, deadline and batching): "
        + ", ".join(f"`{k}={v}`" for k, v in report.service_defaults.items()) + ". "
        + f"Serving processes per server: {workers.count} ({asked}).",
        "",
        _table(["server", "provider", "MTRANK_BATCHING", "MTRANK_REQUEST_TIMEOUT_MS", "log lines", "ERROR lines"],
               [[name, s.provider or "?", s.env.get("MTRANK_BATCHING", "–"),
                 s.env.get("MTRANK_REQUEST_TIMEOUT_MS", "–"), s.log_lines, s.error_lines]
                for name, s in report.servers.items()]),
        "",
    ]
    examples = [line for s in report.servers.values() for line in s.error_examples]
    if examples:
        parts += ["First ERROR lines:", "", "```", *examples[:10], "```", ""]
    return parts


def _engine(report: Report) -> list[str]:
    engine = report.engine
    engines = [engine] + ([report.engine_1_thread] if report.engine_1_thread else [])
    header = (["batch"] + [f"rows/s ({engine_label(e)})" for e in engines]
              + [f"rows per CPU-s ({engine_label(e)})" for e in engines] + ["ms/batch"])
    rows = [[p.batch] + [e.curve[i].rows_per_s for e in engines] + [e.curve[i].rows_per_cpu_s for e in engines]
            + [f"{p.ms_per_batch:.3f}"] for i, p in enumerate(engine.curve)]
    return [f"## Engine: ONNX Runtime alone (graph `{engine.graph}`)", "",
            f"Peak (the targets' reference): {engine.peak.rows_per_s:,.0f} rows/s at batch {engine.peak.batch}, "
            f"{engine_label(engine)}{_peaks(report)}.", "", _table(header, rows), ""]


def _service(report: Report) -> list[str]:
    parts = ["## Service (dynamic batching)", "", _points_table(report.service), ""]
    if report.floor:
        service = {(q.size, q.concurrency): q for q in report.service}
        rows = []
        for q in report.floor:
            svc = service.get((q.size, q.concurrency))
            rows.append([q.size, q.concurrency, q.throughput_rps, q.rows_per_s, q.p50_ms, q.server_cpu_cores,
                         q.rows_per_server_cpu_s, svc.rows_per_s if svc else "–",
                         _short(svc.rows_per_s / q.rows_per_s) if svc and q.rows_per_s else "–"])
        parts += ["### The serving floor: HTTP, batching and ONNX Runtime alone", "",
                  "The service's HTTP stack and batcher on a fixed feed, no ranking path (`mtrank/bench/floor.py`): "
                  "what any ranking path is below on this machine.", "",
                  _table(["cands", "conc", "floor req/s", "floor rows/s", "p50 ms", "server CPU cores",
                          "rows per server CPU-s", "service rows/s", "service ÷ floor"], rows), ""]
    if report.c1_pairs:
        parts += ["### 20 candidates at concurrency 1: pairs of points", "",
                  "Batching and naive back to back, which first alternating, the sweep's pair first; the target "
                  "reads the median ratio.", "",
                  _table(["pair", "batching p50 ms", "naive p50 ms", "ratio"],
                         [[i, q.batching_p50_ms, q.naive_p50_ms, q.ratio]
                          for i, q in enumerate(report.c1_pairs, start=1)]), ""]
    if report.tail:
        repeats = [[p.size, len(p.repeats), ", ".join(f"{q.p50_ms:.2f} / {q.p99_ms:.2f}" for q in p.repeats),
                    ", ".join(f"{q.p99_over_p50:.2f}" for q in p.repeats)] for p in report.tail]
        parts += ["### Open loop at 70 % of the best throughput", "",
                  "Each size's point is the one with the median p99 ÷ p50 of its repeats (all repeats below).", "",
                  _points_table(report.tail), "",
                  _table(["cands", "repeats", "p50 / p99 ms of each", "p99 ÷ p50 of each"], repeats), ""]
    return parts + ["## Naive server (MTRANK_BATCHING=false)", "", _points_table(report.naive), ""]


def _impressions(imp: ImpressionLogPoint) -> list[str]:
    """The impression log on and off in one process, the server without the log and the read-only one:
    each round's points, the ratios and each server's counters."""
    rows = []
    for i, order in enumerate(imp.orders):
        for label in order:
            p = imp.points[label][i]
            rows.append([i + 1, label, p.throughput_rps, f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}",
                         f"{p.server_cpu_cores:.2f}", p.rows_per_server_cpu_s, p.errors, str(p.load)])
    counters = [[label, str(s.statuses), _fmt(s.answered_logged), s.logged, str(s.dropped),
                 _fmt(s.records_in_files), _fmt(s.records_sampled_out), s.cpu_s,
                 f"{s.writer_cpu_s:.2f} ({s.writer_cpu_s / s.cpu_s:.1%})" if s.cpu_s else "–"]
                for label, s in imp.servers.items()]
    ro = imp.read_only

    def listed(values: list[float]) -> str:
        return ", ".join(f"{r:.3f}" for r in values)

    return [
        f"## Impression log: on and off, {imp.size} candidates at concurrency {imp.concurrency}", "",
        f"Three servers with the same settings: the log on (`MTRANK_IMPRESSION_SAMPLE={imp.sample:g}`), off, and on "
        f"in a directory of mode {ro.get('mode', '?')} that the server cannot write (command prefix: "
        f"{ro.get('server_wrapper', '?')}; a probe file there got {ro.get('probe_error', '?')}). The log-on server "
        "gets two copies of the bodies, differing only in their request ids: `log_on` sends ids it logs (every "
        "request logged), `sampled_out` ids its sampling leaves out (the log off for every request, in the same "
        "process); `log_off` is the server without the log, `log_read_only` the read-only one. One point of each "
        "per round, in the order shown.", "",
        f"- on ÷ off in one process (`log_on` ÷ `sampled_out`), the target's, by round: {listed(imp.on_vs_off)}",
        f"- on ÷ the server without the log (`log_on` ÷ `log_off`): {listed(imp.on_vs_off_server)}",
        f"- two processes without the log (`sampled_out` ÷ `log_off`): {listed(imp.sampled_out_vs_off_server)}", "",
        _table(["round", "point", "req/s", "p50 ms", "p99 ms", "server CPU (cores)", "rows per server CPU-s",
                "errors", "load"], rows), "",
        "Each server's counters after the points (answers by status include warm-ups; answered, logged ids: the "
        "log-on server's 200s to the ids it logs; logged: in completed files while it ran; in files: complete "
        "files once it stopped, and of those, records of ids its sampling leaves out; CPU seconds of all its "
        "processes through the rounds, and of the impression writer threads among them):", "",
        _table(["server", "/v1/rank answers", "answered, logged ids", "logged", "dropped", "records in files",
                "of which sampled out", "CPU s", "writer thread CPU s"], counters), "",
    ]


def _history(h: HistoryWorkload) -> list[str]:
    """The history workload: the engine on batches of requests of each size, each measurement, and the
    service's points."""
    lengths = ", ".join(f"`{name}` {lo}–{hi}" if lo != hi else f"`{name}` {lo}" for name, (lo, hi)
                        in h.history_lengths.items())
    rows, seen = [], {}
    for c in h.engine:
        seen[c.candidates] = seen.get(c.candidates, 0) + 1
        rows += [[c.candidates, seen[c.candidates], p.requests, p.batch, p.rows_per_s, p.rows_per_cpu_s,
                  f"{p.ms_per_batch:.3f}"] for p in c.curve]
    return [
        f"## History workload: `{h.model.name}` v{h.model.version}, graph `{h.graph}`", "",
        f"Requests carry the user's history ({lengths} entries) and the items' tags; `mtrank serve` with the "
        f"service's defaults from `{h.model.repo}`, closed loop at concurrency {h.concurrency}. The engine (ONNX "
        "Runtime alone, default session options) runs the same graph on batches of whole requests, as the batcher "
        "stacks them, before the service's points and after; a size's reference is its best.", "",
        _table(["cands", "measurement", "requests per batch", "rows", "rows/s", "rows per CPU-s", "ms/batch"], rows),
        "", _points_table(h.service), "",
    ]


def _overload(ov: Overload) -> list[str]:
    rss, best = ov.rss_kib, ov.best_closed_loop
    return [
        f"## Overload: open loop at {ov.factor:g} × the best closed-loop throughput, {ov.size} candidates",
        "",
        f"{ov.rate_rps:.0f} req/s for {ov.seconds:.1f} s, {ov.repeats_n} × on one server with "
        f"`MTRANK_REQUEST_TIMEOUT_MS={ov.request_timeout_ms}` (client timeout {ov.client_timeout_s:g} s); "
        f"best closed loop {best.throughput_rps:.1f} req/s at concurrency {best.concurrency}.",
        "",
        "The first table gives each figure's median over the repeats (what the targets read) and the "
        "statuses of all of them; the second each repeat; the third the answers of the repeat with the "
        "median goodput.",
        "",
        _table(["goodput (200/s)", "accepted p50 ms", "accepted p99 ms", "503 p99 ms", "statuses",
                "RSS KiB start → after 1 s → end (max)", "ERROR lines"],
               [[ov.goodput_rps, f"{ov.accepted_p50_ms:.2f}", f"{ov.accepted_p99_ms:.2f}",
                 _fmt(ov.rejected_503_p99_ms, 2), str(ov.statuses),
                 f"{rss.start:,} → {rss.after_first_second:,} → {rss.end:,} ({rss.max:,})", ov.error_lines]]),
        "",
        _table(["repeat", "goodput (200/s)", "accepted p99 ms", "503 p50 ms", "503 p99 ms", "statuses", "load"],
               [[i, f"{r.goodput_rps:.1f}", f"{r.accepted_p99_ms:.2f}", _fmt(r.rejected_503_p50_ms, 2),
                 _fmt(r.rejected_503_p99_ms, 2), str(r.statuses), str(r.load)]
                for i, r in enumerate(ov.repeats, start=1)]),
        "",
        _table(["status", "answers", "p50 ms", "p99 ms", "max ms"],
               [["no answer (client timeout or closed)" if s == "0" else s, v.count, f"{v.p50_ms:.2f}",
                 f"{v.p99_ms:.2f}", f"{v.max_ms:.2f}"] for s, v in ov.non_200.items()]),
        "",
    ]


def _retry_storm(ov: Overload) -> list[str]:
    storm = ov.retry_storm
    if storm is None:
        return []
    from mtrank.service.admission import LATENCY_SHARE

    return [
        f"### Retry storm: {storm.clients} clients that resend at once on a 503", "",
        f"A closed loop of {storm.clients} connections on the same server, {storm.seconds:.1f} s, each "
        "sending its next request the moment it has an answer, 503s included (no back-off, Retry-After "
        f"ignored): {ov.factor:g} × the requests that {LATENCY_SHARE:.0%} of the deadline holds at the best "
        "throughput, so that some are always refused.", "",
        _table(["goodput (200/s)", "÷ best closed loop", "refusals/s", "503 p50 / p99 ms", "accepted p99 ms",
                "server / client cores", "load"],
               [[storm.goodput_rps, _fmt(storm.goodput_rps / ov.best_closed_loop.throughput_rps, 2),
                 storm.refused_per_s, f"{_fmt(storm.rejected_503_p50_ms, 2)} / {_fmt(storm.rejected_503_p99_ms, 2)}",
                 f"{storm.accepted_p99_ms:.2f}", f"{storm.server_cpu_cores:.2f} / {storm.client_cpu_cores:.2f}",
                 str(storm.load)]]),
        "",
    ]


def _lookups(report: Report) -> list[str]:
    lk = report.lookups
    if lk is None:
        return []
    ways = {"service": lk.service, "redis_benchmark": lk.redis_benchmark, "bare_async": lk.bare_async,
            "raw_protocol": lk.raw_protocol, "bare_sync": lk.bare_sync, "service_cached": lk.service_cached}
    rows = [[name, f"{t.p50_ms:.3f}", f"{t.mean_ms:.3f}", f"{t.p99_ms:.3f}"] for name, t in ways.items() if t]
    parts = [f"## Embedding lookups: {lk.ids} ids of {lk.value_bytes} bytes", "",
             _table(["how", "p50 ms", "mean ms", "p99 ms"], rows), ""]
    if lk.redis_benchmark_missing:
        parts += ["redis-benchmark is not installed: its reference is missing.", ""]
    return parts


def write_markdown(report: Report, path: Path) -> None:
    """Writes every table of ``report`` to ``path`` (``bench.md``), the plots linked at the end."""
    if report.mode == "history":
        path.write_text("\n".join(_header(report) + _servers(report) + _history(report.history)))
        return
    parts = _header(report) + _servers(report) + _engine(report) + _service(report)
    if report.impressions is not None:
        parts += _impressions(report.impressions)
    if report.overload.repeats:
        parts += _overload(report.overload) + _retry_storm(report.overload)
    parts += _lookups(report)
    if report.history is not None:
        parts += _history(report.history)
    for plot in report.plots or []:
        parts += [f"![{plot}]({plot})", ""]
    path.write_text("\n".join(parts))
