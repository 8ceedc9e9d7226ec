"""Embedding stores (DESIGN.md §4): vectors of store-held sparse fields, by id.

Two stores behind one interface, :class:`EmbeddingStore`:

- :class:`InProcessStore`: the repository's tables (ids file → dict, vectors memory-mapped);
  used when ``MTRANK_REDIS_URL`` is unset.
- :class:`RedisStore`: the versioned keys of :mod:`mtrank.store_keys`, one pipeline round trip
  per request (one MGET per field), a bounded TTL cache in front, and a circuit breaker: on a
  Redis error the answer is served from the cache and default vectors with ``degraded=True``,
  and Redis is tried again after ``MTRANK_REDIS_RETRY_S``, so recovery needs no restart.

An id not in its table gets the table's default vector (row 0 of the repository's table) and is
counted in ``mtrank_embedding_missing_total{table}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from mtrank import store_keys
from mtrank.manifest import TableInfo, open_vectors, read_ids
from service import metrics

log = logging.getLogger("mtrank.stores")


@dataclass
class LocalTable:
    """One store table of one model version, as the repository holds it."""

    model: str
    version: int
    info: TableInfo
    version_dir: Path

    @property
    def field(self) -> str:
        return self.info.field

    @property
    def width(self) -> int:
        return self.info.width

    @cached_property
    def vectors(self) -> np.ndarray:
        vectors = open_vectors(self.version_dir / self.info.vectors_file)
        if vectors.ndim != 2 or vectors.shape != (self.info.rows, self.info.width):
            raise ValueError(
                f"table {self.field}: vectors of shape {vectors.shape}, manifest says ({self.info.rows}, {self.width})"
            )
        return vectors

    @cached_property
    def index(self) -> dict[str, int]:
        """id → row (rows start at 1; 0 is the default row). Built on first use."""
        ids = read_ids(self.version_dir / self.info.ids_file)
        return {v: i for i, v in enumerate(ids, start=1)}

    @cached_property
    def default(self) -> np.ndarray:
        return np.ascontiguousarray(self.vectors[0], dtype=np.float32)

    @cached_property
    def default_bytes(self) -> bytes:
        return self.default.astype("<f4").tobytes()


@dataclass
class Lookup:
    vectors: np.ndarray
    """``[len(ids), width]`` float32, C-contiguous."""
    missing: int
    """Ids that got the default vector because the table does not hold them."""


class EmbeddingStore(Protocol):
    name: str
    """``inprocess`` or ``redis``: the ``store`` label of the lookup histogram."""

    @property
    def degraded(self) -> bool: ...

    async def lookup_many(self, requests: Sequence[tuple[LocalTable, list[str]]]) -> tuple[list[Lookup], bool]:
        """Vectors of ``ids`` in each table, in one round trip; and whether the answer is degraded."""
        ...

    async def version_problem(self, tables: Sequence[LocalTable]) -> str | None:
        """Why a version's tables cannot be served from this store, or None."""
        ...

    async def health(self) -> str | None:
        """Why the store is unusable right now, or None."""
        ...

    async def close(self) -> None: ...


async def lookup(store: EmbeddingStore, table: LocalTable, ids: list[str]) -> tuple[np.ndarray, int, bool]:
    """One field: (vectors ``[n, width]`` float32, missing count, degraded)."""
    (result,), degraded = await store.lookup_many([(table, ids)])
    return result.vectors, result.missing, degraded


