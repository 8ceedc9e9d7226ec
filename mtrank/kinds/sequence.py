"""``sequence`` fields: the user's behaviour history, a list of ids most recent first (``max_len``
keeps the most recent), pooled by the model (``mean``, ``sum`` or target ``attention`` between the
candidate and each entry, padding masked).

A history enters once per request (axis ``requests``). Its entries use the table of the field it
``share``s: a graph table's indices (``list.<field>``), or a store table's vectors
(``emb.<field>`` float32 ``[requests, max_len, width]``, looked up with the candidates' own ids in
one pass), beside ``len.<field>`` (:mod:`mtrank.kinds.lists`).
"""

from __future__ import annotations

from collections.abc import Mapping

from mtrank.kinds.base import Feed, GraphInput, Rows
from mtrank.kinds.lists import kind_feed, kind_inputs
from mtrank.transform import FeatureTransform

key = "sequence"


def inputs(t: FeatureTransform, widths: Mapping[str, int]) -> list[GraphInput]:
    return kind_inputs(key, t, widths)


def feed(t: FeatureTransform, rows: Rows, out: Feed) -> None:
    kind_feed(key, t, rows, out)
