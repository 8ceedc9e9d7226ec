"""Baselines: independent single-task models, shared bottom, MMoE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtrank.spec import STRICT, FeatureSpec
from mtrank.training.models.base import InputShape, MultiTaskModel, task_heads
from mtrank.training.models.blocks import MLP, Gate, Tower, expert_bank, run_experts
from mtrank.training.models.registry import register


@dataclass
class SingleConfig:
    __pydantic_config__ = STRICT

    embedding_dim: int = 16
    """Width of one embedding view."""
    bottom_hidden: tuple[int, ...] = (128, 64)
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0


@register("single", SingleConfig)
class SingleTask(MultiTaskModel):
    """One independent model per task, embeddings included (PLE paper eq. 11 baseline)."""

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: SingleConfig):
        super().__init__(spec, shape, cfg.embedding_dim, embedding_views=len(spec.tasks))
        self.heads = task_heads(spec)
        self.bottoms = nn.ModuleList(MLP(self.input_dim, cfg.bottom_hidden, cfg.dropout) for _ in self.heads)
        self.towers = nn.ModuleList(Tower(b.out_dim, cfg.tower_hidden, cfg.dropout) for b in self.bottoms)

    @property
    def view_names(self) -> list[str]:
        return [h.task for h in self.heads]

    def forward_embedded(self, dense, field_vectors, group=None, gates=None):
        outs = [
            tower(bottom(self.view(dense, field_vectors, k)))
            for k, (bottom, tower) in enumerate(zip(self.bottoms, self.towers, strict=True))
        ]
        return torch.stack(outs, dim=1)


@dataclass
class SharedBottomConfig:
    __pydantic_config__ = STRICT

    embedding_dim: int = 16
    bottom_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0


@register("shared_bottom", SharedBottomConfig)
class SharedBottom(MultiTaskModel):
    """Hard parameter sharing: one bottom MLP, one tower per task."""

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: SharedBottomConfig):
        super().__init__(spec, shape, cfg.embedding_dim)
        self.heads = task_heads(spec)
        self.bottom = MLP(self.input_dim, cfg.bottom_hidden, cfg.dropout)
        self.towers = nn.ModuleList(Tower(self.bottom.out_dim, cfg.tower_hidden, cfg.dropout) for _ in self.heads)

    def forward_embedded(self, dense, field_vectors, group=None, gates=None):
        h = self.bottom(self.view(dense, field_vectors))
        return torch.stack([tower(h) for tower in self.towers], dim=1)


@dataclass
class MMoEConfig:
    __pydantic_config__ = STRICT

    embedding_dim: int = 16
    n_experts: int = 6
    expert_hidden: tuple[int, ...] = (128, 64)
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0


@register("mmoe", MMoEConfig)
class MMoE(MultiTaskModel):
    """Shared experts, one softmax gate per task over all of them."""

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: MMoEConfig):
        super().__init__(spec, shape, cfg.embedding_dim)
        self.heads = task_heads(spec)
        self.experts = expert_bank(self.input_dim, cfg.n_experts, cfg.expert_hidden, cfg.dropout)
        self.gates = nn.ModuleList(Gate(self.input_dim, cfg.n_experts) for _ in self.heads)
        d = cfg.expert_hidden[-1]
        self.towers = nn.ModuleList(Tower(d, cfg.tower_hidden, cfg.dropout) for _ in self.heads)

    def forward_embedded(self, dense, field_vectors, group=None, gates=None):
        x = self.view(dense, field_vectors)
        experts = run_experts(self.experts, x)
        logits = []
        for h, gate, tower in zip(self.heads, self.gates, self.towers, strict=True):
            fused, w = gate(x, experts)
            if gates is not None:
                gates[h.name] = w
            logits.append(tower(fused))
        return torch.stack(logits, dim=1)
