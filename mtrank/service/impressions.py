"""The impression log (docs/impressions.md): one Parquet record per answered ``POST /v1/rank``.

On the event loop, :meth:`ImpressionLog.offer` only appends what the handler already holds (the
decoded query, the answer, the ranker's returned rows and task scores) to a bounded queue: no
encoding there. A writer thread drains the queue every :data:`WRITER_INTERVAL_S`, builds Arrow
columns, writes them as row groups into a hidden temporary file and renames it into place when it
is complete (``MTRANK_IMPRESSION_ROTATE_MB`` or ``_ROTATE_S``), so a reader sees whole files or
none. File names carry the start time, the host and the pid: every worker and replica writes a
file set of its own. A full queue or a failing disk drops records (counted in
``mtrank_impressions_dropped_total{reason}``, a warning at most every 10 s); ranking goes on.

pyarrow is imported only when the log is on: a service without it never loads Arrow.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import logging
import math
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from mtrank.impression_log import schema
from mtrank.service import metrics

if TYPE_CHECKING:
    import pyarrow as pa

    from mtrank.service.ranking import RequestContext
    from mtrank.service.schemas import RankQuery, RankResponse
    from mtrank.service.settings import Settings

log = logging.getLogger("mtrank.impressions")

WRITER_INTERVAL_S = 0.25
"""How often the writer drains the queue."""
ROW_GROUP_RECORDS = 4096
"""Records per Parquet row group (fewer when a file is completed or the group is older than
:data:`ROW_GROUP_S`)."""
ROW_GROUP_S = 5.0
WARN_EVERY_S = 10.0
DICTIONARY_COLUMNS = ("bucket", "model", "user_group", "items.list.element.tasks.key_value.key")
"""The Parquet columns of few distinct values, dictionary-encoded. The others (ids, JSON texts,
numbers) are mostly distinct: a dictionary costs a hash of every value (twice the write time of a
100-candidate record) and ends up larger than plain zstd."""
THREAD_NAME = "mtrank-implog"
"""The writer thread's name, also given to the OS (``/proc/PID/task/*/comm``)."""

Record = tuple[float, "RankQuery", "RankResponse", np.ndarray, dict[str, np.ndarray]]
"""(answer time in s since the epoch, query, answer, returned rows in rank order, task scores)."""


def open_impression_log(settings: Settings) -> ImpressionLog | None:
    """The log ``settings`` ask for, its writer started; None when ``MTRANK_IMPRESSION_LOG`` is unset."""
    directory = settings.impression_log
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # Not fatal: ranking must not depend on the log; every record is counted as dropped.
        log.warning("impression log: cannot create %s (%s); records are dropped until it can be written",
                    directory, e.strerror or e)
    impressions = ImpressionLog(directory, settings.impression_sample, settings.impression_queue_rows,
                                int(settings.impression_rotate_mb * (1 << 20)), settings.impression_rotate_s)
    log.info("impression log: %s, sample %g, files of %g MiB or %g s", directory, settings.impression_sample,
             settings.impression_rotate_mb, settings.impression_rotate_s)
    return impressions


