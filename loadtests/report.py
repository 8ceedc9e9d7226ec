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


def write_markdown(report: dict[str, Any], path: Path) -> None:
    m = report["machine"]
    parts = [
        f"# mtrank bench ({report['mode']} run, {report['started_at']})",
        "",
        f"Model `{report['model']['name']}` v{report['model']['version']} ({report['model']['kind']}, graphs "
        f"{', '.join(report['model']['graphs'])}). Machine: {m.get('model_name', '?')}, {m.get('cpus')} CPUs, "
        f"{m.get('ram_gib', '?')} GiB RAM, {m.get('hypervisor_vendor', 'bare metal?')}; ONNX Runtime "
        f"{m['onnxruntime']}, Python {m['python']}. Load average (1/5/15 min) at start {report['load_at_start']}, "
        f"at end {report['load_at_end']}; the run took {report['seconds']} s. Server, load generator and Redis "
        f"share the machine's cores.",
        "",
        "## Targets",
        "",
        _table(["ratio", "value", "target", "met", "what"],
               [[name, "–" if r["value"] is None else f"{r['value']:.2f}", f"{r['op']} {r['target']}",
                 "yes" if r["met"] else "**no**", r["what"]]
                for name, r in report["ratios"].items()]),
        "",
        f"## Engine: ONNX Runtime alone ({report['engine']['threads']} intra-op thread(s), graph "
        f"`{report['engine']['graph']}`)",
        "",
    ]
    engines = [report["engine"]] + ([report["engine_all_threads"]] if report.get("engine_all_threads") else [])
    header = (["batch"] + [f"rows/s ({e['threads'] or 'all'} thr.)" for e in engines]
              + [f"rows per CPU-s ({e['threads'] or 'all'} thr.)" for e in engines] + ["ms/batch"])
    rows = [[p["batch"]] + [e["curve"][i]["rows_per_s"] for e in engines]
            + [e["curve"][i].get("rows_per_cpu_s", 0.0) for e in engines] + [f"{p['ms_per_batch']:.3f}"]
            for i, p in enumerate(report["engine"]["curve"])]
    parts += [_table(header, rows), ""]
    parts += ["## Service (dynamic batching, Redis store)", "", _points_table(report["service"]), ""]
    if report.get("tail"):
        parts += ["### Open loop at 70 % of the best throughput", "", _points_table(report["tail"]), ""]
    parts += ["## Naive server (MTRANK_BATCHING=false)", "", _points_table(report["naive"]), ""]
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
    engines = [report["engine"]] + ([report["engine_all_threads"]] if report.get("engine_all_threads") else [])
    for e in engines:
        x = [p["batch"] for p in e["curve"]]
        ax.plot(x, [p["rows_per_s"] for p in e["curve"]], "o-", label=f"engine, {e['threads'] or 'all'} thread(s)")
        ax_cpu.plot(x, [p.get("rows_per_cpu_s", 0) for p in e["curve"]], "o-",
                    label=f"engine, {e['threads'] or 'all'} thread(s)")
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
