"""The impression log (docs/impressions.md): one Parquet record per answered ``POST /v1/rank``.

On the event loop, :meth:`ImpressionLog.offer` only appends what the handler holds anyway to a
bounded queue: the request body as received (the bytes themselves: the log keeps the request
verbatim), the answer's labels, the returned ids, and arrays of rows, scores and predictions. No
encoding there, and no decoded request kept alive: the event loop frees it at once, as with the
log off (holding tens of thousands of small objects until the writer freed them cost the server
more CPU than writing the log). A writer thread drains the queue every :data:`WRITER_INTERVAL_S`,
builds Arrow columns, writes them as row groups into a hidden temporary file and renames it into
place when it is complete (``MTRANK_IMPRESSION_ROTATE_MB`` or ``_ROTATE_S``), so a reader sees
whole files or none. File names carry the start time, the host and the pid: every worker and
replica writes a file set of its own. A full queue or a failing disk drops records (counted in
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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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
DICTIONARY_COLUMNS = ("bucket", "model", "user_group")
"""The Parquet columns of few distinct values, dictionary-encoded. The others (ids, JSON texts,
numbers) are mostly distinct: a dictionary costs a hash of every value (twice the write time of a
100-candidate record) and ends up larger than plain compression. The task names of the items' maps
repeat, but hashing six hundred of them per 100-candidate record cost 5 µs of the items' 30."""
STATISTICS_COLUMNS = ("time", "bucket", "model", "version", "user_group")
"""The columns whose row groups carry min/max statistics, for readers that skip row groups by time,
bucket or model. Statistics of the long columns (JSON texts, ids) would cost more than their
compression (30 µs of 80 per 100-candidate record) and prune nothing."""
THREAD_NAME = "mtrank-implog"
"""The writer thread's name, also given to the OS (``/proc/PID/task/*/comm``)."""


class Record(NamedTuple):
    """One answered request, as queued: what the handler holds anyway (the body, the returned ids,
    arrays), so that the event loop frees the decoded request at once, as with the log off."""

    time: float
    """Answer time, seconds since the epoch."""
    body: bytes
    """The request body as received: valid UTF-8 JSON (it was decoded to be answered)."""
    candidates: int
    request_id: str
    bucket: str
    model: str
    version: int
    user_group: str | None
    user_id: str
    served_ids: list[str]
    """The returned item ids, in rank order."""
    served_rows: np.ndarray
    """The returned candidates' indices in the request, in rank order."""
    scores: np.ndarray
    """The returned items' scores, in rank order."""
    task_scores: dict[str, np.ndarray]
    """Each task's predictions for every candidate, in request order."""


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
                                int(settings.impression_rotate_mb * (1 << 20)), settings.impression_rotate_s,
                                settings.impression_compression)
    log.info("impression log: %s, sample %g, files of %g MiB or %g s, %s", directory, settings.impression_sample,
             settings.impression_rotate_mb, settings.impression_rotate_s, settings.impression_compression)
    return impressions


