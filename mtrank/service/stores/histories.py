"""Reading per-user history records (:mod:`mtrank.histories`) for requests that leave a
``sequence`` field out: what a store is asked (:class:`HistoryQuery`), what it answers
(:class:`HistoryAnswer`), and the in-process store's records file (:class:`LocalHistories`).

A user without a record, a load that is incomplete or of other fields (no meta key in the user's
shard, or one naming other fields or lengths) and a record that does not decode all answer
``missing``: the request is served with empty histories. A store that could not be asked answers
``unserved`` (the request is degraded, as for embeddings).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mtrank import histories
from mtrank.histories import HistoryError, HistoryFields

log = logging.getLogger("mtrank.stores")

FOUND, MISSING, UNSERVED = "found", "missing", "unserved"


@dataclass(frozen=True)
class HistoryQuery:
    """The record of ``user_id`` for model version (``model``, ``version``), holding ``fields``."""

    model: str
    version: int
    version_dir: Path
    user_id: str
    fields: HistoryFields


@dataclass(frozen=True)
class HistoryAnswer:
    status: str
    """:data:`FOUND`, :data:`MISSING` (no record: empty histories) or :data:`UNSERVED` (the store
    could not be asked)."""
    lists: tuple[list[str], ...] | None = None
    """When found: per field of the query, the user's keys, most recent first."""


UNSERVED_ANSWER = HistoryAnswer(UNSERVED)
MISSING_ANSWER = HistoryAnswer(MISSING)


def answer(raw_meta: bytes | None, raw_record: bytes | None, query: HistoryQuery) -> HistoryAnswer:
    """The answer from the meta value of the user's shard and the user's record, as read."""
    if raw_record is None or raw_meta is None or not _meta_ok(raw_meta, query.fields):
        return MISSING_ANSWER
    try:
        return HistoryAnswer(FOUND, tuple(histories.decode_record(raw_record, len(query.fields.names))))
    except HistoryError as e:
        log.error("history record of user %r of %s v%d: %s; serving empty histories",
                  query.user_id, query.model, query.version, e)
        return MISSING_ANSWER


@functools.lru_cache(maxsize=64)
def _meta_ok(raw_meta: bytes, fields: HistoryFields) -> bool:
    ok = histories.meta_matches(histories.parse_meta(raw_meta), fields)
    if not ok:
        log.warning("history records loaded for fields other than %s (meta %s); load them again with "
                    "`mtrank load-histories`", list(fields.names), raw_meta[:200])
    return ok


@dataclass
class _LocalFile:
    stat: tuple[int, int, int] | None
    meta: dict | None = None
    records: dict[str, bytes] = field(default_factory=dict)
    checked_at: float = 0.0


class LocalHistories:
    """The in-process store's records: ``REPO/<model>/<version>.histories`` of each version,
    read on first use and again when the file changes (checked at most every ``check_s``)."""

    def __init__(self, check_s: float = 1.0):
        self.check_s = check_s
        self._files: dict[Path, _LocalFile] = {}
        self._locks: dict[Path, asyncio.Lock] = {}

    async def read(self, query: HistoryQuery) -> HistoryAnswer:
        loaded = await self._file(histories.local_path(query.version_dir))
        if loaded.meta is None or not histories.meta_matches(loaded.meta, query.fields):
            return MISSING_ANSWER
        record = loaded.records.get(query.user_id)
        if record is None:
            return MISSING_ANSWER
        try:
            return HistoryAnswer(FOUND, tuple(histories.decode_record(record, len(query.fields.names))))
        except HistoryError:
            return MISSING_ANSWER

    async def _file(self, path: Path) -> _LocalFile:
        now = time.monotonic()
        current = self._files.get(path)
        if current is not None and now - current.checked_at < self.check_s:
            return current
        async with self._locks.setdefault(path, asyncio.Lock()):
            current = self._files.get(path)
            if current is not None and now - current.checked_at < self.check_s:
                return current
            stat = _stat(path)
            if current is None or stat != current.stat:
                current = await asyncio.to_thread(_read, path, stat)
            current.checked_at = now
            self._files[path] = current
            return current


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read(path: Path, stat: tuple[int, int, int] | None) -> _LocalFile:
    if stat is None:
        return _LocalFile(None)
    try:
        meta, records = histories.read_local(path)
    except (OSError, ValueError, KeyError) as e:
        log.error("history records %s: %s; serving empty histories", path, e)
        return _LocalFile(stat)
    log.info("history records %s: %d users", path, len(records))
    return _LocalFile(stat, meta, records)
