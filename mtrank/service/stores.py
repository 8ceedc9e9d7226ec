"""Embedding stores (DESIGN.md §4): vectors of store-held sparse fields, by id.

Two stores behind one interface, :class:`EmbeddingStore`:

- :class:`InProcessStore`: the repository's tables (ids file → dict, vectors memory-mapped);
  used when ``MTRANK_REDIS_URL`` is unset.
- :class:`RedisStore`: the versioned keys of :mod:`mtrank.store_keys` on one Redis or a Redis
  Cluster (``redis+cluster://``). One round trip per request on a single Redis (one MGET of
  every table's keys); on a Cluster one MGET per slot holding the request's keys, whatever their
  table, all sent at once (a version's tables share its N hash tags, which sit on N different
  primaries: one MGET per node for the whole request). A bounded TTL
  cache in front, and a circuit breaker: on a Redis error the answer is served from the cache
  and default vectors with ``degraded=True``; after ``MTRANK_REDIS_RETRY_S`` one call (a
  request or a readiness check) probes Redis while the others keep answering degraded, so
  recovery, failover and resharding need no restart.

An id not in its table gets the table's default vector (row 0 of the repository's table) and is
counted in ``mtrank_embedding_missing_total{table}``. Each :class:`Lookup` says how many of its
ids got the default vector and why (``missing``: the store does not hold them; ``unserved``: the
store could not be asked).
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
from mtrank.service import metrics

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
    """One field's answer. Default vectors used = ``missing + unserved`` (:attr:`defaults`)."""

    vectors: np.ndarray
    """``[len(ids), width]`` float32, C-contiguous."""
    missing: int
    """Ids (with repeats) that got the default vector because the store does not hold them: ids
    unknown to the table, or not yet loaded when ``incomplete``. Counted in
    ``mtrank_embedding_missing_total{table}``."""
    unserved: int = 0
    """Ids (with repeats) that got the default vector because the store could not be asked: Redis
    (or the Cluster node holding them) unreachable, or the circuit breaker open. Not counted as
    missing: whether the table holds them is unknown."""
    incomplete: bool = False
    """The table's version was not completely loaded in Redis (its meta key was absent or
    different) at the last check, so ``missing`` may count ids the complete table holds."""

    @property
    def defaults(self) -> int:
        """Ids (with repeats) that got the default vector, for any reason."""
        return self.missing + self.unserved


class EmbeddingStore(Protocol):
    name: str
    """``inprocess`` or ``redis``: the ``store`` label of the lookup histogram."""

    @property
    def degraded(self) -> bool:
        """True during an outage (answers come from the cache and default vectors)."""
        ...

    async def lookup_many(self, requests: Sequence[tuple[LocalTable, list[str]]]) -> tuple[list[Lookup], bool]:
        """Vectors of ``ids`` in each table, in one round trip; and whether the answer is degraded
        (some ids unserved, or a table not completely loaded)."""
        ...

    async def version_problem(self, tables: Sequence[LocalTable]) -> str | None:
        """Why a version's tables cannot be served from this store, or None."""
        ...

    async def health(self) -> str | None:
        """Why answers are (or would be) degraded right now, or None: checks the store."""
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


def fast_connection_class(url: str) -> type:
    """The connection class ``url`` asks for (TCP, TLS for ``rediss://``, a unix socket for
    ``unix://``), with hiredis packing the commands.

    redis-py's asyncio client packs commands in Python (its sync client uses hiredis): for a
    500-key MGET that is ~0.45 ms of the ~0.8 ms call. Packing in C leaves the round trip. The
    class must be the URL's own: a plain ``Connection`` in its place would send a ``rediss://``
    password in clear text and refuse the URL's ``ssl_*`` options.
    """
    from redis.asyncio.connection import parse_url

    base = parse_url(url).get("connection_class") or _tcp_connection()
    try:
        import hiredis
    except ImportError:
        return base

    class HiredisPacking(base):
        def pack_command(self, *args):  # noqa: ANN002, ANN202 - redis-py's signature
            if isinstance(args[0], str) and " " in args[0]:
                args = (*args[0].split(), *args[1:])  # "CLIENT SETNAME" → two arguments, as redis-py does
            try:
                return [hiredis.pack_command(args)]
            except TypeError:  # an argument type hiredis does not take: redis-py's own packing
                return super().pack_command(*args)

    HiredisPacking.__name__ = HiredisPacking.__qualname__ = f"HiredisPacking{base.__name__}"
    return HiredisPacking


