"""Task outputs: how a logit becomes a prediction in label units, fitted on the train labels.

Binary tasks output ``sigmoid(logit)``, a probability. A regression task declares its output in
the spec (``Task.output``) or gets one chosen from the train labels' range (:func:`choose_output`):

- ``sigmoid``: labels in [0, 1] (a completion ratio): ``y = sigmoid(logit)``;
- ``identity``: any real label: ``y = logit · std + mean`` (labels standardised on train);
- ``softplus`` / ``exp``: positive labels (watch time, counts): ``y = softplus(logit) · scale`` or
  ``exp(logit) · scale``, ``scale`` the train labels' standard deviation.

The loss of a regression head is MSE between the normalised prediction ``(y - shift) / scale`` and
the normalised label: a constant factor per task does not move the minimiser of MSE in label
units (what evaluation reports), and it keeps every task's loss O(1) next to BCE, so static task
weights and one learning rate work whatever the labels' unit. For ``identity`` that is MSE on the
raw logit against the standardised label, the well-conditioned least-squares problem.

:class:`OutputLayer` is the one logits → label-units mapping: ``predict``, the exporter's serving
graphs and the export parity reference all call it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtrank.spec import FeatureSpec, SpecError

OUTPUT_KINDS = ("identity", "sigmoid", "softplus", "exp")
FUSION_PERCENTILES = (1.0, 99.0)
"""Unbounded outputs enter the fusion score normalised by these percentiles of the train labels."""


@dataclass(frozen=True)
class TaskOutput:
    """One task's output: ``y = link(logit) · scale + shift`` (binary: ``sigmoid(logit)``)."""

    task: str
    type: str
    """``binary`` or ``regression``."""
    output: str
    """``sigmoid`` for binary tasks; one of :data:`OUTPUT_KINDS` for regression."""
    shift: float = 0.0
    """Label units: the train labels' mean for ``identity``, else 0."""
    scale: float = 1.0
    """Label units per normalised unit: the train labels' std (``identity``, ``softplus``, ``exp``)."""
    fusion_range: tuple[float, float] = (0.0, 1.0)
    """``[lo, hi]`` in label units mapped to [0, 1] before the fusion score's log (see mtrank.fusion)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fusion_range"] = list(self.fusion_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskOutput:
        return cls(**{**d, "fusion_range": tuple(d["fusion_range"])})


def choose_output(labels: np.ndarray) -> str:
    """The output for regression labels: all in [0, 1] → sigmoid; all ≥ 0 → softplus; else identity."""
    y = np.asarray(labels, dtype=np.float64)
    if y.size and y.min() >= 0.0 and y.max() <= 1.0:
        return "sigmoid"
    if y.size and y.min() >= 0.0:
        return "softplus"
    return "identity"


def fit_output(task_name: str, task_type: str, declared: str | None, labels: np.ndarray) -> tuple[TaskOutput, bool]:
    """A task's output fitted on its train labels (inside its sample space); and whether it was chosen
    (not declared)."""
    if task_type == "binary":
        return TaskOutput(task_name, "binary", "sigmoid"), False
    y = np.asarray(labels, dtype=np.float64)
    if y.size == 0:
        raise SpecError(f"task {task_name!r}: no train label inside its sample space")
    kind = declared or choose_output(y)
    if kind == "sigmoid" and (y.min() < 0.0 or y.max() > 1.0):
        raise SpecError(f"task {task_name!r}: output sigmoid needs labels in [0, 1], train labels span "
                        f"[{y.min():.4g}, {y.max():.4g}]")
    if kind in ("softplus", "exp") and y.min() < 0.0:
        raise SpecError(f"task {task_name!r}: output {kind} needs labels >= 0, the smallest is {y.min():.4g}")
    std = float(y.std())
    std = std if std > 1e-12 else 1.0
    lo, hi = (float(v) for v in np.percentile(y, FUSION_PERCENTILES))
    if kind == "sigmoid":
        out = TaskOutput(task_name, "regression", kind)
    elif kind == "identity":
        out = TaskOutput(task_name, "regression", kind, float(y.mean()), std, (lo, hi if hi > lo else lo + std))
    else:
        out = TaskOutput(task_name, "regression", kind, 0.0, std, (0.0, hi if hi > 0.0 else std))
    return out, declared is None


def fit_outputs(spec: FeatureSpec, labels: np.ndarray, space: np.ndarray, say: bool = True) -> list[TaskOutput]:
    """Every task's output from the train labels ``[N, n_tasks]`` and space masks; prints the choices
    made for regression tasks whose spec does not declare an output."""
    outs = []
    for k, task in enumerate(spec.tasks):
        y = labels[:, k][space[:, k] > 0]
        out, chosen = fit_output(task.name, task.type, task.output, y)
        if chosen and say:
            print(
                f"task {task.name}: regression output {out.output} (train labels in [{y.min():.4g}, {y.max():.4g}]; "
                "set `output:` on the task in the spec to choose)",
                file=sys.stderr,
            )
        outs.append(out)
    return outs


def default_outputs(spec: FeatureSpec) -> list[TaskOutput]:
    """Outputs without fitted statistics: binary sigmoid; regression as declared, else sigmoid (labels
    in [0, 1]), with unit scale. What a run trained before outputs existed used."""
    return [
        TaskOutput(t.name, t.type, "sigmoid" if t.type == "binary" else (t.output or "sigmoid")) for t in spec.tasks
    ]


class OutputLayer(nn.Module):
    """Logits ``[B, C]`` → predictions in label units ``[B, C]``, one :class:`TaskOutput` per column.

    The columns are tasks (predict, serving graphs) or heads (training: several heads may share
    one task's output).
    """

    def __init__(self, outputs: list[TaskOutput]):
        super().__init__()
        self.outputs = list(outputs)
        self.register_buffer("shift", torch.tensor([o.shift for o in outputs], dtype=torch.float32), persistent=False)
        self.register_buffer("scale", torch.tensor([o.scale for o in outputs], dtype=torch.float32), persistent=False)
        self.register_buffer(
            "is_binary", torch.tensor([o.type == "binary" for o in outputs], dtype=torch.bool), persistent=False
        )

    def link(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalised predictions: probabilities for binary columns, ``(y - shift) / scale`` for regression."""
        cols = [_LINKS[o.output](logits[:, k]) for k, o in enumerate(self.outputs)]
        return torch.stack(cols, dim=1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.link(logits) * self.scale + self.shift

    def loss_inputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What the masked loss compares with :meth:`normalise`'d labels: logits for binary columns
        (BCE on logits), normalised predictions for regression columns (MSE)."""
        return torch.where(self.is_binary, logits, self.link(logits))

    def normalise(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels in the loss space: binary unchanged, regression ``(y - shift) / scale``."""
        return (labels - self.shift) / self.scale


def _exp(x: torch.Tensor) -> torch.Tensor:
    # Bounded so that an early large logit cannot overflow to inf (e^30 ≈ 1e13 normalised units).
    return torch.exp(x.clamp(max=30.0))


_LINKS = {"identity": lambda x: x, "sigmoid": torch.sigmoid, "softplus": F.softplus, "exp": _exp}
