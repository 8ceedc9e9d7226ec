"""The one feature transform: raw feature values → model inputs. Numpy only, columnar.

The trainer's preprocessing, the exporter's parity rows and the service's request path all call
this module, so a raw value becomes the same model input everywhere:

- **dense** (:class:`mtrank.manifest.DenseInfo`): missing → the field's default; ``log1p`` → ``log1p(max(x, 0))``;
  ``(x − mean) / std`` with train statistics; clipped to ±:data:`DENSE_LIMIT`; float32.
- **sparse keys** (:func:`sparse_keys`): a raw value becomes the string its vocabulary or store
  table is keyed by: strings stay, integers and integral floats print as integers (``3``, ``3.0``
  and ``"3"`` are one key), other floats as Python prints them, booleans as ``True``/``False``,
  missing as ``""``.
- **vocabulary indices** (:class:`Vocabulary`): key → row, 0 = out of vocabulary.
- **lists** (:func:`list_matrix`, ``multi`` and ``sequence`` fields): each row's list of raw values
  becomes keys as above and then vocabulary indices, the first ``max_len`` kept (a sequence is most
  recent first), padded with 0 into an int64 ``[n, max_len]`` matrix beside the lengths ``[n]``;
  a missing list is empty. A value that is not a list, or a list holding lists or objects, is a
  :class:`TransformError`.
- **facets** (:func:`facet_index`): the spec's ordered threshold rules on raw dense values, with
  missing rule features filled by their dense default (NaN when the feature is not a dense field).

A *column* is the raw values of one feature for a batch of rows: a numpy array (NaN = missing),
a list (``None`` = missing), or a scalar that every row shares (a user feature in a request).
Statistics and vocabularies are fitted in a streaming pass (:class:`DenseStatsAccumulator`,
:class:`VocabularyCounter`), so memory does not grow with rows.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from mtrank.manifest import DenseInfo, Manifest
from mtrank.spec import Facet

DENSE_LIMIT = 1e6
"""Standardised dense inputs are clipped to ±this, so absurd (finite) values cannot overflow float32."""
MISSING_KEY = ""
"""The key of a missing sparse value (it is out of vocabulary unless train data had missing values)."""

Column = Any
"""np.ndarray | Sequence | scalar: one feature's raw values for a batch of rows (see module doc)."""


class TransformError(ValueError):
    """A raw value cannot be turned into a model input (a string for a numeric feature)."""

    def __init__(self, message: str, feature: str | None = None):
        super().__init__(f"{feature}: {message}" if feature else message)
        self.feature = feature
        """The feature whose value it was, when there is one."""


# -- dense ----------------------------------------------------------------------------------


def numeric_column(values: Column, n: int, default: float, name: str) -> np.ndarray:
    """``[n]`` float64 raw values, missing (None, NaN) replaced by ``default``.

    Numbers and booleans are accepted; a string raises :class:`TransformError` naming ``name``.
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        x = values.astype(np.float64, copy=True)
    elif isinstance(values, np.ndarray):
        x = _floats(values.tolist(), name)
    elif is_scalar(values):
        return np.full(n, numeric_value(values, default, name), dtype=np.float64)
    else:
        x = _floats(values, name)
    if x.shape != (n,):
        raise TransformError(f"{x.shape[0]} values for {n} rows", name)
    x[np.isnan(x)] = default
    return x


def is_scalar(value: Any) -> bool:
    """One raw value rather than a column: None, a string, a number or a boolean."""
    return value is None or isinstance(value, str | int | float | bool | np.number)


def numeric_value(value: Any, default: float, name: str) -> float:
    """One scalar raw value as :func:`numeric_column` reads it: a number or boolean as a float,
    None or NaN as ``default``; a string raises :class:`TransformError` naming ``name``."""
    if value is None:
        return default
    if isinstance(value, str):
        raise TransformError("must be a number, got a string", name)
    x = float(value)
    return default if math.isnan(x) else x


def _floats(values: Sequence, name: str) -> np.ndarray:
    try:
        return np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise TransformError("must be a number", name) from None


def pre_standardise(raw: np.ndarray, transform: str) -> np.ndarray:
    """The value whose train mean and std standardise the field: ``log1p(max(x, 0))`` or ``x``."""
    if transform == "log1p":
        return np.log1p(np.maximum(raw, 0.0))
    return raw


@dataclass
class DenseStatsAccumulator:
    """Mean and (population) std of a field's pre-standardised values over batches.

    Batches merge with Chan et al.'s pairwise update, so one batch gives numpy's mean and std.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: np.ndarray) -> None:
        n = int(x.shape[0])
        if n == 0:
            return
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def result(self) -> tuple[float, float]:
        """(mean, std); a constant or empty field gets std 1 so standardising is a shift."""
        std = math.sqrt(self.m2 / self.count) if self.count else 0.0
        return self.mean, std if std > 1e-12 else 1.0


