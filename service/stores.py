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
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
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


def _unique(ids: list[str]) -> tuple[list[str], np.ndarray | None]:
    """Distinct ids in first-seen order and, per input id, its position among them (None when
    the ids are already distinct, as a candidate list's item ids are)."""
    if len(set(ids)) == len(ids):
        return ids, None
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
    """Bounded id → value cache with expiry, kept in two generations (dicts).

    New values go into the young generation. When it is ``ttl_s / 2`` seconds old or holds half
    of ``max_entries``, it becomes the old generation and the previous old one is dropped: a
    value is reused for at most ``ttl_s`` and about ``max_entries`` are held (plus one request's
    ids). Unlike a per-entry LRU, a lookup of many ids is two ``dict.get`` passes run by ``map``
    in C (a 500-id request: ~20 µs instead of ~250 µs of per-key Python).

    Values are the raw Redis bytes, or None for an id Redis does not hold (cached too, so a
    stream of unknown ids does not hammer Redis).
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
        """Per key its cached value or ``_NOT_CACHED``."""
        if not self.enabled:
            return [_NOT_CACHED] * len(keys)
        self._rotate_if_due(now)
        missing = repeat(_NOT_CACHED)
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


def _fetched_keys(plan: tuple) -> list[str]:
    keys, fetch = plan[1], plan[4]
    return keys if isinstance(fetch, range) else [keys[j] for j in fetch]


def _hiredis_packing_connection() -> type:
    """redis.asyncio's Connection with hiredis packing the commands.

    redis-py's asyncio client packs commands in Python (its sync client uses hiredis): for a
    500-key MGET that is ~0.45 ms of the ~0.8 ms call. Packing in C leaves the round trip.
    """
    from redis.asyncio.connection import Connection

    try:
        import hiredis
    except ImportError:
        return Connection

    class HiredisPackingConnection(Connection):
        def pack_command(self, *args):  # noqa: ANN002, ANN202 - redis-py's signature
            if isinstance(args[0], str) and " " in args[0]:
                args = (*args[0].split(), *args[1:])  # "CLIENT SETNAME" → two arguments, as redis-py does
            try:
                return [hiredis.pack_command(args)]
            except TypeError:  # an argument type hiredis does not take: redis-py's own packing
                return super().pack_command(*args)

    return HiredisPackingConnection


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
        extra = {} if store_keys.is_cluster_url(url) else {"connection_class": _hiredis_packing_connection()}
        self.client = store_keys.connect_async(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **extra
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
            values = self.cache.get_many(keys, now)
            n_missed = values.count(_NOT_CACHED)
            if n_missed == len(keys):
                fetch = range(len(keys))
            else:
                fetch = [j for j, v in enumerate(values) if v is _NOT_CACHED] if n_missed else []
            hits += len(keys) - n_missed
            plans.append((table, keys, values, inverse, fetch))
        metrics.CACHE_HITS.inc(hits)

        degraded = self._degraded and now < self._retry_at
        to_fetch = [p for p in plans if p[4]]
        if to_fetch and not degraded:
            metrics.CACHE_MISSES.inc(sum(len(p[4]) for p in to_fetch))
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    if len(to_fetch) == 1:
                        replies = [await self.client.mget(_fetched_keys(to_fetch[0]))]
                    else:
                        pipe = self.client.pipeline(transaction=False)
                        for plan in to_fetch:
                            pipe.mget(_fetched_keys(plan))
                        replies = await pipe.execute()
            except (RedisError, OSError, TimeoutError) as e:
                self._fail(e)
                degraded = True
            else:
                self._recovered()
                for plan, reply in zip(to_fetch, replies, strict=True):
                    _, keys, values, _, fetch = plan
                    if isinstance(fetch, range):
                        values[:] = reply
                    else:
                        for j, value in zip(fetch, reply, strict=True):
                            values[j] = value
                    self.cache.put_many(_fetched_keys(plan), reply, now)
        return [self._assemble(t, values, inverse) for t, _, values, inverse, _ in plans], degraded

    @staticmethod
    def _assemble(table: LocalTable, values: list, inverse: np.ndarray | None) -> Lookup:
        row_bytes = table.width * 4
        if None not in values and _NOT_CACHED not in values and sum(map(len, values)) == row_bytes * len(values):
            # Every id found, every value the right size: no per-value Python work.
            distinct = np.frombuffer(b"".join(values), dtype="<f4").reshape(len(values), table.width)
            return Lookup(distinct if inverse is None else distinct[inverse], 0)
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
        if inverse is None:
            missing, vectors = int(np.count_nonzero(missing_distinct)), distinct
        else:
            missing, vectors = int(np.count_nonzero(missing_distinct[inverse])), distinct[inverse]
        if missing:
            metrics.MISSING.labels(table.field).inc(missing)
        return Lookup(np.ascontiguousarray(vectors, dtype=np.float32), missing)

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
