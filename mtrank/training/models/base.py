"""The interface every multi-task model implements.

A model maps tensors to tensors: ``dense`` (float32 ``[B, n_dense]``, already normalised) and
``sparse`` (int64, vocabulary indices, 0 = out of vocabulary: the ``n_sparse`` single-valued fields
in spec order, then per list field its ``max_len`` padded indices and its length, see
:class:`InputShape`) to logits ``[B, len(heads)]``.

The shared input layer (:meth:`MultiTaskModel.embed`) turns ids into one vector per *slot*: each
sparse field's embedding, then each list field pooled (:class:`~mtrank.training.models.blocks.ListPool`:
mean, sum or target attention against the candidate's vector of the field the list shares). Every
model reads ``concat(dense, slot vectors)`` through :meth:`MultiTaskModel.view`, so list fields reach
every model in one place. The lookup is a separate step so that the exporter can move store-held
tables out of the graph and feed their vectors (and a history's entry vectors) as inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtrank.spec import FeatureSpec
from mtrank.training.models.blocks import FieldEmbeddings, ListPool


@dataclass(frozen=True)
class Head:
    """One output column: a task, for one user group when the model splits tasks by group."""

    name: str
    task: str
    group: str | None = None


@dataclass(frozen=True)
class ListShape:
    """A list field (``multi`` or ``sequence``) as the model sees it."""

    name: str
    max_len: int
    pooling: str
    share: int | None
    """Index of the sparse field whose table embeds the entries; None: a table of its own."""
    vocab_size: int = 0
    """Rows of its own table (``share`` None)."""


@dataclass(frozen=True)
class InputShape:
    """What the preprocessor fitted: dense width, the vocabulary size of each sparse field, the list
    fields. ``sparse`` input columns: ``len(vocab_sizes)`` field indices, then for each list field
    ``max_len`` padded indices and its length."""

    n_dense: int
    vocab_sizes: tuple[int, ...]
    lists: tuple[ListShape, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> InputShape:
        return cls(d["n_dense"], tuple(d["vocab_sizes"]), tuple(ListShape(**x) for x in d.get("lists", ())))


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
        self.slot_views = self.field_views + tuple(
            self.field_views[x.share] if x.share is not None else 1 for x in shape.lists)
        """Views per input slot: the sparse fields', then each list field's (its shared table's)."""
        own = [x for x in shape.lists if x.share is None]
        self.list_tables = FieldEmbeddings([x.vocab_size for x in own], embedding_dim)
        self._own_table = {x.name: i for i, x in enumerate(own)}
        self.pools = nn.ModuleList(
            ListPool(x.pooling, embedding_dim * self.slot_views[len(self.field_views) + k], x.max_len)
            for k, x in enumerate(shape.lists)
        )

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
    def n_slots(self) -> int:
        """Input vectors: one per sparse field and one per list field."""
        return self.n_fields + len(self.shape.lists)

    @property
    def input_dim(self) -> int:
        """Width of ``concat(dense, one view of every slot)``."""
        return self.shape.n_dense + self.n_slots * self.embedding_dim

    def embed(self, sparse: torch.Tensor) -> list[torch.Tensor]:
        """Per slot, ``[B, embedding_dim * views]``: the sparse fields' vectors, then the pooled lists."""
        n = self.n_fields
        vectors = self.embeddings(sparse[:, :n])
        offset = n
        for k, x in enumerate(self.shape.lists):
            entries = self.list_table(k)(sparse[:, offset : offset + x.max_len])
            vectors.append(self.pool_list(k, entries, sparse[:, offset + x.max_len], vectors))
            offset += x.max_len + 1
        return vectors

    def list_table(self, k: int) -> nn.Embedding:
        """The table that embeds list field ``k``'s entries (the shared field's, or its own)."""
        x = self.shape.lists[k]
        if x.share is not None:
            return self.embeddings.tables[x.share]
        return self.list_tables.tables[self._own_table[x.name]]

    def pool_list(
        self, k: int, entries: torch.Tensor, lengths: torch.Tensor, vectors: list[torch.Tensor]
    ) -> torch.Tensor:
        """List field ``k`` pooled: ``entries`` ``[B, L, W]``, ``lengths`` ``[B]``; ``vectors`` are the
        rows' sparse field vectors (read for attention only: its target is the shared field's)."""
        x = self.shape.lists[k]
        return self.pools[k](entries, lengths, vectors[x.share] if x.pooling == "attention" else None)

    def view(self, dense: torch.Tensor, field_vectors: list[torch.Tensor], view: int = 0) -> torch.Tensor:
        """``concat(dense, view ``view`` of every field)``: ``[B, input_dim]``.

        A field whose row does not hold view ``view`` contributes its shared view (view 0).
        """
        d = self.embedding_dim
        parts = [dense]
        for v, n in zip(field_vectors, self.slot_views, strict=True):
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
        self.has_task_views = [n > 1 for n in self.slot_views]
        """Per input slot (lists follow their shared field)."""
        self.heads = task_heads(spec)

    @property
    def view_names(self) -> list[str]:
        return ["shared", *self.spec.task_names]

    def task_only_vectors(self, field_vectors: list[torch.Tensor], task: int) -> list[torch.Tensor]:
        """Task ``task``'s own vectors of the fields that have task views."""
        d, k = self.embedding_dim, 1 + task
        return [v[:, k * d : (k + 1) * d] for v, own in zip(field_vectors, self.has_task_views, strict=True) if own]
