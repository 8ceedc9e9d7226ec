"""The impression log's file format, shared by its writer (:mod:`mtrank.service.impressions`) and
its readers (:mod:`mtrank.impression_join`, :mod:`mtrank.ab_report`): the Arrow schema of a record,
the file names, the sampling rule, and the feedback table both readers join it with.
docs/impressions.md describes every column."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

FORMAT = "mtrank.impressions/2"
"""The files' ``format`` metadata key: bumped when the schema changes incompatibly."""
FILE_GLOB = "impressions-*.parquet"
"""Complete files; a file being written has a hidden temporary name that this does not match."""
FEEDBACK_KEYS = ("request_id", "item_id")
"""The feedback table's key: one row per shown item that got feedback."""


class FeedbackError(ValueError):
    """A feedback table that cannot be used; the message is one line naming the file."""


class LogError(ValueError):
    """An impression log that cannot be read; the message is one line naming the directory or file."""


def log_files(directory: Path) -> list[Path]:
    """The complete files of the log under ``directory``, each checked to be of this :data:`FORMAT`
    (its footer's metadata; nothing else is read). Raises :class:`LogError` for a directory without
    log files, or a file of another format (the message names it and both formats)."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    files = sorted(directory.glob(FILE_GLOB)) if directory.is_dir() else []
    if not files:
        raise LogError(f"{directory}: no impression log files ({FILE_GLOB})")
    for path in files:
        try:
            metadata = pq.read_metadata(path).metadata or {}
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not Parquet
            raise LogError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        found = metadata.get(b"format", b"none").decode(errors="replace")
        if found != FORMAT:
            raise LogError(f"{path}: impression log format {found}, this mtrank reads {FORMAT} "
                           "(files of another version: read them with that version, or move them aside)")
    return files


def read_feedback(path: Path) -> pa.Table:
    """The frontend's feedback table (Parquet, or CSV for small data) with its key columns as plain
    strings whatever the writer chose (pandas writes ``large_string``; ids may be integers), so they
    join with the log's string ids. Raises :class:`FeedbackError` for a missing file, another format,
    missing key columns or a key that appears twice."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FeedbackError(f"feedback file not found: {path}")
    name = path.name.lower()
    if name.endswith(".parquet"):
        table = pq.read_table(path)
    elif name.endswith((".csv", ".csv.gz")):
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
            column_types={key: pa.string() for key in FEEDBACK_KEYS}))
    else:
        raise FeedbackError(f"{path}: feedback must be .parquet or .csv")
    missing = [c for c in FEEDBACK_KEYS if c not in table.column_names]
    if missing:
        raise FeedbackError(f"{path}: feedback needs the key columns {list(FEEDBACK_KEYS)}; missing {missing}")
    for key in FEEDBACK_KEYS:
        table = table.set_column(table.column_names.index(key), key, pc.cast(table[key], pa.string()))
    keys = pc.binary_join_element_wise(table["request_id"], table["item_id"], "\x00")
    if len(pc.unique(keys)) != table.num_rows:
        raise FeedbackError(f"{path}: a (request_id, item_id) key appears twice")
    return table


def sampled(request_id: str, rate: float) -> bool:
    """Whether the request ``request_id`` is logged at sampling ``rate``: CRC-32 of the id below
    ``rate`` × 2^32, so every process, replica and restart decides alike for one id."""
    return zlib.crc32(request_id.encode()) < rate * 2**32


def schema() -> pa.Schema:
    """A record's Arrow schema: one row per answered request."""
    import pyarrow as pa

    item = pa.struct([("item_id", pa.string()), ("rank", pa.int32()), ("score", pa.float64()),
                      ("tasks", pa.map_(pa.string(), pa.float32()))])
    return pa.schema([
        ("time", pa.timestamp("ms", tz="UTC")),
        ("request_id", pa.string()),
        ("bucket", pa.string()),
        ("model", pa.string()),
        ("version", pa.int32()),
        ("user_group", pa.string()),
        ("user_id", pa.string()),
        ("request", pa.string()),
        ("items", pa.list_(item)),
    ], metadata={"format": FORMAT})
