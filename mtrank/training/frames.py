"""Data readers: tables (Parquet/CSV/TSV) checked against a feature spec and conformed to it.

A split is a Parquet file, a directory of Parquet files (``train/`` or ``train.parquet/``), or a
CSV/TSV file for small data. :mod:`mtrank.training.streaming` reads it in record batches; every batch goes
through :func:`validate_frame` (a one-line ``SpecError`` naming the file when it does not match the
spec) and :func:`conform_frame` (dense NaNs filled, facet columns present, sparse values as their
keys, so ids read from CSV as ints and from Parquet as strings look alike).
``mtrank.training.streaming.load_split`` returns a whole split as one conformed frame, for evaluation
tools on data that fits in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from mtrank.spec import Facet, FeatureSpec, SpecError
from mtrank.transform import facet_index, sparse_keys

_TAB_SUFFIXES = (".tsv", ".tsv.gz", ".txt", ".txt.gz")
_CSV_SUFFIXES = (".csv", ".csv.gz")
TABLE_SUFFIXES = (".parquet", *_CSV_SUFFIXES, *_TAB_SUFFIXES)
_SPLIT_ALIASES = {"valid": ("valid", "val"), "validation": ("valid", "val")}


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read ``.parquet``, ``.csv``/``.csv.gz`` (comma) or ``.tsv``/``.txt`` (tab, header row)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"data file not found: {path}")
    if _has_suffix(path, (".parquet",)):
        import pyarrow.parquet as pq

        # Without the pandas metadata (see streaming.SplitSource._raw): list columns read as arrays.
        return pq.read_table(path).to_pandas(ignore_metadata=True)
    if _has_suffix(path, _CSV_SUFFIXES):
        return pd.read_csv(path)
    if _has_suffix(path, _TAB_SUFFIXES):
        return pd.read_csv(path, sep="\t")
    raise SpecError(f"{path}: unsupported file type (expected one of {', '.join(TABLE_SUFFIXES)})")


def find_split(data_dir: str | Path, split: str, spec_name: str | None = None) -> Path:
    """The file or directory holding ``split`` in ``data_dir``.

    ``<split>.parquet`` (a file or a directory of Parquet files), the directory ``<split>/``, then
    ``<split>.csv`` first; otherwise the one table file whose name contains the split name (``valid``
    also matches ``val``). When several match, those whose name also contains ``spec_name`` win
    (``ali_ccp_train_sample.csv`` over ``other_train.csv``).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SpecError(f"data directory not found: {data_dir}")
    for exact in (data_dir / f"{split}.parquet", data_dir / split, data_dir / f"{split}.csv"):
        if exact.is_file() or (exact.is_dir() and exact.suffix != ".csv"):
            return exact
    tokens = _SPLIT_ALIASES.get(split, (split,))
    tables = sorted(p for p in data_dir.iterdir() if p.is_file() and _has_suffix(p, TABLE_SUFFIXES))
    found = [p for p in tables if any(t in p.name.lower() for t in tokens)]
    if len(found) > 1 and spec_name:
        named = [p for p in found if spec_name.lower() in p.name.lower()]
        found = named or found
    if not found:
        raise SpecError(f"{data_dir}: no {split}.parquet, {split}.csv or table file named like *{tokens[-1]}*")
    if len(found) > 1:
        raise SpecError(f"{data_dir}: several files match split {split!r}: {', '.join(p.name for p in found)}")
    return found[0]


def _facet_features(facet: Facet) -> list[str]:
    return list(dict.fromkeys(r.feature for r in facet.rules))


