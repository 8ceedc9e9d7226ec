"""Load a model version's store-held embedding tables into an embedding store, then flip the
model's pointer. Any back-end of :mod:`mtrank.stores` (the URL's scheme picks it).

Key layout: :mod:`mtrank.store_keys`. The version's shard layout (``N`` hash tags shared by all
its tables) is chosen once, then each table is written shard by shard (one tag, one slot): its
rows go in as chunks (Redis: ``MSET`` streamed on one connection to the node owning the shard's
slot), then the table's meta key (with the version layout) marks it complete; after every table the
pointer ``{prefix}:ptr:<model>`` is set to the version in one ``SET``. Until then readers
following the pointer keep using the old version, whose keys are not touched. Row 0 (the default
vector) is not stored: the service takes defaults from the repository.

On a store with several nodes (Redis Cluster) a version of at least
:data:`mtrank.store_keys.SHARD_MIN_BYTES` of values (all tables together) is spread over several
primaries (``shards``: auto from the version's size and the cluster's size, or given). Chunks that
meet a slot being moved are written again key by key by the back-end.

Re-running is idempotent: a table whose meta key already matches (rows, width, checksums, layout)
is skipped, and a version partly loaded keeps the layout its complete tables recorded. ``prune``
deletes the keys of every other version of the model, in this layout or in the earlier one with a
hash tag per table (meta keys first, so a half-pruned table is never taken for complete).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mtrank import store_keys
from mtrank.manifest import Manifest, ManifestError, load_manifest, open_vectors, read_ids, version_dir
from mtrank.stores import StoreBackend, open_backend

CHUNK_IDS = 2000
"""Ids per chunk (one ``MSET`` on Redis)."""
UNLINK_BATCH = 1000


def load_embeddings(
    repo: str | Path,
    model: str,
    store_url: str,
    version: int | None = None,
    prune: bool = False,
    prefix: str = store_keys.DEFAULT_PREFIX,
    progress: bool = True,
    shards: int | None = None,
) -> dict[str, Any]:
    """Load ``model``'s version (default: newest) into the store at ``store_url`` and point the
    model at it.

    ``shards``: hash tags of the version, shared by its tables (None: chosen from the version's
    size and the number of Cluster primaries, :func:`mtrank.store_keys.choose_shards`; 1 on a
    single node). Returns ``{"model", "version", "ids", "seconds", "ids_per_s", "tables",
    "shards", "shard_salts", "redirected_ids", "pruned_keys"}``; ``ids`` counts the ids written
    by this call (0 when everything was already loaded), ``redirected_ids`` those written again
    key by key after a slot moved under them.
    """
    vdir = version_dir(repo, model, version)
    manifest = load_manifest(vdir)
    if str(manifest.version) != vdir.name:
        # Keys carry the version: a directory copied under another number would load under the wrong one.
        raise ManifestError(f"{vdir}: manifest says version {manifest.version}, the directory is {vdir.name}")
    store = open_backend(store_url)
    try:
        started = time.perf_counter()
        report: dict[str, Any] = {"redirected_ids": 0}
        layout = version_layout(store, manifest, model=model, prefix=prefix, shards=shards)
        tables = {
            field: load_table(
                store, vdir, manifest, field, model=model, prefix=prefix, progress=progress, layout=layout,
                report=report,
            )
            for field in manifest.tables
        }
        flip_pointer(store, model, manifest.version, prefix=prefix)
        seconds = time.perf_counter() - started
        pruned = prune_versions(store, model, keep=manifest.version, prefix=prefix) if prune else 0
    finally:
        store.close_writer()
    ids = sum(tables.values())
    stats = {
        "model": model,
        "version": manifest.version,
        "ids": ids,
        "seconds": round(seconds, 3),
        "ids_per_s": round(ids / seconds) if seconds > 0 else 0,
        "tables": tables,
        "shards": layout.shards,
        "shard_salts": list(layout.salts),
        "redirected_ids": report["redirected_ids"],
        "pruned_keys": pruned,
    }
    if progress:
        skipped = [f for f, n in tables.items() if n == 0]
        print(
            f"loaded {model} v{manifest.version}: {ids} ids in {seconds:.2f} s ({stats['ids_per_s']} ids/s)"
            + (f", already loaded: {', '.join(skipped)}" if skipped else "")
            + (f", pruned {pruned} keys" if prune else ""),
            flush=True,
        )
    return stats


def table_meta(manifest: Manifest, field: str) -> dict[str, Any]:
    """The meta value that marks ``field``'s table of this version complete."""
    table = manifest.tables[field]
    return {
        "rows": table.rows,
        "width": table.width,
        "sha256": manifest.files[table.vectors_file],
        "ids_sha256": manifest.files[table.ids_file],
        "dim": table.dim,
        "views": table.views,
        "dtype": table.dtype,
    }


