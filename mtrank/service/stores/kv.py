"""The embedding store over any key-value back-end (:class:`mtrank.stores.StoreBackend`):
the TTL cache, the circuit breaker and the table checks wrapped around the back-end's reads.

A request's lookup asks the cache first, then the back-end for the rest in one call: its keys
grouped by route (one group on a single Redis: one MGET; on a Cluster one MGET per slot, every
table of a version sharing its N hash tags, so one MGET per node for the whole request). On a
back-end error the answer is served from the cache and default vectors with ``degraded=True``
and the breaker decides when the back-end is asked again. An id not in its table, or whose value
is no vector (wrong size, NaN, infinities), gets the table's default vector (row 0 of the
repository's table) and is counted in ``mtrank_embedding_missing_total{table}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtrank import store_keys
from mtrank.service import metrics
from mtrank.service.stores.breaker import OPEN, PROBE, CircuitBreaker
from mtrank.service.stores.cache import NOT_CACHED, TTLCache
from mtrank.service.stores.checks import TableChecks, TableState
from mtrank.service.stores.histories import UNSERVED_ANSWER, HistoryAnswer, HistoryQuery
from mtrank.service.stores.histories import answer as history_answer
from mtrank.service.stores.tables import LocalTable, Lookup, unique_ids
from mtrank.stores import StoreBackend

log = logging.getLogger("mtrank.stores")


@dataclass
class _Plan:
    """One field of a lookup: its distinct ids, their values so far, which to fetch."""

    table: LocalTable
    state: TableState
    ids: list[str]
    keys: list[str]
    """Cache keys of ``ids``."""
    values: list
    """Per distinct id: bytes, None (not in the store) or ``NOT_CACHED`` (not asked)."""
    inverse: np.ndarray | None
    fetch: range | list[int]

    def fetched_ids(self) -> list[str]:
        return self.ids if isinstance(self.fetch, range) else [self.ids[j] for j in self.fetch]

    def fetched_keys(self) -> list[str]:
        return self.keys if isinstance(self.fetch, range) else [self.keys[j] for j in self.fetch]


@dataclass
class _RecordRead:
    """A user's history record and its shard's meta key, read with a lookup's keys."""

    route: int
    keys: list[str]
    """``[meta key, record key]``."""
    values: list | None = None
    """Their values once read (None: not read)."""


class KeyValueStore:
    """An :class:`~mtrank.service.stores.tables.EmbeddingStore` over ``backend``, with a TTL cache
    of ``cache_size`` entries (0: none), a breaker retrying after ``retry_s`` and the table checks."""

    def __init__(self, backend: StoreBackend, prefix: str = store_keys.DEFAULT_PREFIX, retry_s: float = 1.0,
                 cache_size: int = 200_000, cache_ttl_s: float = 60.0):
        self.backend = backend
        self.name = backend.name
        self.prefix = prefix
        self.cache = TTLCache(cache_size, cache_ttl_s)
        self.breaker = CircuitBreaker(backend, retry_s)
        self.checks = TableChecks(backend, self.breaker, prefix, verify_s=retry_s)
        self._history_keys: dict[tuple[str, int, store_keys.VersionLayout], list[tuple[int, str, str]]] = {}

    @property
    def degraded(self) -> bool:
        return self.breaker.degraded

    @property
    def incomplete_tables(self) -> list[str]:
        return self.checks.incomplete_tables

    async def version_problem(self, tables: Sequence[LocalTable]) -> str | None:
        return await self.checks.version_problem(tables)

    # -- lookups ------------------------------------------------------------------------------

    async def lookup_many(self, requests: Sequence[tuple[LocalTable, list[str]]]) -> tuple[list[Lookup], bool]:
        results, _, degraded = await self.lookup_with_history(requests, None)
        return results, degraded

    async def lookup_with_history(
        self, requests: Sequence[tuple[LocalTable, list[str]]], history: HistoryQuery | None
    ) -> tuple[list[Lookup], HistoryAnswer | None, bool]:
        """:meth:`lookup_many`, and the user's history record (with its shard's meta key) read in
        the same back-end call as the ids the cache does not hold. Records are not cached: a
        re-load is seen at once."""
        now = time.monotonic()
        plans: list[_Plan] = []
        hits = 0
        for table, ids in requests:
            state = self.checks.state(table)
            uniq, inverse = unique_ids(ids)
            cache_prefix = state.cache_prefix
            keys = [cache_prefix + i for i in uniq]
            values = self.cache.get_many(keys, now)
            n_missed = values.count(NOT_CACHED)
            if n_missed == len(keys):
                fetch: range | list[int] = range(len(keys))
            else:
                fetch = [j for j, v in enumerate(values) if v is NOT_CACHED] if n_missed else []
            hits += len(keys) - n_missed
            plans.append(_Plan(table, state, uniq, keys, values, inverse, fetch))
        metrics.CACHE_HITS.inc(hits)

        degraded = False
        to_fetch = [p for p in plans if p.fetch]
        record = self._record_read(history) if history is not None else None
        if to_fetch or record is not None:
            gate = self.breaker.admit(now)
            if gate == OPEN:
                degraded = True
            else:
                metrics.CACHE_MISSES.inc(sum(len(p.fetch) for p in to_fetch))
                degraded = not await self._fetch(to_fetch, probe=gate == PROBE, record=record)
                self._cache(to_fetch, cache_misses=not degraded, now=now)
        results = [_assemble(p) for p in plans]
        incomplete = [p.state for p, r in zip(plans, results, strict=True) if r.incomplete]
        if incomplete and not self.breaker.degraded:
            self.checks.schedule_verify(incomplete, now)  # until the load completes
        found = None
        if history is not None:
            values = record.values
            found = UNSERVED_ANSWER if values is None else history_answer(values[0], values[1], history)
        return results, found, degraded or bool(incomplete)

    def _record_read(self, history: HistoryQuery) -> _RecordRead:
        """The keys of ``history``'s record and of its shard's meta value, and where they live."""
        layout = self.checks.layout(history.model, history.version)
        where = self._history_keys.get((history.model, history.version, layout))
        if where is None:
            prefixes = store_keys.history_key_prefixes(self.prefix, history.model, history.version, layout)
            metas = store_keys.history_meta_keys(self.prefix, history.model, history.version, layout)
            where = [(self.backend.route(p), m, p) for p, m in zip(prefixes, metas, strict=True)]
            self._history_keys[(history.model, history.version, layout)] = where
        route, meta_key, key_prefix = where[store_keys.shard_of([history.user_id], len(where))[0]]
        return _RecordRead(route, [meta_key, key_prefix + history.user_id])

    async def _fetch(self, plans: list[_Plan], probe: bool, record: _RecordRead | None = None) -> bool:
        """Fill the plans' fetched values (and ``record``'s) from the back-end; False when some
        could not be asked."""
        error: BaseException | None = None
        try:
            async with asyncio.timeout(self.backend.timeout_s * (4 if probe else 2)):
                if probe:
                    await self.breaker.start_probe()
                error = await self._read(plans, record)
                if probe and error is None:
                    # The store may be back empty: this answer already says whether its tables are complete.
                    await self.checks.read_metas(list({id(p.state): p.state for p in plans}.values()))
        except self.backend.errors as e:
            error = e
        finally:
            if probe:
                self.breaker.end_probe()
        if error is not None:
            self.breaker.failed(error)
            return False
        self.breaker.succeeded()
        return True

    async def _read(self, plans: list[_Plan], record: _RecordRead | None = None) -> BaseException | None:
        """One back-end read of the plans' keys (and ``record``'s) grouped by route; returns a
        failure, if any (the values of a failed group stay ``NOT_CACHED``, ``record.values`` None)."""
        groups: dict[int, tuple[list[str], list[tuple[_Plan, list[int]]]]] = {}
        if record is not None:
            keys, where = groups.setdefault(record.route, ([], []))
            keys.extend(record.keys)
            where.append((record, []))
        for plan in plans:
            state = plan.state
            positions = list(plan.fetch)
            if len(state.routes) == 1:
                keys, where = groups.setdefault(state.routes[0], ([], []))
                keys.extend(state.keys(plan.fetched_ids()))
                where.append((plan, positions))
                continue
            by_shard: dict[int, list[int]] = {}
            for j, shard in zip(positions, store_keys.shard_of(plan.fetched_ids(), len(state.routes)), strict=True):
                by_shard.setdefault(shard, []).append(j)
            for shard, js in by_shard.items():
                keys, where = groups.setdefault(state.routes[shard], ([], []))
                key_prefix = state.key_prefixes[shard]
                keys.extend(key_prefix + plan.ids[j] for j in js)
                where.append((plan, js))
        outcomes = await self.backend.read([(route, keys) for route, (keys, _) in groups.items()])
        error = None
        for (_, where), outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                error = outcome
                continue
            start = 0
            for plan, js in where:
                if isinstance(plan, _RecordRead):
                    plan.values = outcome[start : start + len(plan.keys)]
                    start += len(plan.keys)
                    continue
                if isinstance(plan.fetch, range) and len(js) == len(plan.values):
                    plan.values[:] = outcome[start : start + len(js)]
                else:
                    for j, value in zip(js, outcome[start : start + len(js)], strict=True):
                        plan.values[j] = value
                start += len(js)
        return error

    def _cache(self, plans: list[_Plan], cache_misses: bool, now: float) -> None:
        """Cache what was fetched. Values always (a version's rows never change); misses only when
        every group answered and the table was recently seen complete (a miss learned during a
        recovery or an incomplete load must not outlive it)."""
        stale = []
        for plan in plans:
            keys, values = plan.fetched_keys(), [plan.values[j] for j in plan.fetch]
            if cache_misses and self.checks.fresh(plan.state, now) and NOT_CACHED not in values:
                self.cache.put_many(keys, values, now)
                continue
            if None in values and cache_misses:
                stale.append(plan.state)
            found = [(k, v) for k, v in zip(keys, values, strict=True) if v is not None and v is not NOT_CACHED]
            if found:
                self.cache.put_many([k for k, _ in found], [v for _, v in found], now)
        if stale:
            self.checks.schedule_verify(stale, now)

    # -- health -------------------------------------------------------------------------------

    async def health(self) -> str | None:
        """None when every route holding a known table answers and every table is complete.

        Each call asks the back-end (:meth:`~mtrank.stores.StoreBackend.check`: a PING on a single
        Redis, an MGET per slot of the known tables on a Cluster), so readiness tells the truth even
        before a request meets the failure. While the breaker is open it answers from its state;
        when a retry is due and no probe runs, this call is the probe.
        """
        gate = self.breaker.admit(time.monotonic())
        if gate == OPEN:
            return self.breaker.outage_reason()
        try:
            async with asyncio.timeout(self.backend.timeout_s * 4):
                if gate == PROBE:
                    await self.breaker.start_probe()
                await self.backend.check(self.checks.probes())
        except self.backend.errors as e:
            self.breaker.failed(e)
            return self.breaker.outage_reason()
        finally:
            if gate == PROBE:
                self.breaker.end_probe()
        self.breaker.succeeded()
        incomplete = self.incomplete_tables
        if incomplete:
            return (f"embedding store degraded: not completely loaded in {self.backend.title}: "
                    f"{', '.join(incomplete)}; their missing ids get default vectors")
        return None

    async def close(self) -> None:
        self.checks.close()
        await self.backend.close()


def _assemble(plan: _Plan) -> Lookup:
    """One field's vectors from its values: the default vector for an id not in the store (None),
    not asked (``NOT_CACHED``) or whose value is no vector (wrong size, NaN or infinities)."""
    table, values, inverse = plan.table, plan.values, plan.inverse
    incomplete = plan.state.incomplete
    row_bytes = table.width * 4
    if None not in values and NOT_CACHED not in values and sum(map(len, values)) == row_bytes * len(values):
        # Every id found, every value the right size: no per-value Python work.
        distinct = np.frombuffer(b"".join(values), dtype="<f4").reshape(len(values), table.width)
        if np.isfinite(distinct).all():
            return Lookup(distinct if inverse is None else distinct[inverse], 0, 0, incomplete)
    default = table.default_bytes
    # Not in the store (None) and not asked (outage) both get the default vector; only the
    # former is "missing" from the table.
    missing_distinct = np.zeros(len(values), dtype=bool)
    unserved_distinct = np.zeros(len(values), dtype=bool)
    parts = []
    for j, v in enumerate(values):
        if v is None:
            missing_distinct[j] = True
            parts.append(default)
        elif v is NOT_CACHED:
            unserved_distinct[j] = True
            parts.append(default)
        elif len(v) != row_bytes:
            log.error("table %s: a stored value of %d bytes, expected %d; using the default vector",
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
        distinct, missing_distinct, unserved_distinct, invalid_distinct = (
            distinct[inverse], missing_distinct[inverse], unserved_distinct[inverse], invalid_distinct[inverse]
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
