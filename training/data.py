"""Data readers: tables (Parquet/CSV/TSV) checked against a feature spec and conformed to it.

``load_split`` is what the trainer calls: it finds ``<split>.parquet|csv`` (or a file whose name
contains the split name), reads it, raises a one-line ``SpecError`` when the file does not match
the spec, and returns a frame with dense NaNs filled, facet columns present and sparse values
as their keys (so ids read from CSV as ints and from Parquet as strings look alike).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

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
        return pd.read_parquet(path)
    if _has_suffix(path, _CSV_SUFFIXES):
        return pd.read_csv(path)
    if _has_suffix(path, _TAB_SUFFIXES):
        return pd.read_csv(path, sep="\t")
    raise SpecError(f"{path}: unsupported file type (expected one of {', '.join(TABLE_SUFFIXES)})")


def find_split(data_dir: str | Path, split: str, spec_name: str | None = None) -> Path:
    """The file holding ``split`` in ``data_dir``.

    ``<split>.parquet`` then ``<split>.csv`` first; otherwise the one table file whose name
    contains the split name (``valid`` also matches ``val``). When several match, those whose
    name also contains ``spec_name`` win (``ali_ccp_train_sample.csv`` over ``other_train.csv``).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SpecError(f"data directory not found: {data_dir}")
    for suffix in (".parquet", ".csv"):
        exact = data_dir / f"{split}{suffix}"
        if exact.is_file():
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


def validate_frame(frame: pd.DataFrame, spec: FeatureSpec, path: str | Path) -> None:
    """Raise a one-line ``SpecError`` naming ``path`` when ``frame`` does not match ``spec``.

    Checked: at least one row; every declared feature, label and space column present; space
    columns 0/1; binary labels 0/1 and never NaN; regression labels NaN only outside the space;
    facet columns, when present, hold only the facet's values.
    """
    if len(frame) == 0:
        raise SpecError(f"{path}: no rows")
    columns = set(frame.columns)
    for f in (*spec.dense, *spec.sparse):
        if f.name not in columns:
            raise SpecError(f"{path}: missing feature column {f.name!r} declared in spec {spec.name!r}")
    for task in spec.tasks:
        label = task.label_column
        if label not in columns:
            raise SpecError(f"{path}: missing label column {label!r} of task {task.name!r}")
        if task.space is not None and task.space not in columns:
            raise SpecError(f"{path}: missing space column {task.space!r} of task {task.name!r}")
    for space in dict.fromkeys(t.space for t in spec.tasks if t.space is not None):
        values = pd.to_numeric(frame[space], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isin(values, (0.0, 1.0))
        if bad.any():
            raise SpecError(f"{path}: space column {space!r} must be 0/1; {int(bad.sum())} rows are not")
    for task in spec.tasks:
        _check_label(frame, task.label_column, task.name, task.type, task.space, path)
    for facet in (spec.user_groups, spec.item_facet):
        if facet is None:
            continue
        if facet.column in columns:
            unknown = set(frame[facet.column].astype(str).unique()) - set(facet.values)
            if unknown:
                raise SpecError(
                    f"{path}: facet column {facet.column!r} has values {sorted(unknown)} outside {list(facet.values)}"
                )
        else:
            for name in _facet_features(facet):
                if name not in columns:
                    raise SpecError(
                        f"{path}: facet column {facet.column!r} is absent and its rule feature {name!r} too"
                    )


def _check_label(frame: pd.DataFrame, label: str, task: str, kind: str, space: str | None, path: str | Path) -> None:
    raw = frame[label]
    y = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    unparsable = np.isnan(y) & raw.notna().to_numpy()
    if unparsable.any():
        row = int(np.flatnonzero(unparsable)[0])
        raise SpecError(f"{path}: label {label!r} of task {task!r} is not numeric (row {row}: {raw.iloc[row]!r})")
    missing = np.isnan(y)
    if kind == "regression" and space is not None:
        missing &= frame[space].to_numpy(dtype=np.float64) == 1.0
    if missing.any():
        where = f"inside its space {space!r}" if kind == "regression" and space is not None else "on some rows"
        raise SpecError(
            f"{path}: label {label!r} of task {task!r} is NaN {where} "
            f"({int(missing.sum())} rows, first row {int(np.flatnonzero(missing)[0])})"
        )
    if kind == "binary":
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            raise SpecError(
                f"{path}: binary label {label!r} of task {task!r} has values other than 0/1 ({int(bad.sum())} rows)"
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


def load_split(data_dir: str | Path, split: str, spec: FeatureSpec) -> pd.DataFrame:
    """Read, validate and conform ``split`` (``train``/``valid``/``test``) of ``data_dir``."""
    path = find_split(data_dir, split, spec.name)
    frame = read_table(path)
    validate_frame(frame, spec, path)
    return conform_frame(frame, spec)


def load_spec(data_dir: str | Path, spec_path: str | Path | None = None) -> FeatureSpec:
    """The feature spec at ``spec_path``, or ``data_dir/spec.yaml`` when none is given."""
    return FeatureSpec.load(Path(spec_path) if spec_path is not None else Path(data_dir) / "spec.yaml")
