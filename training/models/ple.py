"""CGC and PLE (Tang et al., RecSys 2020, §4.1–4.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtrank.spec import FeatureSpec
from training.models.base import InputShape, MultiTaskModel, task_heads
from training.models.blocks import ExtractionLayer, Tower
from training.models.registry import register


@dataclass
class PLEConfig:
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


def extraction_stack(in_dim: int, n_tasks: int, cfg: PLEConfig) -> nn.ModuleList:
    """``n_levels`` extraction layers; every layer but the last has a shared gate."""
    layers = []
    for level in range(cfg.n_levels):
        last = level == cfg.n_levels - 1
        layers.append(
            ExtractionLayer(
                in_dim,
                n_tasks,
                cfg.n_task_experts,
                cfg.n_shared_experts,
                cfg.expert_hidden,
                cfg.dropout,
                shared_gate=not last,
            )
        )
        in_dim = layers[-1].out_dim
    return nn.ModuleList(layers)


def run_extraction(layers: nn.ModuleList, x: torch.Tensor, n_tasks: int) -> list[torch.Tensor]:
    """The gates of layer j take the fused outputs of layer j−1 as selectors."""
    task_inputs, shared = [x] * n_tasks, x
    for layer in layers:
        task_inputs, shared = layer(task_inputs, shared)
    return task_inputs


@register("ple", PLEConfig)
class PLE(MultiTaskModel):
    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: PLEConfig):
        super().__init__(spec, shape, cfg.embedding_dim)
        self.heads = task_heads(spec)
        self.layers = extraction_stack(self.input_dim, len(self.heads), cfg)
        d = self.layers[-1].out_dim
        self.towers = nn.ModuleList(Tower(d, cfg.tower_hidden, cfg.dropout) for _ in self.heads)

    def forward_embedded(self, dense, field_vectors, group=None):
        fused = run_extraction(self.layers, self.view(dense, field_vectors), len(self.heads))
        return torch.stack([tower(h) for tower, h in zip(self.towers, fused, strict=True)], dim=1)

    def gate_weights(self):
        out = {}
        for j, layer in enumerate(self.layers):
            for h, g in zip(self.heads, layer.task_gates, strict=True):
                out[f"L{j}.{h.name}"] = g.last_weights
            if layer.shared_gate is not None:
                out[f"L{j}.shared"] = layer.shared_gate.last_weights
        return out


@dataclass
class CGCConfig(PLEConfig):
    n_levels: int = 1

    def __post_init__(self):
        if self.n_levels != 1:
            raise ValueError("cgc has exactly one extraction layer; use model 'ple' for more")


@register("cgc", CGCConfig)
class CGC(PLE):
    """Customized gate control: PLE with one extraction layer (no shared gate)."""
