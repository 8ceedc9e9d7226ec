"""Building blocks shared by every model: embeddings, MLP, expert, gate, extraction layer, tower."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FieldEmbeddings(nn.Module):
    """One table per sparse field; row 0 is the out-of-vocabulary (default) vector.

    ``width`` is every table's row width, or one width per field.
    """

    def __init__(self, vocab_sizes: tuple[int, ...] | list[int], width: int | Sequence[int]):
        super().__init__()
        widths = [width] * len(vocab_sizes) if isinstance(width, int) else list(width)
        if len(widths) != len(vocab_sizes):
            raise ValueError(f"{len(widths)} embedding widths for {len(vocab_sizes)} fields")
        self.tables = nn.ModuleList(nn.Embedding(n, w) for n, w in zip(vocab_sizes, widths, strict=True))
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.05)

    def forward(self, sparse: torch.Tensor) -> list[torch.Tensor]:
        return [table(sparse[:, i]) for i, table in enumerate(self.tables)]


class MLP(nn.Sequential):
    """Linear → ReLU (→ dropout) per hidden width."""

    def __init__(self, in_dim: int, hidden: list[int] | tuple[int, ...], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        super().__init__(*layers)
        self.out_dim = in_dim


class Gate(nn.Module):
    """Softmax over ``n_experts`` from a selector vector; keeps its last weights for inspection."""

    def __init__(self, in_dim: int, n_experts: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)
        self.last_weights: torch.Tensor | None = None

    def forward(self, selector: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``experts``: ``[B, n_experts, d]`` → weighted sum ``[B, d]``."""
        w = torch.softmax(self.linear(selector), dim=-1)
        self.last_weights = w.detach()
        return torch.bmm(w.unsqueeze(1), experts).squeeze(1)


class Tower(nn.Module):
    """Task tower: MLP → one logit."""

    def __init__(self, in_dim: int, hidden: list[int] | tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x)).squeeze(-1)


def expert_bank(in_dim: int, n: int, hidden: list[int] | tuple[int, ...], dropout: float) -> nn.ModuleList:
    return nn.ModuleList(MLP(in_dim, hidden, dropout) for _ in range(n))


def run_experts(bank: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """``[B, n_experts, d]``."""
    return torch.stack([e(x) for e in bank], dim=1)


class ExtractionLayer(nn.Module):
    """PLE extraction layer (CGC when alone).

    Task k's gate weighs task k's experts and the shared experts; with ``shared_gate`` (every
    non-final PLE layer) a shared gate weighs *all* experts of the layer. Inputs are one selector
    per task plus one shared selector (the previous layer's fused outputs, or the embedding
    concat for the first layer).
    """

    def __init__(
        self,
        in_dim: int,
        n_tasks: int,
        n_task_experts: int,
        n_shared_experts: int,
        hidden: list[int] | tuple[int, ...],
        dropout: float = 0.0,
        shared_gate: bool = False,
    ):
        super().__init__()
        self.task_experts = nn.ModuleList(
            expert_bank(in_dim, n_task_experts, hidden, dropout) for _ in range(n_tasks)
        )
        self.shared_experts = expert_bank(in_dim, n_shared_experts, hidden, dropout)
        self.task_gates = nn.ModuleList(Gate(in_dim, n_task_experts + n_shared_experts) for _ in range(n_tasks))
        n_all = n_tasks * n_task_experts + n_shared_experts
        self.shared_gate = Gate(in_dim, n_all) if shared_gate else None
        self.out_dim = hidden[-1]

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor):
        """Returns (fused output per task, fused shared output or None)."""
        shared = run_experts(self.shared_experts, shared_input)
        own = [run_experts(bank, x) for bank, x in zip(self.task_experts, task_inputs, strict=True)]
        outs = [
            gate(x, torch.cat([e, shared], dim=1))
            for gate, x, e in zip(self.task_gates, task_inputs, own, strict=True)
        ]
        shared_out = None
        if self.shared_gate is not None:
            shared_out = self.shared_gate(shared_input, torch.cat([*own, shared], dim=1))
        return outs, shared_out
