"""``mtrank load-histories``: per-user history records of a model version, from a table with a user
id column and a list column per ``sequence`` field, into an embedding store or the in-process
store's file (record format and key layout: :mod:`mtrank.histories`, :mod:`mtrank.store_keys`).

The table is Parquet (list columns) or CSV (each list cell a JSON array). Each user's lists are
turned into keys as the transform turns a request's (:func:`mtrank.transform.sparse_keys`: ``3``,
``3.0`` and ``"3"`` are one id), cut at the field's ``max_len`` (the first entries: most recent
first) and encoded into one record.

A key-value store is written like ``load-embeddings`` writes a version: the load's meta keys are
deleted first (readers see no record from then on), then the version's earlier records, then the
new records go in under the version's shard layout (the one its tables recorded), and the meta
keys last: a reader sees the whole load or none of it. A re-load replaces the version's records
(users missing from the new table have none). ``load-embeddings --prune`` deletes the records of
the versions it prunes with their tables (they share hash tags). The in-process store's file is
written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mtrank import histories, store_keys
from mtrank.export.store_loader import UNLINK_BATCH, _glob_escape, _hash_tag, version_layout
from mtrank.histories import HistoryError, HistoryFields
from mtrank.manifest import ManifestError, load_manifest, version_dir
from mtrank.stores import IN_PROCESS, StoreBackend, open_backend
from mtrank.transform import TransformError, list_values, sparse_keys

CHUNK_USERS = 2000
"""Records per write (one ``MSET`` on Redis)."""


def load_histories(
    repo: str | Path,
    model: str,
    table: str | Path,
    version: int | None = None,
    user_column: str = "user_id",
    store_url: str | None = None,
    prefix: str = store_keys.DEFAULT_PREFIX,
    progress: bool = True,
) -> dict[str, Any]:
    """Load the history records of ``model``'s version (default: newest) from ``table`` into the
    store at ``store_url`` (None or ``inprocess://``: the file beside the version directory).
    Returns ``{"model", "version", "users", "fields", "truncated", "seconds", "store"}``; raises
    :class:`~mtrank.histories.HistoryError` (or ManifestError) on bad input, before writing."""
    started = time.perf_counter()
    vdir = version_dir(repo, model, version)
    manifest = load_manifest(vdir)
    if str(manifest.version) != vdir.name:
        raise ManifestError(f"{vdir}: manifest says version {manifest.version}, the directory is {vdir.name}")
    fields = HistoryFields.of(manifest.lists)
    if not fields:
        raise HistoryError(f"model {model!r} v{manifest.version} has no sequence fields: it takes no histories")
    users, records, truncated = read_history_table(Path(table), fields, user_column)
    meta = histories.meta_value(fields, len(users), _sha256(Path(table)))
    local = store_url is None or store_url.split("://", 1)[0].lower() == IN_PROCESS
    if local:
        path = histories.local_path(vdir)
        histories.write_local(path, users, records, meta)
        where = str(path)
    else:
        store = open_backend(store_url)
        try:
            write_records(store, model, manifest.version, users, records, meta, prefix, progress, manifest)
        finally:
            store.close_writer()
        where = store.display_url
    seconds = time.perf_counter() - started
    if progress:
        print(f"loaded histories of {model} v{manifest.version}: {len(users)} users, fields "
              f"{', '.join(fields.names)} ({truncated} lists cut at max_len) into {where} in {seconds:.2f} s",
              flush=True)
    return {"model": model, "version": manifest.version, "users": len(users), "fields": list(fields.names),
            "truncated": truncated, "seconds": round(seconds, 3), "store": where}


def read_history_table(path: Path, fields: HistoryFields, user_column: str) -> tuple[list[str], list[bytes], int]:
    """(user ids, their records, lists cut at ``max_len``) of a Parquet or CSV history table."""
    columns = _read_columns(path, [user_column, *fields.names])
    users = sparse_keys(columns[user_column])
    seen: set[str] = set()
    for row, user in enumerate(users):
        if user == "":
            raise HistoryError(f"{path}: column {user_column!r} row {row + 1}: no user id")
        if user in seen:
            raise HistoryError(f"{path}: user {user!r} appears twice in column {user_column!r}")
        histories.check_key(user, user_column)
        seen.add(user)
    per_field, truncated = [], 0
    for name, max_len in zip(fields.names, fields.max_lens, strict=True):
        keys, cut = _field_keys(path, name, columns[name], max_len)
        per_field.append(keys)
        truncated += cut
    records = [histories.encode_record(lists) for lists in zip(*per_field, strict=True)] if per_field else []
    return users, records, truncated


def _read_columns(path: Path, names: list[str]) -> dict[str, list]:
    """The named columns of a Parquet or CSV file as Python lists (CSV list cells parsed as JSON)."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    if not path.is_file():
        raise HistoryError(f"no history table at {path}")
    try:
        if suffix in (".csv", ".txt"):
            from pyarrow import csv

            table = csv.read_csv(path, convert_options=csv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True))
        elif suffix in (".parquet", ".pq"):
            from pyarrow import parquet

            table = parquet.read_table(path)
        else:
            raise HistoryError(f"{path}: a history table is a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as e:
        raise HistoryError(f"{path}: cannot read it as {suffix[1:]}: {str(e).splitlines()[0]}") from None
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise HistoryError(f"{path}: no column {', '.join(repr(m) for m in missing)} "
                           f"(has {', '.join(table.column_names)})")
    out = {n: table.column(n).to_pylist() for n in names}
    if suffix in (".csv", ".txt"):
        for n in names[1:]:
            out[n] = [_json_cell(path, n, row, cell) for row, cell in enumerate(out[n])]
    return out


def _json_cell(path: Path, name: str, row: int, cell: str | None) -> Any:
    if cell is None or cell.strip() == "":
        return None
    try:
        return json.loads(cell)
    except ValueError:
        raise HistoryError(f"{path}: column {name!r} row {row + 1}: not a JSON array: {cell[:40]!r}") from None


def _field_keys(path: Path, name: str, cells: list, max_len: int) -> tuple[list[list[str]], int]:
    """Per row the field's keys (first ``max_len``), and how many rows held more."""
    out, cut = [], 0
    for row, cell in enumerate(cells):
        try:
            values = list_values(cell, "")
        except TransformError as e:
            raise HistoryError(f"{path}: column {name!r} row {row + 1}: {e}") from None
        keys = sparse_keys(list(values[:max_len])) if len(values) else []
        for key in keys:
            histories.check_key(key, name)
        cut += len(values) > max_len
        out.append(keys)
    return out, cut


def write_records(
    store: StoreBackend, model: str, version: int, users: list[str], records: list[bytes], meta: dict[str, Any],
    prefix: str, progress: bool, manifest: Any,
) -> None:
    """Replace the version's records in a key-value store: meta keys off, old records off, new
    records, meta keys on (see the module docstring)."""
    layout = version_layout(store, manifest, model=model, prefix=prefix)
    for key in _scan_tagged(store, model, version, prefix, meta=True):
        store.delete_keys([key])
    old = defaultdict(list)
    for key in _scan_tagged(store, model, version, prefix, meta=False):
        tag = _hash_tag(key)
        old[tag].append(key)
        if len(old[tag]) >= UNLINK_BATCH:
            store.delete_keys(old.pop(tag))  # one tag: one slot
    for keys in old.values():
        store.delete_keys(keys)
    key_prefixes = store_keys.history_key_prefixes(prefix, model, version, layout)
    shard = store_keys.shard_of(users, layout.shards)
    with tqdm(total=len(users), unit="user", unit_scale=True, desc=f"{model} v{version} histories",
              file=sys.stderr, disable=not progress) as bar:
        for s, key_prefix in enumerate(key_prefixes):
            mine = [j for j, k in enumerate(shard) if k == s]
            encoded = key_prefix.encode()
            store.write_rows(encoded, _chunks(encoded, users, records, mine), on_written=bar.update)
    value = json.dumps({**meta, **layout.meta_fields()})
    for key in store_keys.history_meta_keys(prefix, model, version, layout):
        store.set_value(key, value)


def _chunks(key_prefix: bytes, users: list[str], records: list[bytes], rows: list[int]) -> Iterator[list[bytes]]:
    for start in range(0, len(rows), CHUNK_USERS):
        args: list[bytes] = []
        for j in rows[start : start + CHUNK_USERS]:
            args += (key_prefix + users[j].encode(), records[j])
        yield args


def _scan_tagged(store: StoreBackend, model: str, version: int, prefix: str, meta: bool) -> Iterator[bytes]:
    """The version's history meta keys (``meta``) or records, in any shard layout."""
    segment = store_keys.HISTORY_SEGMENT
    p, m = _glob_escape(prefix), _glob_escape(f"{model}:{version}")
    for tag in ("{" + m + "}", "{" + m + ":*}"):
        pattern = f"{p}:meta:{tag}:{segment}" if meta else f"{p}:{tag}:{segment}:*"
        yield from store.scan(pattern)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
