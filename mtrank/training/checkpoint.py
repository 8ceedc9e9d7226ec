"""A run directory: everything needed to rebuild and evaluate a trained model; and a run in progress.

``RUN/checkpoint.json`` (model name and config, train config, feature spec, input shape, config
hash), ``RUN/model.safetensors`` (weights: no pickle), ``RUN/preprocess.json`` + ``RUN/vocab/``,
``RUN/metrics.json``. The run directory appears only when training is done (:func:`publish_run`).

While training, rank 0 keeps ``RUN.partial/``: ``job.json`` (what ``--resume`` needs to rebuild the
job), the fitted preprocessing, and ``state/<name>/`` checkpoints (model with loss weighting,
optimiser, best weights so far: safetensors; epoch, step, early-stopping state, RNG, rows seen:
JSON) with ``LATEST`` naming the newest complete one. A checkpoint is written into a temporary
directory, renamed, then ``LATEST`` is replaced: a kill at any moment leaves the previous one usable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mtrank.spec import FeatureSpec, SpecError
from mtrank.training.features import Preprocessor
from mtrank.training.models.base import InputShape, MultiTaskModel
from mtrank.training.models.registry import create_model, make_config
from mtrank.training.outputs import TaskOutput, default_outputs

FORMAT = 1


def config_hash(model_name: str, model_config: Any, train_config: Any, spec: FeatureSpec) -> str:
    blob = json.dumps(
        {
            "model": model_name,
            "model_config": dataclasses.asdict(model_config),
            "train_config": dataclasses.asdict(train_config),
            "spec": spec.fingerprint(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Run:
    model: MultiTaskModel
    spec: FeatureSpec
    preprocessor: Preprocessor
    meta: dict[str, Any]
    outputs: list[TaskOutput]
    """Per task, how a logit becomes a label-unit prediction (``meta["outputs"]``)."""


def save_run(run_dir: Path, model: MultiTaskModel, preprocessor: Preprocessor, meta: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    preprocessor.save(run_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run_dir / "model.safetensors"))
    doc = {
        "format": FORMAT,
        "model": model.kind,
        "spec": model.spec.to_dict(),
        "shape": dataclasses.asdict(model.shape),
        **meta,
    }
    (run_dir / "checkpoint.json").write_text(json.dumps(doc, indent=2, default=str))


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint.json"
    if not path.is_file():
        raise SpecError(f"not a run directory (no checkpoint.json): {run_dir}")
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise SpecError(f"{path}: unsupported checkpoint format {doc.get('format')!r}")
    spec = FeatureSpec.from_dict(doc["spec"])
    shape = InputShape.from_dict(doc["shape"])
    model = create_model(doc["model"], spec, shape, make_config(doc["model"], doc["model_config"], str(path)))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    # Runs written before outputs were fitted used sigmoid outputs on every task.
    outputs = [TaskOutput.from_dict(o) for o in doc["outputs"]] if "outputs" in doc else default_outputs(spec)
    return Run(model=model, spec=spec, preprocessor=Preprocessor.load(spec, run_dir), meta=doc, outputs=outputs)


# -- a run in progress ------------------------------------------------------------------------


def partial_dir(run_dir: Path) -> Path:
    """Where a run in progress keeps its job description and checkpoints: ``RUN.partial``."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + ".partial")


def publish_run(tmp: Path, run_dir: Path) -> None:
    """Move the finished run written in ``tmp`` to ``run_dir``: one rename when ``run_dir`` does not
    exist; otherwise entry by entry (``metrics.json`` last), keeping files the run does not write."""
    if not run_dir.exists():
        os.rename(tmp, run_dir)
        return
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "metrics.json")
    for entry in entries:
        target = run_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, allow_nan=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_train_state(partial: Path, name: str, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write checkpoint ``name`` (a safetensors file per entry of ``tensors``, ``state.json``) and make
    it the one ``LATEST`` names; older checkpoints are removed afterwards."""
    root = partial / "state"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for key, values in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in values.items()}, str(tmp / f"{key}.safetensors"))
    write_json_atomic(tmp / "state.json", state)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    fsync_dir(root)
    latest = partial / "LATEST"
    tmp_latest = partial / ".LATEST.tmp"
    tmp_latest.write_text(name + "\n")
    os.replace(tmp_latest, latest)
    for old in root.iterdir():
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(partial: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    """The checkpoint ``LATEST`` names, or None when the run has none yet."""
    latest = partial / "LATEST"
    if not latest.is_file():
        return None
    folder = partial / "state" / latest.read_text().strip()
    state = json.loads((folder / "state.json").read_text())
    tensors = {p.name.removesuffix(".safetensors"): load_file(str(p)) for p in folder.glob("*.safetensors")}
    return tensors, state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimiser's state as flat tensors (``<param index>.<name>``) and its parameter groups (JSON)."""
    doc = optimizer.state_dict()
    flat = {f"{i}.{k}": v for i, st in doc["state"].items() for k, v in st.items()}
    return flat, doc["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
