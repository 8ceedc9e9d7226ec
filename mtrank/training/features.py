"""Preprocessing fitted on the training split: dense statistics and sparse vocabularies.

The transform itself is :mod:`mtrank.transform` (the same code the service runs on requests);
this module fits its state on the train split — in one streaming pass over batches of columns —
and saves it with the run. The exporter writes that state into the manifest (dense stats,
graph-field vocabularies) and the embedding tables (store-field id lists).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mtrank.manifest import DenseInfo
from mtrank.spec import FeatureSpec
from mtrank.training.models.base import InputShape, ListShape
from mtrank.transform import (
    Column,
    DenseStatsAccumulator,
    FeatureTransform,
    ListColumn,
    SparseColumn,
    Vocabulary,
    VocabularyCounter,
    list_batch,
    numeric_column,
    pre_standardise,
    sparse_keys,
)


@dataclass
class DenseStats:
    mean: float
    std: float


class PreprocessorFitter:
    """Accumulates dense statistics and key counts over batches of train rows.

    ``max_vocab``: most keys per sparse field — the most frequent of those seen ``min_count`` times
    or more; the rest share the out-of-vocabulary row. It also bounds each key counter (see
    :class:`mtrank.transform.VocabularyCounter`), so a field with hundreds of millions of distinct
    ids costs memory for ``2 * max_vocab`` keys at most. None: exact and unbounded.
    """

    def __init__(self, spec: FeatureSpec, max_vocab: int | None = None):
        self.spec = spec
        self.max_vocab = max_vocab
        self._dense = {f.name: DenseStatsAccumulator() for f in spec.dense}
        self._sparse = {f.name: VocabularyCounter(max_vocab) for f in spec.sparse}
        self._lists = {f.name: VocabularyCounter(max_vocab) for f in own_vocabulary_lists(spec)}

    def update(self, columns: Mapping[str, Column], n: int) -> None:
        for f in self.spec.dense:
            raw = numeric_column(columns.get(f.name), n, f.default, f.name)
            self._dense[f.name].update(pre_standardise(raw, f.transform))
        for f in self.spec.sparse:
            self._sparse[f.name].update(sparse_keys(columns.get(f.name), n))
        for f in own_vocabulary_lists(self.spec):
            self._lists[f.name].update(list_batch(columns.get(f.name), n, f.max_len, f.name).keys)

    def finish(self) -> Preprocessor:
        stats = {name: DenseStats(*acc.result()) for name, acc in self._dense.items()}
        vocabs = {f.name: self._sparse[f.name].vocabulary(f.min_count, self.max_vocab) for f in self.spec.sparse}
        for f in own_vocabulary_lists(self.spec):
            vocabs[f.name] = self._lists[f.name].vocabulary(f.min_count, self.max_vocab)
        return Preprocessor(self.spec, stats, vocabs)


def own_vocabulary_lists(spec: FeatureSpec) -> list:
    """The list fields with a vocabulary of their own (no ``share``)."""
    return [f for f in spec.lists if f.share is None]


class Preprocessor:
    """Raw columns → (dense float32 ``[N, n_dense]``, sparse int64 ``[N, n_sparse]``)."""

    def __init__(self, spec: FeatureSpec, dense_stats: dict[str, DenseStats], vocabs: dict[str, list[str]]):
        self.spec = spec
        self.dense_stats = dense_stats
        self.vocabs = vocabs
        self.feature_transform = FeatureTransform(
            [DenseInfo(f.name, f.side, f.transform, dense_stats[f.name].mean, dense_stats[f.name].std, f.default)
             for f in spec.dense],
            [SparseColumn(f.name, f.side, f.location, Vocabulary(vocabs[f.name])) for f in spec.sparse],
            spec.user_groups,
            spec.item_facet,
            [self._list_column(f) for f in spec.lists],
        )

    def _list_column(self, f) -> ListColumn:
        kind = "multi" if f in self.spec.multi else "sequence"
        location = next(s.location for s in self.spec.sparse if s.name == f.share) if f.share else "graph"
        return ListColumn(f.name, kind, f.side, f.max_len, f.pooling, f.share, location,
                          Vocabulary(self.vocabs[f.share or f.name]))

    @classmethod
    def fit(cls, spec: FeatureSpec, frame: pd.DataFrame) -> Preprocessor:
        return cls.fit_batches(spec, [frame])

    @classmethod
    def fit_batches(cls, spec: FeatureSpec, batches: Iterable[pd.DataFrame | Mapping[str, Column]]) -> Preprocessor:
        """One streaming pass: memory holds the statistics and key counts, not the rows."""
        fitter = PreprocessorFitter(spec)
        for batch in batches:
            columns, n = frame_columns(batch)
            fitter.update(columns, n)
        return fitter.finish()

    @property
    def shape(self) -> InputShape:
        names = [f.name for f in self.spec.sparse]
        return InputShape(
            n_dense=len(self.spec.dense),
            vocab_sizes=tuple(len(self.vocabs[f.name]) + 1 for f in self.spec.sparse),
            lists=tuple(
                ListShape(f.name, f.max_len, f.pooling, names.index(f.share) if f.share else None,
                          0 if f.share else len(self.vocabs[f.name]) + 1)
                for f in self.spec.lists
            ),
        )

    def transform(self, frame: pd.DataFrame | Mapping[str, Column]) -> tuple[np.ndarray, np.ndarray]:
        """(dense ``[N, n_dense]``, ids ``[N, n_sparse + Σ (max_len + 1)]``): the sparse fields' indices,
        then each list field's padded indices and its length (:class:`InputShape`'s packing)."""
        columns, n = frame_columns(frame)
        t = self.feature_transform
        ids = t.sparse_ids(columns, n)
        if t.lists:
            parts = [ids]
            for f in t.lists:
                entries, lengths, _ = t.list_ids(f, columns.get(f.name), n)
                parts += [entries, lengths[:, None]]
            ids = np.concatenate(parts, axis=1)
        return t.dense_matrix(columns, n), ids

    def random_rows(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        """``n`` raw rows of plausible values: dense around the train statistics, sparse and list
        entries from the vocabularies (with an unknown key now and then), lists of every length
        from empty to beyond ``max_len``."""

        def keys(vocab: list[str], size: int) -> list[str]:
            pool = np.array([*vocab, "unseen-key"], dtype=object)
            return pool[rng.integers(0, len(pool), size)].tolist()

        frame: dict[str, object] = {}
        for f in self.spec.dense:
            x = self.dense_stats[f.name].mean + self.dense_stats[f.name].std * rng.standard_normal(n)
            frame[f.name] = np.expm1(x) if f.transform == "log1p" else x
        for f in self.spec.sparse:
            frame[f.name] = keys(self.vocabs[f.name], n)
        for f in self.spec.lists:
            lengths = rng.integers(0, f.max_len + 3, n)
            frame[f.name] = [keys(self.vocabs[f.share or f.name], k) for k in lengths]
        return pd.DataFrame(frame)

    def save(self, run_dir: Path) -> None:
        vocab_dir = run_dir / "vocab"
        vocab_dir.mkdir(parents=True, exist_ok=True)
        for name, values in self.vocabs.items():
            (vocab_dir / f"{name}.txt").write_text("".join(v + "\n" for v in values))
        stats = {k: {"mean": s.mean, "std": s.std} for k, s in self.dense_stats.items()}
        (run_dir / "preprocess.json").write_text(json.dumps({"dense": stats}, indent=2))

    @classmethod
    def load(cls, spec: FeatureSpec, run_dir: Path) -> Preprocessor:
        stats = json.loads((run_dir / "preprocess.json").read_text())["dense"]
        vocabs = {
            f.name: (run_dir / "vocab" / f"{f.name}.txt").read_text().splitlines()
            for f in (*spec.sparse, *own_vocabulary_lists(spec))
        }
        return cls(spec, {k: DenseStats(**v) for k, v in stats.items()}, vocabs)


def frame_columns(batch: pd.DataFrame | Mapping[str, Column]) -> tuple[Mapping[str, Column], int]:
    """A frame (or a mapping of equal-length columns) as columns of numpy arrays, and its row count."""
    if isinstance(batch, pd.DataFrame):
        return {name: batch[name].to_numpy() for name in batch.columns}, len(batch)
    lengths = {len(v) for v in batch.values() if isinstance(v, np.ndarray | list | tuple)}
    if len(lengths) != 1:
        raise ValueError(f"columns of different lengths: {sorted(lengths)}")
    return batch, lengths.pop()
