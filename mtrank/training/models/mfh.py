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

Three-facet models (``item_facet: true``) pick a row's heads by its user group *and* its item-facet
value: the trainer passes each row's item-facet index to ``head_row_mask`` / ``own_task_logits``,
and a group's graph takes it as an input and picks with ``group_task_logits``.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from mtrank.spec import STRICT, FeatureSpec, SpecError
from mtrank.training.models.base import Head, InputShape, MultiTaskModel
from mtrank.training.models.blocks import MLP, Tower, extract, extraction_stack
from mtrank.training.models.registry import register

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

    __pydantic_config__ = STRICT

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

    __pydantic_config__ = STRICT

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


def trains_relation(groups: list[str], also_trains: dict[str, tuple[str, ...]] | None) -> torch.Tensor:
    """``[n_groups, n_groups]`` bool: ``[r, g]`` when rows of group ``r`` train group ``g``'s heads."""
    n = len(groups)
    rel = torch.eye(n, dtype=torch.bool)
    if also_trains is None:
        return torch.ones(n, n, dtype=torch.bool).triu()
    for source, targets in also_trains.items():
        unknown = sorted({source, *targets} - set(groups))
        if unknown:
            raise SpecError(f"also_trains names unknown user groups {unknown}; known: {groups}")
        for t in targets:
            rel[groups.index(source), groups.index(t)] = True
    return rel


# --------------------------------------------------------------------------------------------
# Switchers


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
        if kind == "shared_bottom":
            self.layers = nn.ModuleList()
        else:
            n_levels = sizes.ple_levels if kind == "ple" else 1
            own, shared = (0, sizes.n_experts) if kind == "mmoe" else (sizes.n_task_experts, sizes.n_shared_experts)
            self.layers = extraction_stack(in_dim, n_out, n_levels, own, shared, hidden, dropout)

    def forward(
        self,
        x: torch.Tensor,
        wanted: list[int],
        gates: dict[str, torch.Tensor] | None = None,
        names: list[str] | None = None,
        prefix: str = "",
    ) -> dict[int, torch.Tensor]:
        """Branch index → ``[B, out_dim]`` for the ``wanted`` branches; gate weights go to ``gates``
        as ``{prefix}L{j}.{names[k]}`` (see :func:`~mtrank.training.models.blocks.extract`)."""
        if self.bottom is not None:
            return dict.fromkeys(wanted, self.bottom(x))
        return extract(self.layers, [x] * self.n_out, x, wanted, gates, names, prefix)


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

    def forward(
        self, x: torch.Tensor, heads: list[int], gates: dict[str, torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor]:
        """Leaf hidden ``[B, out_dim]`` per requested head index, computing only their paths.

        Gate weights go to ``gates`` as ``<order>/<node>/L<j>.<branch>`` (``user_group>behaviour/new/L0.vtr``).
        """
        out: dict[int, torch.Tensor] = {}
        self._run(0, (), x, heads, out, gates)
        return out

    def _run(self, level: int, prefix: tuple[str, ...], x: torch.Tensor, heads: list[int], out: dict, gates) -> None:
        values = self.branches[prefix]
        wanted = sorted({values.index(self.paths[h][level]) for h in heads})
        node = f"{'>'.join(self.order)}/{'/'.join(prefix) or 'root'}/"
        hidden = self.switchers[_key(prefix)](x, wanted, gates, values, node)
        for c in wanted:
            below = [h for h in heads if self.paths[h][level] == values[c]]
            if level == len(self.order) - 1:
                out.update(dict.fromkeys(below, hidden[c]))
            else:
                path = (*prefix, values[c])
                self._run(level + 1, path, self.partitions[_key(path)](hidden[c]), below, out, gates)


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
        self.uses_item_facet = cfg.item_facet
        index = {t.name: h for h, t in enumerate(self.product)}
        group_of = [self.groups.index(t.group) for t in self.product]
        self.register_buffer("trained_by", trains_relation(self.groups, cfg.also_trains)[:, group_of], persistent=False)
        items = list(spec.item_facet.values) if cfg.item_facet else [None]
        default_item = spec.item_facet.default if cfg.item_facet else None
        self._wanted = {g: [h for h, t in enumerate(self.product) if t.group == g] for g in self.groups}
        # own[g][i][k]: the head serving task k for a row of group g and item value i; an item value
        # without its own head (a declared subset) falls back to the default value's head.
        def head(b: str, g: str, i: str | None) -> int:
            return index.get(ProductTask(b, g, i).name, index[ProductTask(b, g, default_item).name])

        own = [[[head(b, g, i) for b in spec.task_names] for i in items] for g in self.groups]
        self.register_buffer("own_head", torch.tensor(own, dtype=torch.int64), persistent=False)
        # The same heads as columns of the group-mode logits (group g computes only _wanted[g]).
        group_cols = [[[self._wanted[g].index(h) for h in row] for row in own[gi]] for gi, g in enumerate(self.groups)]
        self.register_buffer("group_cols", torch.tensor(group_cols, dtype=torch.int64), persistent=False)
        routes = torch.zeros(len(items), len(self.heads), dtype=torch.bool)
        for by_item in own:
            for i, heads in enumerate(by_item):
                routes[i, heads] = True
        self.register_buffer("item_routes", routes, persistent=False)

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

    def forward_embedded(self, dense, field_vectors, group=None, gates=None):
        wanted = self.wanted_heads(group)
        return torch.stack(self.head_logits(self.view(dense, field_vectors), wanted, gates), dim=1)

    def head_logits(
        self, x: torch.Tensor, heads: list[int], gates: dict[str, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Logit ``[B]`` of each head in ``heads``, computing only what feeds them."""
        raise NotImplementedError

    def _need_item(self, row_item: torch.Tensor | None) -> None:
        if self.uses_item_facet and row_item is None:
            raise SpecError("a three-facet model needs each row's item-facet index to pick its heads (row_item)")

    def head_row_mask(self, row_group: torch.Tensor, row_item: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, len(heads)]`` bool: the heads a row trains (own group and the groups it also trains;
        with the item facet, only the head serving the row's item value)."""
        self._need_item(row_item)
        mask = self.trained_by[row_group]
        if self.uses_item_facet:
            mask = mask & self.item_routes[row_item]
        return mask

    def own_task_logits(self, logits, row_group, row_item=None):
        """``[B, n_tasks]`` in spec task order from each row's own group's (and item value's) heads."""
        self._need_item(row_item)
        return logits.gather(1, self.own_head[row_group, row_item if self.uses_item_facet else 0])

    def group_task_logits(self, logits, group, row_item=None):
        """Group ``group``'s logits → ``[B, n_tasks]``: the head of each row's item value (three facets)."""
        if group is None:
            raise ValueError("group_task_logits needs the group whose group-mode logits these are")
        self._need_item(row_item)
        cols = self.group_cols[self.groups.index(group)]
        if not self.uses_item_facet:
            return logits[:, cols[0]]
        return logits.gather(1, cols[row_item])


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

    def head_logits(self, x, heads, gates=None):
        leaves = [tree(x, heads, gates) for tree in self.trees]
        if self.combine is None:
            return [self.towers[h](leaves[0][h]) for h in heads]
        outs = []
        for h in heads:
            combined = sum(proj(leaf[h]) for proj, leaf in zip(self.combine[h], leaves, strict=True))
            outs.append(self.towers[h](combined))
        return outs


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

    def head_logits(self, x, heads, gates=None):
        hidden = self.switcher(x, heads, gates, [h.name for h in self.heads])
        return [self.towers[h](hidden[h]) for h in heads]
