"""The benchmark's models: synthetic data → train → export, each step skipped when its output exists.

``mtrank bench --prepare`` calls :func:`ensure_model` when ``REPO/NAME`` has no version yet, so the
documented bench is one command on a fresh checkout. The model is the demo-sized one: 100 000
synthetic rows (seed 1), the model's default configuration (``configs/ple.yaml`` holds the same
values) trained for one epoch (speed work needs a real graph, not a converged one). Everything it
needs is package code, so it runs from any install.

The history workload (:mod:`mtrank.bench.history`) has a model of its own, :data:`HISTORY_MODEL`: PLE
trained the same way on ``mtrank synth --history`` data (users' 50-entry histories under target
attention, items' tags), in a repository beside the bench's (:func:`history_repo_for`), so that the
servers of the other sections load exactly the model they always did.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROWS = 100_000
SEED = 1
EPOCHS = 1
HISTORY_MODEL = "ple_history"
"""The history workload's model name (a PLE)."""
HISTORY_ARCH = "ple"


def _step(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def data_dir_for(repo: Path, history: bool = False) -> Path:
    """Where the benchmark's synthetic data lives: beside the repository (``bench/data``, or
    ``bench/data-history`` for the history workload)."""
    return Path(repo).resolve().parent / ("data-history" if history else "data")


def history_repo_for(repo: Path) -> Path:
    """The history workload's model repository beside the bench's: ``bench/repo`` → ``bench/repo-history``."""
    repo = Path(repo)
    return repo.parent / f"{repo.name}-history"


def ensure_model(repo: Path, model: str, rows: int = ROWS, seed: int = SEED, epochs: int = EPOCHS,
                 arch: str | None = None, history: bool = False) -> Path:
    """``repo/model/<newest>``, made first if missing; returns the version directory. ``arch``: the
    registered model to train (default ``model``); ``history``: on ``mtrank synth --history`` data."""
    from mtrank.manifest import list_versions, version_dir

    repo = Path(repo)
    if list_versions(repo, model):
        return version_dir(repo, model)
    data_dir = data_dir_for(repo, history)
    run_dir = repo.resolve().parent / f"run-{model}"
    if not (data_dir / "spec.yaml").is_file():
        from mtrank.training.synth import generate

        _step(f"generating {rows} synthetic impressions{' with histories' if history else ''} into {data_dir}")
        generate(data_dir, rows=rows, seed=seed, history=history)
    if not (run_dir / "checkpoint.json").is_file():
        from mtrank.training.trainer import train

        _step(f"training {arch or model} for {epochs} epoch(s) into {run_dir}")
        train(arch or model, data_dir, run_dir, epochs=epochs, seed=seed)
    from mtrank.export.exporter import export_run

    _step(f"exporting {model} to {repo}")
    return export_run(run_dir, repo, name=model)


def ensure_history_model(repo: Path, rows: int = ROWS, seed: int = SEED, epochs: int = EPOCHS) -> Path:
    """The history workload's model (:data:`HISTORY_MODEL` in :func:`history_repo_for` ``repo``), made
    first if missing; returns its version directory."""
    return ensure_model(history_repo_for(repo), HISTORY_MODEL, rows, seed, epochs, arch=HISTORY_ARCH, history=True)


if __name__ == "__main__":
    print(ensure_model(Path(sys.argv[1]), sys.argv[2]))
