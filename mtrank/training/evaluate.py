"""Re-evaluating a trained run: metrics, MTL gain against ``single``, the STEM paper's subsets.

The STEM paper (Su et al., AAAI 2024, §2) splits samples by how much feedback two tasks A and B
are expected to get: each sample's expected feedback for A and for B comes from a single-task
model; each is cut into ``N_BUCKETS`` equal-frequency buckets, and ``d = bucket_A - bucket_B``
puts the sample in

- ``a_overwhelming``: ``d >= OVERWHELMING_GAP`` (A expected to get much more feedback than B),
- ``comparable``: ``|d| < OVERWHELMING_GAP``,
- ``b_overwhelming``: ``d <= -OVERWHELMING_GAP``.

With the gap at 2, comparable means the two buckets differ by at most one. The paper's figure
shows the bucket-difference axis without stating cut-offs in the text we follow, so the gap is
our choice, recorded in every report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mtrank.spec import FeatureSpec, Task
from mtrank.training import metrics as metrics_lib
from mtrank.training.checkpoint import Run, load_run
from mtrank.training.features import Preprocessor
from mtrank.training.models.base import MultiTaskModel
from mtrank.training.outputs import OutputLayer, TaskOutput, default_outputs
from mtrank.training.streaming import Tensors, chunks, to_tensors

N_BUCKETS = 10
OVERWHELMING_GAP = 2
SUBSETS = ("a_overwhelming", "comparable", "b_overwhelming")
# Written by training and not recomputable from a checkpoint: kept when metrics.json is rewritten.
_TRAINING_KEYS = ("train_seconds", "epochs_run", "history", "train")


# -- scoring a model -------------------------------------------------------------------------


class _Scorer:
    """Predictions in label units from each row's own group's heads, and gate utilisation sums."""

    def __init__(self, model: MultiTaskModel, outputs: list[TaskOutput] | None):
        model.eval()
        self.model = model
        self.device = next(model.parameters()).device
        self.to_labels = OutputLayer(outputs or default_outputs(model.spec)).to(self.device)
        self.gate_sum: dict[str, torch.Tensor] = {}
        self.gate_sq: dict[str, torch.Tensor] = {}
        self.n = 0

    @torch.no_grad()
    def __call__(self, t: Tensors, batch_size: int = 8192) -> np.ndarray:
        outs = []
        for part in chunks(t, batch_size):
            b = part.to(self.device)
            gates: dict[str, torch.Tensor] = {}
            logits = self.model(b.dense, b.sparse, gates=gates)
            outs.append(self.to_labels(self.model.own_task_logits(logits, b.group, b.item)).cpu())
            for name, w in gates.items():
                self.gate_sum[name] = self.gate_sum.get(name, 0) + w.sum(0).cpu()
                self.gate_sq[name] = self.gate_sq.get(name, 0) + (w**2).sum(0).cpu()
            self.n += len(part)
        if not outs:
            return np.zeros((0, len(self.model.spec.tasks)), dtype=np.float32)
        return torch.cat(outs).numpy()

    def gates(self) -> dict[str, Any]:
        """Per gate, the mean and std over rows of each expert's weight."""
        report = {}
        for name, s in self.gate_sum.items():
            mean = s / self.n
            std = (self.gate_sq[name] / self.n - mean**2).clamp(min=0).sqrt()
            report[name] = {"mean": [round(float(x), 4) for x in mean], "std": [round(float(x), 4) for x in std]}
        return report


def predict(
    model: MultiTaskModel, t: Tensors, outputs: list[TaskOutput] | None = None, batch_size: int = 8192
) -> tuple[np.ndarray, dict[str, Any]]:
    """Predictions ``[N, n_tasks]`` in label units (binary: probabilities) from each row's own
    group's (and item value's) heads, plus gate utilisation: per gate, the mean and std over rows
    of each expert's weight. ``outputs``: the run's task outputs (default :func:`default_outputs`)."""
    scorer = _Scorer(model, outputs)
    return scorer(t, batch_size), scorer.gates()


