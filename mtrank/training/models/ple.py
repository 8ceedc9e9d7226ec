"""CGC and PLE (Tang et al., RecSys 2020, §4.1–4.2), and PLE on STEM's embeddings (``me_ple``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtrank.spec import STRICT, FeatureSpec
from mtrank.training.models.base import (
    InputShape,
    MultiTaskModel,
    SharedAndTaskViews,
    check_field_selection,
    task_heads,
)
from mtrank.training.models.blocks import Tower, extract, extraction_stack
from mtrank.training.models.registry import register


@dataclass
class PLEConfig:
    __pydantic_config__ = STRICT

    embedding_dim: int = 16
    """Width of one field's embedding."""
    n_levels: int = 2
    """Stacked extraction layers; 1 is CGC."""
    n_task_experts: int = 2
    """Task-specific experts per task and layer."""
    n_shared_experts: int = 2
    expert_hidden: tuple[int, ...] = (128, 64)
    tower_hidden: tuple[int, ...] = (32,)
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {self.n_levels}")

    def stack(self, in_dim: int, n_tasks: int) -> nn.ModuleList:
        return extraction_stack(
            in_dim, n_tasks, self.n_levels, self.n_task_experts, self.n_shared_experts, self.expert_hidden, self.dropout
        )


@register("ple", PLEConfig)
class PLE(MultiTaskModel):
    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: PLEConfig):
        super().__init__(spec, shape, cfg.embedding_dim)
        self.heads = task_heads(spec)
        self.layers = cfg.stack(self.input_dim, len(self.heads))
        d = self.layers[-1].out_dim
        self.towers = nn.ModuleList(Tower(d, cfg.tower_hidden, cfg.dropout) for _ in self.heads)

    def forward_embedded(self, dense, field_vectors, group=None, gates=None):
        x = self.view(dense, field_vectors)
        fused = extract(self.layers, [x] * len(self.heads), x, gates=gates, names=[h.name for h in self.heads])
        return torch.stack([tower(fused[k]) for k, tower in enumerate(self.towers)], dim=1)


@dataclass
class CGCConfig(PLEConfig):
    n_levels: int = 1

    def __post_init__(self):
        if self.n_levels != 1:
            raise ValueError("cgc has exactly one extraction layer; use model 'ple' for more")


@register("cgc", CGCConfig)
class CGC(PLE):
    """Customized gate control: PLE with one extraction layer (no shared gate)."""


@dataclass
class MEPLEConfig(PLEConfig):
    task_embedding_fields: str | tuple[str, ...] = "all"
    """Fields with task-specific tables, as for ``stem``."""

    def __post_init__(self):
        super().__post_init__()
        self.task_embedding_fields = check_field_selection(self.task_embedding_fields)


@register("me_ple", MEPLEConfig)
class MultiEmbeddingPLE(SharedAndTaskViews):
    """PLE on STEM's embeddings: the first layer's task-k experts and gate read task k's view.

    The shared experts read the shared view; gates are PLE's (task k: own + shared experts), so,
    unlike ``stem``, no task reads another task's experts.
    """

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: MEPLEConfig):
        super().__init__(spec, shape, cfg.embedding_dim, cfg.task_embedding_fields)
        self.layers = cfg.stack(self.input_dim, len(self.heads))
        d = self.layers[-1].out_dim
        self.towers = nn.ModuleList(Tower(d, cfg.tower_hidden, cfg.dropout) for _ in self.heads)

    def forward_embedded(self, dense, field_vectors, group=None, gates=None):
        task_inputs = [self.view(dense, field_vectors, 1 + k) for k in range(len(self.heads))]
        shared = self.view(dense, field_vectors, 0)
        fused = extract(self.layers, task_inputs, shared, gates=gates, names=[h.name for h in self.heads])
        return torch.stack([tower(fused[k]) for k, tower in enumerate(self.towers)], dim=1)