class ImpressionLog:
    """A bounded queue of records and the thread that writes them (:class:`_FileSet`)."""

    def __init__(self, directory: Path, sample: float = 1.0, queue_rows: int = 100_000,
                 rotate_bytes: int = 64 << 20, rotate_s: float = 60.0):
        import pyarrow  # noqa: F401 - fail at start-up, not in the writer, when it is missing

        self._threshold = None if sample >= 1.0 else int(sample * 2**32)
        self._queue: collections.deque[Record] = collections.deque()
        self._capacity = queue_rows
        # Candidates queued = in - out; each counter has one writer thread, so no lock is needed.
        self._rows_in = 0
        self._rows_out = 0
        self._full = 0
        self._full_reported = 0
        self._drops = _DropReport()
        self._files = _FileSet(Path(directory), rotate_bytes, rotate_s, self._drops)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def offer(self, ctx: RequestContext, query: RankQuery, response: RankResponse) -> None:
        """On the event loop, for an answered request: queue its record, or count it dropped."""
        # mtrank.impression_log.sampled's rule, with the threshold computed once.
        if self._threshold is not None and zlib.crc32(response.request_id.encode()) >= self._threshold:
            return
        n = query.n
        if self._rows_in - self._rows_out + n > self._capacity:
            self._full += 1
            return
        self._rows_in += n
        self._queue.append((time.time(), query, response, ctx.served_rows, ctx.task_scores))

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, complete the open file and stop the writer (blocks)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        _name_os_thread(THREAD_NAME)
        while not self._stop.wait(WRITER_INTERVAL_S):
            self._step()
        self._step()
        self._files.complete()
        self._drops.warn(force=True)

    def _step(self) -> None:
        records = []
        queue = self._queue
        while queue:
            record = queue.popleft()
            self._rows_out += record[1].n
            records.append(record)
        full = self._full
        if full > self._full_reported:
            self._drops.drop("queue_full", full - self._full_reported, "the writer's queue is full "
                             "(MTRANK_IMPRESSION_QUEUE_ROWS)")
            self._full_reported = full
        try:
            if records:
                self._files.add(records)
            self._files.tick()
        except Exception as e:  # noqa: BLE001 - a bug here must not end the thread; it is counted and logged
            log.exception("impression log: writer error")
            self._files.abandon(f"{type(e).__name__}: {e}")
        self._drops.warn()


