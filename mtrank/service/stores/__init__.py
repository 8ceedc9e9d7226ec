"""Embedding stores (DESIGN.md §4): vectors of store-held sparse fields, by id.

- :class:`InProcessStore` (:mod:`.inprocess`): the repository's tables; ``MTRANK_STORE_URL``
  unset or ``inprocess://``.
- :class:`KeyValueStore` (:mod:`.kv`): any back-end of :mod:`mtrank.stores` (Redis, Redis
  Cluster, ...) wrapped in the TTL cache (:mod:`.cache`), the circuit breaker (:mod:`.breaker`)
  and the table checks (:mod:`.checks`).

:func:`open_store` picks one from the settings. Each :class:`Lookup` says how many of its ids got
the default vector and why (``missing``: the store does not hold them; ``unserved``: the store
could not be asked).
"""

from mtrank.service.stores.cache import TTLCache
from mtrank.service.stores.factory import open_store, open_url
from mtrank.service.stores.histories import HistoryAnswer, HistoryQuery
from mtrank.service.stores.inprocess import InProcessStore
from mtrank.service.stores.kv import KeyValueStore
from mtrank.service.stores.tables import EmbeddingStore, LocalTable, Lookup, lookup, unique_ids

__all__ = ["EmbeddingStore", "HistoryAnswer", "HistoryQuery",
           "InProcessStore", "KeyValueStore", "LocalTable", "Lookup", "TTLCache", "lookup",
           "open_store", "open_url", "unique_ids"]
