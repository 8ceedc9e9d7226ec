"""What ``mtrank tune-fusion`` writes: ``report.json``, ``buckets.json``, the search-history and
per-task plots, and ``report.md`` (see :mod:`mtrank.training.fusion_tuning` for the search)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def write_outputs(out_dir: Path, report: dict[str, Any]) -> None:
    """buckets.json, report.json, report.md and the two plots it shows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "buckets.json").write_text(json.dumps(report["buckets"], indent=2) + "\n")
    (out_dir / "report.json").write_text(json.dumps(_no_nan(report), indent=2, allow_nan=False) + "\n")
    plot_history(report, out_dir / "objective.png")
    plot_tasks(report, out_dir / "tasks.png")
    (out_dir / "report.md").write_text(render_markdown(report))


def _no_nan(x: Any) -> Any:
    """NaN (a metric without a usable list) as JSON null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def plot_history(report: dict[str, Any], path: Path) -> None:
    """Valid objective of every evaluation, the best feasible so far, and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["history"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [h["evaluation"] for h in hist]
    ok = [h for h in hist if h["feasible"]]
    bad = [h for h in hist if not h["feasible"]]
    ax.scatter([h["evaluation"] for h in ok], [h["objective"] for h in ok], s=8, alpha=0.5, label="candidate")
    if bad:
        ax.scatter([h["evaluation"] for h in bad], [h["objective"] for h in bad], s=8, alpha=0.5, marker="x",
                   color="tab:red", label="breaks a guardrail")
    ax.plot(xs, [h["best"] for h in hist], color="tab:green", label="best feasible so far")
    ax.axhline(report["baseline"]["valid"], color="gray", linestyle="--", label="baseline (control)")
    obj = report["objective"]
    ax.set_xlabel("evaluation")
    ax.set_ylabel(f"{obj['name']}@{obj['k']} on {report['splits']['search']} ({obj['unit']})")
    ax.set_title("fusion search: objective per evaluation")
    best, base = max(h["best"] for h in hist), report["baseline"]["valid"]
    spread = max(abs(best - base), 1e-6)
    ax.set_ylim(base - 4 * spread, best + 1.5 * spread)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tasks(report: dict[str, Any], path: Path) -> None:
    """Each task's held-out NDCG@k, baseline vs tuned (and on the oracle where present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["guardrails"]
    oracle = all("baseline_heldout_oracle" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if oracle else 1, figsize=(10 if oracle else 6, 4), squeeze=False)
    x = np.arange(len(rows))
    panels = [("labels", "baseline_heldout", "tuned_heldout")]
    if oracle:
        panels.append(("oracle", "baseline_heldout_oracle", "tuned_heldout_oracle"))
    for ax, (title, b, t) in zip(axes[0], panels, strict=True):
        ax.bar(x - 0.2, [r[b] for r in rows], 0.4, label="baseline (control)", color="gray")
        ax.bar(x + 0.2, [r[t] for r in rows], 0.4, label="tuned (treatment)", color="tab:green")
        ax.set_xticks(x, [r["task"] if r["gain"] == "label" else f"1−{r['task']}" for r in rows])
        ax.set_ylabel(f"NDCG@{report['objective']['k']} on {report['splits']['heldout']}")
        ax.set_title(f"per-task NDCG ({title})")
        lo = min(min(r[b], r[t]) for r in rows)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f} %"


def render_markdown(report: dict[str, Any]) -> str:
    cfg, obj, base, tuned, imp = report["config"], report["objective"], report["baseline"], report["tuned"], \
        report["improvement"]
    name = f"{obj['name']}@{obj['k']}"
    lines = [
        "# Fusion tuning report",
        "",
        f"Run `{report['run']}`, data `{report['data']}`; objective **{name}** ({obj['unit']})"
        + (f" of the value `{cfg['value']}`" if cfg["value"] else "")
        + f"; ranking lists by `{report['group_by']}`; CMA-ES, {report['search']['evaluations']} evaluations "
        f"on `{report['splits']['search']}` in {report['search']['seconds']} s, seed {cfg['seed']}"
        + (f"; guardrail: no task's NDCG@{obj['k']} drops more than {cfg['max_task_loss']} %"
           if cfg["max_task_loss"] is not None else "")
        + ".",
        "",
        "| split | lists | rows | mean list size |",
        "|---|---|---|---|",
        *[f"| {s} | {v['lists']} | {v['rows']} | {v['mean_size']} |" for s, v in report["lists"].items()],
        "",
        f"| {name} | baseline (control) | tuned (treatment) | change |",
        "|---|---|---|---|",
        f"| {report['splits']['search']} (searched) | {_fmt(base['valid'])} | {_fmt(tuned['valid'])} | "
        f"{_pct(imp['valid'])} |",
        f"| {report['splits']['heldout']}, labels | {_fmt(base['heldout'])} | {_fmt(tuned['heldout'])} | "
        f"{_pct(imp['heldout'])} |",
    ]
    if base["heldout_oracle"] is not None:
        lines.append(f"| {report['splits']['heldout']}, oracle | {_fmt(base['heldout_oracle'])} | "
                     f"{_fmt(tuned['heldout_oracle'])} | {_pct(imp['heldout_oracle'])} |")
    if not report["found_better"]:
        lines += ["", "**No candidate beat the baseline" + (" within the guardrails" if cfg["max_task_loss"] is not None
                                                          else "") + ": the treatment repeats the control.**"]
    lines += ["", "| task | control weight | treatment weight |", "|---|---|---|"]
    for t, w in base["weights"].items():
        lines.append(f"| {t} | {w:g} | {tuned['weights'].get(t, 0.0):g} |")
    lines += ["", f"Treatment f(video_len): `{json.dumps(tuned['length_fn'])}`; control: `none`. "
              f"Buckets: `buckets.json` (control {report['buckets'][0]['share']:g} %, "
              f"treatment {report['buckets'][1]['share']:g} %).", ""]
    lines += [
        f"### Guardrails: each task's own NDCG@{obj['k']}",
        "",
        "| task | gain | valid base | valid tuned | valid change | test base | test tuned | test change "
        "| oracle base | oracle tuned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["guardrails"]:
        lines.append(
            f"| {r['task']} | {r['gain']} | {_fmt(r['baseline_valid'])} | {_fmt(r['tuned_valid'])} | "
            f"{_pct(r['change_valid_pct'])} | {_fmt(r['baseline_heldout'])} | {_fmt(r['tuned_heldout'])} | "
            f"{_pct(r['change_heldout_pct'])} | {_fmt(r.get('baseline_heldout_oracle'))} | "
            f"{_fmt(r.get('tuned_heldout_oracle'))} |"
        )
    lines += ["", "![objective per evaluation](objective.png)", "", "![per-task NDCG](tasks.png)", ""]
    return "\n".join(lines)