# -- sparse ---------------------------------------------------------------------------------


def sparse_key(value: Any) -> str:
    """One raw value's key (see the module doc)."""
    kind = type(value)
    if kind is str:
        return value
    if value is None:
        return MISSING_KEY
    if kind is bool or isinstance(value, np.bool_):
        return "True" if value else "False"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return MISSING_KEY
        if math.isfinite(v) and v == int(v) and abs(v) < 2**63:
            return str(int(v))
        return repr(v)
    if isinstance(value, list | tuple | dict | np.ndarray):
        raise TransformError(f"must be a single value, got {_json_kind(value)}")
    return str(value)


def sparse_keys(values: Column, n: int | None = None) -> list[str]:
    """Keys of a column's values (a scalar column needs ``n``)."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iu":
            return values.astype(str).tolist()
        if values.dtype.kind == "f":
            return _float_keys(values.astype(np.float64, copy=False))
        if values.dtype.kind == "U":
            return values.tolist()
        values = values.tolist()
    elif not isinstance(values, list | tuple):
        if n is None:
            raise TransformError("a scalar column needs a row count")
        return [sparse_key(values)] * n
    if set(map(type, values)) <= {str}:  # C-level: 500 keys in 21-23 µs, a generator took 32-34
        return list(values)
    return [sparse_key(v) for v in values]


def _float_keys(x: np.ndarray) -> list[str]:
    integral = np.isfinite(x) & (x == np.round(x)) & (np.abs(x) < 2**63)
    out = np.where(integral, x, 0).astype(np.int64).astype(str).astype(object)
    rest = ~integral
    if rest.any():
        out[rest] = [sparse_key(v) for v in x[rest].tolist()]
    return out.tolist()


class Vocabulary:
    """Keys of a graph-held field, most frequent first; index ``i + 1`` for ``values[i]``, 0 = OOV."""

    def __init__(self, values: Sequence[str]):
        self.values = list(values)
        self._index = {v: i for i, v in enumerate(self.values, start=1)}

    def __len__(self) -> int:
        return len(self.values)

    def indices(self, keys: Sequence[str]) -> np.ndarray:
        """``[len(keys)]`` int64."""
        return np.fromiter(map(self._index.get, keys, repeat(0)), dtype=np.int64, count=len(keys))

    def index(self, key: str) -> int:
        return self._index.get(key, 0)


class VocabularyCounter:
    """Key frequencies over batches; :meth:`vocabulary` keeps keys seen ``min_count`` times or more.

    ``capacity`` bounds memory for fields with hundreds of millions of distinct ids: when more than
    ``2 * capacity`` keys are held, the counter keeps the ``capacity`` most frequent and lowers every
    count by the first dropped one's (Misra-Gries, batched). A key seen more than ``total /
    (capacity + 1)`` times is never dropped and its count is low by at most that much; below
    ``2 * capacity`` distinct keys the counts are exact. None: exact, unbounded.
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"vocabulary counter capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.counts: Counter[str] = Counter()
        self.pruned = 0
        """Times the counter was cut back to ``capacity`` keys (0: the counts are exact)."""

    def update(self, keys: Iterable[str]) -> None:
        self.counts.update(keys)
        if self.capacity is not None and len(self.counts) > 2 * self.capacity:
            self._prune()

    def _prune(self) -> None:
        kept = self.counts.most_common(self.capacity + 1)
        floor = kept[-1][1]
        self.counts = Counter({k: c - floor for k, c in kept[:-1] if c > floor})
        self.pruned += 1

    def vocabulary(self, min_count: int = 1, max_size: int | None = None) -> list[str]:
        """Most frequent first, ties by key: deterministic for a data set; at most ``max_size`` keys."""
        kept = [(-c, k) for k, c in self.counts.items() if c >= min_count]
        kept.sort()
        if max_size is not None:
            kept = kept[:max_size]
        return [k for _, k in kept]