def _tcp_connection() -> type:
    from redis.asyncio.connection import Connection

    return Connection


@dataclass
class _TableState:
    """What the store knows of one table of one version in Redis."""

    cache_prefix: str
    """Prepended to an id for its cache key (the one-shard key, whatever the layout)."""
    key_prefixes: list[str]
    """Per shard of the version, prepended to an id for its Redis key in this table."""
    slots: list[int]
    """Per shard of the version, its Cluster slot (the same for every table of the version)."""
    meta_key: str
    rows: int
    width: int
    verified_at: float = -math.inf
    """time.monotonic() when the meta key was last read complete: misses are cached only while
    this is within ``verify_s`` and the store has not been degraded since."""
    checked_at: float = -math.inf
    incomplete: bool = False
    """The meta key was absent or different at the last check."""
    label: str = ""

    def redis_keys(self, ids: list[str]) -> list[str]:
        if len(self.key_prefixes) == 1:
            key_prefix = self.key_prefixes[0]
            return [key_prefix + i for i in ids]
        prefixes = self.key_prefixes
        return [prefixes[s] + i for s, i in zip(store_keys.shard_of(ids, len(prefixes)), ids, strict=True)]


@dataclass
class _Plan:
    """One field of a lookup: its distinct ids, their values so far, which to fetch."""

    table: LocalTable
    state: _TableState
    ids: list[str]
    keys: list[str]
    """Cache keys of ``ids``."""
    values: list
    """Per distinct id: bytes, None (not in Redis) or ``_NOT_CACHED`` (not asked)."""
    inverse: np.ndarray | None
    fetch: range | list[int]

    def fetched_ids(self) -> list[str]:
        return self.ids if isinstance(self.fetch, range) else [self.ids[j] for j in self.fetch]

    def fetched_keys(self) -> list[str]:
        return self.keys if isinstance(self.fetch, range) else [self.keys[j] for j in self.fetch]

    def fill(self, reply: list) -> None:
        if isinstance(self.fetch, range):
            self.values[:] = reply
        else:
            for j, value in zip(self.fetch, reply, strict=True):
                self.values[j] = value


_CLOSED, _PROBE, _OPEN = "closed", "probe", "open"


