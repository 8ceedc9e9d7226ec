"""The graph inputs of a list field (``multi`` or ``sequence``): indices or store vectors, and lengths."""

from __future__ import annotations

from collections.abc import Mapping

from mtrank.kinds.base import Feed, GraphInput, Rows, StoreNeed, axis_of
from mtrank.manifest import LEN_PREFIX, LIST_PREFIX, emb_input
from mtrank.transform import FeatureTransform, ListColumn, list_batch


def kind_inputs(kind: str, t: FeatureTransform, widths: Mapping[str, int]) -> list[GraphInput]:
    """The graph inputs of every list field of ``kind`` (``multi`` or ``sequence``)."""
    return [i for f in t.lists if f.kind == kind for i in inputs(f, widths)]


def kind_feed(kind: str, t: FeatureTransform, rows: Rows, out: Feed) -> None:
    """Add the arrays (and store needs) of every list field of ``kind`` for ``rows`` to ``out``."""
    for f in t.lists:
        if f.kind == kind:
            feed(t, f, rows, out)


def inputs(f: ListColumn, widths: Mapping[str, int]) -> list[GraphInput]:
    axis = axis_of(f.side)
    if f.location == "store":
        width = (f.max_len, widths[f.table])
        entries = GraphInput(emb_input(f.name), "float32", axis, width, "list_vectors", (f.name,))
    else:
        entries = GraphInput(LIST_PREFIX + f.name, "int64", axis, (f.max_len,), "list_ids", (f.name,))
    return [entries, GraphInput(LEN_PREFIX + f.name, "int64", axis, (), "list_len", (f.name,))]


def feed(t: FeatureTransform, f: ListColumn, rows: Rows, out: Feed) -> None:
    columns, n = rows.side(f.side)
    values = columns.get(f.name)
    if f.location == "store":
        batch = list_batch(values, n, f.max_len, f.name, t.max_list_len)
        out.needs.append(StoreNeed(emb_input(f.name), f.table, batch.keys,
                                   lambda vectors: batch.matrix(vectors, f.max_len)))
        lengths, truncated = batch.lengths, batch.truncated
    else:
        out.arrays[LIST_PREFIX + f.name], lengths, truncated = t.list_ids(f, values, n)
    out.arrays[LEN_PREFIX + f.name] = lengths
    if truncated:
        out.truncated[f.name] = truncated
