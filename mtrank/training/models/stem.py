"""STEM-Net (Su et al., AAAI 2024); the multi-embedding PLE it is compared with is ``me_ple`` in
``ple.py``.

Both keep STEM's embedding layout: one table row per id holds ``[shared | task_1 | ... | task_T]``
(``view_names``), so serving needs one lookup per id whatever the number of tasks. Fields left out
of ``task_embedding_fields`` hold the shared view only and give it to every task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtrank.spec import STRICT, FeatureSpec
from mtrank.training.models.base import InputShape, SharedAndTaskViews, check_field_selection
from mtrank.training.models.blocks import Gate, Tower, expert_bank, run_experts
from mtrank.training.models.registry import register


@dataclass
class StemConfig:
    __pydantic_config__ = STRICT

    embedding_dim: int = 16
    """Width of one embedding view (the shared one or one task's)."""
    task_embedding_fields: str | tuple[str, ...] = "all"
    """Fields with task-specific tables: all, user, item, ids (store-held id fields) or a list of names."""
    n_shared_experts: int = 1
    """Experts reading the shared embeddings."""
    n_task_experts: int = 1
    """Experts per task, reading that task's embeddings."""
    expert_hidden: tuple[int, ...] = (128, 64)
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0
    stop_gradient: bool = True
    """All-forward task-specific-backward gates; False: every task's loss trains every expert and table."""

    def __post_init__(self):
        self.task_embedding_fields = check_field_selection(self.task_embedding_fields)
        if self.n_task_experts < 1 or self.n_shared_experts < 1:
            raise ValueError("stem needs n_task_experts >= 1 and n_shared_experts >= 1")


@register("stem", StemConfig)
class STEMNet(SharedAndTaskViews):
    """Shared experts on the shared view, task-k experts on task k's view; task k's gate weighs all.

    The gate of task k reads ``concat(shared input, task k's own vectors)`` and weighs
    ``[shared experts, task 1 experts, ..., task T experts]``; with ``stop_gradient`` the experts of
    the other tasks enter it detached, so task k's loss reaches only the shared experts and
    embeddings and its own (the paper's All-Forward Task-specific-Backward gate).
    """

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: StemConfig):
        super().__init__(spec, shape, cfg.embedding_dim, cfg.task_embedding_fields)
        self.stop_gradient = cfg.stop_gradient
        n_tasks = len(self.heads)
        self.shared_experts = expert_bank(self.input_dim, cfg.n_shared_experts, cfg.expert_hidden, cfg.dropout)
        self.task_experts = nn.ModuleList(
            expert_bank(self.input_dim, cfg.n_task_experts, cfg.expert_hidden, cfg.dropout) for _ in range(n_tasks)
        )
        gate_dim = self.input_dim + cfg.embedding_dim * sum(self.has_task_views)
        n_experts = cfg.n_shared_experts + n_tasks * cfg.n_task_experts
        self.gates = nn.ModuleList(Gate(gate_dim, n_experts) for _ in range(n_tasks))
        self.towers = nn.ModuleList(Tower(cfg.expert_hidden[-1], cfg.tower_hidden, cfg.dropout) for _ in range(n_tasks))

    def forward_embedded(self, dense, field_vectors, group=None, gates=None):
        """Gate weights per task ``[B, n_shared + T * n_task]``: shared experts first, then each task's."""
        shared_input = self.view(dense, field_vectors, 0)
        shared = run_experts(self.shared_experts, shared_input)
        own = [run_experts(bank, self.view(dense, field_vectors, 1 + k)) for k, bank in enumerate(self.task_experts)]
        logits = []
        for k, (h, gate, tower) in enumerate(zip(self.heads, self.gates, self.towers, strict=True)):
            readable = [e if j == k or not self.stop_gradient else e.detach() for j, e in enumerate(own)]
            selector = torch.cat([shared_input, *self.task_only_vectors(field_vectors, k)], dim=1)
            fused, w = gate(selector, torch.cat([shared, *readable], dim=1))
            if gates is not None:
                gates[h.name] = w
            logits.append(tower(fused))
        return torch.stack(logits, dim=1)
