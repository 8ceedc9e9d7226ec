"""MFH, H-MTL and the flat product-task PLE (Liu et al. 2021, "Multi-Faceted Hierarchical
Multi-Task Learning for a Large Number of Tasks with Multi-dimensional Relations", §IV).

Tasks are the Cartesian product of facets: the behaviour facet (the spec's tasks) × the user
group facet (``spec.user_groups``) [× the item facet (``spec.item_facet``)], or a declared subset
of it. Head ``vtr@new`` predicts ``vtr`` for new users; ``vtr@high@cold`` for high-activity users
on cold items.

- ``h_mtl``: one tree. The level-0 switcher splits the input into one branch per value of the
  first facet in ``order``; each branch has its own MLP and its own level-1 switcher over the
  second facet's values, and so on; the last level feeds the towers.
- ``mfh``: one such tree per facet order; each tower reads a linear combination of the hidden
  outputs of every path that reaches it (``Σ_p W_p h_p + b``, the paper's Output_New&Skip).
- ``flat``: one PLE over every product task (the paper's flat baseline).

A switcher is shared-bottom, MMoE, CGC or PLE, chosen per level. Training rule (paper §IV):
rows of a user group also train the heads of the groups it ``also_trains`` (by default every
later group in ``spec.user_groups.values``: new → low, high; low → high); at inference each row
reads its own group's heads only. Group mode (``forward_embedded(..., group=g)``) computes only
``g``'s towers and what feeds them: the exporter turns each group into its own graph.

Three-facet models need each row's item facet to pick its heads, which the trainer does not
pass: train them with :class:`FacetedTrainer` and evaluate with :func:`evaluate_faceted`.
Exporting and serving three-facet models is out of scope for now.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mtrank.spec import FeatureSpec, SpecError
from training.features import Preprocessor
from training.losses import masked_task_losses
from training.models.base import Head, InputShape, MultiTaskModel
from training.models.blocks import MLP, ExtractionLayer, Gate, Tower, run_experts
from training.models.registry import register
from training.trainer import Tensors, Trainer, to_tensors

BEHAVIOUR, USER_GROUP, ITEM = "behaviour", "user_group", "item"
SWITCHER_KINDS = ("shared_bottom", "mmoe", "cgc", "ple")


# --------------------------------------------------------------------------------------------
# Configs


def _tuples(value: Any) -> Any:
    """YAML and checkpoints give lists; configs hold tuples so they compare and hash stably."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


@dataclass
class ProductTaskConfig:
    """Fields shared by every product-task model."""

    embedding_dim: int = 16
    """Width of one field's embedding."""
    item_facet: bool = False
    """Split tasks by the spec's item facet too (three facets: behaviour × user group × item)."""
    tasks: tuple[str, ...] = ()
    """Declared subset of product tasks as glob patterns over head names (``*@*@warm``,
    ``*@high@cold``); empty: the full Cartesian product. Every (behaviour, group) must keep a
    head (for the item facet's default value when ``item_facet``): it serves those rows."""
    also_trains: dict[str, tuple[str, ...]] | None = None
    """Training rule: group → other groups whose heads its rows also train. None: the paper's
    rule in facet order (each group's rows also train every later group of
    ``spec.user_groups.values``: new → low, high; low → high). ``{}``: own group only."""
    tower_hidden: tuple[int, ...] = (32,)
    """Hidden widths of every tower unless ``tower_hidden_by_task`` matches its head."""
    tower_hidden_by_task: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Heterogeneous towers: head-name glob → hidden widths; the first matching pattern wins."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _tuples(getattr(self, f.name)))
        if self.also_trains is not None:
            self.also_trains = {k: _tuples(v) for k, v in self.also_trains.items()}
        self.tower_hidden_by_task = {k: _tuples(v) for k, v in self.tower_hidden_by_task.items()}
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")


