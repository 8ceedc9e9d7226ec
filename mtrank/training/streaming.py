"""Splits read as datasets: record batches in, model-ready tensors out, memory flat in the rows.

A split (see :func:`mtrank.training.frames.find_split`) is one or more Parquet files read with
``pyarrow.dataset`` — only the columns the spec needs, one row group at a time, in record batches
of :data:`READ_BATCH_ROWS` — or a CSV/TSV file (small data: read whole, then cut into
:data:`CSV_UNIT_ROWS`-row units). The *unit* of reading, shuffling and sharding is a row group.

:class:`TrainStream` gives one worker's batches of an epoch:

- the epoch's unit order is a permutation seeded by ``(seed, epoch)``: every worker knows it;
- worker ``r`` of ``W`` takes rows ``[N·r/W, N·(r+1)/W)`` of that order (a unit on a boundary is
  read by both workers, each keeping its part), so workers hold disjoint, equal shares;
- its rows are cut into blocks of ``shuffle_rows`` (a multiple of the batch size); a block is
  shuffled with a generator seeded by ``(seed, epoch, rank, block)`` and cut into batches;
- every worker stops after ``min_r ⌈rows_r / batch_size⌉`` steps, known from the files' metadata
  without talking, so DistributedDataParallel's collectives always pair up.

A batch is a pure function of ``(seed, epoch, world size, rank, step)``: a resumed run skips the
blocks before its step without reading them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from mtrank.spec import Facet, FeatureSpec, SpecError
from mtrank.training import frames
from mtrank.training.features import Preprocessor, PreprocessorFitter

READ_BATCH_ROWS = 16_384
"""Rows per record batch read from Parquet."""
CSV_UNIT_ROWS = 65_536
"""Rows per unit of a CSV split (its stand-in for a row group)."""
LABEL_SAMPLE_ROWS = 250_000
"""Train rows whose labels fit the regression outputs (all rows of a smaller split; else a uniform sample)."""


@dataclass
class Tensors:
    """Rows of a split, preprocessed: inputs, labels and masks per task, each row's facet value indices."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    space: torch.Tensor
    group: torch.Tensor
    """int64 ``[N]``: index into ``spec.user_groups.values`` (0 without user groups)."""
    item: torch.Tensor | None = None
    """int64 ``[N]``: index into ``spec.item_facet.values``; None when the spec has no item facet."""

    def __len__(self) -> int:
        return self.dense.shape[0]

    def rows(self, idx) -> Tensors:
        return Tensors(*(None if t is None else t[idx] for t in self._fields()))

    def to(self, device: torch.device | str) -> Tensors:
        return Tensors(*(None if t is None else t.to(device) for t in self._fields()))

    def _fields(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def cat(cls, parts: Sequence[Tensors]) -> Tensors:
        if len(parts) == 1:
            return parts[0]
        columns = zip(*(p._fields() for p in parts), strict=True)
        return cls(*(None if c[0] is None else torch.cat(c) for c in columns))


def chunks(t: Tensors, size: int) -> Iterator[Tensors]:
    """``t`` in consecutive slices of at most ``size`` rows."""
    for a in range(0, len(t), size):
        yield t.rows(slice(a, a + size))


def facet_codes(frame: pd.DataFrame, facet: Facet) -> np.ndarray:
    """int64 value index per row of a conformed frame: its facet column if present, else the facet's
    rules on the raw features (:func:`mtrank.transform.facet_index` does the same on columns)."""
    if facet.column in frame.columns:
        index = frame[facet.column].astype(str).map({v: i for i, v in enumerate(facet.values)})
        if index.isna().any():
            bad = sorted(set(frame[facet.column].astype(str)[index.isna()]))[:5]
            raise SpecError(f"column {facet.column!r} has values {bad} outside {list(facet.values)}")
        return index.to_numpy(np.int64)
    if not facet.rules:
        return np.full(len(frame), facet.values.index(facet.default), dtype=np.int64)
    return facet.assign({r.feature: frame[r.feature].to_numpy(np.float64) for r in facet.rules})


def label_arrays(frame: pd.DataFrame, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[N, n_tasks]`` labels (0 outside a task's space) and space masks (1 inside)."""
    labels = np.zeros((len(frame), len(spec.tasks)), dtype=np.float32)
    space = np.zeros_like(labels)
    for k, task in enumerate(spec.tasks):
        y = frame[task.label_column].to_numpy(np.float64)
        inside = ~np.isnan(y)
        if task.space is not None:
            inside &= frame[task.space].to_numpy() > 0
        labels[:, k] = np.where(inside, y, 0.0)
        space[:, k] = inside
    return labels, space


def to_tensors(frame: pd.DataFrame, spec: FeatureSpec, pre: Preprocessor) -> Tensors:
    """A conformed frame (see mtrank.training.frames.conform_frame) as model inputs, labels and masks."""
    dense, sparse = pre.transform(frame)
    labels, space = label_arrays(frame, spec)
    group = np.zeros(len(frame), dtype=np.int64) if spec.user_groups is None else facet_codes(frame, spec.user_groups)
    arrays = [dense, sparse, labels, space, group]
    if spec.item_facet is not None:
        arrays.append(facet_codes(frame, spec.item_facet))
    return Tensors(*(torch.from_numpy(np.require(a, requirements="W")) for a in arrays))


@dataclass(frozen=True)
class Unit:
    """One row group of a Parquet file (or one slice of a CSV split): what is read, shuffled and sharded."""

    file: int
    """Index into :attr:`SplitSource.files`."""
    index: int
    """Row group number (CSV: slice number)."""
    rows: int
    first_row: int
    """The unit's first row within its file (for error messages)."""


def _wanted_columns(spec: FeatureSpec) -> tuple[list[str], list[str]]:
    """(columns a split must have, columns read when present: facet columns and ``oracle_<task>``)."""
    required = [f.name for f in (*spec.dense, *spec.sparse, *spec.lists)]
    for t in spec.tasks:
        required.append(t.label_column)
        if t.space is not None:
            required.append(t.space)
    optional = []
    for facet in (spec.user_groups, spec.item_facet):
        if facet is not None:
            optional.append(facet.column)
            optional.extend(r.feature for r in facet.rules)
    optional.extend(f"oracle_{t.name}" for t in spec.tasks)
    required = list(dict.fromkeys(required))
    return required, [c for c in dict.fromkeys(optional) if c not in required]


class SplitSource:
    """One split of a data directory: its files, their units and how to read them (see the module doc).

    ``columns`` are what training and evaluation read: the spec's, plus facet and ``oracle_<task>``
    columns where every file has them; ``all_columns``: every column all files have.
    """

    def __init__(self, path: Path, spec: FeatureSpec):
        self.path = path
        self.spec = spec
        required, optional = _wanted_columns(spec)
        self._csv: pd.DataFrame | None = None
        if path.is_file() and not path.name.lower().endswith(".parquet"):
            frame = frames.read_table(path)
            frames.check_columns(frame.columns, spec, path)
            self.files = [path]
            self.columns = required + [c for c in optional if c in frame.columns]
            self.all_columns = list(frame.columns)
            self._csv = frame
            self.units = [Unit(0, i, min(CSV_UNIT_ROWS, len(frame) - a), a)
                          for i, a in enumerate(range(0, len(frame), CSV_UNIT_ROWS))]
        else:
            self.files = frames.parquet_files(path)
            self._fragments = []
            names: list[str] | None = None
            self.units = []
            for i, file in enumerate(self.files):
                try:
                    fragment = next(pads.dataset(str(file), format="parquet").get_fragments())
                    schema = fragment.physical_schema
                    meta = fragment.metadata
                    counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                    raise SpecError(f"{file}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
                frames.check_schema(schema, spec, file)
                names = [c for c in names if c in schema.names] if names is not None else list(schema.names)
                self._fragments.append(fragment)
                first = 0
                for g, n in enumerate(counts):
                    if n:
                        self.units.append(Unit(i, g, n, first))
                    first += n
            self.all_columns = names or []
            self.columns = required + [c for c in optional if c in self.all_columns]
        self.rows = sum(u.rows for u in self.units)
        if self.rows == 0:
            raise SpecError(f"{path}: no rows")

    @classmethod
    def open(cls, data_dir: str | Path, split: str, spec: FeatureSpec) -> SplitSource:
        """The split ``split`` of ``data_dir``; a missing split, file or column is a one-line SpecError."""
        return cls(frames.find_split(data_dir, split, spec.name), spec)

    def where(self, unit: Unit) -> str:
        """The file of ``unit``, for error messages."""
        return str(self.files[unit.file])

    def read(self, unit: Unit, columns: Sequence[str] | None = None, validate: bool = False) -> Iterator[pd.DataFrame]:
        """The unit's rows as conformed frames (see mtrank.training.frames.conform_frame), in file order.

        ``columns``: a projection (default :attr:`columns`); ``validate``: check each frame's values
        first (a one-line SpecError naming the file and row).
        """
        columns = list(columns or self.columns)
        first = unit.first_row
        for frame in self._raw(unit, columns):
            if validate:
                frames.validate_frame(frame, self.spec, self.where(unit), first_row=first)
            first += len(frame)
            yield frames.conform_frame(frame, self.spec)

    def _raw(self, unit: Unit, columns: list[str]) -> Iterator[pd.DataFrame]:
        if self._csv is not None:
            start = unit.index * CSV_UNIT_ROWS
            yield self._csv.iloc[start : start + unit.rows][columns].reset_index(drop=True)
            return
        group = self._fragments[unit.file].subset(row_group_ids=[unit.index])
        # The system allocator: pyarrow's default (mimalloc) kept ~100 MB more resident after one pass
        # over 65k-row row groups (measured), memory the rest of the process could not reuse.
        batches = group.to_batches(columns=columns, batch_size=READ_BATCH_ROWS, use_threads=False,
                                   memory_pool=pa.system_memory_pool())
        for batch in batches:
            if batch.num_rows:
                # Without the pandas metadata: a writer's extension dtypes (``list<string>[pyarrow]``
                # for a list column) are names this pandas may not parse; list cells become arrays.
                yield batch.to_pandas(ignore_metadata=True)

    def frames(self, validate: bool = False, units: Sequence[Unit] | None = None,
               columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        """Conformed frames of ``units`` (default all, in file order)."""
        for unit in self.units if units is None else units:
            yield from self.read(unit, columns, validate)

    def check(self) -> None:
        """Validate every row's values, reading only the columns the checks look at."""
        spec = self.spec
        looked_at = [f.name for f in spec.dense]
        for t in spec.tasks:
            looked_at += [t.label_column] + ([t.space] if t.space is not None else [])
        for facet in (spec.user_groups, spec.item_facet):
            if facet is not None and facet.column in self.columns:
                looked_at.append(facet.column)
        columns = list(dict.fromkeys(looked_at))
        for unit in self.units:
            first = unit.first_row
            for frame in self._raw(unit, columns):
                frames.validate_frame(frame.reindex(columns=self.columns), spec, self.where(unit), first_row=first)
                first += len(frame)

    def shard(self, rank: int, world: int) -> list[Unit]:
        """Units ``rank, rank + world, …`` in file order: a disjoint part for evaluation passes."""
        return self.units[rank::world]


def fit_preprocessing(
    source: SplitSource, spec: FeatureSpec, max_vocab: int | None, seed: int
) -> tuple[Preprocessor, np.ndarray, np.ndarray]:
    """One validating pass over the train split: dense statistics, vocabularies and a label sample.

    Returns the fitted :class:`Preprocessor` and the labels and space masks (``[n, n_tasks]``
    float32) of every train row, or of a uniform sample of :data:`LABEL_SAMPLE_ROWS` rows when the
    split is larger (regression outputs are fitted on them; binary outputs need none).
    """
    fitter = PreprocessorFitter(spec, max_vocab=max_vocab)
    sample = _RowSample(LABEL_SAMPLE_ROWS if any(t.type == "regression" for t in spec.tasks) else 0, seed)
    for frame in source.frames(validate=True):
        fitter.update(*_columns(frame))
        sample.add(*label_arrays(frame, spec))
    labels, space = sample.result(len(spec.tasks))
    return fitter.finish(), labels, space


def _columns(frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], int]:
    return {name: frame[name].to_numpy() for name in frame.columns}, len(frame)


class _RowSample:
    """A uniform sample of at most ``size`` rows (every row while fewer were seen), in stream order."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.rng = np.random.default_rng([seed, 17])
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.seen = 0

    def add(self, labels: np.ndarray, space: np.ndarray) -> None:
        if self.size == 0:
            return
        n = len(labels)
        # Keep the rows with the smallest random keys: a uniform sample without replacement.
        self.parts.append((np.arange(self.seen, self.seen + n), self.rng.random(n), labels, space))
        self.seen += n
        if sum(len(p[0]) for p in self.parts) > 2 * self.size:
            self.parts = [self._smallest()]

    def _smallest(self) -> tuple[np.ndarray, ...]:
        order, keys, labels, space = (np.concatenate(c) for c in zip(*self.parts, strict=True))
        if len(keys) > self.size:
            keep = np.sort(np.argpartition(keys, self.size - 1)[: self.size])
            order, keys, labels, space = order[keep], keys[keep], labels[keep], space[keep]
        return order, keys, labels, space

    def result(self, n_tasks: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.parts:
            empty = np.zeros((0, n_tasks), dtype=np.float32)
            return empty, empty
        _, _, labels, space = self._smallest()
        return labels, space


class TrainStream:
    """One worker's shuffled train batches, epoch by epoch (see the module doc)."""

    def __init__(self, source: SplitSource, pre: Preprocessor, batch_size: int, shuffle_rows: int,
                 seed: int, rank: int = 0, world: int = 1):
        self.source = source
        self.pre = pre
        self.batch_size = batch_size
        self.block_rows = max(1, shuffle_rows // batch_size) * batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        n = source.rows
        self.bounds = [n * r // world for r in range(world + 1)]
        self.steps = min(math.ceil((b - a) / batch_size) for a, b in zip(self.bounds, self.bounds[1:], strict=False))
        """Optimiser steps per epoch, the same on every worker."""
        self.rows_per_epoch = sum(min(self.steps * batch_size, b - a)
                                  for a, b in zip(self.bounds, self.bounds[1:], strict=False))
        """Rows all workers together train on per epoch."""
        if self.steps == 0:
            raise SpecError(f"{source.path}: {n} train rows cannot feed {world} workers")

    def order(self, epoch: int) -> list[Unit]:
        """The epoch's unit order, the same on every worker."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source.units))
        return [self.source.units[i] for i in perm]

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Tensors]:
        """Batches ``start_step, …, steps - 1`` of ``epoch`` for this worker."""
        reader = _RangeReader(self.source, self.order(epoch), self.pre)
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        step = start_step
        block = step * self.batch_size // self.block_rows
        while step < self.steps:
            a = lo + block * self.block_rows
            rows = reader.read(a, min(a + self.block_rows, hi))
            perm = np.random.default_rng([self.seed, epoch, self.rank, block]).permutation(len(rows))
            rows = rows.rows(torch.from_numpy(perm))
            for i in range(step * self.batch_size - block * self.block_rows, len(rows), self.batch_size):
                if step >= self.steps:
                    break
                yield rows.rows(slice(i, i + self.batch_size))
                step += 1
            block += 1


class _RangeReader:
    """Rows ``[a, b)`` of a unit order as tensors, each unit read and transformed once per pass."""

    def __init__(self, source: SplitSource, units: list[Unit], pre: Preprocessor):
        self.source, self.units, self.pre = source, units, pre
        self.starts = np.cumsum([0] + [u.rows for u in units])
        self._cached: tuple[int, Tensors] | None = None

    def _unit(self, i: int) -> Tensors:
        if self._cached is None or self._cached[0] != i:
            parts = [to_tensors(f, self.source.spec, self.pre) for f in self.source.read(self.units[i])]
            self._cached = (i, Tensors.cat(parts))
        return self._cached[1]

    def read(self, a: int, b: int) -> Tensors:
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        parts = []
        i = first
        while i < len(self.units) and self.starts[i] < b:
            u0 = int(self.starts[i])
            parts.append(self._unit(i).rows(slice(max(a, u0) - u0, min(b, int(self.starts[i + 1])) - u0)))
            i += 1
        return Tensors.cat(parts)


def load_split(data_dir: str | Path, split: str, spec: FeatureSpec) -> pd.DataFrame:
    """Read, validate and conform the whole ``split`` (``train``/``valid``/``test``) of ``data_dir``
    into one frame (for splits that fit in memory; training streams them with :class:`SplitSource`)."""
    source = SplitSource.open(data_dir, split, spec)
    return pd.concat(list(source.frames(validate=True, columns=source.all_columns)), ignore_index=True)
