"""``dense`` fields: numbers, standardised with train statistics (:mod:`mtrank.transform`).

Graph inputs: ``dense`` (item side, a row per candidate) and ``user_dense`` (user side, a row per
request), float32, one column per field in spec order.
"""

from __future__ import annotations

from collections.abc import Mapping

from mtrank.kinds.base import Feed, GraphInput, Rows, axis_of
from mtrank.manifest import DENSE_INPUT, USER_DENSE_INPUT
from mtrank.transform import FeatureTransform

key = "dense"
_NAMES = {"item": DENSE_INPUT, "user": USER_DENSE_INPUT}


def inputs(t: FeatureTransform, widths: Mapping[str, int]) -> list[GraphInput]:
    out = []
    for side, name in _NAMES.items():
        fields = tuple(d.name for d in t.dense if d.side == side)
        if fields:
            out.append(GraphInput(name, "float32", axis_of(side), (len(fields),), "dense", fields))
    return out


def feed(t: FeatureTransform, rows: Rows, out: Feed) -> None:
    for side, name in _NAMES.items():
        if any(d.side == side for d in t.dense):
            columns, n = rows.side(side)
            out.arrays[name] = t.dense_matrix(columns, n, side)
