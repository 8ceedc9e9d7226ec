"""Embedding table files of a model version: ``tables/<field>.ids`` and ``tables/<field>.npy``.

Torch-free, so the benchmark and tests can build a version directory without a trained model.
Row ``i + 1`` of the vectors holds the vector of line ``i`` of the ids; row 0 is the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtrank.manifest import TableInfo

TABLES_DIR = "tables"


def write_table(
    version_dir: Path, field: str, ids: Sequence[str], vectors: np.ndarray, dim: int, views: Sequence[str]
) -> TableInfo:
    """Write one store table under ``version_dir/tables/`` and describe it.

    ``vectors``: ``[len(ids) + 1, dim * len(views)]``, row 0 the default vector. Ids must be
    unique and free of line breaks (the ids file is one id per line).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    width = dim * len(views)
    if vectors.shape != (len(ids) + 1, width):
        raise ValueError(
            f"table {field!r}: vectors have shape {vectors.shape}, expected ({len(ids) + 1}, {width}) "
            f"for {len(ids)} ids, dim {dim} and views {list(views)}"
        )
    text = "".join(f"{i}\n" for i in ids)
    # str.splitlines (what mtrank.manifest.read_ids uses) also splits on \v, \f, \x1c, \u2028, ...
    if len(text.splitlines()) != len(ids):
        bad = next(i for i in ids if len(f"{i}\n".splitlines()) != 1)
        raise ValueError(f"table {field!r}: id {bad!r} contains a line break")
    if len(set(ids)) != len(ids):
        raise ValueError(f"table {field!r}: duplicate ids")

    rel_ids = f"{TABLES_DIR}/{field}.ids"
    rel_vectors = f"{TABLES_DIR}/{field}.npy"
    (version_dir / TABLES_DIR).mkdir(parents=True, exist_ok=True)
    (version_dir / rel_ids).write_text(text, encoding="utf-8")
    np.save(version_dir / rel_vectors, vectors, allow_pickle=False)
    return TableInfo(
        field=field,
        ids_file=rel_ids,
        vectors_file=rel_vectors,
        rows=len(ids) + 1,
        dim=dim,
        views=list(views),
    )