@dataclass
class SwitcherConfig:
    """Sizes of the gated switchers (MMoE / CGC / PLE)."""

    n_task_experts: int = 1
    """CGC/PLE: experts per output branch and extraction layer."""
    n_shared_experts: int = 2
    """CGC/PLE: shared experts per extraction layer."""
    n_experts: int = 4
    """MMoE: shared experts."""
    ple_levels: int = 2
    """PLE switchers: stacked extraction layers."""

    def check_switchers(self, kinds: tuple[str, ...]) -> None:
        bad = [k for k in kinds if k not in SWITCHER_KINDS]
        if bad:
            raise ValueError(f"unknown switcher kinds {bad}; known: {list(SWITCHER_KINDS)}")
        if min(self.n_shared_experts, self.n_experts, self.ple_levels) < 1 or self.n_task_experts < 0:
            raise ValueError("switchers need n_shared_experts, n_experts, ple_levels >= 1 and n_task_experts >= 0")


@dataclass
class HierarchyConfig(SwitcherConfig, ProductTaskConfig):
    """Fields shared by ``h_mtl`` and ``mfh``."""

    switchers: tuple[str, ...] = ("shared_bottom", "ple", "cgc")
    """Switcher kind per level (shared_bottom | mmoe | cgc | ple); the paper's default."""
    level_hidden: tuple[tuple[int, ...], ...] = ((128,), (64,), (64,))
    """Per level: the switcher's expert (or bottom) MLP widths; the last width is its output."""
    partition_hidden: tuple[int, ...] = (64,)
    """The MLP of each partition between two levels."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_switchers(self.switchers)
        levels = len(self.facets())
        if len(self.switchers) < levels or len(self.level_hidden) < levels:
            raise ValueError(f"{levels} levels need {levels} switchers and level_hidden entries")
        if any(not h for h in self.level_hidden[:levels]) or not self.partition_hidden:
            raise ValueError("level_hidden entries and partition_hidden need at least one width")
        for order in self.facet_orders():
            if sorted(order) != sorted(self.facets()):
                raise ValueError(f"facet order {list(order)} is not a permutation of {self.facets()}")

    def facets(self) -> list[str]:
        return [USER_GROUP, BEHAVIOUR] + ([ITEM] if self.item_facet else [])

    def facet_orders(self) -> list[tuple[str, ...]]:
        raise NotImplementedError


@dataclass
class HMTLConfig(HierarchyConfig):
    """``h_mtl``: one hierarchical tree."""

    order: tuple[str, ...] = ()
    """Facets in split order, e.g. ``[user_group, behaviour]``; empty: user_group, behaviour
    (then item with ``item_facet``)."""

    def facet_orders(self) -> list[tuple[str, ...]]:
        return [self.order or tuple(self.facets())]


@dataclass
class MFHConfig(HierarchyConfig):
    """``mfh``: one tree per facet order; towers combine every path."""

    orders: tuple[tuple[str, ...], ...] = ()
    """Facet orders, one tree each; empty: every permutation of the facets."""
    combine_dim: int = 64
    """Width of the linear combination of the paths that reach a tower (the tower's input)."""

    def facet_orders(self) -> list[tuple[str, ...]]:
        return list(self.orders) or list(itertools.permutations(self.facets()))


@dataclass
class FlatConfig(ProductTaskConfig):
    """``flat``: one PLE over every product task."""

    n_levels: int = 2
    """Stacked extraction layers."""
    n_task_experts: int = 1
    """Experts per product task and layer."""
    n_shared_experts: int = 4
    expert_hidden: tuple[int, ...] = (128, 64)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.switcher_sizes().check_switchers(("ple",))
        if not self.expert_hidden:
            raise ValueError("flat needs at least one expert width")

    def switcher_sizes(self) -> SwitcherConfig:
        return SwitcherConfig(self.n_task_experts, self.n_shared_experts, ple_levels=self.n_levels)


# --------------------------------------------------------------------------------------------
# Product tasks


@dataclass(frozen=True)
class ProductTask:
    behaviour: str
    group: str
    item: str | None = None

    @property
    def name(self) -> str:
        return "@".join(v for v in (self.behaviour, self.group, self.item) if v is not None)

    def value(self, facet: str) -> str:
        return {BEHAVIOUR: self.behaviour, USER_GROUP: self.group, ITEM: self.item}[facet]


def product_tasks(spec: FeatureSpec, item_facet: bool, patterns: tuple[str, ...] = ()) -> list[ProductTask]:
    """The heads, group-major then in spec task order (then item facet order)."""
    if spec.user_groups is None:
        raise SpecError(f"spec {spec.name!r} has no user_groups facet: product-task models split tasks by it")
    if item_facet and spec.item_facet is None:
        raise SpecError(f"spec {spec.name!r} has no item_facet; set item_facet: false")
    items = spec.item_facet.values if item_facet else (None,)
    full = [ProductTask(b, g, i) for g in spec.user_groups.values for b in spec.task_names for i in items]
    if not patterns:
        return full
    unused = [p for p in patterns if not any(fnmatchcase(t.name, p) for t in full)]
    if unused:
        raise SpecError(f"task patterns {unused} match no product task (e.g. {full[0].name!r})")
    chosen = [t for t in full if any(fnmatchcase(t.name, p) for p in patterns)]
    default_item = spec.item_facet.default if item_facet else None
    names = {t.name for t in chosen}
    missing = [t.name for t in full if t.item == default_item and t.name not in names]
    if missing:
        raise SpecError(f"the declared tasks leave rows without a tower: {missing} must stay")
    return chosen


def trains_relation(groups: list[str], also_trains: dict[str, tuple[str, ...]] | None) -> np.ndarray:
    """``[n_groups, n_groups]`` bool: ``[r, g]`` when rows of group ``r`` train group ``g``'s heads."""
    n = len(groups)
    rel = np.eye(n, dtype=bool)
    if also_trains is None:
        return np.triu(np.ones((n, n), dtype=bool))
    for source, targets in also_trains.items():
        unknown = sorted({source, *targets} - set(groups))
        if unknown:
            raise SpecError(f"also_trains names unknown user groups {unknown}; known: {groups}")
        for t in targets:
            rel[groups.index(source), groups.index(t)] = True
    return rel


# --------------------------------------------------------------------------------------------
# Switchers


def extract(layers: nn.ModuleList, x: torch.Tensor, wanted: list[int], n_out: int) -> dict[int, torch.Tensor]:
    """Stacked extraction layers, computing only what the ``wanted`` outputs of the last layer need.

    Output ``k`` of layer ``j`` feeds its own experts and gate at layer ``j+1``; a shared gate
    (every non-final PLE layer) reads all experts of its layer, so the layer below one computes
    every output. Returns output index → ``[B, d]``.
    """
    need: list[list[int]] = [sorted(wanted)]
    for layer in reversed(layers[1:]):
        need.insert(0, list(range(n_out)) if layer.shared_gate is not None else need[0])
    task_inputs: dict[int, torch.Tensor] = dict.fromkeys(range(n_out), x)
    shared_input = x
    for layer, needed in zip(layers, need, strict=True):
        experts_of = range(n_out) if layer.shared_gate is not None else needed
        shared = run_experts(layer.shared_experts, shared_input)
        own = {k: run_experts(layer.task_experts[k], task_inputs[k]) for k in experts_of if len(layer.task_experts[k])}
        outs = {
            k: layer.task_gates[k](task_inputs[k], torch.cat([own[k], shared], dim=1) if k in own else shared)
            for k in needed
        }
        if layer.shared_gate is not None:
            shared_input = layer.shared_gate(shared_input, torch.cat([*own.values(), shared], dim=1))
        task_inputs = outs
    return task_inputs


class Switcher(nn.Module):
    """Splits one input into ``n_out`` branch inputs: shared-bottom, MMoE, CGC or PLE.

    MMoE is an extraction layer without branch-specific experts; CGC one extraction layer;
    PLE ``ple_levels`` of them. ``forward`` computes only the requested branches.
    """

    def __init__(
        self, kind: str, in_dim: int, n_out: int, hidden: tuple[int, ...], sizes: SwitcherConfig, dropout: float = 0.0
    ):
        super().__init__()
        self.kind = kind
        self.n_out = n_out
        self.out_dim = hidden[-1]
        self.bottom = MLP(in_dim, hidden, dropout) if kind == "shared_bottom" else None
        layers = []
        if kind != "shared_bottom":
            n_levels = sizes.ple_levels if kind == "ple" else 1
            own, shared = (0, sizes.n_experts) if kind == "mmoe" else (sizes.n_task_experts, sizes.n_shared_experts)
            for j in range(n_levels):
                layers.append(ExtractionLayer(in_dim, n_out, own, shared, hidden, dropout, j < n_levels - 1))
                in_dim = layers[-1].out_dim
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, wanted: list[int]) -> dict[int, torch.Tensor]:
        if self.bottom is not None:
            return dict.fromkeys(wanted, self.bottom(x))
        return extract(self.layers, x, wanted, self.n_out)

    def named_gates(self, branch_names: list[str]) -> list[tuple[str, Gate]]:
        out = []
        for j, layer in enumerate(self.layers):
            out += [(f"L{j}.{b}", g) for b, g in zip(branch_names, layer.task_gates, strict=True)]
            if layer.shared_gate is not None:
                out.append((f"L{j}.shared", layer.shared_gate))
        return out


