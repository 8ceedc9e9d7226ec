"""Training loop: in-memory minibatches, masked multi-task loss, early stopping on validation loss."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mtrank.spec import STRICT, Facet, FeatureSpec, SpecError, load_yaml, validate
from training.checkpoint import config_hash, save_run
from training.features import Preprocessor
from training.losses import LossWeighting, masked_task_losses
from training.models.base import MultiTaskModel
from training.models.registry import create_model, make_config
from training.outputs import OutputLayer, TaskOutput, default_outputs, fit_outputs


@dataclass
class TrainConfig:
    """The ``train:`` section of a config file, validated strictly (see mtrank.spec)."""

    __pydantic_config__ = STRICT

    epochs: int = 4
    """Upper bound on passes over the training split."""
    batch_size: int = 1024
    """Rows per optimiser step."""
    lr: float = 2e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    patience: int = 1
    """Epochs without validation-loss improvement before stopping; the best epoch is kept."""
    seed: int = 0
    loss_weighting: Literal["static", "dynamic", "uncertainty"] = "static"
    """static | dynamic (ω_k0·γ_k^t) | uncertainty."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """ω_k0 per task (default 1)."""
    task_gammas: dict[str, float] = field(default_factory=dict)
    """γ_k per task for dynamic weighting (default 1)."""
    threads: int = 1
    """torch intra-op threads; fixed so two runs with one seed give identical results. One is
    fastest for these small MLPs on a shared 2-core machine (two threads spin-wait for a core)."""
    eval_train_rows: int = 50_000
    """Train rows re-scored after training, for the train−test gap."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "threads", "eval_train_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.patience < 0:
            raise ValueError("lr must be > 0, weight_decay and patience >= 0")

    def check_tasks(self, spec: FeatureSpec, source: str) -> None:
        """Task weights and gammas must name the spec's tasks."""
        for key in ("task_weights", "task_gammas"):
            unknown = sorted(set(getattr(self, key)) - set(spec.task_names))
            if unknown:
                raise SpecError(f"{source}: train.{key}.{unknown[0]}: not a task; tasks are {spec.task_names}")


