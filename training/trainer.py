"""Training loop: in-memory minibatches, masked multi-task loss, early stopping on validation loss."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mtrank.spec import Facet, FeatureSpec, SpecError
from training.checkpoint import config_hash, save_run
from training.features import Preprocessor
from training.losses import LossWeighting, masked_task_losses
from training.models.base import MultiTaskModel
from training.models.registry import create_model, make_config


@dataclass
class TrainConfig:
    epochs: int = 4
    """Upper bound on passes over the training split."""
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 1
    """Epochs without validation-loss improvement before stopping; the best epoch is kept."""
    seed: int = 0
    loss_weighting: str = "static"
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
    def __init__(self, model: MultiTaskModel, cfg: TrainConfig):
        self.model = model
        self.cfg = cfg
        spec = model.spec
        task_index = {t.name: k for k, t in enumerate(spec.tasks)}
        self.head_task = torch.tensor([task_index[h.task] for h in model.heads])
        self.is_binary = torch.tensor([spec.task(h.task).type == "binary" for h in model.heads])
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
        return masked_task_losses(logits, batch.labels[:, self.head_task], masks, self.is_binary)

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
def predict(model: MultiTaskModel, t: Tensors, batch_size: int = 8192) -> tuple[np.ndarray, dict[str, Any]]:
    """Probabilities ``[N, n_tasks]`` from each row's own group's (and item value's) heads, plus
    gate utilisation: per gate, the mean and std over rows of each expert's weight."""
    model.eval()
    outs, gate_sum, gate_sq, n = [], {}, {}, 0
    for idx in torch.arange(len(t)).split(batch_size):
        gates: dict[str, torch.Tensor] = {}
        logits = model(t.dense[idx], t.sparse[idx], gates=gates)
        item = None if t.item is None else t.item[idx]
        outs.append(torch.sigmoid(model.own_task_logits(logits, t.group[idx], item)))
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


def evaluate(model: MultiTaskModel, frame: pd.DataFrame, pre: Preprocessor) -> dict[str, Any]:
    from training import metrics as metrics_lib

    probs, gates = predict(model, to_tensors(frame, model.spec, pre))
    preds = {t.name: probs[:, k] for k, t in enumerate(model.spec.tasks)}
    report = metrics_lib.evaluate_predictions(frame, preds, model.spec)
    report["gates"] = gates
    return report


def load_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(doc) - {"model", "train", "name"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)} (expected model, train)")
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
) -> dict[str, Any]:
    """Train ``model_name`` on ``data_dir``, write the run directory, return metrics.json's content."""
    from training import data as data_io
    from training import metrics as metrics_lib

    doc = load_config_file(config_path)
    if doc.get("name", model_name) != model_name:
        raise ValueError(f"{config_path} is a config for {doc['name']!r}, not {model_name!r}")
    model_cfg = make_config(model_name, doc.get("model"))
    train_values = dict(doc.get("train") or {})
    if epochs is not None:
        train_values["epochs"] = epochs
    if seed is not None:
        train_values["seed"] = seed
    cfg = TrainConfig(**train_values)

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    spec = data_io.load_spec(data_dir, spec_path)
    train_frame = data_io.load_split(data_dir, "train", spec)
    valid_frame = data_io.load_split(data_dir, "valid", spec)
    test_frame = data_io.load_split(data_dir, "test", spec)

    pre = Preprocessor.fit(spec, train_frame)
    model = create_model(model_name, spec, pre.shape, model_cfg)
    trainer = Trainer(model, cfg)
    started = time.perf_counter()
    fit = trainer.fit(to_tensors(train_frame, spec, pre), to_tensors(valid_frame, spec, pre), progress)
    train_seconds = time.perf_counter() - started

    report = evaluate(model, test_frame, pre)
    train_sample = train_frame.sample(n=min(cfg.eval_train_rows, len(train_frame)), random_state=cfg.seed)
    report["train"] = {k: v for k, v in evaluate(model, train_sample, pre).items() if k != "gates"}
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
        "config_hash": config_hash(model_name, model_cfg, cfg, spec),
        "data": str(data_dir),
    }
    save_run(out_dir, model, pre, meta)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report
