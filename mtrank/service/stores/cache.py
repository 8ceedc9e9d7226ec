"""The TTL cache in front of any key-value back-end: id → raw value (or None for an id the store
does not hold), reused for at most ``ttl_s``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import repeat

NOT_CACHED = object()
"""A key the cache does not hold (None is a cached miss)."""


@dataclass
class TTLCache:
    """Bounded id → value cache with expiry, kept in two generations (dicts).

    New values go into the young generation. When it is ``ttl_s / 2`` seconds old or holds half
    of ``max_entries``, it becomes the old generation and the previous old one is dropped: a
    value is reused for at most ``ttl_s`` and about ``max_entries`` are held (plus one request's
    ids). Unlike a per-entry LRU, a lookup of many ids is two ``dict.get`` passes run by ``map``
    in C (a 500-id request: ~20 µs instead of ~250 µs of per-key Python).

    Values are the raw store bytes, or None for an id the store does not hold (cached too, so
    a stream of unknown ids does not hammer the store).
    """

    max_entries: int
    ttl_s: float
    _young: dict[str, bytes | None] = field(default_factory=dict)
    _old: dict[str, bytes | None] = field(default_factory=dict)
    _young_since: float = -math.inf

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.ttl_s > 0

    def _rotate_if_due(self, now: float) -> None:
        if now - self._young_since >= self.ttl_s / 2 or 2 * len(self._young) >= self.max_entries:
            # A generation older than ttl_s (no rotation for a whole ttl_s) is dropped too.
            self._old = self._young if now - self._young_since < self.ttl_s else {}
            self._young = {}
            self._young_since = now

    def get_many(self, keys: list[str], now: float) -> list[object]:
        """Per key its cached value or ``NOT_CACHED``."""
        if not self.enabled:
            return [NOT_CACHED] * len(keys)
        self._rotate_if_due(now)
        missing = repeat(NOT_CACHED)
        if not self._old:
            return list(map(self._young.get, keys, missing))
        return list(map(self._young.get, keys, map(self._old.get, keys, missing)))

    def put_many(self, keys: list[str], values: list[bytes | None], now: float) -> None:
        if not self.enabled:
            return
        self._rotate_if_due(now)
        self._young.update(zip(keys, values, strict=True))

    def __len__(self) -> int:
        return len(self._young) + len(self._old.keys() - self._young.keys())
