"""Masked per-task losses and task weighting (PLE paper §4.3; Kendall et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_task_losses(
    preds: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, is_binary: torch.Tensor
) -> torch.Tensor:
    """Per-head loss ``[H]``: mean over the rows inside the head's sample space only.

    ``preds``, ``labels``, ``masks``: ``[B, H]``; ``masks`` is 1 inside the space (the δ of the
    PLE paper). Binary heads: BCE, ``preds`` are logits; regression heads: MSE, ``preds`` and
    ``labels`` in the task's normalised units (``OutputLayer.loss_inputs`` / ``normalise`` in
    mtrank.training.outputs). A head with no row in the batch contributes 0.
    """
    bce = F.binary_cross_entropy_with_logits(preds, labels, reduction="none")
    mse = (preds - labels) ** 2
    per_row = torch.where(is_binary, bce, mse) * masks
    return per_row.sum(dim=0) / masks.sum(dim=0).clamp(min=1.0)


class LossWeighting(nn.Module):
    """Combines per-task losses into one scalar.

    - ``static``: Σ w_k L_k.
    - ``dynamic``: the PLE paper's ω_k(t) = ω_k0 · γ_k^t, t the epoch.
    - ``uncertainty``: Σ ½ exp(−s_k) L_k + ½ s_k with learnable log-variances s_k.
    """

    def __init__(self, kind: str, weights: list[float], gammas: list[float] | None = None):
        super().__init__()
        if kind not in ("static", "dynamic", "uncertainty"):
            raise ValueError(f"loss_weighting must be static, dynamic or uncertainty, got {kind!r}")
        self.kind = kind
        self.register_buffer("w0", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("gamma", torch.tensor(gammas or [1.0] * len(weights), dtype=torch.float32))
        self.log_var = nn.Parameter(torch.zeros(len(weights))) if kind == "uncertainty" else None

    def weights(self, epoch: int) -> torch.Tensor:
        if self.kind == "dynamic":
            return self.w0 * self.gamma**epoch
        return self.w0

    def forward(self, losses: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.log_var is not None:
            return (self.w0 * (0.5 * torch.exp(-self.log_var) * losses + 0.5 * self.log_var)).sum()
        return (self.weights(epoch) * losses).sum()
