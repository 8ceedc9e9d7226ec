"""The interface every multi-task model implements.

A model maps tensors to tensors: ``dense`` (float32 ``[B, n_dense]``, already normalised) and
``sparse`` (int64 ``[B, n_sparse]``, vocabulary indices in spec order, 0 = out of vocabulary) to
logits ``[B, len(heads)]``. The embedding lookup is a separate step (:meth:`embed`) so that the
exporter can move store-held tables out of the graph and feed their vectors as inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtrank.spec import FeatureSpec
from mtrank.training.models.blocks import FieldEmbeddings


@dataclass(frozen=True)
class Head:
    """One output column: a task, for one user group when the model splits tasks by group."""

    name: str
    task: str
    group: str | None = None


@dataclass(frozen=True)
class InputShape:
    """What the preprocessor fitted: dense width and the vocabulary size of each sparse field."""

    n_dense: int
    vocab_sizes: tuple[int, ...]


class MultiTaskModel(nn.Module):
    """Base class: embeddings + a network over ``concat(dense, field vectors)``.

    ``embedding_views`` is 1 for models with one shared table per field; STEM and the
    independent ``single`` baseline keep several views (shared, per task) side by side in one
    table row, so one lookup per id serves every task. ``field_views`` lets a field hold only the
    first few views (STEM with task tables for some fields only): field ``i``'s row is
    ``field_view_names(i)``, ``embedding_dim`` wide each, ``embeddings.tables[i].embedding_dim`` in all.
    """

    heads: list[Head]
    groups: list[str] | None = None
    """User groups with their own graph (MFH); None: one graph serves every user."""
    uses_item_facet: bool = False
    """Whether picking a row's heads needs its item-facet value (three-facet MFH): then
    ``head_row_mask``, ``own_task_logits`` and ``group_task_logits`` need ``row_item``."""

    def __init__(
        self,
        spec: FeatureSpec,
        shape: InputShape,
        embedding_dim: int,
        embedding_views: int = 1,
        field_views: Sequence[int] | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.shape = shape
        self.embedding_dim = embedding_dim
        self.embedding_views = embedding_views
        self.field_views = tuple(field_views or [embedding_views] * len(shape.vocab_sizes))
        if len(self.field_views) != len(shape.vocab_sizes) or not all(
            1 <= n <= embedding_views for n in self.field_views
        ):
            raise ValueError(f"field_views {self.field_views}: one count in [1, {embedding_views}] per field")
        self.embeddings = FieldEmbeddings(shape.vocab_sizes, [embedding_dim * n for n in self.field_views])

    @property
    def view_names(self) -> list[str]:
        """Name of each embedding view, in table-row order (``shared``, or one per task)."""
        if self.embedding_views == 1:
            return ["shared"]
        return [f"view{i}" for i in range(self.embedding_views)]

    def field_view_names(self, field: int) -> list[str]:
        """The views field ``field``'s table row holds, in order (a prefix of ``view_names``)."""
        return self.view_names[: self.field_views[field]]

    @property
    def n_fields(self) -> int:
        return len(self.shape.vocab_sizes)

    @property
    def input_dim(self) -> int:
        """Width of ``concat(dense, one view of every field)``."""
        return self.shape.n_dense + self.n_fields * self.embedding_dim

    def embed(self, sparse: torch.Tensor) -> list[torch.Tensor]:
        """Per field, ``[B, embedding_dim * len(field_view_names(i))]``."""
        return self.embeddings(sparse)

    def view(self, dense: torch.Tensor, field_vectors: list[torch.Tensor], view: int = 0) -> torch.Tensor:
        """``concat(dense, view ``view`` of every field)``: ``[B, input_dim]``.

        A field whose row does not hold view ``view`` contributes its shared view (view 0).
        """
        d = self.embedding_dim
        parts = [dense]
        for v, n in zip(field_vectors, self.field_views, strict=True):
            k = view if view < n else 0
            parts.append(v[:, k * d : (k + 1) * d])
        return torch.cat(parts, dim=1)

    def forward(
        self,
        dense: torch.Tensor,
        sparse: torch.Tensor,
        group: str | None = None,
        gates: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.forward_embedded(dense, self.embed(sparse), group=group, gates=gates)

    def forward_embedded(
        self,
        dense: torch.Tensor,
        field_vectors: list[torch.Tensor],
        group: str | None = None,
        gates: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, len(heads)]``, or ``[B, len(group_heads(group))]`` in group mode.

        ``gates``, when given, receives the weights ``[B, n_experts]`` of every gate the forward
        computed, by gate name (models without gates leave it empty).
        """
        raise NotImplementedError

    def group_heads(self, group: str | None) -> list[Head]:
        """The heads computed in group mode (all heads when the model has no groups)."""
        if group is None or self.groups is None:
            return list(self.heads)
        return [h for h in self.heads if h.group == group]

    def head_row_mask(self, row_group: torch.Tensor, row_item: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, len(heads)]`` bool: which heads a row trains (all; MFH widens new/low users' rows).

        ``row_group`` / ``row_item``: int64 ``[B]``, each row's user-group and item-facet value index.
        """
        return torch.ones(row_group.shape[0], len(self.heads), dtype=torch.bool, device=row_group.device)

    def own_task_logits(
        self, logits: torch.Tensor, row_group: torch.Tensor, row_item: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, n_tasks]`` in spec task order: each row's prediction from its own group's heads."""
        return logits

    def group_task_logits(
        self, logits: torch.Tensor, group: str | None, row_item: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Group-mode logits ``[B, len(group_heads(group))]`` → ``[B, n_tasks]`` in spec task order."""
        return logits


def task_heads(spec: FeatureSpec) -> list[Head]:
    return [Head(name=t.name, task=t.name) for t in spec.tasks]


FIELD_SELECTIONS = ("all", "user", "item", "ids")


def check_field_selection(selection: str | tuple[str, ...] | list[str]) -> str | tuple[str, ...]:
    """A ``task_embedding_fields`` value: one of :data:`FIELD_SELECTIONS` or a non-empty list of fields."""
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


class SharedAndTaskViews(MultiTaskModel):
    """STEM's embedding layout: views ``shared`` + one per task, task views only for the selected fields.

    One table row per id holds ``[shared | task_1 | ... | task_T]``, so serving needs one lookup per
    id whatever the number of tasks; fields left out hold the shared view only.
    """

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
