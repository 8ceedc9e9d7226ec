"""The benchmark's model: synthetic data → train → export, each step skipped when its output exists.

``mtrank bench --prepare`` calls :func:`ensure_model` when ``REPO/NAME`` has no version yet, so the
documented bench is one command on a fresh checkout. The model is the demo-sized one: 100 000
synthetic rows (seed 1), the model's default configuration (``configs/ple.yaml`` holds the same
values) trained for one epoch (speed work needs a real graph, not a converged one). Everything it
needs is package code, so it runs from any install.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROWS = 100_000
SEED = 1
EPOCHS = 1


def _step(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def data_dir_for(repo: Path) -> Path:
    """Where the benchmark's synthetic data lives: beside the repository (``bench/data``)."""
    return Path(repo).resolve().parent / "data"


def ensure_model(repo: Path, model: str, rows: int = ROWS, seed: int = SEED, epochs: int = EPOCHS) -> Path:
    """``repo/model/<newest>``, made first if missing; returns the version directory."""
    from mtrank.manifest import list_versions, version_dir

    repo = Path(repo)
    if list_versions(repo, model):
        return version_dir(repo, model)
    data_dir = data_dir_for(repo)
    run_dir = repo.resolve().parent / f"run-{model}"
    if not (data_dir / "spec.yaml").is_file():
        from mtrank.training.synth import generate

        _step(f"generating {rows} synthetic impressions into {data_dir}")
        generate(data_dir, rows=rows, seed=seed)
    if not (run_dir / "checkpoint.json").is_file():
        from mtrank.training.trainer import train

        _step(f"training {model} for {epochs} epoch(s) into {run_dir}")
        train(model, data_dir, run_dir, epochs=epochs, seed=seed)
    from mtrank.export.exporter import export_run

    _step(f"exporting {model} to {repo}")
    return export_run(run_dir, repo, name=model)


if __name__ == "__main__":
    print(ensure_model(Path(sys.argv[1]), sys.argv[2]))
