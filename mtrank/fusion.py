"""Fusion score ``score = Π_k p_k^{w_k} × f(video_len)`` in log space (docs/architecture.md §5), and the A/B
bucket contract (``MTRANK_BUCKETS``): shared by the service and the offline fusion tuner.

``log score = Σ_k w_k · log(clip(p_k, ε, 1)) + log f(video_len)`` with ``ε = 1e-6``. Every task
output is clipped to ``[1e-6, 1]`` before the log, regression outputs included (``vcr``, the
completion ratio, is a mean in [0, 1]), so a zero prediction cannot make the score -inf or NaN.

``f`` (``video_len`` L in seconds, ≥ 0), always > 0 and finite for 0 ≤ L ≤ 86400:

- ``none``: f = 1.
- ``log1p``: f = (1 + log1p(L / scale))^alpha; alpha in [0, 4], scale > 0 s. f(0) = 1, grows slowly.
- ``sigmoid``: f = σ((L − center) / width); center ≥ 0 s, width ≠ 0 s (negative favours short
  videos). log f = −softplus(−(L − center) / width), stable for any L.
- ``power``: f = (L + offset)^beta; beta in [−4, 4], offset > 0 s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class LengthFn(BaseModel):
    """The video-length factor f(video_len) of the fusion score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["none", "log1p", "sigmoid", "power"] = "none"
    alpha: float = Field(1.0, ge=0.0, le=4.0)
    """log1p: exponent of (1 + log1p(len / scale))."""
    scale: float = Field(1.0, gt=0.0, le=86400.0)
    """log1p: seconds per unit of length."""
    center: float = Field(30.0, ge=0.0, le=86400.0)
    """sigmoid: length in seconds where f = 0.5."""
    width: float = Field(10.0, ge=-86400.0, le=86400.0)
    """sigmoid: seconds per logit unit; negative favours short videos. Must not be 0."""
    beta: float = Field(0.3, ge=-4.0, le=4.0)
    """power: exponent of (len + offset)."""
    offset: float = Field(1.0, gt=0.0, le=86400.0)
    """power: seconds added to the length so that f(0) is finite."""

    @field_validator("width")
    @classmethod
    def _width_not_zero(cls, v: float) -> float:
        if v == 0.0:
            raise ValueError("length_fn.width must not be 0")
        return v


class BucketConfig(BaseModel):
    """One A/B bucket: its traffic share, the model it serves and its fusion parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    share: float = Field(gt=0.0, le=100.0)
    """Percent of users, resolution 0.01."""
    model: str | None = None
    """Model name in the repository; None = the repository's first model."""
    version: int | None = Field(None, ge=1)
    """Pinned version; None = the newest."""
    weights: dict[str, float] | None = None
    """Fusion exponent per task; None = 1 for every task; tasks not listed get 0."""
    length_fn: LengthFn = LengthFn()

    @field_validator("weights")
    @classmethod
    def _finite_weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for task, w in (v or {}).items():
            if not math.isfinite(w) or abs(w) > 100:
                raise ValueError(f"weight of task {task!r} must be finite and within [-100, 100], got {w}")
        return v


def check_buckets(buckets: list[BucketConfig]) -> list[BucketConfig]:
    """A bucket list as ``MTRANK_BUCKETS`` must hold it: unique names, shares adding up to 100."""
    if not buckets:
        raise ValueError("at least one bucket is needed")
    names = [b.name for b in buckets]
    if len(set(names)) != len(names):
        raise ValueError(f"bucket names must be unique, got {names}")
    total = sum(b.share for b in buckets)
    if abs(total - 100.0) > 1e-6:
        raise ValueError(f"shares add up to {total:g}, not 100")
    for b in buckets:
        if abs(round(b.share * 100) - b.share * 100) > 1e-6:
            raise ValueError(f"bucket {b.name!r}: share {b.share} has a finer resolution than 0.01")
    return buckets


P_MIN = 1e-6
"""Lower clip of every task probability (and regression output) before the log."""


def log_length_factor(video_len: np.ndarray, fn: LengthFn) -> np.ndarray:
    """log f(video_len) per row, float64."""
    length = np.asarray(video_len, dtype=np.float64)
    if fn.kind == "none":
        return np.zeros_like(length)
    if fn.kind == "log1p":
        return fn.alpha * np.log1p(np.log1p(length / fn.scale))
    if fn.kind == "sigmoid":
        return -np.logaddexp(0.0, -(length - fn.center) / fn.width)
    if fn.kind == "power":
        return fn.beta * np.log(length + fn.offset)
    raise ValueError(f"unknown length_fn kind {fn.kind!r}")


def length_factor(video_len: np.ndarray, fn: LengthFn) -> np.ndarray:
    """f(video_len) per row, float64 (for checks; ranking uses the log)."""
    return np.exp(log_length_factor(video_len, fn))


def log_scores(
    task_outputs: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    video_len: np.ndarray,
    fn: LengthFn,
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> np.ndarray:
    """Log fusion score per row (float64). Tasks without a weight contribute nothing.

    ``ranges``: per task ``(lo, hi)`` in the task's output units (the manifest's ``fusion_range``):
    its output ``y`` enters as ``clip((y - lo) / (hi - lo), P_MIN, 1)``, so a regression output of
    any unit (watch time in seconds, a standardised score) becomes a probability-like factor in
    [P_MIN, 1]. A task without a range enters as ``clip(y, P_MIN, 1)`` (probabilities, ratios).
    """
    total = log_length_factor(video_len, fn)
    tasks = [(task, w) for task, w in weights.items() if w != 0.0]
    if not tasks:
        return total
    # All tasks as one [tasks, rows] matrix: a handful of numpy calls per request instead of five
    # per task (a 20-row request spent ~90 µs here, nearly all of it numpy call overhead).
    log_p = np.array([task_outputs[task] for task, _ in tasks], dtype=np.float64)
    if ranges:
        for row, (task, _) in zip(log_p, tasks, strict=True):
            if task in ranges:
                lo, hi = ranges[task]
                row -= lo
                row /= hi - lo
    np.nan_to_num(log_p, copy=False, nan=P_MIN)  # NaN (a broken graph output) is the floor, never a top score
    np.clip(log_p, P_MIN, 1.0, out=log_p)
    np.log(log_p, out=log_p)
    for row, (_, w) in zip(log_p, tasks, strict=True):
        total += w * row
    return total


def rank_order(log_score: np.ndarray) -> np.ndarray:
    """Row indices by descending score; ties keep the candidates' request order."""
    return np.argsort(-log_score, kind="stable")
