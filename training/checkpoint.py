"""A run directory: everything needed to rebuild and evaluate a trained model.

``RUN/checkpoint.json`` (model name and config, train config, feature spec, input shape, config
hash), ``RUN/model.safetensors`` (weights: no pickle), ``RUN/preprocess.json`` + ``RUN/vocab/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from mtrank.spec import FeatureSpec, SpecError
from training.features import Preprocessor
from training.models.base import InputShape, MultiTaskModel
from training.models.registry import create_model, make_config
from training.outputs import TaskOutput, default_outputs

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
    shape = InputShape(n_dense=doc["shape"]["n_dense"], vocab_sizes=tuple(doc["shape"]["vocab_sizes"]))
    model = create_model(doc["model"], spec, shape, make_config(doc["model"], doc["model_config"], str(path)))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    # Runs written before outputs were fitted used sigmoid outputs on every task.
    outputs = [TaskOutput.from_dict(o) for o in doc["outputs"]] if "outputs" in doc else default_outputs(spec)
    return Run(model=model, spec=spec, preprocessor=Preprocessor.load(spec, run_dir), meta=doc, outputs=outputs)
