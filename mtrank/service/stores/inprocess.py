"""The in-process store: the repository's own tables, ids file → dict, vectors memory-mapped, and
the history records file beside each version; the embedded default (``MTRANK_STORE_URL`` unset or
``inprocess://``). Nothing to break or cache."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from mtrank.service import metrics
from mtrank.service.stores.histories import HistoryAnswer, HistoryQuery, LocalHistories
from mtrank.service.stores.tables import LocalTable, Lookup


class InProcessStore:
    name = "inprocess"
    degraded = False

    def __init__(self) -> None:
        self.histories = LocalHistories()
        """History records from ``REPO/<model>/<version>.histories`` (``mtrank load-histories``)."""

    async def lookup_many(self, requests: Sequence[tuple[LocalTable, list[str]]]) -> tuple[list[Lookup], bool]:
        return [self.lookup_sync(table, ids) for table, ids in requests], False

    async def lookup_with_history(
        self, requests: Sequence[tuple[LocalTable, list[str]]], history: HistoryQuery | None
    ) -> tuple[list[Lookup], HistoryAnswer | None, bool]:
        found = await self.histories.read(history) if history is not None else None
        return [self.lookup_sync(table, ids) for table, ids in requests], found, False

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
