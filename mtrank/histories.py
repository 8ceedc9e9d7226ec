"""Per-user history records: the lists of a model version's ``sequence`` fields, by user id, for
requests that leave a history out (docs/architecture.md §4, "History records").

A record holds, for one (model, version, user id), the user's list for each ``sequence`` field of
the version, in the manifest's order: raw ids as keys (:func:`mtrank.transform.sparse_keys`),
most recent first, cut at the field's ``max_len``. ``mtrank load-histories`` writes them; the
service reads them where a request leaves a sequence field out.

**Encoding** (:func:`encode_record`): UTF-8 text, each entry followed by ``\\x1f`` (unit
separator), fields joined by ``\\x1e`` (record separator); an empty list is the empty string. The
field names and lengths are said once, in the load's meta value, not in every record; decoding is
two ``str.split`` calls in C (no parser objects per entry), and a record is the ids' own bytes plus
one byte per entry: a 50-entry history of 7-character ids is ~400 bytes, where JSON with field
names is ~560 and needs a parser. Terminating each entry (rather than separating them) keeps
``[]`` and ``[""]`` apart. An id holding either separator is refused by the loader.

**Where records live**

- A key-value store (:mod:`mtrank.store_keys`): ``{prefix}:<tag>:@hist:<user_id>`` under the hash
  tag of the user's shard in the version's layout (one-shard: ``{<model>:<version>}``), so that a
  request's record rides in the same ``MGET`` (the same Cluster slot group) as its embeddings; per
  shard tag a meta key ``{prefix}:meta:<tag>:@hist`` (:func:`meta_value`), written after every
  record: a reader sees a complete load when the meta key of the user's shard is present and
  names the version's sequence fields; otherwise the user has no record.
- The in-process store: the file ``REPO/<model>/<version>.histories`` (:func:`local_path`),
  beside the version directory, whose checksummed file list it leaves untouched. An Arrow IPC
  file: a ``user_id`` (string) and a ``record`` (binary, the encoding above) column, the meta value
  in its schema metadata; written to a temporary name and renamed, so a reader sees the old file
  or the new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENTRY_END = "\x1f"
FIELD_SEPARATOR = "\x1e"
LOCAL_SUFFIX = ".histories"
META_METADATA_KEY = b"mtrank.histories"
FORMAT = 1


class HistoryError(ValueError):
    """A history table or record that cannot be used (one line, for the CLI and the logs)."""


@dataclass(frozen=True)
class HistoryFields:
    """The ``sequence`` fields of one model version, in the manifest's order."""

    names: tuple[str, ...]
    max_lens: tuple[int, ...]

    @classmethod
    def of(cls, lists: Sequence[Any]) -> HistoryFields:
        """From a manifest's ``lists`` or a transform's list columns (anything with ``name``,
        ``kind`` and ``max_len``): its ``sequence`` fields."""
        fields = [f for f in lists if f.kind == "sequence"]
        return cls(tuple(f.name for f in fields), tuple(int(f.max_len) for f in fields))

    def __bool__(self) -> bool:
        return bool(self.names)


def encode_record(lists: Sequence[Sequence[str]]) -> bytes:
    """One record from the user's keys per field (already cut at ``max_len``)."""
    return FIELD_SEPARATOR.join("".join(k + ENTRY_END for k in keys) for keys in lists).encode()


def decode_record(value: bytes, n_fields: int) -> list[list[str]]:
    """The keys per field of a record; :class:`HistoryError` when it is not one of ``n_fields`` fields."""
    try:
        parts = value.decode().split(FIELD_SEPARATOR)
    except UnicodeDecodeError:
        raise HistoryError("a history record that is not UTF-8") from None
    if len(parts) != n_fields or any(p and not p.endswith(ENTRY_END) for p in parts):
        raise HistoryError(f"a history record of {len(parts)} fields, expected {n_fields}")
    return [p.split(ENTRY_END)[:-1] for p in parts]


def check_key(key: str, field: str) -> None:
    """Refuse an entry the encoding cannot hold."""
    if ENTRY_END in key or FIELD_SEPARATOR in key:
        raise HistoryError(f"column {field!r}: an id holds the control character \\x1e or \\x1f")


def meta_value(fields: HistoryFields, users: int, sha256: str, layout: dict[str, Any] | None = None) -> dict[str, Any]:
    """What marks a load complete: the fields (and lengths) the records hold, how many users,
    the SHA-256 of the loaded table file and, in a key-value store, the version's shard layout."""
    return {"format": FORMAT, "fields": list(fields.names), "max_len": list(fields.max_lens), "users": users,
            "sha256": sha256, **(layout or {})}


def meta_matches(meta: Any, fields: HistoryFields) -> bool:
    """Whether a meta value describes records of exactly these fields and lengths."""
    return (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("fields") == list(fields.names)
            and meta.get("max_len") == list(fields.max_lens))


def parse_meta(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


# -- the in-process store's file ------------------------------------------------------------------


def local_path(version_dir: str | Path) -> Path:
    """``REPO/<model>/<version>.histories``: beside the version directory, not in it."""
    version_dir = Path(version_dir)
    return version_dir.parent / f"{version_dir.name}{LOCAL_SUFFIX}"


def write_local(path: Path, users: list[str], records: list[bytes], meta: dict[str, Any]) -> None:
    """Write the records file atomically (temporary file, fsync, rename)."""
    import pyarrow as pa
    from pyarrow import ipc

    schema = pa.schema([("user_id", pa.string()), ("record", pa.binary())],
                       metadata={META_METADATA_KEY: json.dumps(meta).encode()})
    table = pa.table([pa.array(users, pa.string()), pa.array(records, pa.binary())], schema=schema)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, schema) as writer:
            writer.write_table(table, max_chunksize=65536)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_local(path: Path) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
    """(the meta value, user id → record) of a records file."""
    import pyarrow as pa
    from pyarrow import ipc

    with pa.memory_map(str(path)) as source:
        table = ipc.open_file(source).read_all()
    raw = (table.schema.metadata or {}).get(META_METADATA_KEY)
    users = table.column("user_id").to_pylist()
    records = table.column("record").to_pylist()
    return parse_meta(raw), dict(zip(users, records, strict=True))
