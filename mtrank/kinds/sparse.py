"""``sparse`` fields: one categorical value per row (:mod:`mtrank.transform` keys and vocabularies).

Graph-held fields (small vocabularies) feed vocabulary indices: ``ids`` (item side) and
``user_ids`` (user side), int64, one column per field in spec order. Store-held fields (ids) feed
their table's vectors, ``emb.<field>`` float32 ``[batch or requests, width]``, looked up in the
embedding store by key.
"""

from __future__ import annotations

from collections.abc import Mapping

from mtrank.kinds.base import Feed, GraphInput, Rows, StoreNeed, axis_of
from mtrank.manifest import IDS_INPUT, USER_IDS_INPUT, emb_input
from mtrank.transform import FeatureTransform

key = "sparse"
_NAMES = {"item": IDS_INPUT, "user": USER_IDS_INPUT}


def inputs(t: FeatureTransform, widths: Mapping[str, int]) -> list[GraphInput]:
    out = []
    for side, name in _NAMES.items():
        fields = tuple(s.name for s in t.graph_fields if s.side == side)
        if fields:
            out.append(GraphInput(name, "int64", axis_of(side), (len(fields),), "ids", fields))
    for s in t.sparse:
        if s.location == "store":
            width = (widths[s.name],)
            out.append(GraphInput(emb_input(s.name), "float32", axis_of(s.side), width, "vectors", (s.name,)))
    return out


def feed(t: FeatureTransform, rows: Rows, out: Feed) -> None:
    for side, name in _NAMES.items():
        fields = [s for s in t.graph_fields if s.side == side]
        if fields:
            columns, n = rows.side(side)
            out.arrays[name] = t.indices(fields, columns, n)
    for s in t.sparse:
        if s.location == "store":
            columns, n = rows.side(s.side)
            out.needs.append(StoreNeed(emb_input(s.name), s.name, t.store_keys(s.name, columns.get(s.name), n)))