def _metric_columns(frame: pd.DataFrame, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """The columns :func:`mtrank.training.metrics.evaluate_predictions` reads, compactly: binary labels and
    spaces as int8 (checked 0/1), facet values as int8 codes; regression labels and oracles as they are."""
    out = {}
    for t in spec.tasks:
        y = frame[t.label_column].to_numpy()
        out[t.label_column] = y.astype(np.int8) if t.type == "binary" else y
        if t.space is not None:
            out[t.space] = frame[t.space].to_numpy().astype(np.int8)
        if f"oracle_{t.name}" in frame.columns:
            out[f"oracle_{t.name}"] = frame[f"oracle_{t.name}"].to_numpy()
    for facet in (spec.user_groups, spec.item_facet):
        if facet is not None:
            out[facet.column] = pd.Categorical(frame[facet.column], categories=list(facet.values)).codes
    return out


def evaluate_frames(
    model: MultiTaskModel, frames: Iterable[pd.DataFrame], pre: Preprocessor, outputs: list[TaskOutput] | None = None,
    rows: int | None = None,
) -> dict[str, Any]:
    """Exact metrics over conformed frames read one at a time: the features are dropped after each
    frame; the predictions and the few columns metrics need are kept (about 90 bytes per row on the
    synthetic data, oracles included), joined column by column at the end. ``rows``: the frames'
    total when known, so the predictions are written in place."""
    spec = model.spec
    scorer = _Scorer(model, outputs)
    probs: list[np.ndarray] = []
    p = None if rows is None else np.empty((rows, len(spec.tasks)), dtype=np.float32)
    done = 0
    parts: dict[str, list[np.ndarray]] = {}
    for frame in frames:
        scores = scorer(to_tensors(frame, spec, pre))
        if p is None:
            probs.append(scores)
        else:
            p[done : done + len(scores)] = scores
        done += len(scores)
        for name, values in _metric_columns(frame, spec).items():
            parts.setdefault(name, []).append(values)
    if p is None:
        p = np.concatenate(probs)
    elif done != rows:
        raise ValueError(f"evaluate_frames: {done} rows read, {rows} expected")
    columns = {name: np.concatenate(parts.pop(name)) for name in list(parts)}
    for facet in (spec.user_groups, spec.item_facet):
        if facet is not None:
            columns[facet.column] = pd.Categorical.from_codes(columns[facet.column], categories=list(facet.values))
    table = pd.DataFrame(columns, copy=False)
    report = metrics_lib.evaluate_predictions(table, {t.name: p[:, k] for k, t in enumerate(spec.tasks)}, spec)
    report["gates"] = scorer.gates()
    return report


def evaluate(
    model: MultiTaskModel, frame: pd.DataFrame, pre: Preprocessor, outputs: list[TaskOutput] | None = None
) -> dict[str, Any]:
    """Metrics of ``model`` on a conformed frame (see :func:`evaluate_frames`)."""
    return evaluate_frames(model, [frame], pre, outputs)


# -- evaluating a run -----------------------------------------------------------------------


def feedback_buckets(expected: np.ndarray, n_buckets: int = N_BUCKETS) -> np.ndarray:
    """Equal-frequency bucket index ``0 .. n_buckets - 1`` per sample (higher = more feedback).

    Edges are the sample quantiles; equal values share a bucket.
    """
    x = np.asarray(expected, dtype=np.float64).ravel()
    edges = np.quantile(x, np.arange(1, n_buckets) / n_buckets)
    return np.searchsorted(edges, x, side="right")


def stem_subsets(
    expected_a: np.ndarray, expected_b: np.ndarray, gap: int = OVERWHELMING_GAP, n_buckets: int = N_BUCKETS
) -> dict[str, np.ndarray]:
    """Boolean row masks of the three subsets (see the module docstring); they partition the rows."""
    d = feedback_buckets(expected_a, n_buckets) - feedback_buckets(expected_b, n_buckets)
    return {"a_overwhelming": d >= gap, "comparable": np.abs(d) < gap, "b_overwhelming": d <= -gap}


def parameter_counts(model: MultiTaskModel) -> dict[str, int]:
    """Trainable parameters: all, in embedding tables, and in the network above them."""
    embeddings = sum(p.numel() for p in model.embeddings.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "embeddings": embeddings, "network": total - embeddings}


def metrics_path(run_dir: Path, split: str) -> Path:
    """``RUN/metrics.json`` for the test split (what training writes), ``RUN/metrics.<split>.json`` otherwise."""
    return run_dir / ("metrics.json" if split == "test" else f"metrics.{split}.json")


def predict_frame(run: Run, frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The run's prediction per task for every row of a conformed frame (each row from its own
    user group's heads), and gate utilisation."""
    probs, gates = predict(run.model, to_tensors(frame, run.spec, run.preprocessor), run.outputs)
    return {t.name: probs[:, k] for k, t in enumerate(run.spec.tasks)}, gates


def _parse_pair(stem_pair: str, run: Run) -> tuple[str, str]:
    names = [s.strip() for s in stem_pair.split(",")]
    if len(names) != 2 or names[0] == names[1]:
        raise ValueError(f"stem_pair must name two different tasks as 'A,B', got {stem_pair!r}")
    for name in names:
        if name not in run.spec.task_names:
            raise ValueError(f"stem_pair: no task {name!r}; tasks are {run.spec.task_names}")
    return names[0], names[1]


def _subset_report(
    frame: pd.DataFrame,
    masks: dict[str, np.ndarray],
    preds: dict[str, np.ndarray],
    base_preds: dict[str, np.ndarray],
    run: Run,
) -> dict[str, Any]:
    binary = [t for t in run.spec.tasks if t.type == "binary"]
    out: dict[str, Any] = {}
    for name, mask in masks.items():
        rows = frame[mask].reset_index(drop=True)
        ours = metrics_lib.evaluate_predictions(rows, {t.name: preds[t.name][mask] for t in binary}, run.spec)
        theirs = metrics_lib.evaluate_predictions(rows, {t.name: base_preds[t.name][mask] for t in binary}, run.spec)
        out[name] = {
            "rows": int(mask.sum()),
            "positives": {t.name: _positives(rows, t) for t in binary},
            "auc": {t.name: ours["tasks"][t.name]["auc"] for t in binary},
            "baseline_auc": {t.name: theirs["tasks"][t.name]["auc"] for t in binary},
        }
        if all("oracle_auc" in ours["tasks"][t.name] for t in binary):
            out[name]["oracle_auc"] = {t.name: ours["tasks"][t.name]["oracle_auc"] for t in binary}
    return out


def _positives(frame: pd.DataFrame, task: Task) -> int:
    """Positive labels of a binary task inside its sample space."""
    y = frame[task.label_column].to_numpy(dtype=np.float64)
    inside = ~np.isnan(y)
    if task.space is not None:
        inside &= frame[task.space].to_numpy(dtype=np.float64) == 1.0
    return int((y[inside] > 0.5).sum())


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    baseline: str | Path | None = None,
    stem_pair: str | None = None,
) -> dict[str, Any]:
    """Recompute a run's metrics on ``split`` of ``data_dir`` and write them (see :func:`metrics_path`).

    ``baseline``: a ``single`` run on the same data; adds ``mtl_gain`` (evaluated on the same rows).
    ``stem_pair="A,B"`` (needs ``baseline``, whose predictions are the expected feedback) adds
    ``stem_subsets``: per subset, its row count, positives and the AUC of every binary task for this
    run (``auc``), the baseline (``baseline_auc``) and, on synthetic data, the true probabilities
    (``oracle_auc``). Training-only fields of an existing ``metrics.json`` (train time, history,
    train-split metrics) are kept; the rest is recomputed.
    """
    if stem_pair is not None and baseline is None:
        raise ValueError("stem_pair needs a baseline: the single-task run whose predictions give the expected feedback")
    from mtrank.training import streaming as dataset

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    run = load_run(run_dir)
    pair = _parse_pair(stem_pair, run) if stem_pair is not None else None
    frame = dataset.load_split(data_dir, split, run.spec)

    preds, gates = predict_frame(run, frame)
    report = metrics_lib.evaluate_predictions(frame, preds, run.spec)
    report["gates"] = gates
    out_path = metrics_path(run_dir, split)
    if out_path.is_file():
        previous = json.loads(out_path.read_text())
        report.update({k: previous[k] for k in _TRAINING_KEYS if k in previous})
    counts = parameter_counts(run.model)
    report.update(model=run.meta["model"], split=split, data=str(data_dir), params=counts["total"], param_counts=counts)

    if baseline is not None:
        base = load_run(baseline)
        if base.spec.fingerprint() != run.spec.fingerprint():
            raise ValueError(f"baseline {baseline} was trained on another feature spec than {run_dir}")
        base_preds, _ = predict_frame(base, frame)
        report["mtl_gain"] = metrics_lib.mtl_gain(report, metrics_lib.evaluate_predictions(frame, base_preds, run.spec))
        if pair is not None:
            a, b = pair
            masks = stem_subsets(base_preds[a], base_preds[b])
            report["stem_subsets"] = {
                "pair": [a, b],
                "baseline": str(baseline),
                "n_buckets": N_BUCKETS,
                "gap": OVERWHELMING_GAP,
                "subsets": _subset_report(frame, masks, preds, base_preds, run),
            }

    out_path.write_text(json.dumps(report, indent=2, allow_nan=False))
    return report
