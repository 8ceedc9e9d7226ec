"""History table: PLE without the user's history, with it mean-pooled, with target attention.

    nice -n 10 python docs/tables/history_table.py               # train what is missing, print the table
    nice -n 10 python docs/tables/history_table.py --update-doc  # ... and rewrite the block in docs/data.md

Data: ``mtrank synth --history`` (200k rows, seeds 1-3), whose labels depend on how the candidate
matches the user's recent history (docs/data.md). The three variants read the same files through
three specs that differ only in the ``sequence`` section: none, ``mean`` pooling, ``attention``
(target attention against the candidate's item and category). The item's ``tags`` stay in all
three. Resumable: a run whose ``metrics.json`` exists is not retrained. Runs live in
``runs/history-table-<generator fingerprint>/s<seed>/<variant>/`` (git-ignored), data in
``data/synth-history-200k-s<seed>-<fingerprint>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mtrank.training.experiments import DATA_ROOT, generator_fingerprint, mean_std, write_generated_block  # noqa: E402

VARIANTS = ("none", "mean", "attention")
SEEDS = (1, 2, 3)
ROWS = 200_000
DOC = REPO / "docs" / "data.md"
BEGIN, END = "<!-- history_table:begin -->", "<!-- history_table:end -->"


def fingerprint() -> str:
    """The generator's fingerprint with the history parameters': new parameters, new data and runs."""
    import dataclasses
    import hashlib

    from mtrank.training.synth_history import HistoryParams

    blob = json.dumps(dataclasses.asdict(HistoryParams()), sort_keys=True, default=str)
    return f"{generator_fingerprint()}-{hashlib.sha256(blob.encode()).hexdigest()[:6]}"


def ensure_data(seed: int, rows: int) -> Path:
    """The history data set of ``seed``, generated once (temporary directory, then renamed)."""
    from mtrank.training.synth import generate

    out = DATA_ROOT / f"synth-history-{rows // 1000}k-s{seed}-{fingerprint()}"
    if not (out / "spec.yaml").is_file():
        tmp = out.with_name(f".tmp-{uuid.uuid4().hex}")
        generate(tmp, rows=rows, seed=seed, history=True)
        tmp.rename(out)
    return out


def variant_data(data: Path, variant: str) -> Path:
    """``data`` seen through the variant's spec: the same split files, the sequence section changed."""
    out = data.parent / f"{data.name}-{variant}"
    if (out / "spec.yaml").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for p in data.iterdir():
        if p.name != "spec.yaml" and not (out / p.name).exists():
            (out / p.name).symlink_to(p.resolve())
    spec = yaml.safe_load((data / "spec.yaml").read_text())
    if variant == "none":
        spec.pop("sequence", None)
    else:
        spec["sequence"] = [{**s, "pooling": variant} for s in spec.get("sequence", [])]
    (out / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def ensure_run(variant: str, seed: int, data: Path, runs: Path, threads: int) -> dict:
    from mtrank.training.trainer import train

    run_dir = runs / f"s{seed}" / variant
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        doc = yaml.safe_load((REPO / "configs" / "ple.yaml").read_text())
        doc["train"] = {**doc.get("train", {}), "threads": threads, "seed": seed}
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_dir / "table-config.yaml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        report = train("ple", variant_data(data, variant), run_dir, config_path=config, progress=False)
        print(f"trained {variant} seed {seed}: {report['train_seconds']} s, {report['epochs_run']} epochs", flush=True)
    return json.loads(metrics.read_text())


def average_auc(report: dict) -> float:
    aucs = [t["auc"] for t in report["tasks"].values() if t.get("auc") is not None]
    return sum(aucs) / len(aucs)


def oracle_auc(report: dict) -> float | None:
    aucs = [t.get("oracle_auc") for t in report["tasks"].values() if t.get("auc") is not None]
    return sum(aucs) / len(aucs) if aucs and None not in aucs else None


def table(results: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| variant | average test AUC (binary tasks), mean ± std over seeds 1-3 | per seed | Δ vs none |",
             "| --- | --- | --- | --- |"]
    none = [average_auc(results["none"][s]) for s in SEEDS]
    for variant in VARIANTS:
        values = [average_auc(results[variant][s]) for s in SEEDS]
        delta = [v - n for v, n in zip(values, none, strict=True)]
        lines.append(f"| PLE, history {variant} | {mean_std(values)} | {', '.join(f'{v:.4f}' for v in values)} | "
                     f"{mean_std(delta)} |")
    ceiling = [oracle_auc(results["none"][s]) for s in SEEDS]
    if None not in ceiling:
        lines.append(f"| oracle (the generator's probabilities) | {mean_std(ceiling)} | "
                     f"{', '.join(f'{v:.4f}' for v in ceiling)} | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per training run")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows per data set")
    parser.add_argument("--update-doc", action="store_true", help=f"rewrite the table block in {DOC}")
    args = parser.parse_args()
    runs = REPO / "runs" / f"history-table-{fingerprint()}"
    results: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for seed in SEEDS:
        data = ensure_data(seed, args.rows)
        for variant in VARIANTS:
            results[variant][seed] = ensure_run(variant, seed, data, runs, args.threads)
    lines = table(results)
    print("\n".join(lines))
    if args.update_doc:
        print(write_generated_block(DOC, BEGIN, END, lines, "docs/tables/history_table.py"))


if __name__ == "__main__":
    main()