def parquet_files(path: Path) -> list[Path]:
    """``path`` itself, or the ``*.parquet`` files under the directory ``path`` (sorted); none is an error."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise SpecError(f"{path}: no Parquet files in this directory")
    return files


def check_columns(columns: Iterable[str], spec: FeatureSpec, path: str | Path) -> None:
    """Raise a one-line ``SpecError`` naming ``path`` when a declared feature, label, space or facet
    rule column is absent."""
    columns = set(columns)
    for f in (*spec.dense, *spec.sparse):
        if f.name not in columns:
            raise SpecError(f"{path}: missing feature column {f.name!r} declared in spec {spec.name!r}")
    for task in spec.tasks:
        label = task.label_column
        if label not in columns:
            raise SpecError(f"{path}: missing label column {label!r} of task {task.name!r}")
        if task.space is not None and task.space not in columns:
            raise SpecError(f"{path}: missing space column {task.space!r} of task {task.name!r}")
    for facet in (spec.user_groups, spec.item_facet):
        if facet is not None and facet.column not in columns:
            for name in _facet_features(facet):
                if name not in columns:
                    raise SpecError(
                        f"{path}: facet column {facet.column!r} is absent and its rule feature {name!r} too"
                    )


def check_schema(schema: pa.Schema, spec: FeatureSpec, path: str | Path) -> None:
    """A Parquet file's columns and types against the spec: :func:`check_columns`, then numbers
    (integer, floating point, boolean) for dense features, labels, spaces and facet rule features."""
    check_columns(schema.names, spec, path)
    numeric = {f.name: "dense feature" for f in spec.dense}
    numeric.update({t.label_column: f"label of task {t.name!r}" for t in spec.tasks})
    numeric.update({t.space: f"space of task {t.name!r}" for t in spec.tasks if t.space is not None})
    for facet in (spec.user_groups, spec.item_facet):
        if facet is not None and facet.column not in schema.names:
            numeric.update({name: f"rule feature of facet {facet.column!r}" for name in _facet_features(facet)})
    for name, role in numeric.items():
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
                or pa.types.is_null(kind)):
            raise SpecError(f"{path}: column {name!r} ({role}) has type {kind}, expected a number")


def validate_frame(frame: pd.DataFrame, spec: FeatureSpec, path: str | Path, first_row: int = 0) -> None:
    """Raise a one-line ``SpecError`` naming ``path`` when ``frame`` does not match ``spec``.

    Checked: at least one row; every declared feature, label and space column present; dense
    features numeric; space columns 0/1; binary labels 0/1 and never NaN; regression labels NaN only
    outside the space; facet columns, when present, hold only the facet's values. ``first_row``: the
    frame's first row number in the file (rows in messages count from the file's start).
    """
    if len(frame) == 0:
        raise SpecError(f"{path}: no rows")
    check_columns(frame.columns, spec, path)
    columns = set(frame.columns)
    for f in spec.dense:
        raw = frame[f.name]
        if raw.dtype.kind not in "fiub":
            bad = pd.to_numeric(raw, errors="coerce").isna().to_numpy() & raw.notna().to_numpy()
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise SpecError(f"{path}: dense feature {f.name!r} is not numeric "
                                f"(row {first_row + row}: {raw.iloc[row]!r})")
    for space in dict.fromkeys(t.space for t in spec.tasks if t.space is not None):
        values = pd.to_numeric(frame[space], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isin(values, (0.0, 1.0))
        if bad.any():
            raise SpecError(f"{path}: space column {space!r} must be 0/1; {int(bad.sum())} rows are not")
    for task in spec.tasks:
        _check_label(frame, task.label_column, task.name, task.type, task.space, path, first_row)
    for facet in (spec.user_groups, spec.item_facet):
        if facet is not None and facet.column in columns:
            unknown = set(frame[facet.column].astype(str).unique()) - set(facet.values)
            if unknown:
                raise SpecError(
                    f"{path}: facet column {facet.column!r} has values {sorted(unknown)} outside {list(facet.values)}"
                )


def _check_label(
    frame: pd.DataFrame, label: str, task: str, kind: str, space: str | None, path: str | Path, first_row: int
) -> None:
    raw = frame[label]
    y = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    unparsable = np.isnan(y) & raw.notna().to_numpy()
    if unparsable.any():
        row = int(np.flatnonzero(unparsable)[0])
        raise SpecError(
            f"{path}: label {label!r} of task {task!r} is not numeric (row {first_row + row}: {raw.iloc[row]!r})"
        )
    missing = np.isnan(y)
    if kind == "regression" and space is not None:
        missing &= frame[space].to_numpy(dtype=np.float64) == 1.0
    if missing.any():
        where = f"inside its space {space!r}" if kind == "regression" and space is not None else "on some rows"
        raise SpecError(
            f"{path}: label {label!r} of task {task!r} is NaN {where} "
            f"({int(missing.sum())} rows, first row {first_row + int(np.flatnonzero(missing)[0])})"
        )
    if kind == "binary":
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SpecError(
                f"{path}: binary label {label!r} of task {task!r} has values other than 0/1 "
                f"({int(bad.sum())} rows, first row {first_row + row}: {y[row]:g})"
            )


def conform_frame(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """A copy of a validated frame with the spec's types.

    Dense features as float64 with NaN replaced by the field's default; sparse features as their
    keys (:func:`mtrank.transform.sparse_keys`: ids read from CSV as ints and from Parquet as
    strings look alike); labels as float64; facet columns computed from the spec's rules where absent.
    """
    out = frame.copy()
    for f in spec.dense:
        values = pd.to_numeric(out[f.name], errors="coerce").astype(np.float64)
        out[f.name] = values.fillna(f.default)
    for f in spec.sparse:
        out[f.name] = np.asarray(sparse_keys(out[f.name].to_numpy()), dtype=object)
    for label in dict.fromkeys(t.label_column for t in spec.tasks):
        out[label] = pd.to_numeric(out[label]).astype(np.float64)
    defaults = {f.name: f.default for f in spec.dense}
    for facet in (spec.user_groups, spec.item_facet):
        if facet is None:
            continue
        if facet.column in out.columns:
            out[facet.column] = out[facet.column].astype(str)
            continue
        columns = {
            name: pd.to_numeric(out[name], errors="coerce").to_numpy(dtype=np.float64)
            for name in _facet_features(facet)
        }
        index = facet_index(facet, columns, len(out), defaults)
        out[facet.column] = np.asarray(facet.values, dtype=object)[index]
    return out


def load_spec(data_dir: str | Path, spec_path: str | Path | None = None) -> FeatureSpec:
    """The feature spec at ``spec_path``, or ``data_dir/spec.yaml`` when none is given."""
    return FeatureSpec.load(Path(spec_path) if spec_path is not None else Path(data_dir) / "spec.yaml")