# -- lists ----------------------------------------------------------------------------------


def list_values(value: Any, name: str) -> Sequence:
    """One row's raw list: a list, tuple or 1-d array of scalars; None is the empty list."""
    if value is None:
        return ()
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise TransformError("must be a flat list of values", name)
        if value.dtype.kind in "iufbU":
            return value
        value = value.tolist()
    elif not isinstance(value, list | tuple):
        raise TransformError(f"must be a list, got {_json_kind(value)}", name)
    if set(map(type, value)) <= _PLAIN_SCALARS:  # C-level: a request's 500 tag lists in 0.13 ms, the loop 0.75
        return value
    for v in value:
        if not is_scalar(v):
            raise TransformError(f"list entries must be strings, numbers or booleans, got {_json_kind(v)}", name)
    return value


_PLAIN_SCALARS = {str, int, float, bool}
"""Entry types :func:`list_values` accepts without looking at each entry (what a JSON list decodes to)."""


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple | np.ndarray):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return "a number" if isinstance(value, int | float | np.number) else type(value).__name__


@dataclass
class ListBatch:
    """A list field's rows as model input: keys or indices, padded, and each row's length."""

    lengths: np.ndarray
    """int64 ``[n]``: entries kept per row (at most ``max_len``)."""
    keys: list[str]
    """The kept entries' keys, row after row (``lengths`` says where each row's keys end)."""
    truncated: int
    """Rows that held more than ``max_len`` entries."""

    def positions(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of each kept entry in the padded ``[n, max_len]`` matrix."""
        rows = np.repeat(np.arange(len(self.lengths)), self.lengths)
        starts = np.cumsum(self.lengths) - self.lengths
        return rows, np.arange(len(rows)) - np.repeat(starts, self.lengths)

    def matrix(self, values: np.ndarray, max_len: int) -> np.ndarray:
        """``values`` (one per kept entry: indices, or vectors ``[k, w]``) padded with 0 into
        ``[n, max_len, ...]``."""
        out = np.zeros((len(self.lengths), max_len, *values.shape[1:]), dtype=values.dtype)
        rows, cols = self.positions(max_len)
        out[rows, cols] = values
        return out


class ListTooLong(TransformError):
    """A list longer than the hard limit a caller set (the service's ``MTRANK_MAX_LIST_LEN``)."""


def list_batch(values: Column, n: int, max_len: int, name: str, limit: int | None = None) -> ListBatch:
    """The kept keys of ``n`` rows of a list field (``values``: one list per row, or None); a list
    longer than ``limit`` raises :class:`ListTooLong`."""
    if values is None:
        return ListBatch(np.zeros(n, dtype=np.int64), [], 0)
    if len(values) != n:
        raise TransformError(f"{len(values)} values for {n} rows", name)
    if isinstance(values, list) and set(map(type, values)) <= _JSON_ROWS:
        fast = _json_list_batch(values, n, max_len, limit)
        if fast is not None:
            return fast
    rows = [list_values(v, name) for v in values]
    full = np.fromiter(map(len, rows), dtype=np.int64, count=n)
    if limit is not None and n and full.max() > limit:
        raise ListTooLong(f"a list of {int(full.max())} values, more than the limit of {limit} (MTRANK_MAX_LIST_LEN)",
                          name)
    lengths = np.minimum(full, max_len)
    keys: list[str] = []
    for row, k in zip(rows, lengths.tolist(), strict=True):
        if k:
            keys += sparse_keys(row[:k] if isinstance(row, np.ndarray) else list(row[:k]))
    return ListBatch(lengths, keys, int((full > max_len).sum()))


_JSON_ROWS = {list, type(None)}


def _json_list_batch(values: list, n: int, max_len: int, limit: int | None) -> ListBatch | None:
    """:func:`list_batch` of rows as a JSON request decodes them (lists of plain scalars, or None),
    in a few C-level passes over all rows at once (a request's 500 tag lists: ~0.3 ms less than row
    by row); None when some entry is not a plain scalar (the row-by-row path then says which)."""
    rows = [v if v is not None else [] for v in values]
    if not set(map(type, itertools.chain.from_iterable(rows))) <= _PLAIN_SCALARS:
        return None
    full = np.fromiter(map(len, rows), dtype=np.int64, count=n)
    if limit is not None and n and full.max() > limit:
        return None
    lengths = np.minimum(full, max_len)
    truncated = int((full > max_len).sum())
    kept = (r[:max_len] for r in rows) if truncated else rows
    return ListBatch(lengths, sparse_keys(list(itertools.chain.from_iterable(kept))), truncated)


# -- facets ---------------------------------------------------------------------------------


def facet_index(facet: Facet, columns: Mapping[str, Column], n: int, defaults: Mapping[str, float]) -> np.ndarray:
    """``[n]`` int64 index into ``facet.values`` per row, from the rules' raw features.

    A rule feature a row does not carry is its dense default (``defaults``), else NaN, which
    matches no rule (the row gets ``facet.default``).
    """
    features = {}
    for rule in facet.rules:
        if rule.feature in features:
            continue
        default = defaults.get(rule.feature, math.nan)
        values = columns.get(rule.feature)
        features[rule.feature] = numeric_column(values, n, default, rule.feature) if values is not None else (
            np.full(n, default, dtype=np.float64)
        )
    if not features:
        return np.full(n, facet.values.index(facet.default), dtype=np.int64)
    return facet.assign(features)


def _dense_state(fields: list[DenseInfo]) -> tuple[list[DenseInfo], list[int], np.ndarray, np.ndarray]:
    return (fields, [k for k, d in enumerate(fields) if d.transform == "log1p"],
            np.array([d.mean for d in fields], dtype=np.float64),
            np.array([d.std or 1.0 for d in fields], dtype=np.float64))


@contextmanager
def _naming(feature: str):
    """A :class:`TransformError` raised inside names ``feature`` when it named none."""
    try:
        yield
    except TransformError as e:
        if e.feature is not None:
            raise
        raise TransformError(str(e), feature) from None


# -- the transform of one model -------------------------------------------------------------


@dataclass(frozen=True)
class SparseColumn:
    name: str
    side: str
    location: str
    """``graph``: a vocabulary index feeds the graph; ``store``: the key is looked up in the store."""
    vocabulary: Vocabulary | None = None
    """Key → index. Training has one for every field; a manifest only for graph fields (a store
    field's table knows its ids)."""


@dataclass(frozen=True)
class ListColumn:
    """A ``multi`` or ``sequence`` field as the transform holds it."""

    name: str
    kind: str
    """``multi`` or ``sequence``."""
    side: str
    max_len: int
    pooling: str
    share: str | None
    """The sparse field whose vocabulary and table the entries use; None: the field's own."""
    location: str
    """``graph``: entries become vocabulary indices; ``store``: keys looked up in ``share``'s store table."""
    vocabulary: Vocabulary | None = None

    @property
    def table(self) -> str:
        """The field whose table embeds the entries."""
        return self.share or self.name


class FeatureTransform:
    """A fitted transform: what the manifest (or a training run) says about every feature."""

    def __init__(
        self,
        dense: Sequence[DenseInfo],
        sparse: Sequence[SparseColumn],
        user_groups: Facet | None = None,
        item_facet: Facet | None = None,
        lists: Sequence[ListColumn] = (),
    ):
        self.dense = list(dense)
        self.sparse = list(sparse)
        self.lists = list(lists)
        self.max_list_len: int | None = None
        """Longest list accepted (:class:`ListTooLong` beyond it); None: any length."""
        self.user_groups = user_groups
        self.item_facet = item_facet
        self.graph_fields = [s for s in self.sparse if s.location == "graph"]
        self.store_fields = {s.name: s for s in self.sparse if s.location == "store"}
        self.dense_defaults = {d.name: d.default for d in self.dense}
        self._dense_sides = {side: _dense_state([d for d in self.dense if side is None or d.side == side])
                             for side in (None, "user", "item")}
        """Per side (None: every field): the fields, their log1p columns, means and stds."""

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> FeatureTransform:
        """From a loaded model version's manifest."""
        dense = list(manifest.dense)
        sparse = [
            SparseColumn(s.name, s.side, s.location, Vocabulary(s.vocab or []) if s.location == "graph" else None)
            for s in manifest.sparse
        ]
        by_name = {s.name: s for s in sparse}
        lists = [
            ListColumn(f.name, f.kind, f.side, f.max_len, f.pooling, f.share, f.location,
                       by_name[f.share].vocabulary if f.share else Vocabulary(f.vocab or []))
            for f in manifest.lists
        ]
        return cls(dense, sparse, manifest.group_facet(), manifest.item_facet_rule(), lists)

    def dense_matrix(self, columns: Mapping[str, Column], n: int, side: str | None = None) -> np.ndarray:
        """``[n, n_dense]`` float32 model input (the fields of ``side`` only, when given)."""
        fields, log1p, mean, std = self._dense_sides[side]
        raw = np.empty((n, len(fields)), dtype=np.float64)
        for k, d in enumerate(fields):
            raw[:, k] = numeric_column(columns.get(d.name), n, d.default, d.name)
        if log1p:
            raw[:, log1p] = pre_standardise(raw[:, log1p], "log1p")
        raw -= mean
        raw /= std
        np.clip(raw, -DENSE_LIMIT, DENSE_LIMIT, out=raw)
        return raw.astype(np.float32)

    def sparse_ids(self, columns: Mapping[str, Column], n: int) -> np.ndarray:
        """``[n, n_sparse]`` int64 vocabulary indices of every sparse field (training: all tables in the model)."""
        return self.indices(self.sparse, columns, n)

    @staticmethod
    def indices(fields: Sequence[SparseColumn], columns: Mapping[str, Column], n: int) -> np.ndarray:
        ids = np.empty((n, len(fields)), dtype=np.int64)
        for j, s in enumerate(fields):
            if s.vocabulary is None:
                raise TransformError(f"sparse field {s.name!r} has no vocabulary here (its table is in the store)")
            values = columns.get(s.name)
            with _naming(s.name):
                if values is None or not isinstance(values, np.ndarray | list | tuple):
                    ids[:, j] = s.vocabulary.index(sparse_key(values))  # one value for every row
                else:
                    ids[:, j] = s.vocabulary.indices(sparse_keys(values))
        return ids

    def list_ids(self, field: ListColumn, values: Column, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(int64 ``[n, max_len]`` indices padded with 0, int64 ``[n]`` lengths, rows truncated)."""
        if field.vocabulary is None:
            raise TransformError(f"list field {field.name!r} is embedded by a store table; it has no vocabulary here")
        batch = list_batch(values, n, field.max_len, field.name, self.max_list_len)
        ids = batch.matrix(field.vocabulary.indices(batch.keys), field.max_len)
        return ids, batch.lengths, batch.truncated

    def store_keys(self, name: str, values: Column, n: int | None = None) -> list[str]:
        """The keys of store field ``name`` to look up (one per row, or one for a scalar column)."""
        if name not in self.store_fields:
            raise TransformError(f"{name!r} is not a store-held field")
        with _naming(name):
            if values is None or not isinstance(values, np.ndarray | list | tuple):
                return [sparse_key(values)]
            return sparse_keys(values, n)

    def facet(self, facet: Facet | None, columns: Mapping[str, Column], n: int) -> np.ndarray | None:
        """``[n]`` facet value index per row, or None when the model has no such facet."""
        if facet is None:
            return None
        return facet_index(facet, columns, n, self.dense_defaults)

    def facet_one(self, facet: Facet, values: Mapping[str, Any]) -> int:
        """The facet value index of one row of scalar raw values (a request's user): the answer of
        :meth:`facet` for ``n = 1``, in plain Python."""
        features: dict[str, float] = {}
        for rule in facet.rules:
            value = values.get(rule.feature)
            if not is_scalar(value):  # the array path says what is wrong with it
                return int(facet_index(facet, values, 1, self.dense_defaults)[0])
            features[rule.feature] = numeric_value(value, self.dense_defaults.get(rule.feature, math.nan), rule.feature)
        return facet.index_one(features)
