"""Multi-seed experiment runs behind the tables in ``docs/``: resumable, one run dir per (model, seed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT = REPO_ROOT / "data"
RUNS_ROOT = REPO_ROOT / "runs"
CONFIGS = REPO_ROOT / "configs"


def generator_fingerprint() -> str:
    """Short hash of the synthetic generator's parameters: a changed generator gets new data dirs
    (and so new run dirs), never tables mixing two versions of the data."""
    from mtrank.training.synth import SynthParams

    blob = json.dumps(dataclasses.asdict(SynthParams()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def ensure_data(seed: int, rows: int = 200_000) -> Path:
    """``data/synth-<rows/1000>k-s<seed>-<generator fingerprint>``, generated once (temp dir, rename)."""
    from mtrank.training.synth import generate

    out = DATA_ROOT / f"synth-{rows // 1000}k-s{seed}-{generator_fingerprint()}"
    if not (out / "spec.yaml").is_file():
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        generate(tmp, rows=rows, seed=seed)
        if not (out / "spec.yaml").is_file():
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        else:
            shutil.rmtree(tmp)
    return out


def ensure_run(
    model: str, seed: int, data_dir: Path, baseline: Path | None = None, tag: str = ""
) -> dict[str, Any]:
    """Train ``model`` with ``configs/<model>.yaml`` on ``data_dir`` unless its metrics.json exists."""
    from mtrank.training.trainer import train

    run_dir = RUNS_ROOT / f"{data_dir.name}" / f"{model}{tag}"
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        config = CONFIGS / f"{model}.yaml"
        train(
            model, data_dir, run_dir, config_path=config if config.is_file() else None, seed=seed,
            baseline=baseline, progress=False,
        )
        print(f"trained {model} seed {seed}: {json.loads(metrics.read_text())['train_seconds']} s", flush=True)
    return json.loads(metrics.read_text())


def mean_std(values: list[float | None], digits: int = 4) -> str:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return "–"
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_generated_block(doc: Path, begin: str, end: str, body: list[str], title: str) -> str:
    """Replace the lines between the ``begin`` and ``end`` markers of ``doc`` with ``body`` (a new
    page titled ``title`` when ``doc`` does not exist yet); returns the block written."""
    generated = "\n".join([begin, "", *body, "", end])
    text = doc.read_text() if doc.is_file() else f"# {title}\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: markers {begin!r} / {end!r} not found")
    head, rest = text.split(begin, 1)
    doc.write_text(head + generated + rest.split(end, 1)[1])
    return generated


def mtrank(*args: str) -> str:
    """``mtrank ARGS`` in a subprocess (this interpreter's install); its stdout. A failure stops the
    experiment with the command and the end of its stderr."""
    done = subprocess.run([sys.executable, "-m", "mtrank.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mtrank {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout
