"""The table checks around any embedding store back-end: is each table of a version loaded,
completely, with the repository's shape and one shard layout?

A table is complete when its meta key (written by the loader after the table's rows) matches the
repository's rows and width. :meth:`TableChecks.version_problem` refuses a version whose tables
are not (yet) loaded; afterwards a table found incomplete (the store restarted empty, a load
under way) is re-read in the background at most once per ``verify_s``, and until it is seen
complete again its misses are not cached and its answers are marked degraded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mtrank import store_keys
from mtrank.service.stores.breaker import CircuitBreaker
from mtrank.service.stores.tables import LocalTable
from mtrank.stores import StoreBackend

log = logging.getLogger("mtrank.stores")


@dataclass
class TableState:
    """What the store knows of one table of one version."""

    cache_prefix: str
    """Prepended to an id for its cache key (the one-shard key, whatever the layout)."""
    key_prefixes: list[str]
    """Per shard of the version, prepended to an id for its key in this table."""
    routes: list[int]
    """Per shard of the version, where its keys live (:meth:`StoreBackend.route`: the Cluster slot)."""
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

    def keys(self, ids: list[str]) -> list[str]:
        if len(self.key_prefixes) == 1:
            key_prefix = self.key_prefixes[0]
            return [key_prefix + i for i in ids]
        prefixes = self.key_prefixes
        return [prefixes[s] + i for s, i in zip(store_keys.shard_of(ids, len(prefixes)), ids, strict=True)]


_ONE_SHARD = store_keys.VersionLayout()


class TableChecks:
    """Per table of every version served, its layout in the store and whether it is complete."""

    def __init__(self, backend: StoreBackend, breaker: CircuitBreaker, prefix: str, verify_s: float):
        self.backend = backend
        self.breaker = breaker
        self.prefix = prefix
        self.verify_s = verify_s
        """Seconds a table's meta key check stays valid for caching misses."""
        self._tables: dict[tuple[str, int, str], TableState] = {}
        self._to_verify: set[tuple[str, int, str]] = set()
        self._layouts: dict[tuple[str, int], store_keys.VersionLayout] = {}
        self._verify_task: asyncio.Task | None = None
        # The store may have come back empty: misses are not cached until each table's meta key
        # has been read again.
        breaker.on_recovered(self._unverify)

    def _unverify(self) -> None:
        for state in self._tables.values():
            state.verified_at = -math.inf

    @property
    def incomplete_tables(self) -> list[str]:
        """Tables (``model vN field``) whose meta key was absent or different at the last check."""
        return sorted(s.label for s in self._tables.values() if s.incomplete)

    def fresh(self, state: TableState, now: float) -> bool:
        """Whether ``state``'s misses may be cached: seen complete within ``verify_s``."""
        return not state.incomplete and now - state.verified_at < self.verify_s

    def probes(self) -> dict[int, str]:
        """Route → a key prefix living there, for every route of every known table."""
        return {route: s.key_prefixes[i] for s in self._tables.values() for i, route in enumerate(s.routes)}

    def state(self, table: LocalTable) -> TableState:
        state = self._tables.get((table.model, table.version, table.field))
        return state if state is not None else self._register(table, store_keys.VersionLayout())

    def _register(self, table: LocalTable, layout: store_keys.VersionLayout) -> TableState:
        key_prefixes = layout.key_prefixes(self.prefix, table.model, table.version, table.field)
        state = TableState(
            cache_prefix=store_keys.id_key_prefix(self.prefix, table.model, table.version, table.field),
            key_prefixes=key_prefixes,
            routes=[self.backend.route(p) for p in key_prefixes],
            meta_key=store_keys.meta_key(self.prefix, table.model, table.version, table.field),
            rows=table.info.rows,
            width=table.width,
            label=f"{table.model} v{table.version} {table.field}",
        )
        self._tables[(table.model, table.version, table.field)] = state
        return state

    async def version_problem(self, tables: Sequence[LocalTable]) -> str | None:
        """Why ``tables`` (of one or more versions) cannot be served from the store, or None."""
        if not tables:
            return None
        title = self.backend.title
        keys = [store_keys.meta_key(self.prefix, t.model, t.version, t.field) for t in tables]
        try:
            async with asyncio.timeout(max(self.backend.timeout_s * 10, 1.0)):
                metas = await self.backend.get(keys)
        except self.backend.errors as e:
            self.breaker.failed(e)
            return f"cannot check its tables in {title} at {self.backend.display_url}: {self.breaker.last_error}"
        self.breaker.succeeded()
        layouts: dict[tuple[str, int], tuple[str, store_keys.VersionLayout]] = {}
        for t, key, raw in zip(tables, keys, metas, strict=True):
            if raw is None:
                return (f"table {t.field!r} of {t.model} v{t.version} is not loaded in {title} (no key {key}); "
                        f"run `mtrank load-embeddings --model {t.model} --version {t.version}`")
            meta = _meta_object(raw)
            try:
                layout = store_keys.VersionLayout.from_meta(meta)
            except (ValueError, TypeError, AttributeError):
                return f"table {t.field!r}: meta key {key} is not a JSON object with a valid shard layout"
            if _shape(meta) != (t.info.rows, t.width):
                return (f"table {t.field!r} in {title} has rows={meta.get('rows')} width={meta.get('width')}, "
                        f"the repository has rows={t.info.rows} width={t.width}")
            first_field, first = layouts.setdefault((t.model, t.version), (t.field, layout))
            if layout != first:
                # The tables of a version share its hash tags: one request, one MGET per node.
                return (f"tables {first_field!r} and {t.field!r} of {t.model} v{t.version} were loaded with "
                        f"different shard layouts ({first.shards} and {layout.shards} shards); run "
                        f"`mtrank load-embeddings --model {t.model} --version {t.version}` again")
        now = time.monotonic()
        for t, raw in zip(tables, metas, strict=True):
            self.check_meta(self._register(t, layouts[(t.model, t.version)][1]), raw, now)
        self._layouts.update({version: layout for version, (_, layout) in layouts.items()})
        return None

    def layout(self, model: str, version: int) -> store_keys.VersionLayout:
        """The shard layout the version's tables were loaded with (one shard for a version without
        store tables): its history records use the same hash tags."""
        return self._layouts.get((model, version), _ONE_SHARD)

    def check_meta(self, state: TableState, raw: bytes | None, now: float) -> str | None:
        """Record the state of ``state``'s meta value ``raw``; returns why it is not complete, or None."""
        state.checked_at = now
        problem = None
        if raw is None:
            problem = f"table {state.label} is not loaded in {self.backend.title} (no key {state.meta_key})"
        else:
            meta = _meta_object(raw)
            if meta is None:
                problem = f"table {state.label}: meta key {state.meta_key} is not a JSON object"
            elif _shape(meta) != (state.rows, state.width):
                problem = (f"table {state.label} in {self.backend.title} has rows={meta.get('rows')} "
                           f"width={meta.get('width')}, the repository has rows={state.rows} width={state.width}")
        if problem is None:
            if state.incomplete:
                log.warning("table %s is completely loaded in %s again", state.label, self.backend.title)
            state.incomplete = False
            state.verified_at = now
        else:
            if not state.incomplete:
                log.warning("%s; its missing ids get default vectors and are not cached", problem)
            state.incomplete = True
        return problem

    def schedule_verify(self, states: list[TableState], now: float) -> None:
        """Read these tables' meta keys in the background (at most once per ``verify_s`` each)."""
        due = [s for s in states if now - s.checked_at >= self.verify_s]
        if not due:
            return
        self._to_verify.update((k for k, s in self._tables.items() if any(s is d for d in due)))
        if self._verify_task is None or self._verify_task.done():
            self._verify_task = asyncio.create_task(self._verify())

    async def _verify(self) -> None:
        while self._to_verify:
            keys = list(self._to_verify)
            self._to_verify.clear()
            try:
                async with asyncio.timeout(self.backend.timeout_s * 2):
                    await self.read_metas([self._tables[k] for k in keys if k in self._tables])
            except self.backend.errors as e:
                self.breaker.failed(e)
                return

    async def read_metas(self, states: list[TableState]) -> None:
        raws = await self.backend.get([s.meta_key for s in states])
        now = time.monotonic()
        for state, raw in zip(states, raws, strict=True):
            self.check_meta(state, raw, now)

    def close(self) -> None:
        if self._verify_task is not None:
            self._verify_task.cancel()


def _meta_object(raw: bytes) -> dict | None:
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _shape(meta: dict | None) -> tuple[object, object] | None:
    """(rows, width) as a meta value records them, not coerced: ``"8"`` or ``8.5`` is no width."""
    return None if meta is None else (meta.get("rows"), meta.get("width"))
