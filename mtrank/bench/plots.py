"""The PNG plots of a bench run: latency against throughput per request size, and the engine curve with
the servers' best points on it. Without matplotlib no plot is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtrank.bench.markdown import engine_label
from mtrank.bench.report import LoadPoint, Report


def write_plots(report: Report, out: Path) -> list[str]:
    """Writes ``latency_throughput.png`` and ``engine.png`` under ``out``; returns their names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    _latency_throughput(plt, report, out / "latency_throughput.png")
    _engine(plt, report, out / "engine.png")
    return ["latency_throughput.png", "engine.png"]


def _latency_throughput(plt: Any, report: Report, path: Path) -> None:
    """p50 and p99 (ms, log scale) against rows/s, one panel per request size, the tail points starred."""
    sizes = sorted({p.size for p in report.service})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for name, points, color in (("batching", report.service, "tab:blue"), ("naive", report.naive, "tab:red")):
            pts = sorted((p for p in points if p.size == size), key=lambda p: p.concurrency)
            if not pts:
                continue
            x = [p.rows_per_s for p in pts]
            ax.plot(x, [p.p99_ms for p in pts], "o-", color=color, label=f"{name} p99")
            ax.plot(x, [p.p50_ms for p in pts], "s--", color=color, alpha=0.6, label=f"{name} p50")
            for p in pts:
                ax.annotate(str(p.concurrency), (p.rows_per_s, p.p99_ms), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        for p in report.tail:
            if p.size == size:
                ax.plot([p.rows_per_s], [p.p99_ms], "k*", markersize=10, label="p99 at 70 % (open loop)")
        ax.set_yscale("log")
        ax.set_title(f"{size} candidates / request")
        ax.set_xlabel("rows/s (candidates scored per second)")
        ax.set_ylabel("latency, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency against throughput (labels: concurrency)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best_per_size(points: list[LoadPoint]) -> dict[int, LoadPoint]:
    """Each size's point of most rows/s."""
    best: dict[int, LoadPoint] = {}
    for p in points:
        if p.rows_per_s > (best[p.size].rows_per_s if p.size in best else 0.0):
            best[p.size] = p
    return best


def _engine(plt: Any, report: Report, path: Path) -> None:
    """The engine's rows/s (wall clock and per CPU-second) against batch size, each server's best point
    per size at its mean batch."""
    fig, (ax, ax_cpu) = plt.subplots(1, 2, figsize=(12, 4.2))
    engines = [report.engine] + ([report.engine_1_thread] if report.engine_1_thread else [])
    for e in engines:
        x = [p.batch for p in e.curve]
        ax.plot(x, [p.rows_per_s for p in e.curve], "o-", label=f"engine, {engine_label(e)}")
        ax_cpu.plot(x, [p.rows_per_cpu_s for p in e.curve], "o-", label=f"engine, {engine_label(e)}")
    for name, points, marker in (("service", report.service, "D"), ("naive", report.naive, "x")):
        for size, p in sorted(_best_per_size(points).items()):
            x = [max(p.mean_batch_rows, 1)]
            label = f"{name} best, {size} cands (c={p.concurrency})"
            ax.plot(x, [p.rows_per_s], marker, label=label)
            ax_cpu.plot(x, [p.rows_per_server_cpu_s], marker, label=label)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
