"""``multi`` fields: a list of categorical values per row (an item's tags, a user's interests),
pooled by the model (``mean`` / ``sum``; an empty list is the zero vector).

Graph inputs (:mod:`mtrank.kinds.lists`): ``list.<field>`` int64 ``[batch or requests, max_len]``
vocabulary indices padded with 0, and ``len.<field>`` int64, each row's length.
"""

from __future__ import annotations

from collections.abc import Mapping

from mtrank.kinds.base import Feed, GraphInput, Rows
from mtrank.kinds.lists import feed as feed_list
from mtrank.kinds.lists import inputs as list_inputs
from mtrank.transform import FeatureTransform

key = "multi"


def inputs(t: FeatureTransform, widths: Mapping[str, int]) -> list[GraphInput]:
    return [i for f in t.lists if f.kind == key for i in list_inputs(f, widths)]


def feed(t: FeatureTransform, rows: Rows, out: Feed) -> None:
    for f in t.lists:
        if f.kind == key:
            feed_list(t, f, rows, out)
