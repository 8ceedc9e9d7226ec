"""The feature kinds, one module each, and the graph inputs of a model derived from them.

Adding a kind: its module (spec field in :mod:`mtrank.spec`, columnar transform in
:mod:`mtrank.transform`, ``inputs`` and ``feed`` here, a role the models' input layer knows) and
one line in :data:`KINDS`. docs/architecture.md says more.
"""

from __future__ import annotations

from collections.abc import Mapping

from mtrank.kinds import dense, multi, sequence, sparse
from mtrank.kinds.base import Feed, GraphInput, Kind, Rows, StoreNeed
from mtrank.manifest import BATCH_AXIS, ITEM_FACET_INPUT, REQUEST_INDEX_INPUT
from mtrank.transform import FeatureTransform

KINDS: tuple[Kind, ...] = (dense, sparse, multi, sequence)

__all__ = ["KINDS", "Feed", "GraphInput", "Rows", "StoreNeed", "graph_inputs", "feed"]


def graph_inputs(t: FeatureTransform, widths: Mapping[str, int], item_facet: bool = False) -> list[GraphInput]:
    """Every graph input of a model, in graph order: the row → request index (when some input is
    per request), each kind's inputs, and the item-facet index for models that pick heads by it."""
    out = [i for kind in KINDS for i in kind.inputs(t, widths)]
    if any(i.per_request for i in out):
        out.insert(0, GraphInput(REQUEST_INDEX_INPUT, "int64", BATCH_AXIS, (), "request_index"))
    if item_facet:
        out.append(GraphInput(ITEM_FACET_INPUT, "int64", BATCH_AXIS, (), "item_facet"))
    return out


def feed(t: FeatureTransform, rows: Rows, wanted: Mapping[str, GraphInput] | None = None) -> Feed:
    """The graph inputs' arrays for ``rows`` (those of ``wanted`` only, when given)."""
    out = Feed(arrays={REQUEST_INDEX_INPUT: rows.request_index})
    for kind in KINDS:
        kind.feed(t, rows, out)
    if t.item_facet is not None and (wanted is None or ITEM_FACET_INPUT in wanted):
        out.arrays[ITEM_FACET_INPUT] = t.facet(t.item_facet, rows.item, rows.n_rows)
    if wanted is not None:
        out.arrays = {k: v for k, v in out.arrays.items() if k in wanted}
        out.needs = [n for n in out.needs if n.input in wanted]
    return out