class _DropReport:
    """Counts drops and sums them up in one warning at most every :data:`WARN_EVERY_S`."""

    def __init__(self) -> None:
        self._since: dict[str, int] = {}
        self._why: dict[str, str] = {}
        self._last = -math.inf

    def drop(self, reason: str, count: int, why: str) -> None:
        if count <= 0:
            return
        metrics.IMPRESSIONS_DROPPED.labels(reason).inc(count)
        self._since[reason] = self._since.get(reason, 0) + count
        self._why[reason] = why

    def warn(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._since or (now - self._last < WARN_EVERY_S and not force):
            return
        parts = [f"{n} ({reason}: {self._why[reason]})" for reason, n in sorted(self._since.items())]
        log.warning("impression log: dropped %s records; ranking goes on", ", ".join(parts),
                    extra={"event": "impressions_dropped", "dropped": dict(self._since)})
        self._since.clear()
        self._last = now


class _FileSet:
    """This process's files: ``impressions-<start>-<host>-<pid>-<seq>.parquet``, each written as
    ``.<name>.tmp`` (hidden from globs and from pyarrow's and DuckDB's directory readers) and
    renamed when complete."""

    def __init__(self, directory: Path, rotate_bytes: int, rotate_s: float, drops: _DropReport):
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self.rotate_s = rotate_s
        self._drops = drops
        started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
        self._prefix = f"impressions-{started}-{host}-{os.getpid()}"
        self._seq = 0
        self._schema = schema()
        self._writer: Any = None
        self._sink: Any = None
        self._paths: tuple[Path, Path] | None = None
        self._open_error = ""
        """Why the last file could not be opened."""
        self._opened = 0.0
        self._written = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_records = 0
        self._pending_since = 0.0

    def add(self, records: list[Record]) -> None:
        # Open at the first record: a directory that cannot be written shows at once, and its
        # records are counted dropped before any CPU is spent building them.
        if self._writer is None and not self._open():
            self._drops.drop("write_error", len(records), self._open_error)
            return
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(record_batch(records, self._schema))
        self._pending_records += len(records)
        if self._pending_records >= ROW_GROUP_RECORDS:
            self._flush()

    def tick(self) -> None:
        """Write a row group that has waited long enough; complete a file that is old enough."""
        now = time.monotonic()
        if self._pending and now - self._pending_since >= ROW_GROUP_S:
            if self._writer is None and not self._open():
                return
            self._flush()
        if self._writer is not None and now - self._opened >= self.rotate_s:
            self.complete()

    def complete(self) -> None:
        """Write what is pending, close the file and rename it into place."""
        if self._pending and (self._writer is not None or self._open()):
            self._flush(rotate=False)
        if self._writer is None:
            return
        tmp, final = self._paths
        try:
            self._writer.close()
            self._sink.close()
            os.rename(tmp, final)
        except Exception as e:  # noqa: BLE001 - OSError, or pyarrow's errors of the same disk
            self.abandon(_describe(e))
            return
        metrics.IMPRESSIONS_LOGGED.inc(self._written)
        self._writer = self._sink = self._paths = None
        self._written = 0

    def abandon(self, why: str) -> None:
        """Drop the open file's records and what is pending, and remove the temporary file."""
        self._drops.drop("write_error", self._written + self._pending_records, why)
        for handle in (self._writer, self._sink):
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
        if self._paths is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._paths[0])
        self._writer = self._sink = self._paths = None
        self._written = 0
        self._pending, self._pending_records = [], 0

    def _open(self) -> bool:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._seq += 1
        name = f"{self._prefix}-{self._seq:06d}.parquet"
        self._paths = (self.directory / f".{name}.tmp", self.directory / name)
        try:
            self._sink = pa.OSFile(str(self._paths[0]), "wb")
            self._writer = pq.ParquetWriter(self._sink, self._schema, compression="zstd",
                                            use_dictionary=list(DICTIONARY_COLUMNS))
        except Exception as e:  # noqa: BLE001 - OSError, or pyarrow's errors of the same disk
            self._open_error = _describe(e)
            self.abandon(self._open_error)
            return False
        self._opened = time.monotonic()
        return True

    def _flush(self, rotate: bool = True) -> None:
        import pyarrow as pa

        table = pa.Table.from_batches(self._pending, self._schema)
        try:
            self._writer.write_table(table, row_group_size=max(1, table.num_rows))
            size = self._sink.tell()
        except Exception as e:  # noqa: BLE001 - OSError (ENOSPC...), or pyarrow's errors of the same disk
            self.abandon(_describe(e))
            return
        self._written += self._pending_records
        self._pending, self._pending_records = [], 0
        if rotate and size >= self.rotate_bytes:
            self.complete()


def record_batch(records: list[Record], schema: pa.Schema) -> pa.RecordBatch:
    """The records as Arrow columns (one row per request; lists of candidates and of items)."""
    import pyarrow as pa

    queries = [r[1] for r in records]
    answers = [r[2] for r in records]
    candidates, candidate_ids, starts = _candidates(queries, schema.field("candidates").type)
    columns = [
        pa.array([int(r[0] * 1000) for r in records], pa.int64()).cast(schema.field("time").type),
        pa.array([a.request_id for a in answers], pa.string()),
        pa.array([a.bucket for a in answers], pa.string()),
        pa.array([a.model.name for a in answers], pa.string()),
        pa.array([a.model.version for a in answers], pa.int32()),
        pa.array([a.user_group for a in answers], pa.string()),
        pa.array([q.user_id for q in queries], pa.string()),
        _json_texts([q.user_features for q in queries]),
        candidates,
        _items(records, schema.field("items").type, candidate_ids, starts),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


_JSON = msgspec.json.Encoder()


def _json_texts(values: Iterable[Any]) -> pa.Array:
    """One JSON text per value, as an Arrow string array. One encoder call for all of them (JSON
    lines: a newline inside a string is escaped) and C kernels for the split: a call per value
    costs ~3 µs, 60 µs for a 20-candidate request."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = _JSON.encode_lines(values)
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
    offsets = np.zeros(len(ends) + 1, dtype=np.int32)
    offsets[1:] = ends + 1
    lines = pa.StringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(data))
    return pc.utf8_rtrim(lines, characters="\n")


def _offsets(lengths: Iterable[int] | np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _candidates(queries: list[RankQuery], kind: pa.ListType) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Every candidate as received: item id, video length and its features as JSON text. Returns the
    list column, the candidates' ids and each request's first candidate (and the end) in them."""
    import pyarrow as pa

    ids = pa.array(list(itertools.chain.from_iterable(q.item_ids for q in queries)), pa.string())
    lengths = pa.array(np.concatenate([q.video_len for q in queries]), pa.float64())
    features = _json_texts(itertools.chain.from_iterable(q.item_features for q in queries))
    values = pa.StructArray.from_arrays([ids, lengths, features], fields=list(kind.value_type))
    offsets = _offsets([q.n for q in queries])
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=kind), ids, offsets