def _unique(ids: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct ids in first-seen order and, per input id, its position among them."""
    pos: dict[str, int] = {}
    inverse = np.fromiter((pos.setdefault(i, len(pos)) for i in ids), dtype=np.int64, count=len(ids))
    return list(pos), inverse


class InProcessStore:
    name = "inprocess"
    degraded = False

    async def lookup_many(self, requests: Sequence[tuple[LocalTable, list[str]]]) -> tuple[list[Lookup], bool]:
        return [self.lookup_sync(table, ids) for table, ids in requests], False

    @staticmethod
    def lookup_sync(table: LocalTable, ids: list[str]) -> Lookup:
        index = table.index
        rows = np.fromiter((index.get(i, 0) for i in ids), dtype=np.int64, count=len(ids))
        missing = int(np.count_nonzero(rows == 0))
        if missing:
            metrics.MISSING.labels(table.field).inc(missing)
        return Lookup(np.ascontiguousarray(table.vectors[rows], dtype=np.float32), missing)

    async def version_problem(self, tables: Sequence[LocalTable]) -> str | None:
        def open_all() -> str | None:
            for t in tables:
                try:
                    t.vectors  # noqa: B018 - opens and checks the shape
                    t.index  # noqa: B018 - reads the ids (large tables: seconds, so off the event loop)
                except (OSError, ValueError) as e:
                    return f"table {t.field}: {e}"
            return None

        return await asyncio.to_thread(open_all)

    async def health(self) -> str | None:
        return None

    async def close(self) -> None:
        return None


_NOT_CACHED = object()


@dataclass
class TTLCache:
    """Bounded id → value cache with expiry; evicts the least recently used entry when full.

    Values are the raw Redis bytes, or None for an id Redis does not hold (cached too, so a
    stream of unknown ids does not hammer Redis).
    """

    max_entries: int
    ttl_s: float
    _data: OrderedDict[str, tuple[float, bytes | None]] = field(default_factory=OrderedDict)

    def get(self, key: str, now: float) -> object:
        entry = self._data.get(key)
        if entry is None:
            return _NOT_CACHED
        if entry[0] < now:
            del self._data[key]
            return _NOT_CACHED
        self._data.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: bytes | None, now: float) -> None:
        if self.max_entries <= 0 or self.ttl_s <= 0:
            return
        self._data[key] = (now + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class RedisStore:
    name = "redis"

    def __init__(
        self,
        url: str,
        prefix: str = store_keys.DEFAULT_PREFIX,
        timeout_s: float = 0.1,
        retry_s: float = 1.0,
        cache_size: int = 200_000,
        cache_ttl_s: float = 60.0,
    ):
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.cache = TTLCache(cache_size, cache_ttl_s)
        # No client-side retries: a failure is answered at once from the cache and defaults,
        # and the breaker decides when Redis is tried again.
        self.client = store_keys.connect_async(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._retry_at = 0.0
        self._degraded = False
        self._last_error = ""
        metrics.STORE_DEGRADED.set(0)

    @property
    def degraded(self) -> bool:
        return self._degraded

    def _fail(self, e: BaseException) -> None:
        metrics.REDIS_ERRORS.inc()
        if not self._degraded:
            log.warning("Redis unreachable (%s: %s); serving default vectors, retrying every %.1f s",
                        type(e).__name__, e, self.retry_s)
        self._degraded = True
        self._last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        self._retry_at = time.monotonic() + self.retry_s
        metrics.STORE_DEGRADED.set(1)

    def _recovered(self) -> None:
        if self._degraded:
            log.warning("Redis reachable again; embedding store recovered")
        self._degraded = False
        metrics.STORE_DEGRADED.set(0)

    async def lookup_many(self, requests: Sequence[tuple[LocalTable, list[str]]]) -> tuple[list[Lookup], bool]:
        from redis.exceptions import RedisError

        now = time.monotonic()
        plans = []  # per field: (table, keys of distinct ids, their values, inverse, indexes to fetch)
        hits = 0
        for table, ids in requests:
            uniq, inverse = _unique(ids)
            key_prefix = store_keys.id_key_prefix(self.prefix, table.model, table.version, table.field)
            keys = [key_prefix + i for i in uniq]
            values = [self.cache.get(k, now) for k in keys]
            fetch = [j for j, v in enumerate(values) if v is _NOT_CACHED]
            hits += len(keys) - len(fetch)
            plans.append((table, keys, values, inverse, fetch))
        metrics.CACHE_HITS.inc(hits)

        degraded = self._degraded and now < self._retry_at
        to_fetch = [p for p in plans if p[4]]
        if to_fetch and not degraded:
            metrics.CACHE_MISSES.inc(sum(len(p[4]) for p in to_fetch))
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    if len(to_fetch) == 1:
                        table, keys, _, _, fetch = to_fetch[0]
                        replies = [await self.client.mget([keys[j] for j in fetch])]
                    else:
                        pipe = self.client.pipeline(transaction=False)
                        for _, keys, _, _, fetch in to_fetch:
                            pipe.mget([keys[j] for j in fetch])
                        replies = await pipe.execute()
            except (RedisError, OSError, TimeoutError) as e:
                self._fail(e)
                degraded = True
            else:
                self._recovered()
                for (_, keys, values, _, fetch), reply in zip(to_fetch, replies, strict=True):
                    for j, value in zip(fetch, reply, strict=True):
                        values[j] = value
                        self.cache.put(keys[j], value, now)
        return [self._assemble(t, values, inverse) for t, _, values, inverse, _ in plans], degraded

    @staticmethod
    def _assemble(table: LocalTable, values: list, inverse: np.ndarray) -> Lookup:
        row_bytes = table.width * 4
        default = table.default_bytes
        # Not in Redis (None) and not fetched (degraded) both get the default vector; only the
        # former is "missing" from the table.
        missing_distinct = np.zeros(len(values), dtype=bool)
        parts = []
        for j, v in enumerate(values):
            if v is None or v is _NOT_CACHED:
                missing_distinct[j] = v is None
                parts.append(default)
            elif len(v) != row_bytes:
                log.error("table %s: a Redis value of %d bytes, expected %d; using the default vector",
                          table.field, len(v), row_bytes)
                missing_distinct[j] = True
                parts.append(default)
            else:
                parts.append(v)
        distinct = np.frombuffer(b"".join(parts), dtype="<f4").reshape(len(values), table.width)
        missing = int(np.count_nonzero(missing_distinct[inverse]))
        if missing:
            metrics.MISSING.labels(table.field).inc(missing)
        return Lookup(np.ascontiguousarray(distinct[inverse], dtype=np.float32), missing)

    async def version_problem(self, tables: Sequence[LocalTable]) -> str | None:
        from redis.exceptions import RedisError

        if not tables:
            return None
        keys = [store_keys.meta_key(self.prefix, t.model, t.version, t.field) for t in tables]
        try:
            async with asyncio.timeout(max(self.timeout_s * 10, 1.0)):
                metas = [await self.client.get(k) for k in keys]
        except (RedisError, OSError, TimeoutError) as e:
            self._fail(e)
            return f"cannot check its tables in Redis at {self.url}: {self._last_error}"
        self._recovered()
        for t, key, raw in zip(tables, keys, metas, strict=True):
            if raw is None:
                return (f"table {t.field!r} of {t.model} v{t.version} is not loaded in Redis (no key {key}); "
                        f"run `mtrank load-embeddings --model {t.model} --version {t.version}`")
            try:
                meta = json.loads(raw)
            except ValueError:
                return f"table {t.field!r}: meta key {key} is not JSON"
            if int(meta.get("width", -1)) != t.width or int(meta.get("rows", -1)) != t.info.rows:
                return (f"table {t.field!r} in Redis has rows={meta.get('rows')} width={meta.get('width')}, "
                        f"the repository has rows={t.info.rows} width={t.width}")
        return None

    async def health(self) -> str | None:
        """None when usable; while the breaker is open, a due retry pings Redis."""
        from redis.exceptions import RedisError

        if not self._degraded:
            return None
        if time.monotonic() >= self._retry_at:
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    await self.client.ping()
            except (RedisError, OSError, TimeoutError) as e:
                self._fail(e)
            else:
                self._recovered()
                return None
        return f"embedding store degraded: Redis unreachable ({self._last_error}); serving default vectors"

    async def close(self) -> None:
        await self.client.aclose()
