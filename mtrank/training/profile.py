"""Cost of a model's forward: the network parameters it touches and its FLOPs per row."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtrank.training.models.base import MultiTaskModel


def forward_cost(
    model: MultiTaskModel, dense: torch.Tensor, field_vectors: list[torch.Tensor], group: str | None = None
) -> dict[str, float]:
    """Network parameters a forward touches and its FLOPs per row (embedding lookups excluded).

    A parameter is touched when the outputs depend on it (it receives a gradient). ``outputs`` is
    the number of logits the forward computes.
    """
    model.zero_grad(set_to_none=True)
    field_vectors = [v.detach() for v in field_vectors]
    with FlopCounterMode(display=False) as counter:
        out = model.forward_embedded(dense, field_vectors, group=group)
    out.sum().backward()
    touched = sum(p.numel() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return {"params": touched, "flops_per_row": counter.get_total_flops() / dense.shape[0], "outputs": out.shape[1]}