class RedisStore:
    """Redis or Redis Cluster behind a TTL cache and a circuit breaker (see the module docstring).

    Per Cluster the breaker is one: a failed node opens it for ``retry_s``; then a single probe
    (a request's lookup or a readiness check) refreshes the slot map, which follows a promoted
    replica or moved slots, and closes it on success.
    """

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

        self.display_url = store_keys.redacted_url(url)
        """The URL without its password: the only form of it any message may carry."""
        self._secrets = store_keys.url_secrets(url)
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.verify_s = retry_s
        """Seconds a table's meta key check stays valid for caching misses."""
        self.cache = TTLCache(cache_size, cache_ttl_s)
        self.cluster = store_keys.is_cluster_url(url)
        # No client-side retries: a failure is answered at once from the cache and defaults,
        # and the breaker decides when Redis is tried again.
        extra = {} if self.cluster else {"connection_class": fast_connection_class(url)}
        self.client = store_keys.connect_async(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **extra
        )
        self._tables: dict[tuple[str, int, str], _TableState] = {}
        self._retry_at = 0.0
        self._degraded = False
        self._probing = False
        self._connections_stale = False
        self._last_error = ""
        self._to_verify: set[tuple[str, int, str]] = set()
        self._verify_task: asyncio.Task | None = None
        metrics.STORE_DEGRADED.set(0)

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def incomplete_tables(self) -> list[str]:
        """Tables (``model vN field``) whose meta key was absent or different at the last check."""
        return sorted(s.label for s in self._tables.values() if s.incomplete)

    # -- breaker ------------------------------------------------------------------------------

    def _fail(self, e: BaseException) -> None:
        metrics.REDIS_ERRORS.inc()
        if not self._degraded:
            log.warning("Redis at %s unreachable (%s); serving default vectors, retrying every %.1f s",
                        self.display_url, self._scrub(f"{type(e).__name__}: {e}"), self.retry_s)
        self._degraded = True
        self._connections_stale = True
        self._last_error = self._scrub(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        self._retry_at = time.monotonic() + self.retry_s
        metrics.STORE_DEGRADED.set(1)

    def _scrub(self, text: str) -> str:
        """``text`` without the URL's secrets (an error may quote what it was given)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _recovered(self) -> None:
        if not self._degraded:
            return
        log.warning("Redis reachable again; embedding store recovered")
        self._degraded = False
        metrics.STORE_DEGRADED.set(0)
        # Redis may have come back empty: misses are not cached until each table's meta key
        # has been read again.
        for state in self._tables.values():
            state.verified_at = -math.inf

    def _admit(self, now: float) -> str:
        """Closed: ask Redis. Probe: this call is the half-open breaker's one try. Open: do not ask."""
        if not self._degraded:
            return _CLOSED
        if now >= self._retry_at and not self._probing:
            self._probing = True
            return _PROBE
        return _OPEN

    def _outage_reason(self) -> str:
        return f"embedding store degraded: Redis unreachable ({self._last_error}); serving default vectors"

    # -- tables -------------------------------------------------------------------------------

    def _register(self, table: LocalTable, layout: store_keys.VersionLayout) -> _TableState:
        key_prefixes = layout.key_prefixes(self.prefix, table.model, table.version, table.field)
        state = _TableState(
            cache_prefix=store_keys.id_key_prefix(self.prefix, table.model, table.version, table.field),
            key_prefixes=key_prefixes,
            slots=[store_keys.key_slot(p) for p in key_prefixes],
            meta_key=store_keys.meta_key(self.prefix, table.model, table.version, table.field),
            rows=table.info.rows,
            width=table.width,
            label=f"{table.model} v{table.version} {table.field}",
        )
        self._tables[(table.model, table.version, table.field)] = state
        return state

    def _state(self, table: LocalTable) -> _TableState:
        state = self._tables.get((table.model, table.version, table.field))
        return state if state is not None else self._register(table, store_keys.VersionLayout())

    def _check_meta(self, state: _TableState, raw: bytes | None, now: float) -> str | None:
        """Record the state of ``state``'s meta value ``raw``; returns why it is not complete, or None."""
        state.checked_at = now
        problem = None
        if raw is None:
            problem = f"table {state.label} is not loaded in Redis (no key {state.meta_key})"
        else:
            try:
                meta = json.loads(raw)
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                problem = f"table {state.label}: meta key {state.meta_key} is not a JSON object"
            elif meta.get("width") != state.width or meta.get("rows") != state.rows:  # no coercion: 8.5 is no width
                problem = (f"table {state.label} in Redis has rows={meta.get('rows')} width={meta.get('width')}, "
                           f"the repository has rows={state.rows} width={state.width}")
        if problem is None:
            if state.incomplete:
                log.warning("table %s is completely loaded in Redis again", state.label)
            state.incomplete = False
            state.verified_at = now
        else:
            if not state.incomplete:
                log.warning("%s; its missing ids get default vectors and are not cached", problem)
            state.incomplete = True
        return problem

    def _schedule_verify(self, states: list[_TableState], now: float) -> None:
        """Read these tables' meta keys in the background (at most once per ``verify_s`` each)."""
        due = [s for s in states if now - s.checked_at >= self.verify_s]
        if not due:
            return
        self._to_verify.update((k for k, s in self._tables.items() if any(s is d for d in due)))
        if self._verify_task is None or self._verify_task.done():
            self._verify_task = asyncio.create_task(self._verify())

    async def _verify(self) -> None:
        from redis.exceptions import RedisError

        while self._to_verify:
            keys = list(self._to_verify)
            self._to_verify.clear()
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    await self._read_metas([self._tables[k] for k in keys if k in self._tables])
            except (RedisError, OSError, TimeoutError) as e:
                self._fail(e)
                return

    async def _read_metas(self, states: list[_TableState]) -> None:
        raws = await asyncio.gather(*(self.client.get(s.meta_key) for s in states))
        now = time.monotonic()
        for state, raw in zip(states, raws, strict=True):
            self._check_meta(state, raw, now)

    async def _reset_connections(self) -> None:
        """After a failure: reconnect instead of reusing sockets the outage broke, and on a
        Cluster read the slot map again (a replica may have been promoted, slots moved)."""
        if not self._connections_stale:
            return
        if self.cluster:
            await self.client.nodes_manager.initialize()
        else:
            await self.client.connection_pool.disconnect(inuse_connections=False)
        self._connections_stale = False

    # -- lookups ------------------------------------------------------------------------------

    async def lookup_many(self, requests: Sequence[tuple[LocalTable, list[str]]]) -> tuple[list[Lookup], bool]:
        now = time.monotonic()
        plans: list[_Plan] = []
        hits = 0
        for table, ids in requests:
            state = self._state(table)
            uniq, inverse = _unique(ids)
            cache_prefix = state.cache_prefix
            keys = [cache_prefix + i for i in uniq]
            values = self.cache.get_many(keys, now)
            n_missed = values.count(_NOT_CACHED)
            if n_missed == len(keys):
                fetch: range | list[int] = range(len(keys))
            else:
                fetch = [j for j, v in enumerate(values) if v is _NOT_CACHED] if n_missed else []
            hits += len(keys) - n_missed
            plans.append(_Plan(table, state, uniq, keys, values, inverse, fetch))
        metrics.CACHE_HITS.inc(hits)

        degraded = False
        to_fetch = [p for p in plans if p.fetch]
        if to_fetch:
            gate = self._admit(now)
            if gate == _OPEN:
                degraded = True
            else:
                metrics.CACHE_MISSES.inc(sum(len(p.fetch) for p in to_fetch))
                degraded = not await self._fetch(to_fetch, probe=gate == _PROBE)
                self._cache(to_fetch, cache_misses=not degraded, now=now)
        results = [self._assemble(p) for p in plans]
        incomplete = [p.state for p, r in zip(plans, results, strict=True) if r.incomplete]
        if incomplete and not self._degraded:
            self._schedule_verify(incomplete, now)  # until the load completes
        return results, degraded or bool(incomplete)

    async def _fetch(self, plans: list[_Plan], probe: bool) -> bool:
        """Fill the plans' fetched values from Redis; False when some could not be asked."""
        from redis.exceptions import RedisError

        error: BaseException | None = None
        try:
            async with asyncio.timeout(self.timeout_s * (4 if probe else 2)):
                if probe:
                    await self._reset_connections()
                error = await (self._fetch_cluster(plans) if self.cluster else self._fetch_single(plans))
                if probe and error is None:
                    # Redis may be back empty: this answer already says whether its tables are complete.
                    await self._read_metas(list({id(p.state): p.state for p in plans}.values()))
        except (RedisError, OSError, TimeoutError) as e:
            error = e
        finally:
            if probe:
                self._probing = False
        if error is not None:
            self._fail(error)
            return False
        self._recovered()
        return True

    async def _fetch_single(self, plans: list[_Plan]) -> None:
        """One MGET of every plan's keys (one command, one round trip)."""
        keys = [key for plan in plans for key in plan.state.redis_keys(plan.fetched_ids())]
        reply = await self.client.mget(keys)
        start = 0
        for plan in plans:
            end = start + len(plan.fetch)
            plan.fill(reply[start:end])
            start = end

    async def _fetch_cluster(self, plans: list[_Plan]) -> BaseException | None:
        """One MGET per slot holding the plans' keys, all at once; returns a failure, if any
        (the values of a failed slot stay ``_NOT_CACHED``)."""
        from redis.exceptions import RedisError

        groups: dict[int, tuple[list[str], list[tuple[_Plan, list[int]]]]] = {}
        for plan in plans:
            state = plan.state
            positions = list(plan.fetch)
            if len(state.slots) == 1:
                keys, where = groups.setdefault(state.slots[0], ([], []))
                keys.extend(state.redis_keys(plan.fetched_ids()))
                where.append((plan, positions))
                continue
            ids = plan.fetched_ids()
            by_shard: dict[int, list[int]] = {}
            for j, shard in zip(positions, store_keys.shard_of(ids, len(state.slots)), strict=True):
                by_shard.setdefault(shard, []).append(j)
            for shard, js in by_shard.items():
                keys, where = groups.setdefault(state.slots[shard], ([], []))
                key_prefix = state.key_prefixes[shard]
                keys.extend(key_prefix + plan.ids[j] for j in js)
                where.append((plan, js))
        outcomes = await asyncio.gather(
            *(self._cluster_mget(slot, keys) for slot, (keys, _) in groups.items()), return_exceptions=True
        )
        error = None
        for (_, where), outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, (RedisError, OSError, TimeoutError)):
                    raise outcome
                error = outcome
                continue
            start = 0
            for plan, js in where:
                for j, value in zip(js, outcome[start : start + len(js)], strict=True):
                    plan.values[j] = value
                start += len(js)
        return error

    async def _cluster_mget(self, slot: int, keys: list[str]) -> list:
        """MGET of one slot's keys on the node the slot map names; redirections through the client."""
        from redis.exceptions import AskError, MovedError, TryAgainError

        node = self.client.nodes_manager.get_node_from_slot(slot)
        try:
            return await node.execute_command("MGET", *keys)
        except MovedError:
            # The slot moved: the cluster client follows MOVED and updates its slot map.
            return await self.client.execute_command("MGET", *keys)
        except (AskError, TryAgainError):
            # The slot is migrating and its keys are on two nodes: key by key, following ASK.
            pipe = self.client.pipeline()
            for key in keys:
                pipe.get(key)
            return await pipe.execute()

    def _cache(self, plans: list[_Plan], cache_misses: bool, now: float) -> None:
        """Cache what was fetched. Values always (a version's rows never change); misses only when
        every slot answered and the table was recently seen complete (a miss learned during a
        recovery or an incomplete load must not outlive it)."""
        stale = []
        for plan in plans:
            keys, values = plan.fetched_keys(), [plan.values[j] for j in plan.fetch]
            state = plan.state
            fresh = not state.incomplete and now - state.verified_at < self.verify_s
            if cache_misses and fresh and _NOT_CACHED not in values:
                self.cache.put_many(keys, values, now)
                continue
            if None in values and cache_misses:
                stale.append(state)
            found = [(k, v) for k, v in zip(keys, values, strict=True) if v is not None and v is not _NOT_CACHED]
            if found:
                self.cache.put_many([k for k, _ in found], [v for _, v in found], now)
        if stale:
            self._schedule_verify(stale, now)

    @staticmethod
    def _assemble(plan: _Plan) -> Lookup:
        table, values, inverse = plan.table, plan.values, plan.inverse
        incomplete = plan.state.incomplete
        row_bytes = table.width * 4
        if None not in values and _NOT_CACHED not in values and sum(map(len, values)) == row_bytes * len(values):
            # Every id found, every value the right size: no per-value Python work.
            distinct = np.frombuffer(b"".join(values), dtype="<f4").reshape(len(values), table.width)
            if np.isfinite(distinct).all():
                return Lookup(distinct if inverse is None else distinct[inverse], 0, 0, incomplete)
        default = table.default_bytes
        # Not in Redis (None) and not asked (outage) both get the default vector; only the
        # former is "missing" from the table.
        missing_distinct = np.zeros(len(values), dtype=bool)
        unserved_distinct = np.zeros(len(values), dtype=bool)
        parts = []
        for j, v in enumerate(values):
            if v is None:
                missing_distinct[j] = True
                parts.append(default)
            elif v is _NOT_CACHED:
                unserved_distinct[j] = True
                parts.append(default)
            elif len(v) != row_bytes:
                log.error("table %s: a Redis value of %d bytes, expected %d; using the default vector",
                          table.field, len(v), row_bytes)
                missing_distinct[j] = True
                parts.append(default)
            else:
                parts.append(v)
        distinct = np.frombuffer(b"".join(parts), dtype="<f4").reshape(len(values), table.width)
        # A vector with NaN or infinities (a corrupt or poisoned value) is no vector: like a missing id.
        invalid_distinct = ~np.isfinite(distinct).all(axis=1)
        if invalid_distinct.any():
            distinct = distinct.copy()
            distinct[invalid_distinct] = table.default
            missing_distinct |= invalid_distinct
        if inverse is not None:
            invalid_distinct = invalid_distinct[inverse]
            distinct, missing_distinct, unserved_distinct = (
                distinct[inverse], missing_distinct[inverse], unserved_distinct[inverse]
            )
        missing = int(np.count_nonzero(missing_distinct))
        if missing:
            metrics.MISSING.labels(table.field).inc(missing)
        invalid = int(np.count_nonzero(invalid_distinct))
        if invalid:
            metrics.INVALID_VECTORS.labels(table.field).inc(invalid)
        return Lookup(
            np.ascontiguousarray(distinct, dtype=np.float32), missing, int(np.count_nonzero(unserved_distinct)),
            incomplete,
        )

    # -- versions and health ------------------------------------------------------------------

    async def version_problem(self, tables: Sequence[LocalTable]) -> str | None:
        from redis.exceptions import RedisError

        if not tables:
            return None
        keys = [store_keys.meta_key(self.prefix, t.model, t.version, t.field) for t in tables]
        try:
            async with asyncio.timeout(max(self.timeout_s * 10, 1.0)):
                metas = await asyncio.gather(*(self.client.get(k) for k in keys))
        except (RedisError, OSError, TimeoutError) as e:
            self._fail(e)
            return f"cannot check its tables in Redis at {self.display_url}: {self._last_error}"
        self._recovered()
        layouts: dict[tuple[str, int], tuple[str, store_keys.VersionLayout]] = {}
        for t, key, raw in zip(tables, keys, metas, strict=True):
            if raw is None:
                return (f"table {t.field!r} of {t.model} v{t.version} is not loaded in Redis (no key {key}); "
                        f"run `mtrank load-embeddings --model {t.model} --version {t.version}`")
            try:
                meta = json.loads(raw)
                layout = store_keys.VersionLayout.from_meta(meta)
            except (ValueError, TypeError, AttributeError):
                return f"table {t.field!r}: meta key {key} is not a JSON object with a valid shard layout"
            if meta.get("width") != t.width or meta.get("rows") != t.info.rows:  # no coercion: "8" or 8.5 is no width
                return (f"table {t.field!r} in Redis has rows={meta.get('rows')} width={meta.get('width')}, "
                        f"the repository has rows={t.info.rows} width={t.width}")
            first_field, first = layouts.setdefault((t.model, t.version), (t.field, layout))
            if layout != first:
                # The tables of a version share its hash tags: one request, one MGET per node.
                return (f"tables {first_field!r} and {t.field!r} of {t.model} v{t.version} were loaded with "
                        f"different shard layouts ({first.shards} and {layout.shards} shards); run "
                        f"`mtrank load-embeddings --model {t.model} --version {t.version}` again")
        now = time.monotonic()
        for t, raw in zip(tables, metas, strict=True):
            self._check_meta(self._register(t, layouts[(t.model, t.version)][1]), raw, now)
        return None

    async def health(self) -> str | None:
        """None when every slot holding a known table answers and every table is complete.

        Each call asks Redis (an MGET per slot of the known tables on a Cluster, a PING on a
        single Redis), so readiness tells the truth even before a request meets the failure.
        While the breaker is open it answers from its state; when a retry is due and no probe
        runs, this call is the probe.
        """
        from redis.exceptions import RedisError

        gate = self._admit(time.monotonic())
        if gate == _OPEN:
            return self._outage_reason()
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                if gate == _PROBE:
                    await self._reset_connections()
                await self._check_slots()
        except (RedisError, OSError, TimeoutError) as e:
            self._fail(e)
            return self._outage_reason()
        finally:
            if gate == _PROBE:
                self._probing = False
        self._recovered()
        incomplete = self.incomplete_tables
        if incomplete:
            return (f"embedding store degraded: not completely loaded in Redis: {', '.join(incomplete)}; "
                    f"their missing ids get default vectors")
        return None

    async def _check_slots(self) -> None:
        """Raise unless Redis answers: on a Cluster, an MGET (the lookup path) in every slot of
        every known table, so a dead or unreachable primary shows; else a PING."""
        slots = {slot: state.key_prefixes[i] for state in self._tables.values() for i, slot in enumerate(state.slots)}
        if not self.cluster or not slots:
            await self.client.ping()
            return
        outcomes = await asyncio.gather(
            *(self._cluster_mget(slot, [key_prefix + "\x00health"]) for slot, key_prefix in slots.items()),
            return_exceptions=True,
        )
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            raise failure

    async def close(self) -> None:
        if self._verify_task is not None:
            self._verify_task.cancel()
        await self.client.aclose()


def open_store(settings) -> EmbeddingStore:  # noqa: ANN001 - Settings (imported lazily by its users)
    """The store ``settings.store_url`` names (None or ``inprocess://``: the in-process store)."""
    url = settings.store_url_text()
    if url is None or url.startswith("inprocess://"):
        return InProcessStore()
    return RedisStore(
        url, prefix=settings.store_prefix, timeout_s=settings.store_timeout_ms / 1000.0,
        retry_s=settings.store_retry_s, cache_size=settings.embedding_cache_size,
        cache_ttl_s=settings.embedding_cache_ttl_s,
    )