class ImpressionLog:
    """A bounded queue of records and the thread that writes them (:class:`_FileSet`)."""

    def __init__(self, directory: Path, sample: float = 1.0, queue_rows: int = 100_000,
                 rotate_bytes: int = 64 << 20, rotate_s: float = 60.0, compression: str = "lz4"):
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
        self._files = _FileSet(Path(directory), rotate_bytes, rotate_s, self._drops, compression)
        _warm_up(self._files.schema)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def offer(self, ctx: RequestContext, body: bytes, query: RankQuery, response: RankResponse) -> None:
        """On the event loop, for an answered request (``body`` as received, decoded into
        ``query``): queue its record, or count it dropped."""
        # mtrank.impression_log.sampled's rule, with the threshold computed once.
        request_id = response.request_id
        if self._threshold is not None and zlib.crc32(request_id.encode()) >= self._threshold:
            return
        n = query.n
        if self._rows_in - self._rows_out + n > self._capacity:
            self._full += 1
            return
        self._rows_in += n
        self._queue.append(Record(time.time(), body, n, request_id, response.bucket, response.model.name,
                                  response.model.version, response.user_group, query.user_id, ctx.served_ids,
                                  ctx.served_rows, ctx.scores, ctx.task_scores))

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
            self._rows_out += record.candidates
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

    def __init__(self, directory: Path, rotate_bytes: int, rotate_s: float, drops: _DropReport,
                 compression: str = "lz4"):
        self.directory = directory
        self.compression = compression
        self.rotate_bytes = rotate_bytes
        self.rotate_s = rotate_s
        self._drops = drops
        started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
        self._prefix = f"impressions-{started}-{host}-{os.getpid()}"
        self._seq = 0
        self.schema = schema()
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
        self._pending.append(record_batch(records, self.schema))
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
            self._writer = pq.ParquetWriter(self._sink, self.schema, compression=self.compression,
                                            use_dictionary=list(DICTIONARY_COLUMNS),
                                            write_statistics=list(STATISTICS_COLUMNS))
        except Exception as e:  # noqa: BLE001 - OSError, or pyarrow's errors of the same disk
            self._open_error = _describe(e)
            self.abandon(self._open_error)
            return False
        self._opened = time.monotonic()
        return True

    def _flush(self, rotate: bool = True) -> None:
        import pyarrow as pa

        table = pa.Table.from_batches(self._pending, self.schema)
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
    """The records as Arrow columns (one row per request; a list of the returned items)."""
    import pyarrow as pa

    columns = [
        pa.array([int(r.time * 1000) for r in records], pa.int64()).cast(schema.field("time").type),
        pa.array([r.request_id for r in records], pa.string()),
        pa.array([r.bucket for r in records], pa.string()),
        pa.array([r.model for r in records], pa.string()),
        pa.array([r.version for r in records], pa.int32()),
        pa.array([r.user_group for r in records], pa.string()),
        pa.array([r.user_id for r in records], pa.string()),
        _texts([r.body for r in records]),
        _items(records, schema.field("items").type),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _texts(texts: list[bytes]) -> pa.Array:
    """UTF-8 texts as one Arrow string array: one copy into a buffer and the offsets, not a Python
    string each (request bodies: valid UTF-8, they were decoded to be answered)."""
    import pyarrow as pa

    data = b"".join(texts)
    offsets = _offsets(list(map(len, texts)))
    return pa.StringArray.from_buffers(len(texts), pa.py_buffer(offsets), pa.py_buffer(data))


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _items(records: list[Record], kind: pa.ListType) -> pa.Array:
    """The returned items in rank order: id, rank, score and each task's prediction (a map)."""
    import pyarrow as pa

    fields = list(kind.value_type)
    counts = [len(r.served_rows) for r in records]
    ids = pa.array(list(itertools.chain.from_iterable(r.served_ids for r in records)), pa.string())
    ranks = pa.array(np.concatenate([np.arange(1, k + 1, dtype=np.int32) for k in counts]), pa.int32())
    scores = pa.array(np.concatenate([r.scores for r in records]).astype(np.float64, copy=False), pa.float64())
    tasks = _task_maps(records).cast(fields[3].type)
    values_array = pa.StructArray.from_arrays([ids, ranks, scores, tasks], fields=fields)
    return pa.ListArray.from_arrays(pa.array(_offsets(counts)), values_array, type=kind)


def _task_maps(records: list[Record]) -> pa.MapArray:
    """Each returned item's task predictions as a map, item-major so that each item's map is
    contiguous."""
    import pyarrow as pa

    names = list(records[0].task_scores)
    if all(list(r.task_scores) == names for r in records):
        # One model's tasks throughout (the usual batch): a column per task for the whole batch,
        # indexed by the returned items' positions among all the batch's candidates.
        starts = _offsets([r.candidates for r in records])[:-1].tolist()
        rows = np.concatenate([r.served_rows + start for r, start in zip(records, starts, strict=True)])
        values = np.stack([np.concatenate([r.task_scores[t] for r in records])[rows] for t in names], axis=1)
        keys = np.tile(np.arange(len(names), dtype=np.int32), len(rows))
        offsets = np.arange(len(rows) + 1, dtype=np.int32) * len(names)
    else:
        # Task names as indices into the names seen (taken in C), not a Python string per item and task.
        seen: dict[str, int] = {}
        key_parts, value_parts, per_item = [], [], []
        for r in records:
            served, task_scores = r.served_rows, r.task_scores
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


def _warm_up(schema: pa.Schema) -> None:
    """Build one record's columns at start-up: the first ``pa.array`` of Python objects imports
    pyarrow's pandas shim (pandas itself where installed, about a second of CPU), which would
    otherwise land on the first minute of traffic. The Parquet module is imported here too."""
    import pyarrow.parquet  # noqa: F401

    body = b'{"user":{"user_id":"u"},"candidates":[{"item_id":"i","video_len":1.0}]}'
    rows = np.zeros(1, dtype=np.int64)
    record_batch([Record(time.time(), body, 1, "warm-up", "b", "m", 1, None, "u", ["i"], rows, np.ones(1),
                         {"t": np.ones(1, dtype=np.float32)})], schema)


def _describe(e: BaseException) -> str:
    return f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the OS too (Linux ``prctl(PR_SET_NAME)``), so that tools
    and tests that read ``/proc`` see it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)