@dataclass
class Tensors:
    """One split, preprocessed: inputs, labels and masks per task, each row's facet value indices."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    space: torch.Tensor
    group: torch.Tensor
    """int64 ``[N]``: index into ``spec.user_groups.values`` (0 without user groups)."""
    item: torch.Tensor | None = None
    """int64 ``[N]``: index into ``spec.item_facet.values``; None when the spec has no item facet."""

    def __len__(self) -> int:
        return self.dense.shape[0]

    def rows(self, idx) -> Tensors:
        return Tensors(
            self.dense[idx],
            self.sparse[idx],
            self.labels[idx],
            self.space[idx],
            self.group[idx],
            None if self.item is None else self.item[idx],
        )


def facet_index(frame: pd.DataFrame, facet: Facet) -> np.ndarray:
    """int64 value index per row: the frame's facet column if present, else the facet's rules on raw features."""
    if facet.column in frame.columns:
        index = frame[facet.column].astype(str).map({v: i for i, v in enumerate(facet.values)})
        if index.isna().any():
            bad = sorted(set(frame[facet.column].astype(str)[index.isna()]))[:5]
            raise SpecError(f"column {facet.column!r} has values {bad} outside {list(facet.values)}")
        return index.to_numpy(np.int64)
    if not facet.rules:
        return np.full(len(frame), facet.values.index(facet.default), dtype=np.int64)
    return facet.assign({r.feature: frame[r.feature].to_numpy(np.float64) for r in facet.rules})


def to_tensors(frame: pd.DataFrame, spec: FeatureSpec, pre: Preprocessor) -> Tensors:
    dense, sparse = pre.transform(frame)
    labels = np.zeros((len(frame), len(spec.tasks)), dtype=np.float32)
    space = np.zeros_like(labels)
    for k, task in enumerate(spec.tasks):
        y = frame[task.label_column].to_numpy(np.float64)
        inside = ~np.isnan(y)
        if task.space is not None:
            inside &= frame[task.space].to_numpy() > 0
        labels[:, k] = np.where(inside, y, 0.0)
        space[:, k] = inside
    group = np.zeros(len(frame), dtype=np.int64) if spec.user_groups is None else facet_index(frame, spec.user_groups)
    arrays = [dense, sparse, labels, space, group]
    if spec.item_facet is not None:
        arrays.append(facet_index(frame, spec.item_facet))
    return Tensors(*(torch.from_numpy(np.require(a, requirements="W")) for a in arrays))


class Trainer:
    """Minibatch training of ``model``; ``outputs`` (one per task, default :func:`default_outputs`)
    say how each head's logit is compared with its label (see training.outputs)."""

    def __init__(self, model: MultiTaskModel, cfg: TrainConfig, outputs: list[TaskOutput] | None = None):
        self.model = model
        self.cfg = cfg
        spec = model.spec
        task_index = {t.name: k for k, t in enumerate(spec.tasks)}
        self.head_task = torch.tensor([task_index[h.task] for h in model.heads])
        self.is_binary = torch.tensor([spec.task(h.task).type == "binary" for h in model.heads])
        outputs = outputs or default_outputs(spec)
        self.head_outputs = OutputLayer([outputs[task_index[h.task]] for h in model.heads])
        self.weighting = LossWeighting(
            cfg.loss_weighting,
            [cfg.task_weights.get(h.task, 1.0) for h in model.heads],
            [cfg.task_gammas.get(h.task, 1.0) for h in model.heads],
        )
        params = list(model.parameters()) + list(self.weighting.parameters())
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def head_losses(self, batch: Tensors) -> torch.Tensor:
        logits = self.model(batch.dense, batch.sparse)
        masks = batch.space[:, self.head_task] * self.model.head_row_mask(batch.group, batch.item)
        out = self.head_outputs
        labels = out.normalise(batch.labels[:, self.head_task])
        return masked_task_losses(out.loss_inputs(logits), labels, masks, self.is_binary)

    def fit(self, train: Tensors, valid: Tensors, progress: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        best, best_state, since_best, history = float("inf"), None, 0, []
        for epoch in range(cfg.epochs):
            self.model.train()
            order = torch.randperm(len(train), generator=gen)
            batches = order.split(cfg.batch_size)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, file=sys.stderr)
            for idx in bar:
                loss = self.weighting(self.head_losses(train.rows(idx)), epoch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            val = self.validation_loss(valid)
            history.append({"epoch": epoch + 1, "valid_loss": val})
            if progress:
                print(f"epoch {epoch + 1}: valid loss {val:.5f}", file=sys.stderr)
            if val < best - 1e-6:
                best, since_best = val, 0
                best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
            else:
                since_best += 1
                if since_best > cfg.patience:
                    break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        return {"history": history, "best_valid_loss": best}

    @torch.no_grad()
    def validation_loss(self, valid: Tensors, batch_size: int = 8192) -> float:
        """Unweighted sum of per-head losses, averaged over rows inside each head's space."""
        self.model.eval()
        total = torch.zeros(len(self.model.heads))
        for idx in torch.arange(len(valid)).split(batch_size):
            batch = valid.rows(idx)
            total += self.head_losses(batch) * len(idx)
        return float(total.sum() / len(valid))


@torch.no_grad()
def predict(
    model: MultiTaskModel, t: Tensors, outputs: list[TaskOutput] | None = None, batch_size: int = 8192
) -> tuple[np.ndarray, dict[str, Any]]:
    """Predictions ``[N, n_tasks]`` in label units (binary: probabilities) from each row's own
    group's (and item value's) heads, plus gate utilisation: per gate, the mean and std over rows
    of each expert's weight. ``outputs``: the run's task outputs (default :func:`default_outputs`)."""
    model.eval()
    to_labels = OutputLayer(outputs or default_outputs(model.spec))
    outs, gate_sum, gate_sq, n = [], {}, {}, 0
    for idx in torch.arange(len(t)).split(batch_size):
        gates: dict[str, torch.Tensor] = {}
        logits = model(t.dense[idx], t.sparse[idx], gates=gates)
        item = None if t.item is None else t.item[idx]
        outs.append(to_labels(model.own_task_logits(logits, t.group[idx], item)))
        for name, w in gates.items():
            gate_sum[name] = gate_sum.get(name, 0) + w.sum(0)
            gate_sq[name] = gate_sq.get(name, 0) + (w**2).sum(0)
        n += len(idx)
    gates_report = {}
    for name, s in gate_sum.items():
        mean = s / n
        std = (gate_sq[name] / n - mean**2).clamp(min=0).sqrt()
        gates_report[name] = {"mean": [round(float(x), 4) for x in mean], "std": [round(float(x), 4) for x in std]}
    return torch.cat(outs).numpy(), gates_report


def evaluate(
    model: MultiTaskModel, frame: pd.DataFrame, pre: Preprocessor, outputs: list[TaskOutput] | None = None
) -> dict[str, Any]:
    from training import metrics as metrics_lib

    probs, gates = predict(model, to_tensors(frame, model.spec, pre), outputs)
    preds = {t.name: probs[:, k] for k, t in enumerate(model.spec.tasks)}
    report = metrics_lib.evaluate_predictions(frame, preds, model.spec)
    report["gates"] = gates
    return report


CONFIG_SECTIONS = ("name", "model", "train")
TRAIN_OVERRIDES = ("lr", "batch_size", "patience", "threads", "loss_weighting", "epochs", "seed")
"""``train:`` keys the command line may override."""


def load_config_file(path: Path | None) -> dict[str, Any]:
    """A config file's sections (``name``, ``model``, ``train``); a bad file is a one-line SpecError."""
    if path is None:
        return {}
    doc = load_yaml(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping with sections {list(CONFIG_SECTIONS)}")
    unknown = sorted(set(doc) - set(CONFIG_SECTIONS))
    if unknown:
        raise SpecError(f"{path}: {unknown[0]}: unknown section (expected {', '.join(CONFIG_SECTIONS)})")
    for key in ("model", "train"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise SpecError(f"{path}: {key}: expected a mapping, got {type(doc[key]).__name__}")
    return doc


def train(
    model_name: str,
    data_dir: Path,
    out_dir: Path,
    config_path: Path | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    baseline: Path | None = None,
    spec_path: Path | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model_name`` on ``data_dir``, write the run directory, return metrics.json's content.

    ``overrides``: ``train:`` values (keys of :data:`TRAIN_OVERRIDES`) that win over the config
    file's, as the command line's ``--lr`` etc. give them. Configs and the spec are validated before
    anything is written: a bad value is one SpecError line naming the file and the key.
    """
    from training import data as data_io
    from training import metrics as metrics_lib

    source = str(config_path) if config_path is not None else "train config"
    doc = load_config_file(config_path)
    if doc.get("name", model_name) != model_name:
        raise SpecError(f"{source}: name: this is a config for {doc['name']!r}, not {model_name!r}")
    model_cfg = make_config(model_name, doc.get("model"), source)
    train_values = dict(doc.get("train") or {})
    extra = {"epochs": epochs, "seed": seed, **(overrides or {})}
    train_values.update({k: v for k, v in extra.items() if v is not None})
    cfg = validate(TrainConfig, train_values, source, prefix="train.")
    spec = data_io.load_spec(data_dir, spec_path)
    cfg.check_tasks(spec, source)

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train_frame = data_io.load_split(data_dir, "train", spec)
    valid_frame = data_io.load_split(data_dir, "valid", spec)
    test_frame = data_io.load_split(data_dir, "test", spec)

    pre = Preprocessor.fit(spec, train_frame)
    model = create_model(model_name, spec, pre.shape, model_cfg)
    train_tensors = to_tensors(train_frame, spec, pre)
    outputs = fit_outputs(spec, train_tensors.labels.numpy(), train_tensors.space.numpy())
    trainer = Trainer(model, cfg, outputs)
    started = time.perf_counter()
    fit = trainer.fit(train_tensors, to_tensors(valid_frame, spec, pre), progress)
    train_seconds = time.perf_counter() - started

    report = evaluate(model, test_frame, pre, outputs)
    train_sample = train_frame.sample(n=min(cfg.eval_train_rows, len(train_frame)), random_state=cfg.seed)
    report["train"] = {k: v for k, v in evaluate(model, train_sample, pre, outputs).items() if k != "gates"}
    report.update(
        model=model_name,
        params=sum(p.numel() for p in model.parameters()),
        train_seconds=round(train_seconds, 2),
        epochs_run=len(fit["history"]),
        history=fit["history"],
    )
    if baseline is not None:
        base = json.loads((Path(baseline) / "metrics.json").read_text())
        report["mtl_gain"] = metrics_lib.mtl_gain(report, base)

    meta = {
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(cfg),
        "outputs": [o.to_dict() for o in outputs],
        "config_hash": config_hash(model_name, model_cfg, cfg, spec),
        "data": str(data_dir),
    }
    save_run(out_dir, model, pre, meta)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report