def _items(records: list[Record], kind: pa.ListType, candidate_ids: pa.Array, starts: np.ndarray) -> pa.Array:
    """The returned items in rank order: id, rank, score and each task's prediction (a map).
    ``candidate_ids`` and ``starts``: the batch's candidates and each request's first one in them."""
    import pyarrow as pa

    fields = list(kind.value_type)
    answers = [r[2] for r in records]
    counts = [len(a.items) for a in answers]
    # Each returned item is a candidate of its request: its index among the batch's candidates.
    rows = np.concatenate([r[3] + start for r, start in zip(records, starts[:-1].tolist(), strict=True)])
    ids = candidate_ids.take(pa.array(rows))
    ranks = pa.array(np.concatenate([np.arange(1, k + 1, dtype=np.int32) for k in counts]), pa.int32())
    scores = pa.array([it.score for a in answers for it in a.items], pa.float64())
    tasks = _task_maps(records, rows).cast(fields[3].type)
    values_array = pa.StructArray.from_arrays([ids, ranks, scores, tasks], fields=fields)
    return pa.ListArray.from_arrays(pa.array(_offsets(counts)), values_array, type=kind)


def _task_maps(records: list[Record], rows: np.ndarray) -> pa.MapArray:
    """Each returned item's task predictions (``rows``: the items' indices among the batch's
    candidates) as a map, item-major so that each item's map is contiguous."""
    import pyarrow as pa

    names = list(records[0][4])
    if all(list(r[4]) == names for r in records):
        # One model's tasks throughout (the usual batch): a column per task for the whole batch.
        values = np.stack([np.concatenate([r[4][t] for r in records])[rows] for t in names], axis=1)
        keys = np.tile(np.arange(len(names), dtype=np.int32), len(rows))
        offsets = np.arange(len(rows) + 1, dtype=np.int32) * len(names)
    else:
        # Task names as indices into the names seen (taken in C), not a Python string per item and task.
        seen: dict[str, int] = {}
        key_parts, value_parts, per_item = [], [], []
        for _, _, _, served, task_scores in records:
            k = len(served)
            index = np.array([seen.setdefault(t, len(seen)) for t in task_scores], dtype=np.int32)
            key_parts.append(np.tile(index, k))
            # [tasks, candidates] → the returned rows → item-major.
            value_parts.append(np.array(list(task_scores.values()), dtype=np.float32)[:, served].T.ravel())
            per_item.append(np.full(k, len(index), dtype=np.int32))
        names, keys, values = list(seen), np.concatenate(key_parts), np.concatenate(value_parts)
        offsets = _offsets(np.concatenate(per_item))
    key_array = pa.array(names, pa.string()).take(pa.array(keys))
    return pa.MapArray.from_arrays(pa.array(offsets), key_array, pa.array(values.astype(np.float32).ravel()))


def _describe(e: BaseException) -> str:
    return f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the OS too (Linux ``prctl(PR_SET_NAME)``), so that tools
    and tests that read ``/proc`` see it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)
