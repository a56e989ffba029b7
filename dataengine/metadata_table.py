"""The typed columns of ``metadata.parquet`` (one row per ingested sample) and their Arrow schema.

Row r of ``metadata.parquet`` is the r-th sample when reading the shards in manifest order; later stages
join on row order. ``offset``/``size`` locate the sample's JPEG inside its tar for random access.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

META_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int32()),
        ("position", pa.int32()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("photo_id", pa.int64()),
        ("user", pa.string()),
        ("nickname", pa.string()),
        ("date_taken", pa.string()),
        ("date_uploaded", pa.int64()),
        ("device", pa.string()),
        ("title", pa.string()),
        ("description", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("machine_tags", pa.list_(pa.string())),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("accuracy", pa.int32()),
        ("license", pa.string()),
        ("download_url", pa.string()),
        ("page_url", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("source", pa.string()),
    ]
)
_LIST_COLUMNS = ("tags", "machine_tags")


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a table with :data:`META_SCHEMA` from sample dicts (missing keys become nulls)."""
    columns = {}
    for column in META_SCHEMA:
        default = [] if column.name in _LIST_COLUMNS else None
        columns[column.name] = pa.array([row.get(column.name, default) for row in rows], column.type)
    return pa.table(columns, schema=META_SCHEMA)


def rows_to_parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Serialize sample dicts as a Parquet file in memory."""
    buffer = io.BytesIO()
    pq.write_table(rows_to_table(rows), buffer, compression="zstd")
    return buffer.getvalue()
