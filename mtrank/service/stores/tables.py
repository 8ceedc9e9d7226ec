"""What every embedding store answers with, whatever its back-end: the tables of a model
version as the repository holds them (:class:`LocalTable`), one field's answer (:class:`Lookup`)
and the interface the ranker calls (:class:`EmbeddingStore`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from mtrank.manifest import TableInfo, open_vectors, read_ids

if TYPE_CHECKING:
    from mtrank.service.stores.histories import HistoryAnswer, HistoryQuery


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
    unknown to the table, not yet loaded when ``incomplete``, or a value that is no vector (wrong
    size, NaN or infinities). Counted in
    ``mtrank_embedding_missing_total{table}``."""
    unserved: int = 0
    """Ids (with repeats) that got the default vector because the store could not be asked: the
    store (or the Cluster node holding them) unreachable, or the circuit breaker open. Not counted
    as missing: whether the table holds them is unknown."""
    incomplete: bool = False
    """The table's version was not completely loaded in the store (its meta key was absent or
    different) at the last check, so ``missing`` may count ids the complete table holds."""

    @property
    def defaults(self) -> int:
        """Ids (with repeats) that got the default vector, for any reason."""
        return self.missing + self.unserved


class EmbeddingStore(Protocol):
    name: str
    """``inprocess`` or the back-end's name (``redis``): the ``store`` label of the lookup histogram."""

    @property
    def degraded(self) -> bool:
        """True during an outage (answers come from the cache and default vectors)."""
        ...

    async def lookup_many(self, requests: Sequence[tuple[LocalTable, list[str]]]) -> tuple[list[Lookup], bool]:
        """Vectors of ``ids`` in each table, in one round trip; and whether the answer is degraded
        (some ids unserved, or a table not completely loaded)."""
        ...

    async def lookup_with_history(
        self, requests: Sequence[tuple[LocalTable, list[str]]], history: HistoryQuery | None
    ) -> tuple[list[Lookup], HistoryAnswer | None, bool]:
        """:meth:`lookup_many`, and the user's history record (None when ``history`` is None) in
        the same round trip."""
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


def unique_ids(ids: list[str]) -> tuple[list[str], np.ndarray | None]:
    """Distinct ids in first-seen order and, per input id, its position among them (None when
    the ids are already distinct, as a candidate list's item ids are)."""
    if len(set(ids)) == len(ids):
        return ids, None
    pos: dict[str, int] = {}
    inverse = np.fromiter((pos.setdefault(i, len(pos)) for i in ids), dtype=np.int64, count=len(ids))
    return list(pos), inverse