def _key(prefix: tuple[str, ...]) -> str:
    return "__".join(v.replace(".", "_") for v in prefix) or "root"


class HierarchyTree(nn.Module):
    """One H-MTL tree: switchers split the input by ``order[0]``, then ``order[1]``, ….

    ``paths[h]`` is head ``h``'s facet values in ``order``; a node exists only for prefixes
    that lead to a head, so a declared task subset builds only its own branches.
    """

    def __init__(self, order: tuple[str, ...], paths: list[tuple[str, ...]], in_dim: int, cfg: HierarchyConfig):
        super().__init__()
        self.order = order
        self.paths = paths
        self.branches: dict[tuple[str, ...], list[str]] = {}
        self.switchers = nn.ModuleDict()
        self.partitions = nn.ModuleDict()
        self.out_dim = self._build(0, (), in_dim, cfg)

    def _build(self, level: int, prefix: tuple[str, ...], in_dim: int, cfg: HierarchyConfig) -> int:
        values = list(dict.fromkeys(p[level] for p in self.paths if p[:level] == prefix))
        self.branches[prefix] = values
        switcher = Switcher(cfg.switchers[level], in_dim, len(values), cfg.level_hidden[level], cfg, cfg.dropout)
        self.switchers[_key(prefix)] = switcher
        if level == len(self.order) - 1:
            return switcher.out_dim
        for v in values:
            mlp = MLP(switcher.out_dim, cfg.partition_hidden, cfg.dropout)
            self.partitions[_key((*prefix, v))] = mlp
            out_dim = self._build(level + 1, (*prefix, v), mlp.out_dim, cfg)
        return out_dim

    def forward(self, x: torch.Tensor, heads: list[int]) -> dict[int, torch.Tensor]:
        """Leaf hidden ``[B, out_dim]`` per requested head index, computing only their paths."""
        out: dict[int, torch.Tensor] = {}
        self._run(0, (), x, heads, out)
        return out

    def _run(self, level: int, prefix: tuple[str, ...], x: torch.Tensor, heads: list[int], out: dict) -> None:
        values = self.branches[prefix]
        wanted = sorted({values.index(self.paths[h][level]) for h in heads})
        hidden = self.switchers[_key(prefix)](x, wanted)
        for c in wanted:
            below = [h for h in heads if self.paths[h][level] == values[c]]
            if level == len(self.order) - 1:
                out.update(dict.fromkeys(below, hidden[c]))
            else:
                path = (*prefix, values[c])
                self._run(level + 1, path, self.partitions[_key(path)](hidden[c]), below, out)

    def named_gates(self) -> list[tuple[str, Gate]]:
        tree = ">".join(self.order)
        out = []
        for prefix, values in self.branches.items():
            node = "/".join(prefix) or "root"
            out += [(f"{tree}/{node}/{n}", g) for n, g in self.switchers[_key(prefix)].named_gates(values)]
        return out


