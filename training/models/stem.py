"""STEM-Net (Su et al., AAAI 2024) and the multi-embedding PLE it is compared with.

Both keep STEM's embedding layout: one table row per id holds ``[shared | task_1 | ... | task_T]``
(``view_names``), so serving needs one lookup per id whatever the number of tasks. Fields left out
of ``task_embedding_fields`` hold the shared view only and give it to every task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtrank.spec import FeatureSpec
from training.models.base import InputShape, MultiTaskModel, task_heads
from training.models.blocks import Gate, Tower, expert_bank, run_experts
from training.models.ple import PLE, PLEConfig, extraction_stack
from training.models.registry import register

FIELD_SELECTIONS = ("all", "user", "item", "ids")


def _check_selection(selection: str | tuple[str, ...] | list[str]) -> str | tuple[str, ...]:
    if isinstance(selection, str):
        if selection not in FIELD_SELECTIONS:
            raise ValueError(f"task_embedding_fields must be one of {FIELD_SELECTIONS} or a list of fields")
        return selection
    if not selection:
        raise ValueError("task_embedding_fields is empty: at least one field needs task tables")
    return tuple(selection)


def task_table_fields(spec: FeatureSpec, selection: str | tuple[str, ...]) -> list[bool]:
    """Per sparse field, whether it gets task-specific views.

    ``all``: every field; ``user`` / ``item``: the fields of that side; ``ids``: the store-held id
    fields (user, item, author); a tuple: the fields named.
    """
    fields = spec.sparse
    if selection == "all":
        chosen = [True] * len(fields)
    elif selection in ("user", "item"):
        chosen = [f.side == selection for f in fields]
    elif selection == "ids":
        chosen = [f.location == "store" for f in fields]
    else:
        unknown = sorted(set(selection) - {f.name for f in fields})
        if unknown:
            raise ValueError(f"task_embedding_fields names unknown sparse fields {unknown}")
        chosen = [f.name in selection for f in fields]
    if not any(chosen):
        raise ValueError(f"task_embedding_fields={selection!r} selects no sparse field of spec {spec.name!r}")
    return chosen


class _SharedAndTaskViews(MultiTaskModel):
    """Embedding views ``shared`` + one per task, task views only for the selected fields."""

    def __init__(self, spec: FeatureSpec, shape: InputShape, embedding_dim: int, selection):
        n_views = 1 + len(spec.tasks)
        has_task_views = task_table_fields(spec, selection)
        field_views = [n_views if own else 1 for own in has_task_views]
        super().__init__(spec, shape, embedding_dim, embedding_views=n_views, field_views=field_views)
        self.has_task_views = has_task_views
        self.heads = task_heads(spec)

    @property
    def view_names(self) -> list[str]:
        return ["shared", *self.spec.task_names]

    def task_only_vectors(self, field_vectors: list[torch.Tensor], task: int) -> list[torch.Tensor]:
        """Task ``task``'s own vectors of the fields that have task views."""
        d, k = self.embedding_dim, 1 + task
        return [v[:, k * d : (k + 1) * d] for v, own in zip(field_vectors, self.has_task_views, strict=True) if own]


@dataclass
class StemConfig:
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
        self.task_embedding_fields = _check_selection(self.task_embedding_fields)
        if self.n_task_experts < 1 or self.n_shared_experts < 1:
            raise ValueError("stem needs n_task_experts >= 1 and n_shared_experts >= 1")


@register("stem", StemConfig)
class STEMNet(_SharedAndTaskViews):
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

    def forward_embedded(self, dense, field_vectors, group=None):
        shared_input = self.view(dense, field_vectors, 0)
        shared = run_experts(self.shared_experts, shared_input)
        own = [run_experts(bank, self.view(dense, field_vectors, 1 + k)) for k, bank in enumerate(self.task_experts)]
        logits = []
        for k, (gate, tower) in enumerate(zip(self.gates, self.towers, strict=True)):
            readable = [e if j == k or not self.stop_gradient else e.detach() for j, e in enumerate(own)]
            selector = torch.cat([shared_input, *self.task_only_vectors(field_vectors, k)], dim=1)
            logits.append(tower(gate(selector, torch.cat([shared, *readable], dim=1))))
        return torch.stack(logits, dim=1)

    def gate_weights(self):
        """Per task ``[B, n_shared + T * n_task]``: shared experts first, then each task's in spec order."""
        return {h.name: g.last_weights for h, g in zip(self.heads, self.gates, strict=True)}


@dataclass
class MEPLEConfig(PLEConfig):
    task_embedding_fields: str | tuple[str, ...] = "all"
    """Fields with task-specific tables, as for ``stem``."""

    def __post_init__(self):
        super().__post_init__()
        self.task_embedding_fields = _check_selection(self.task_embedding_fields)


@register("me_ple", MEPLEConfig)
class MultiEmbeddingPLE(_SharedAndTaskViews):
    """PLE on STEM's embeddings: the first layer's task-k experts and gate read task k's view.

    The shared experts read the shared view; gates are PLE's (task k: own + shared experts), so,
    unlike ``stem``, no task reads another task's experts.
    """

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: MEPLEConfig):
        super().__init__(spec, shape, cfg.embedding_dim, cfg.task_embedding_fields)
        self.layers = extraction_stack(self.input_dim, len(self.heads), cfg)
        d = self.layers[-1].out_dim
        self.towers = nn.ModuleList(Tower(d, cfg.tower_hidden, cfg.dropout) for _ in self.heads)

    def forward_embedded(self, dense, field_vectors, group=None):
        task_inputs = [self.view(dense, field_vectors, 1 + k) for k in range(len(self.heads))]
        shared = self.view(dense, field_vectors, 0)
        for layer in self.layers:
            task_inputs, shared = layer(task_inputs, shared)
        return torch.stack([tower(h) for tower, h in zip(self.towers, task_inputs, strict=True)], dim=1)

    gate_weights = PLE.gate_weights