def load_table(
    store: StoreBackend,
    vdir: Path,
    manifest: Manifest,
    field: str,
    model: str | None = None,
    prefix: str = store_keys.DEFAULT_PREFIX,
    progress: bool = True,
    layout: store_keys.VersionLayout | None = None,
    report: dict[str, Any] | None = None,
) -> int:
    """Write one table's rows, then its meta key; returns the ids written (0: already complete).

    ``layout``: the version's (None: :func:`version_layout` with its defaults, which keeps the
    layout of the version's tables already loaded). ``report``, when given, adds to
    ``["redirected_ids"]``. Does not touch the pointer: a caller can load every table of a new
    version while readers stay on the old one.
    """
    model = model or manifest.name
    layout = layout or version_layout(store, manifest, model=model, prefix=prefix)
    table = manifest.tables[field]
    meta = table_meta(manifest, field)
    meta.update(layout.meta_fields())
    meta_key = store_keys.meta_key(prefix, model, manifest.version, field)
    report = report if report is not None else {"redirected_ids": 0}
    current = store.get_value(meta_key)
    if current is not None and _same_table(json.loads(current), meta) and _layout_of(current) == layout:
        return 0
    if current is not None:
        # A different table (the version directory was replaced) or layout (another --shards)
        # went in under this model and version before: it stops counting as complete first.
        store.delete_keys([meta_key])

    ids = read_ids(vdir / table.ids_file)
    vectors = open_vectors(vdir / table.vectors_file)
    if vectors.shape != (table.rows, table.width) or len(ids) != table.rows - 1:
        raise ManifestError(
            f"{vdir}: table {field!r} has {len(ids)} ids and vectors {vectors.shape}, "
            f"manifest says {table.rows - 1} ids and ({table.rows}, {table.width})"
        )
    key_prefixes = layout.key_prefixes(prefix, model, manifest.version, field)
    # vectors row 0 is the default (not stored): id i is row i + 1.
    rows_of_shard = _rows_by_shard(ids, layout.shards)
    with tqdm(
        total=len(ids), unit="id", unit_scale=True, desc=f"{model} v{manifest.version} {field}",
        file=sys.stderr, disable=not progress,
    ) as bar:
        for key_prefix, rows in zip(key_prefixes, rows_of_shard, strict=True):
            encoded_prefix = key_prefix.encode()
            commands = (
                _mset_args(encoded_prefix, [ids[r] for r in chunk], vectors[chunk + 1])
                for chunk in (rows[start : start + CHUNK_IDS] for start in range(0, len(rows), CHUNK_IDS))
            )
            report["redirected_ids"] += store.write_rows(encoded_prefix, commands, on_written=bar.update)
    store.set_value(meta_key, json.dumps(meta))
    return len(ids)


def version_layout(
    store: StoreBackend, manifest: Manifest, model: str | None = None, prefix: str = store_keys.DEFAULT_PREFIX,
    shards: int | None = None,
) -> store_keys.VersionLayout:
    """The shard layout of the version's tables: the one its complete tables already recorded
    (when ``shards`` is None or agrees), else ``shards`` tags (None: one per
    :data:`mtrank.store_keys.SHARD_MIN_BYTES` of all tables' values, at most one per Cluster
    primary; 1 on a single node) with salts placing them on distinct primaries."""
    model = model or manifest.name
    fields = list(manifest.tables)
    keys = [store_keys.meta_key(prefix, model, manifest.version, f) for f in fields]
    for field, key in zip(fields, keys, strict=True):
        raw = store.get_value(key)
        if raw is not None and _same_table(json.loads(raw), table_meta(manifest, field)):
            recorded = _layout_of(raw)
            if shards is None or recorded.shards == shards:
                return recorded
    placement = store.placement()
    if placement is None:
        n = shards or 1
        return store_keys.VersionLayout(n, (0,) * n if n > 1 else ())
    owner, primaries = placement
    value_bytes = sum((t.rows - 1) * t.width * 4 for t in manifest.tables.values())
    n = shards or store_keys.choose_shards(value_bytes, len(primaries))
    if n == 1:
        return store_keys.VersionLayout()
    return store_keys.VersionLayout(n, store_keys.pick_salts(model, manifest.version, n, owner, primaries))