# --------------------------------------------------------------------------------------------
# Models


class ProductTaskModel(MultiTaskModel):
    """Heads = product tasks; the training rule, own-group picking and group mode."""

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: ProductTaskConfig):
        super().__init__(spec, shape, cfg.embedding_dim)
        self.cfg = cfg
        self.product = product_tasks(spec, cfg.item_facet, cfg.tasks)
        self.heads = [Head(name=t.name, task=t.behaviour, group=t.group) for t in self.product]
        self.groups = list(spec.user_groups.values)
        self.three_facet = cfg.item_facet
        index = {t.name: h for h, t in enumerate(self.product)}
        trains = trains_relation(self.groups, cfg.also_trains)
        group_of = [self.groups.index(t.group) for t in self.product]
        self.register_buffer("trained_by", torch.from_numpy(trains[:, group_of]), persistent=False)
        items = list(spec.item_facet.values) if cfg.item_facet else [None]
        default_item = spec.item_facet.default if cfg.item_facet else None
        # own_head[g, i, k]: the head serving task k for a row of group g and item value i; an item
        # value without its own head (a declared subset) falls back to the default value's head.
        own = np.array(
            [
                [
                    [
                        index.get(ProductTask(b, g, i).name, index[ProductTask(b, g, default_item).name])
                        for b in spec.task_names
                    ]
                    for i in items
                ]
                for g in self.groups
            ],
            dtype=np.int64,
        )
        self.register_buffer("own_head", torch.from_numpy(own), persistent=False)
        routes = np.zeros((len(items), len(self.heads)), dtype=bool)
        for g in range(len(self.groups)):
            for i in range(len(items)):
                routes[i, own[g, i]] = True
        self.register_buffer("item_routes", torch.from_numpy(routes), persistent=False)
        self._wanted = {g: [h for h, t in enumerate(self.product) if t.group == g] for g in self.groups}

    def tower_hidden(self, head: str) -> tuple[int, ...]:
        for pattern, hidden in self.cfg.tower_hidden_by_task.items():
            if fnmatchcase(head, pattern):
                return hidden
        return self.cfg.tower_hidden

    def wanted_heads(self, group: str | None) -> list[int]:
        if group is None:
            return list(range(len(self.heads)))
        if group not in self._wanted:
            raise ValueError(f"unknown user group {group!r}; known: {self.groups}")
        return self._wanted[group]

    def forward_embedded(self, dense, field_vectors, group=None):
        wanted = self.wanted_heads(group)
        return torch.stack(self.head_logits(self.view(dense, field_vectors), wanted), dim=1)

    def head_logits(self, x: torch.Tensor, heads: list[int]) -> list[torch.Tensor]:
        """Logit ``[B]`` of each head in ``heads``, computing only what feeds them."""
        raise NotImplementedError

    def head_row_mask(self, row_group: torch.Tensor, row_item: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, len(heads)]`` bool: the heads a row trains (own group and the groups it also trains;
        with the item facet, only the head serving the row's item value)."""
        mask = self.trained_by[row_group]
        if self.three_facet:
            if row_item is None:
                raise SpecError(
                    "a three-facet model needs each row's item facet to pick the heads it trains: "
                    "train it with training.models.mfh.FacetedTrainer"
                )
            mask = mask & self.item_routes[row_item]
        return mask

    def own_task_logits(
        self, logits: torch.Tensor, row_group: torch.Tensor, row_item: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, n_tasks]`` in spec task order from each row's own group's (and item value's) heads."""
        if self.three_facet and row_item is None:
            raise SpecError(
                "a three-facet model needs each row's item facet to pick its heads: use "
                "training.models.mfh.evaluate_faceted"
            )
        index = self.own_head[row_group, row_item if self.three_facet else 0]
        return logits.gather(1, index)


@register("h_mtl", HMTLConfig)
class HMTL(ProductTaskModel):
    """Hierarchical MTL: one tree, towers read its leaves (MFH paper's H-MTL)."""

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: HierarchyConfig):
        super().__init__(spec, shape, cfg)
        self.trees = nn.ModuleList(
            HierarchyTree(order, [tuple(t.value(f) for f in order) for t in self.product], self.input_dim, cfg)
            for order in cfg.facet_orders()
        )
        self.combine = self._combiners(cfg)
        tower_in = cfg.combine_dim if self.combine is not None else self.trees[0].out_dim
        self.towers = nn.ModuleList(Tower(tower_in, self.tower_hidden(h.name), cfg.dropout) for h in self.heads)

    def _combiners(self, cfg: HierarchyConfig) -> nn.ModuleList | None:
        return None

    def head_logits(self, x, heads):
        leaves = [tree(x, heads) for tree in self.trees]
        if self.combine is None:
            return [self.towers[h](leaves[0][h]) for h in heads]
        outs = []
        for h in heads:
            combined = sum(proj(leaf[h]) for proj, leaf in zip(self.combine[h], leaves, strict=True))
            outs.append(self.towers[h](combined))
        return outs

    def gate_weights(self):
        return {n: g.last_weights for tree in self.trees for n, g in tree.named_gates() if g.last_weights is not None}


@register("mfh", MFHConfig)
class MFH(HMTL):
    """Multi-faceted hierarchical MTL: one tree per facet order; each tower reads ``Σ_p W_p h_p + b``
    over the paths ``p`` (one per tree) that reach it."""

    def _combiners(self, cfg: MFHConfig) -> nn.ModuleList:
        return nn.ModuleList(
            nn.ModuleList(nn.Linear(tree.out_dim, cfg.combine_dim, bias=p == 0) for p, tree in enumerate(self.trees))
            for _ in self.heads
        )


@register("flat", FlatConfig)
class FlatPLE(ProductTaskModel):
    """One PLE over every product task: the MFH paper's flat baseline."""

    def __init__(self, spec: FeatureSpec, shape: InputShape, cfg: FlatConfig):
        super().__init__(spec, shape, cfg)
        self.switcher = Switcher(
            "ple", self.input_dim, len(self.heads), cfg.expert_hidden, cfg.switcher_sizes(), cfg.dropout
        )
        self.towers = nn.ModuleList(
            Tower(self.switcher.out_dim, self.tower_hidden(h.name), cfg.dropout) for h in self.heads
        )

    def head_logits(self, x, heads):
        hidden = self.switcher(x, heads)
        return [self.towers[h](hidden[h]) for h in heads]

    def gate_weights(self):
        names = [h.name for h in self.heads]
        return {n: g.last_weights for n, g in self.switcher.named_gates(names) if g.last_weights is not None}


# --------------------------------------------------------------------------------------------
# Cost of a forward


def forward_cost(
    model: MultiTaskModel, dense: torch.Tensor, field_vectors: list[torch.Tensor], group: str | None = None
) -> dict[str, float]:
    """Network parameters a forward touches and its FLOPs per row (embedding lookups excluded).

    A parameter is touched when the outputs depend on it (it receives a gradient).
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    field_vectors = [v.detach() for v in field_vectors]
    with FlopCounterMode(display=False) as counter:
        out = model.forward_embedded(dense, field_vectors, group=group)
    out.sum().backward()
    touched = sum(p.numel() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return {"params": touched, "flops_per_row": counter.get_total_flops() / dense.shape[0], "outputs": out.shape[1]}


# --------------------------------------------------------------------------------------------
# Three-facet training and evaluation (the trainer passes each row's user group only)


@dataclass
class FacetedTensors(Tensors):
    """A split with each row's item facet value index."""

    item: torch.Tensor

    def rows(self, idx) -> FacetedTensors:
        return FacetedTensors(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


def faceted_tensors(frame: pd.DataFrame, spec: FeatureSpec, pre: Preprocessor) -> FacetedTensors:
    if spec.item_facet is None:
        raise SpecError(f"spec {spec.name!r} has no item_facet")
    t = to_tensors(frame, spec, pre)
    values = {v: i for i, v in enumerate(spec.item_facet.values)}
    item = np.array(frame[spec.item_facet.column].astype(str).map(values), dtype=np.int64)
    fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
    return FacetedTensors(**fields, item=torch.from_numpy(item))


class FacetedTrainer(Trainer):
    """The trainer with each row's item facet passed to ``head_row_mask`` (three-facet models)."""

    def head_losses(self, batch: FacetedTensors) -> torch.Tensor:
        logits = self.model(batch.dense, batch.sparse)
        masks = batch.space[:, self.head_task] * self.model.head_row_mask(batch.group, batch.item)
        return masked_task_losses(logits, batch.labels[:, self.head_task], masks, self.is_binary)


@torch.no_grad()
def evaluate_faceted(
    model: ProductTaskModel, frame: pd.DataFrame, pre: Preprocessor, batch_size: int = 8192
) -> dict[str, Any]:
    """``metrics.json``'s layout (tasks, groups, item facets) for a three-facet model."""
    from training import metrics as metrics_lib

    model.eval()
    t = faceted_tensors(frame, model.spec, pre)
    outs = []
    for idx in torch.arange(len(t)).split(batch_size):
        logits = model(t.dense[idx], t.sparse[idx])
        outs.append(torch.sigmoid(model.own_task_logits(logits, t.group[idx], t.item[idx])))
    probs = torch.cat(outs).numpy()
    preds = {task.name: probs[:, k] for k, task in enumerate(model.spec.tasks)}
    return metrics_lib.evaluate_predictions(frame, preds, model.spec)
