"""What every feature kind provides, and the batch of raw columns the kinds turn into graph inputs.

A kind (:mod:`mtrank.kinds.dense`, ``sparse``, ``multi``, ``sequence``) knows, for the fields of
its kind in a fitted :class:`~mtrank.transform.FeatureTransform`:

- ``inputs``: the graph inputs it owns (name, dtype, axis, width, role);
- ``feed``: their arrays for a batch of raw rows (:class:`Rows`), through the shared transform,
  and the store lookups they need (:class:`StoreNeed`) where vectors come from the store;
- ``manifest``: its entries of the manifest (from the spec and the fitted vocabularies).

The *role* of an input says what the exported graph does with it, in terms of the shared input
layer of every model (``mtrank.training.models.base``): ``dense`` columns, graph-table ``ids``,
store ``vectors`` of one field, a list field's ``list_ids`` / ``list_vectors`` and ``list_len``.
The exporter and the service handle roles, never input names or kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mtrank.manifest import BATCH_AXIS, REQUESTS_AXIS
from mtrank.transform import Column, FeatureTransform

ROLES = ("request_index", "dense", "ids", "vectors", "list_ids", "list_vectors", "list_len", "item_facet")


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str
    """numpy dtype name: float32 or int64."""
    axis: str
    """:data:`~mtrank.manifest.BATCH_AXIS` (a row per candidate) or ``REQUESTS_AXIS`` (a row per request)."""
    width: tuple[int, ...]
    """The dimensions after the axis."""
    role: str
    """One of :data:`ROLES`."""
    fields: tuple[str, ...] = ()
    """The spec fields it carries, in column order."""

    @property
    def per_request(self) -> bool:
        return self.axis == REQUESTS_AXIS

    @property
    def shape(self) -> list[int | str]:
        return [self.axis, *self.width]


def axis_of(side: str) -> str:
    """User-side fields enter once per request, item-side ones once per candidate."""
    return REQUESTS_AXIS if side == "user" else BATCH_AXIS


@dataclass
class Rows:
    """Raw columns of one batch: item-side columns hold a value per row (candidate), user-side
    columns a value per request; ``request_index[row]`` is the row's request."""

    item: Mapping[str, Column]
    user: Mapping[str, Column]
    n_rows: int
    n_requests: int
    request_index: np.ndarray

    def side(self, side: str) -> tuple[Mapping[str, Column], int]:
        return (self.user, self.n_requests) if side == "user" else (self.item, self.n_rows)

    @classmethod
    def one_request(cls, user: Mapping[str, Any], item: Mapping[str, Column], n: int) -> Rows:
        """A request: one user (scalar or list values) and ``n`` candidates."""
        return cls(item, {k: [v] for k, v in user.items()}, n, 1, np.zeros(n, dtype=np.int64))


@dataclass
class StoreNeed:
    """Vectors a graph input takes from store table ``table``: one per key, placed by ``place``
    (identity when None) into the input's array."""

    input: str
    table: str
    keys: list[str]
    place: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class Feed:
    """What the kinds produce for one batch: arrays by input name, store lookups still to do, and
    per list field the rows cut to ``max_len``."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    needs: list[StoreNeed] = field(default_factory=list)
    truncated: dict[str, int] = field(default_factory=dict)

    def resolve(self, found: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays with each need's looked-up vectors (``found[input]``: ``[len(keys), width]``) placed."""
        out = dict(self.arrays)
        for need in self.needs:
            vectors = found[need.input]
            out[need.input] = need.place(vectors) if need.place is not None else vectors
        return out


class Kind(Protocol):
    """One kind of feature: see the module docstring."""

    key: str
    """The spec's and the manifest's key for fields of this kind."""

    def inputs(self, t: FeatureTransform, widths: Mapping[str, int]) -> list[GraphInput]:
        """Its graph inputs; ``widths`` gives each store table's vector width."""
        ...

    def feed(self, t: FeatureTransform, rows: Rows, out: Feed) -> None:
        """Add its inputs' arrays (and store needs) for ``rows`` to ``out``."""
        ...
