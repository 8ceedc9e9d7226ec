"""Preprocessing fitted on the training split: dense normalisation and sparse vocabularies.

The fitted state is what the exporter writes into the manifest (dense stats, graph-field
vocabularies) and the embedding tables (store-field id lists), so serving reproduces it exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mtrank.spec import FeatureSpec
from training.models.base import InputShape


@dataclass
class DenseStats:
    mean: float
    std: float


class Preprocessor:
    """Raw frame → (dense float32 ``[N, n_dense]``, sparse int64 ``[N, n_sparse]``)."""

    def __init__(self, spec: FeatureSpec, dense_stats: dict[str, DenseStats], vocabs: dict[str, list[str]]):
        self.spec = spec
        self.dense_stats = dense_stats
        self.vocabs = vocabs
        self._index = {name: pd.Index(values) for name, values in vocabs.items()}

    @classmethod
    def fit(cls, spec: FeatureSpec, frame: pd.DataFrame) -> Preprocessor:
        stats = {}
        for f in spec.dense:
            x = _transform(frame[f.name].to_numpy(np.float64), f.transform)
            std = float(x.std())
            stats[f.name] = DenseStats(mean=float(x.mean()), std=std if std > 1e-12 else 1.0)
        vocabs = {}
        for f in spec.sparse:
            counts = frame[f.name].astype(str).value_counts(sort=False)
            counts = counts[counts >= f.min_count]
            # Most frequent first, ties by value: deterministic for a data set.
            order = sorted(zip(-counts.to_numpy(), counts.index, strict=True), key=lambda t: (t[0], t[1]))
            vocabs[f.name] = [v for _, v in order]
        return cls(spec, stats, vocabs)

    @property
    def shape(self) -> InputShape:
        return InputShape(
            n_dense=len(self.spec.dense),
            vocab_sizes=tuple(len(self.vocabs[f.name]) + 1 for f in self.spec.sparse),
        )

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        dense = np.empty((len(frame), len(self.spec.dense)), dtype=np.float32)
        for j, f in enumerate(self.spec.dense):
            s = self.dense_stats[f.name]
            raw = frame[f.name].to_numpy(np.float64) if f.name in frame else np.full(len(frame), f.default)
            raw = np.where(np.isnan(raw), f.default, raw)
            dense[:, j] = (_transform(raw, f.transform) - s.mean) / s.std
        sparse = np.empty((len(frame), len(self.spec.sparse)), dtype=np.int64)
        for j, f in enumerate(self.spec.sparse):
            # get_indexer gives -1 for unseen values; +1 makes them the OOV row 0.
            sparse[:, j] = self._index[f.name].get_indexer(frame[f.name].astype(str)) + 1
        return dense, sparse

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
            f.name: (run_dir / "vocab" / f"{f.name}.txt").read_text().splitlines() for f in spec.sparse
        }
        return cls(spec, {k: DenseStats(**v) for k, v in stats.items()}, vocabs)


def _transform(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    return x
