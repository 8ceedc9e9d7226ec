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


class ListPool(nn.Module):
    """A padded list of entry vectors ``[B, L, W]`` with lengths ``[B]`` → one vector ``[B, W]``.

    ``mean`` / ``sum`` over the entries kept (an empty list gives the zero vector). ``attention``
    is target attention (as in DIN): each entry's weight is a small MLP's sigmoid over the entry,
    the target (the candidate's vector of the shared field), their product and difference, plus a
    learned bias per position (recency); the output is the weighted mean over the kept entries, so
    padded positions count for nothing and all-ones weights are mean pooling.
    """

    def __init__(self, mode: str, width: int, max_len: int, hidden: int = 32):
        super().__init__()
        if mode not in ("mean", "sum", "attention"):
            raise ValueError(f"unknown list pooling {mode!r}")
        self.mode = mode
        if mode == "attention":
            self.score = nn.Sequential(nn.Linear(4 * width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            self.position = nn.Parameter(torch.zeros(max_len))

    def forward(self, entries: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(entries.shape[1], device=entries.device)
        mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(entries.dtype)  # [B, L]
        if self.mode == "attention":
            t = target.unsqueeze(1).expand_as(entries)
            features = torch.cat([entries, t, entries * t, entries - t], dim=2)
            mask = mask * torch.sigmoid(self.score(features).squeeze(2) + self.position)
        pooled = (entries * mask.unsqueeze(2)).sum(dim=1)
        if self.mode == "sum":
            return pooled
        return pooled / lengths.clamp(min=1).to(entries.dtype).unsqueeze(1)


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
    """Softmax over ``n_experts`` from a selector vector."""

    def __init__(self, in_dim: int, n_experts: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)

    def forward(self, selector: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``experts``: ``[B, n_experts, d]`` → (weighted sum ``[B, d]``, weights ``[B, n_experts]``)."""
        w = torch.softmax(self.linear(selector), dim=-1)
        return torch.bmm(w.unsqueeze(1), experts).squeeze(1), w


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
    """PLE extraction layer (CGC when alone): the experts and gates of one level; :func:`extract` runs it.

    Output k's gate weighs output k's experts and the shared experts; with ``shared_gate`` (every
    non-final PLE layer) a shared gate weighs *all* experts of the layer. ``n_task_experts`` may be
    0 (MMoE as an extraction layer: every gate weighs the shared experts only).
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


def extraction_stack(
    in_dim: int,
    n_out: int,
    n_levels: int,
    n_task_experts: int,
    n_shared_experts: int,
    hidden: list[int] | tuple[int, ...],
    dropout: float = 0.0,
) -> nn.ModuleList:
    """``n_levels`` extraction layers with ``n_out`` outputs each; every layer but the last has a shared gate."""
    layers = []
    for level in range(n_levels):
        layers.append(
            ExtractionLayer(
                in_dim, n_out, n_task_experts, n_shared_experts, hidden, dropout, shared_gate=level < n_levels - 1
            )
        )
        in_dim = layers[-1].out_dim
    return nn.ModuleList(layers)


def extract(
    layers: nn.ModuleList,
    task_inputs: list[torch.Tensor],
    shared_input: torch.Tensor,
    wanted: list[int] | None = None,
    gates: dict[str, torch.Tensor] | None = None,
    names: list[str] | None = None,
    prefix: str = "",
) -> dict[int, torch.Tensor]:
    """Stacked extraction layers (PLE paper §4.2), computing only what the ``wanted`` outputs of the
    last layer need (all when None). Returns output index → fused output ``[B, d]``.

    ``task_inputs``: layer 0's input of each output (one tensor per output); ``shared_input``: the
    input of its shared experts and shared gate. The gates of layer j take the fused outputs of
    layer j−1 as selectors. Output k of layer j feeds its own experts and gate at layer j+1; a
    shared gate reads all experts of its layer, so the layer below one computes every output.

    ``gates``, when given, receives each computed gate's weights ``[B, n_experts]`` under
    ``{prefix}L{j}.{names[k]}`` (output k's gate of layer j) and ``{prefix}L{j}.shared``.
    """
    n_out = len(task_inputs)
    need: list[list[int]] = [sorted(range(n_out) if wanted is None else wanted)]
    for layer in reversed(layers[1:]):
        need.insert(0, list(range(n_out)) if layer.shared_gate is not None else need[0])
    names = names or [str(k) for k in range(n_out)]
    inputs: dict[int, torch.Tensor] = dict(enumerate(task_inputs))
    for j, (layer, needed) in enumerate(zip(layers, need, strict=True)):
        experts_of = range(n_out) if layer.shared_gate is not None else needed
        shared = run_experts(layer.shared_experts, shared_input)
        own = {k: run_experts(layer.task_experts[k], inputs[k]) for k in experts_of if len(layer.task_experts[k])}
        outs = {}
        for k in needed:
            experts = torch.cat([own[k], shared], dim=1) if k in own else shared
            outs[k], w = layer.task_gates[k](inputs[k], experts)
            if gates is not None:
                gates[f"{prefix}L{j}.{names[k]}"] = w
        if layer.shared_gate is not None:
            shared_input, w = layer.shared_gate(shared_input, torch.cat([*own.values(), shared], dim=1))
            if gates is not None:
                gates[f"{prefix}L{j}.shared"] = w
        inputs = outs
    return inputs
