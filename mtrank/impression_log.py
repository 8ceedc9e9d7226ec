"""The impression log's file format, shared by its writer (:mod:`mtrank.service.impressions`) and
its readers (:mod:`mtrank.impression_join`): the Arrow schema of a record, the file names and the
sampling rule. docs/impressions.md describes every column."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

FORMAT = "mtrank.impressions/1"
"""The files' ``format`` metadata key: bumped when the schema changes incompatibly."""
FILE_GLOB = "impressions-*.parquet"
"""Complete files; a file being written has a hidden temporary name that this does not match."""


def sampled(request_id: str, rate: float) -> bool:
    """Whether the request ``request_id`` is logged at sampling ``rate``: CRC-32 of the id below
    ``rate`` × 2^32, so every process, replica and restart decides alike for one id."""
    return zlib.crc32(request_id.encode()) < rate * 2**32


def schema() -> pa.Schema:
    """A record's Arrow schema: one row per answered request."""
    import pyarrow as pa

    candidate = pa.struct([("item_id", pa.string()), ("video_len", pa.float64()), ("features", pa.string())])
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
        ("user_features", pa.string()),
        ("candidates", pa.list_(candidate)),
        ("items", pa.list_(item)),
    ], metadata={"format": FORMAT})
