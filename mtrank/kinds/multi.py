"""``multi`` fields: a list of categorical values per row (an item's tags, a user's interests),
pooled by the model (``mean`` / ``sum``; an empty list is the zero vector).

Graph inputs (:mod:`mtrank.kinds.lists`): ``list.<field>`` int64 ``[batch or requests, max_len]``
vocabulary indices padded with 0, and ``len.<field>`` int64, each row's length.
"""

from __future__ import annotations

from collections.abc import Mapping

from mtrank.kinds.base import Feed, GraphInput, Rows
from mtrank.kinds.lists import kind_feed, kind_inputs
from mtrank.transform import FeatureTransform

key = "multi"


def inputs(t: FeatureTransform, widths: Mapping[str, int]) -> list[GraphInput]:
    return kind_inputs(key, t, widths)


def feed(t: FeatureTransform, rows: Rows, out: Feed) -> None:
    kind_feed(key, t, rows, out)
