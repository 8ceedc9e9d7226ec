"""STEM table: like AUC on the STEM paper's like/finish subsets, 3 seeds of 200k synthetic rows.

    nice -n 10 python docs/tables/stem_table.py            # train what is missing, print the tables
    nice -n 10 python docs/tables/stem_table.py --update-doc  # ... and rewrite the block in docs/stem.md

Resumable: a run whose ``metrics.json`` exists is not retrained, and one that already has its
``stem_subsets`` is not re-evaluated. Runs live in ``runs/stem-table-<generator fingerprint>/s<seed>/<variant>/``
(git-ignored), data in ``data/synth-200k-s<seed>/`` (generated when missing). Every run gets the
train section of its config with ``threads`` set by ``--threads`` (default 1: on a shared 2-core
machine two intra-op threads spin-wait and run several times slower) and ``seed`` = data seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from mtrank.training.experiments import generator_fingerprint, mean_std

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PAIR = ("like", "finish")
# variant -> (registered model, config file); the config's `name` is the model.
VARIANTS = {
    "single": ("single", "single.yaml"),
    "mmoe": ("mmoe", "mmoe.yaml"),
    "ple": ("ple", "ple.yaml"),
    "stem": ("stem", "stem.yaml"),
    "stem_no_sg": ("stem", "stem_no_stop_gradient.yaml"),
    "me_ple": ("me_ple", "me_ple.yaml"),
}
SUBSET_LABELS = {
    "a_overwhelming": "like-overwhelming",
    "comparable": "comparable",
    "b_overwhelming": "finish-overwhelming",
}
DOC = REPO / "docs" / "stem.md"
BEGIN, END = "<!-- stem_table:begin -->", "<!-- stem_table:end -->"


def ensure_data(seed: int, rows: int) -> Path:
    from mtrank.training.experiments import ensure_data as shared_ensure_data

    return shared_ensure_data(seed, rows)


def run_config(variant: str, seed: int, threads: int, run_dir: Path) -> Path:
    """The variant's config with this table's seed and thread count, written beside the run."""
    model, filename = VARIANTS[variant]
    path = REPO / "configs" / filename
    if path.is_file():
        doc = yaml.safe_load(path.read_text())
    else:  # the model's defaults, trained like stem
        doc = {"name": model, "train": yaml.safe_load((REPO / "configs" / "stem.yaml").read_text())["train"]}
    doc["train"] = {**doc.get("train", {}), "threads": threads, "seed": seed}
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "table-config.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def ensure_run(variant: str, seed: int, data: Path, runs: Path, threads: int, reevaluate: bool) -> dict:
    from mtrank.training.evaluate import evaluate_run
    from mtrank.training.trainer import train

    run_dir = runs / f"s{seed}" / variant
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        config = run_config(variant, seed, threads, run_dir)
        report = train(VARIANTS[variant][0], data, run_dir, config_path=config, progress=False)
        print(f"trained {variant} seed {seed}: {report['train_seconds']} s, {report['epochs_run']} epochs", flush=True)
    report = json.loads(metrics.read_text())
    if reevaluate or "stem_subsets" not in report:
        report = evaluate_run(run_dir, data, baseline=runs / f"s{seed}" / "single", stem_pair=",".join(PAIR))
    return report


def subset(report: dict, name: str) -> dict:
    return report["stem_subsets"]["subsets"][name]


def tables(results: dict[str, list[dict]], seeds: list[int]) -> str:
    names = list(SUBSET_LABELS)
    head = " | ".join(f"like AUC, {SUBSET_LABELS[s]}" for s in names)
    main = [
        f"| model | {head} | avg AUC (5 binary tasks) | params (embeddings + network) |",
        "|---" * 6 + "|",
    ]
    for variant, runs in results.items():
        cells = [mean_std([subset(r, s)["auc"][PAIR[0]] for r in runs]) for s in names]
        counts = runs[0]["param_counts"]
        cells += [
            mean_std([r["avg_auc"] for r in runs]),
            f"{counts['total']:,} ({counts['embeddings']:,} + {counts['network']:,})",
        ]
        main.append(f"| {variant} | " + " | ".join(cells) + " |")
    runs = results["single"]
    if "oracle_auc" in subset(runs[0], "comparable"):
        cells = [mean_std([subset(r, s)["oracle_auc"][PAIR[0]] for r in runs]) for s in names]
        cells += [mean_std([r.get("avg_oracle_auc") for r in runs]), "–"]
        main.append("| *oracle (true probabilities)* | " + " | ".join(cells) + " |")

    delta = [f"| model | {head.replace('like AUC', 'Δ like AUC')} | Δ avg AUC |", "|---" * 5 + "|"]
    for variant, runs in results.items():
        if variant == "single":
            continue
        cells = [
            mean_std([subset(r, s)["auc"][PAIR[0]] - subset(r, s)["baseline_auc"][PAIR[0]] for r in runs])
            for s in names
        ]
        cells.append(mean_std([r["avg_auc"] - b["avg_auc"] for r, b in zip(runs, results["single"], strict=True)]))
        delta.append(f"| {variant} | " + " | ".join(cells) + " |")

    first = next(iter(results.values()))
    sizes = [
        "| seed | " + " | ".join(f"{SUBSET_LABELS[s]}: rows (like positives)" for s in names) + " |",
        "|---" * 4 + "|",
    ]
    for seed, r in zip(seeds, first, strict=True):
        cells = [f"{subset(r, s)['rows']} ({subset(r, s)['positives'][PAIR[0]]})" for s in names]
        sizes.append(f"| {seed} | " + " | ".join(cells) + " |")

    times = [
        "| model | " + " | ".join(f"seed {s}: train s (epochs)" for s in seeds) + " |",
        "|---" * (1 + len(seeds)) + "|",
    ]
    for variant, runs in results.items():
        times.append(
            f"| {variant} | " + " | ".join(f"{r['train_seconds']:.0f} ({r['epochs_run']})" for r in runs) + " |"
        )
    return (
        "Like AUC on the test split's subsets (mean ± std over seeds "
        + ", ".join(map(str, seeds))
        + "):\n\n"
        + "\n".join(main)
        + "\n\nPaired difference to `single` on the same rows and seed (positive: better than single):\n\n"
        + "\n".join(delta)
        + "\n\nSubset sizes (test split, buckets from `single`'s predictions):\n\n"
        + "\n".join(sizes)
        + "\n\nTraining time per run (wall seconds on the shared 2-core machine, 1 thread):\n\n"
        + "\n".join(times)
        + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / f"stem-table-{generator_fingerprint()}")
    p.add_argument("--reevaluate", action="store_true", help="recompute the subsets of existing runs")
    p.add_argument("--update-doc", action="store_true", help=f"rewrite the table block of {DOC.relative_to(REPO)}")
    a = p.parse_args()
    variants = ["single", *(v for v in a.variants if v != "single")]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in a.seeds:
        data = ensure_data(seed, a.rows)
        for variant in variants:
            results[variant].append(ensure_run(variant, seed, data, a.runs, a.threads, a.reevaluate))
    text = tables(results, a.seeds)
    print(text)
    if a.update_doc:
        doc = DOC.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:start] + "\n" + text + doc[end:])


if __name__ == "__main__":
    main()
