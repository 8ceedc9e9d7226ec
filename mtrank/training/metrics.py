"""Offline evaluation: AUC, logloss and MSE per task, per user group and per item facet.

numpy-only so that the synthetic generator, the trainer and the tests share one exact AUC.
``evaluate_predictions`` produces the ``metrics.json`` layout; every value in it is a plain
``float``/``int`` or ``None`` (NaN becomes ``None``) so it serialises to JSON as is.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from mtrank.spec import Facet, FeatureSpec, Task

_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U, tied scores share their average rank).

    ``labels`` are 0/1 (values > 0.5 count as positive); NaN when one class is absent.
    """
    y = np.asarray(labels, dtype=np.float64).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"auc: {y.size} labels but {s.size} scores")
    if np.isnan(s).any():
        raise ValueError("auc: scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Tie groups [start, end) in the sorted scores; each member gets rank (start + 1 + end) / 2.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy in nats; probabilities are clipped to [1e-7, 1 - 1e-7]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), _EPS, 1.0 - _EPS)
    if y.size == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def mse(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean squared error; NaN on empty input."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(preds, dtype=np.float64).ravel()
    if y.size == 0:
        return math.nan
    return float(np.mean((y - p) ** 2))


def _plain(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _space_mask(frame: pd.DataFrame, task: Task) -> np.ndarray:
    """Rows inside the task's sample space with a label (regression labels may be NaN outside it)."""
    mask = np.ones(len(frame), dtype=bool)
    if task.space is not None:
        mask &= frame[task.space].to_numpy(dtype=np.float64) == 1.0
    return mask & ~np.isnan(frame[task.label_column].to_numpy(dtype=np.float64))


def _task_metrics(frame: pd.DataFrame, pred: np.ndarray, task: Task, rows: np.ndarray) -> dict[str, Any]:
    mask = rows & _space_mask(frame, task)
    y = frame[task.label_column].to_numpy(dtype=np.float64)[mask]
    p = np.asarray(pred, dtype=np.float64).ravel()[mask]
    oracle_col = f"oracle_{task.name}"
    oracle = frame[oracle_col].to_numpy(dtype=np.float64)[mask] if oracle_col in frame.columns else None
    if task.type == "regression":
        out: dict[str, Any] = {"mse": _plain(mse(y, p))}
        if oracle is not None:
            out["oracle_mse"] = _plain(mse(y, oracle))
        return out
    out = {"auc": _plain(auc(y, p)), "logloss": _plain(logloss(y, p))}
    if oracle is not None:
        out["oracle_auc"] = _plain(auc(y, oracle))
    out["positive_rate"] = _plain(y.mean()) if y.size else None
    return out


def _mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _facet_values(frame: pd.DataFrame, facet: Facet) -> np.ndarray:
    """Facet value per row: the frame's column if present, else the spec's rules on raw features."""
    if facet.column in frame.columns:
        return frame[facet.column].astype(str).to_numpy()
    features = {r.feature: frame[r.feature].to_numpy(dtype=np.float64) for r in facet.rules}
    if not features:
        return np.full(len(frame), facet.default, dtype=object)
    return np.asarray(facet.values, dtype=object)[facet.assign(features)]


def evaluate_predictions(frame: pd.DataFrame, preds: dict[str, np.ndarray], spec: FeatureSpec) -> dict[str, Any]:
    """Metrics of ``preds`` (task -> probability or regression value per row of ``frame``).

    Each task is scored on the rows of its sample space only; tasks absent from ``preds`` are
    left out. ``oracle_*`` fields appear when the frame has ``oracle_<task>`` columns (synthetic
    data); ``groups`` / ``item_facets`` when the spec declares user groups / an item facet.
    """
    tasks = [t for t in spec.tasks if t.name in preds]
    for t in tasks:
        if len(preds[t.name]) != len(frame):
            raise ValueError(f"predictions for {t.name!r} have {len(preds[t.name])} rows, frame has {len(frame)}")
    everything = np.ones(len(frame), dtype=bool)
    per_task = {t.name: _task_metrics(frame, preds[t.name], t, everything) for t in tasks}
    binary = [per_task[t.name] for t in tasks if t.type == "binary"]
    out: dict[str, Any] = {"avg_auc": _mean_of([m["auc"] for m in binary])}
    if binary and all("oracle_auc" in m for m in binary):
        out["avg_oracle_auc"] = _mean_of([m["oracle_auc"] for m in binary])
    out["rows"] = len(frame)
    out["tasks"] = per_task
    for key, facet in (("groups", spec.user_groups), ("item_facets", spec.item_facet)):
        if facet is None:
            continue
        values = _facet_values(frame, facet)
        section: dict[str, Any] = {}
        for value in facet.values:
            rows = values == value
            section[value] = {t.name: _task_metrics(frame, preds[t.name], t, rows) for t in tasks}
            section[value]["rows"] = int(rows.sum())
        out[key] = section
    return out


def mtl_gain(metrics: dict[str, Any], baseline_metrics: dict[str, Any]) -> dict[str, float | None]:
    """Per-task gain over a baseline (``single``): AUC difference, or baseline MSE minus MSE.

    Positive means better than the baseline; ``None`` where either side has no value.
    """
    gains: dict[str, float | None] = {}
    base_tasks = baseline_metrics.get("tasks", {})
    for name, m in metrics.get("tasks", {}).items():
        b = base_tasks.get(name)
        if b is None:
            continue
        if "auc" in m:
            ours, theirs, sign = m.get("auc"), b.get("auc"), 1.0
        else:
            ours, theirs, sign = m.get("mse"), b.get("mse"), -1.0
        gains[name] = None if ours is None or theirs is None else _plain(sign * (ours - theirs))
    return gains