def _layout_of(raw_meta: bytes) -> store_keys.VersionLayout:
    return store_keys.VersionLayout.from_meta(json.loads(raw_meta))


def _rows_by_shard(ids: list[str], shards: int) -> list[np.ndarray]:
    """Per shard, the positions in ``ids`` of the ids it holds (in file order)."""
    if shards == 1:
        return [np.arange(len(ids))]
    shard = np.asarray(store_keys.shard_of(ids, shards), dtype=np.int64)
    order = np.argsort(shard, kind="stable")
    return np.split(order, np.searchsorted(shard[order], np.arange(1, shards)))


def _mset_args(key_prefix: bytes, ids: list[str], rows) -> list[bytes]:
    """``MSET`` arguments ``key1 value1 key2 value2 ...`` for one chunk of a table."""
    args: list[bytes] = [b""] * (2 * len(ids))
    args[0::2] = [key_prefix + i.encode() for i in ids]
    args[1::2] = store_keys.encode_rows(rows)
    return args


def flip_pointer(store: StoreBackend, model: str, version: int, prefix: str = store_keys.DEFAULT_PREFIX) -> None:
    """Point readers of ``model`` at ``version`` (one ``SET``: atomic)."""
    store.set_value(store_keys.pointer_key(prefix, model), str(version))


def loaded_version(store: StoreBackend, model: str, prefix: str = store_keys.DEFAULT_PREFIX) -> int | None:
    value = store.get_value(store_keys.pointer_key(prefix, model))
    return None if value is None else int(value)


def prune_versions(store: StoreBackend, model: str, keep: int, prefix: str = store_keys.DEFAULT_PREFIX) -> int:
    """Delete the keys of every version of ``model`` but ``keep``; returns the number deleted."""
    deleted = 0
    meta_pattern = f"{_glob_escape(prefix)}:meta:{{{_glob_escape(model)}:*"
    row_pattern = f"{_glob_escape(prefix)}:{{{_glob_escape(model)}:*"
    # Meta keys first: an interrupted prune leaves tables that are incomplete, not wrongly complete.
    for pattern in (meta_pattern, row_pattern):
        by_tag: dict[bytes, list[bytes]] = defaultdict(list)
        for key in store.scan(pattern):
            tag = _hash_tag(key)
            if tag is None or not _stale(tag, model, keep):
                continue
            by_tag[tag].append(key)
            if len(by_tag[tag]) >= UNLINK_BATCH:
                deleted += store.delete_keys(by_tag.pop(tag))  # one tag: one slot
        for keys in by_tag.values():
            deleted += store.delete_keys(keys)
    return deleted


def _same_table(current: dict[str, Any], meta: dict[str, Any]) -> bool:
    return all(current.get(k) == meta[k] for k in ("rows", "width", "sha256", "ids_sha256"))


def _hash_tag(key: bytes) -> bytes | None:
    start = key.find(b"{")
    end = key.find(b"}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else None


def _stale(tag: bytes, model: str, keep: int) -> bool:
    """``tag`` of ``model`` with a version other than ``keep``: ``<model>:<version>[:<shard>.<salt>]``,
    or ``<model>:<version>:<field>[:<shard>.<salt>]`` of the earlier per-table layout."""
    text = tag.decode("utf-8", "replace")
    if not text.startswith(model + ":"):
        return False
    version = text[len(model) + 1 :].split(":", 1)[0]
    return version.isdigit() and version != str(keep)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
