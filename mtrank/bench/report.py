"""``bench.md`` and the PNG plots of a bench run, from its report dict (the content of bench.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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


def _points_table(points: list[dict[str, Any]]) -> str:
    rows = [
        [p["size"], p["concurrency"] or f"rate {p['rate']:.0f}/s", p["throughput_rps"], p["rows_per_s"],
         f"{p['p50_ms']:.2f}", f"{p['p90_ms']:.2f}", f"{p['p99_ms']:.2f}", p["mean_batch_rows"],
         f"{p['server_cpu_cores']:.2f}", p.get("rows_per_server_cpu_s", 0.0), f"{p['client_cpu_cores']:.2f}",
         ("yes" if p["stable"] else "no") + f" ({p['windows']})", p["errors"]]
        for p in points
    ]
    return _table(["cands", "conc.", "req/s", "rows/s", "p50 ms", "p90 ms", "p99 ms", "rows/batch",
                   "server CPU (cores)", "rows per server CPU-s", "client CPU (cores)", "stable (windows)",
                   "errors"], rows)


def _short(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}".rstrip("0").rstrip(".")


def _ratio_rows(ratios: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [[name, _short(r["value"]), f"{r['op']} {r['target']}",
             "yes" if r["met"] else "**no**",
             r["what"] + "".join(f" ({r[k]})" for k in ("missing", "not_at_load") if r.get(k))]
            for name, r in ratios.items()]


def _workers_line(workers: dict[str, int] | int | None) -> str:
    if not isinstance(workers, dict):  # reports from before MTRANK_WORKERS=0
        return f"Serving processes per server: {workers or 1}."
    asked = "the default, one per available core" if not workers["asked"] else f"MTRANK_WORKERS={workers['asked']}"
    return f"Serving processes per server: {workers['count']} ({asked})."


def _peaks(report: dict[str, Any]) -> str:
    peaks = report.get("engine_peaks")
    if not peaks:
        return ""
    values = ", ".join(f"{p['rows_per_s']:,.0f}" for p in peaks)
    when = "at the start and at the end" if len(peaks) == 2 else \
        "at the start, after the batching server's sections and at the end"
    return f"; the best of {len(peaks)} measurements, {when} of the run ({values})"


def _engine_label(e: dict[str, Any]) -> str:
    options = "default session options" if e["session_options"] == "default" else e["session_options"]
    return f"{options}, {e['provider']}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    m = report["machine"]
    parts = [
        f"# mtrank bench ({report['mode']} run, {report['started_at']})",
        "",
        f"Model `{report['model']['name']}` v{report['model']['version']} ({report['model']['kind']}, graphs "
        f"{', '.join(report['model']['graphs'])}). Machine: {m.get('model_name', '?')}, {m.get('cpus')} CPUs, "
        f"{m.get('ram_gib', '?')} GiB RAM, {m.get('hypervisor_vendor', 'bare metal?')}; ONNX Runtime "
        f"{m['onnxruntime']}, Python {m['python']}. Device `{report['device']}`, {report['store']} embedding "
        f"store. Load average (1/5/15 min) at start {report['load_at_start']}, at end {report['load_at_end']}; "
        f"the run took {report['seconds']} s. Server, load generator and Redis share the machine's cores.",
        "",
        "## Targets",
        "",
        _table(["ratio", "value", "target", "met", "what"], _ratio_rows(report["ratios"])),
        "",
        "Informational:",
        "",
        _table(["ratio", "value", "reference", "met", "what"], _ratio_rows(report["informational"])),
        "",
        "## Sections and the machine's load",
        "",
        _table(["section", "seconds", "load before (1/5/15 min)", "load after"],
               [[name, s["seconds"], str(s["load_before"]), str(s["load_after"])]
                for name, s in report["sections"].items()]),
        "",
        "## Servers",
        "",
        "Service settings at their defaults (the bench sets only device, store, deadline and batching): "
        + ", ".join(f"`{k}={v}`" for k, v in report["service_defaults"].items()) + ". "
        + _workers_line(report.get("workers")),
        "",
        _table(["server", "provider", "MTRANK_BATCHING", "MTRANK_REQUEST_TIMEOUT_MS", "log lines", "ERROR lines"],
               [[name, s.get("provider", "?"), s["env"].get("MTRANK_BATCHING", "–"),
                 s["env"].get("MTRANK_REQUEST_TIMEOUT_MS", "–"), s.get("log_lines", 0), s.get("error_lines", 0)]
                for name, s in report["servers"].items()]),
        "",
    ]
    examples = [line for s in report["servers"].values() for line in s.get("error_examples", [])]
    if examples:
        parts += ["First ERROR lines:", "", "```", *examples[:10], "```", ""]
    engines = [report["engine"]] + ([report["engine_1_thread"]] if report.get("engine_1_thread") else [])
    parts += [f"## Engine: ONNX Runtime alone (graph `{report['engine']['graph']}`)", "",
              f"Peak (the targets' reference): {report['engine']['peak']['rows_per_s']:,.0f} rows/s at batch "
              f"{report['engine']['peak']['batch']}, {_engine_label(report['engine'])}{_peaks(report)}.", ""]
    header = (["batch"] + [f"rows/s ({_engine_label(e)})" for e in engines]
              + [f"rows per CPU-s ({_engine_label(e)})" for e in engines] + ["ms/batch"])
    rows = [[p["batch"]] + [e["curve"][i]["rows_per_s"] for e in engines]
            + [e["curve"][i].get("rows_per_cpu_s", 0.0) for e in engines] + [f"{p['ms_per_batch']:.3f}"]
            for i, p in enumerate(report["engine"]["curve"])]
    parts += [_table(header, rows), ""]
    parts += ["## Service (dynamic batching)", "", _points_table(report["service"]), ""]
    if report.get("floor"):
        service = {(q["size"], q["concurrency"]): q for q in report["service"]}
        parts += ["### The serving floor: HTTP, batching and ONNX Runtime alone", "",
                  "The service's HTTP stack and batcher on a fixed feed, no ranking path (`mtrank/bench/floor.py`): "
                  "what any ranking path is below on this machine.", "",
                  _table(["cands", "conc", "floor req/s", "floor rows/s", "p50 ms", "server CPU cores",
                          "rows per server CPU-s", "service rows/s", "service ÷ floor"],
                         [[q["size"], q["concurrency"], q["throughput_rps"], q["rows_per_s"], q["p50_ms"],
                           q["server_cpu_cores"], q["rows_per_server_cpu_s"],
                           service.get((q["size"], q["concurrency"]), {}).get("rows_per_s", "–"),
                           _short(service[(q["size"], q["concurrency"])]["rows_per_s"] / q["rows_per_s"])
                           if (q["size"], q["concurrency"]) in service and q["rows_per_s"] else "–"]
                          for q in report["floor"]]), ""]
    if report.get("c1_pairs"):
        parts += ["### 20 candidates at concurrency 1: pairs of points", "",
                  "Batching and naive back to back, which first alternating, the sweep's pair first; the target "
                  "reads the median ratio.", "",
                  _table(["pair", "batching p50 ms", "naive p50 ms", "ratio"],
                         [[i, q["batching_p50_ms"], q["naive_p50_ms"], q["ratio"]]
                          for i, q in enumerate(report["c1_pairs"], start=1)]), ""]
    if report.get("tail"):
        parts += ["### Open loop at 70 % of the best throughput", "",
                  "Each size's point is the one with the median p99 ÷ p50 of its repeats (all repeats below).", "",
                  _points_table(report["tail"]), ""]
        repeats = [[p["size"], len(p.get("repeats", [])),
                    ", ".join(f"{q['p50_ms']:.2f} / {q['p99_ms']:.2f}" for q in p.get("repeats", [])),
                    ", ".join(f"{q['p99_over_p50']:.2f}" for q in p.get("repeats", []))]
                   for p in report["tail"]]
        parts += [_table(["cands", "repeats", "p50 / p99 ms of each", "p99 ÷ p50 of each"], repeats), ""]
    parts += ["## Naive server (MTRANK_BATCHING=false)", "", _points_table(report["naive"]), ""]
    ov = report.get("overload")
    if ov:
        rss = ov["rss_kib"]
        parts += [
            f"## Overload: open loop at {ov['factor']:g} × the best closed-loop throughput, {ov['size']} candidates",
            "",
            f"{ov['rate_rps']:.0f} req/s for {ov['seconds']:.1f} s, {ov.get('repeats_n', 1)} × on one server with "
            f"`MTRANK_REQUEST_TIMEOUT_MS={ov['request_timeout_ms']}` (client timeout {ov['client_timeout_s']:g} s); "
            f"best closed loop {ov['best_closed_loop']['throughput_rps']:.1f} req/s at concurrency "
            f"{ov['best_closed_loop']['concurrency']}.",
            "",
            "The first table gives each figure's median over the repeats (what the targets read) and the "
            "statuses of all of them; the second each repeat; the third the answers of the repeat with the "
            "median goodput.",
            "",
            _table(["goodput (200/s)", "accepted p50 ms", "accepted p99 ms", "503 p99 ms", "statuses",
                    "RSS KiB start → after 1 s → end (max)", "ERROR lines"],
                   [[ov["goodput_rps"], f"{ov['accepted_p50_ms']:.2f}", f"{ov['accepted_p99_ms']:.2f}",
                     _fmt(ov["rejected_503_p99_ms"], 2), str(ov["statuses"]),
                     f"{rss['start']:,} → {rss['after_first_second']:,} → {rss['end']:,} ({rss['max']:,})",
                     ov["error_lines"]]]),
            "",
            _table(["repeat", "goodput (200/s)", "accepted p99 ms", "503 p50 ms", "503 p99 ms", "statuses", "load"],
                   [[i, f"{r['goodput_rps']:.1f}", f"{r['accepted_p99_ms']:.2f}", _fmt(r["rejected_503_p50_ms"], 2),
                     _fmt(r["rejected_503_p99_ms"], 2), str(r["statuses"]), str(r["load"])]
                    for i, r in enumerate(ov.get("repeats", []), start=1)]),
            "",
            _table(["status", "answers", "p50 ms", "p99 ms", "max ms"],
                   [["no answer (client timeout or closed)" if s == "0" else s, v["count"], f"{v['p50_ms']:.2f}",
                     f"{v['p99_ms']:.2f}", f"{v['max_ms']:.2f}"]
                    for s, v in ov["non_200"].items()]),
            "",
        ]
        storm = ov.get("retry_storm")
        if storm:
            from mtrank.service.admission import LATENCY_SHARE

            parts += [
                f"### Retry storm: {storm['clients']} clients that resend at once on a 503", "",
                f"A closed loop of {storm['clients']} connections on the same server, {storm['seconds']:.1f} s, each "
                "sending its next request the moment it has an answer, 503s included (no back-off, Retry-After "
                f"ignored): {ov['factor']:g} × the requests that {LATENCY_SHARE:.0%} of the deadline holds at the best "
                "throughput, so that some are always refused.", "",
                _table(["goodput (200/s)", "÷ best closed loop", "refusals/s", "503 p50 / p99 ms", "accepted p99 ms",
                        "server / client cores", "load"],
                       [[storm["goodput_rps"], _fmt(storm["goodput_rps"] / ov["best_closed_loop"]["throughput_rps"], 2),
                         storm["refused_per_s"],
                         f"{_fmt(storm['rejected_503_p50_ms'], 2)} / {_fmt(storm['rejected_503_p99_ms'], 2)}",
                         f"{storm['accepted_p99_ms']:.2f}",
                         f"{storm['server_cpu_cores']:.2f} / {storm['client_cpu_cores']:.2f}", str(storm["load"])]]),
                "",
            ]
    lk = report.get("lookups")
    if lk:
        rows = [[name, r["p50_ms"], r["mean_ms"], r["p99_ms"]] for name, r in lk.items()
                if isinstance(r, dict) and "p50_ms" in r]
        parts += [f"## Embedding lookups: {lk['ids']} ids of {lk['value_bytes']} bytes", "",
                  _table(["how", "p50 ms", "mean ms", "p99 ms"], [[n, f"{a:.3f}", f"{b:.3f}", f"{c:.3f}"]
                                                                 for n, a, b, c in rows]), ""]
        if lk.get("redis_benchmark_missing"):
            parts += ["redis-benchmark is not installed: its reference is missing.", ""]
    for plot in report.get("plots", []):
        parts += [f"![{plot}]({plot})", ""]
    path.write_text("\n".join(parts))


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Latency against throughput per request size (service and naive), and the engine curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    sizes = sorted({p["size"] for p in report["service"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for name, points, color in (("batching", report["service"], "tab:blue"), ("naive", report["naive"], "tab:red")):
            pts = sorted((p for p in points if p["size"] == size), key=lambda p: p["concurrency"])
            if not pts:
                continue
            x = [p["rows_per_s"] for p in pts]
            ax.plot(x, [p["p99_ms"] for p in pts], "o-", color=color, label=f"{name} p99")
            ax.plot(x, [p["p50_ms"] for p in pts], "s--", color=color, alpha=0.6, label=f"{name} p50")
            for p in pts:
                ax.annotate(str(p["concurrency"]), (p["rows_per_s"], p["p99_ms"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        for p in report.get("tail", []):
            if p["size"] == size:
                ax.plot([p["rows_per_s"]], [p["p99_ms"]], "k*", markersize=10, label="p99 at 70 % (open loop)")
        ax.set_yscale("log")
        ax.set_title(f"{size} candidates / request")
        ax.set_xlabel("rows/s (candidates scored per second)")
        ax.set_ylabel("latency, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency against throughput (labels: concurrency)")
    fig.tight_layout()
    fig.savefig(out / "latency_throughput.png", dpi=110)
    plt.close(fig)
    written.append("latency_throughput.png")

    fig, (ax, ax_cpu) = plt.subplots(1, 2, figsize=(12, 4.2))
    engines = [report["engine"]] + ([report["engine_1_thread"]] if report.get("engine_1_thread") else [])
    for e in engines:
        x = [p["batch"] for p in e["curve"]]
        ax.plot(x, [p["rows_per_s"] for p in e["curve"]], "o-", label=f"engine, {_engine_label(e)}")
        ax_cpu.plot(x, [p.get("rows_per_cpu_s", 0) for p in e["curve"]], "o-", label=f"engine, {_engine_label(e)}")
    for name, points, marker in (("service", report["service"], "D"), ("naive", report["naive"], "x")):
        best: dict[int, dict] = {}
        for p in points:
            if p["rows_per_s"] > best.get(p["size"], {"rows_per_s": 0})["rows_per_s"]:
                best[p["size"]] = p
        for size, p in sorted(best.items()):
            x = [max(p["mean_batch_rows"], 1)]
            label = f"{name} best, {size} cands (c={p['concurrency']})"
            ax.plot(x, [p["rows_per_s"]], marker, label=label)
            ax_cpu.plot(x, [p.get("rows_per_server_cpu_s", 0)], marker, label=label)
    for a, ylabel, title in ((ax, "rows/s (wall clock)", "Engine limit and the servers at their batch size"),
                             (ax_cpu, "rows per CPU-second of the server process",
                              "The same per CPU-second (robust to the machine's load)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("rows per inference call")
        a.set_ylabel(ylabel)
        a.set_title(title, fontsize=10)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "engine.png", dpi=110)
    plt.close(fig)
    written.append("engine.png")
    return written
