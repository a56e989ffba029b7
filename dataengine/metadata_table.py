"""The typed columns of ``metadata.parquet`` (one row per ingested sample) and their Arrow schema.

Row r of ``metadata.parquet`` is the r-th sample when reading the shards in manifest order; later stages
join on row order. ``offset``/``size`` locate the sample's JPEG inside its tar for random access.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow is imported lazily: ingest workers never need it, and it costs ~0.3 s of start-up.
_COLUMNS = (
    ("key", "string"),
    ("shard", "int32"),
    ("position", "int32"),
    ("offset", "int64"),
    ("size", "int64"),
    ("photo_id", "int64"),
    ("user", "string"),
    ("nickname", "string"),
    ("date_taken", "string"),
    ("date_uploaded", "int64"),
    ("device", "string"),
    ("title", "string"),
    ("description", "string"),
    ("tags", "list<string>"),
    ("machine_tags", "list<string>"),
    ("lat", "float64"),
    ("lon", "float64"),
    ("accuracy", "int32"),
    ("license", "string"),
    ("download_url", "string"),
    ("page_url", "string"),
    ("label", "string"),
    ("width", "int32"),
    ("height", "int32"),
    ("sha256", "string"),
    ("source", "string"),
)
_LIST_COLUMNS = ("tags", "machine_tags")


@functools.cache
def meta_schema() -> "pa.Schema":
    """The Arrow schema of ``metadata.parquet``."""
    import pyarrow as pa

    types = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64(),
             "list<string>": pa.list_(pa.string())}
    return pa.schema([(name, types[kind]) for name, kind in _COLUMNS])


def rows_to_table(rows: list[dict[str, Any]]) -> "pa.Table":
    """Build a table with :func:`meta_schema` from sample dicts (missing keys become nulls, missing lists [])."""
    import pyarrow as pa

    schema = meta_schema()
    # One conversion of the dicts as structs (in C++; keys outside the schema are ignored) instead of a Python
    # pass per column: ~3x faster. Only a missing list column differs, an empty list rather than null.
    table = pa.Table.from_struct_array(pa.array(rows, type=pa.struct(list(schema))))
    for name in _LIST_COLUMNS:
        index = schema.get_field_index(name)
        table = table.set_column(index, schema.field(index),
                                 pa.array([row.get(name, []) for row in rows], schema.field(index).type))
    return table


def rows_to_parquet_bytes(rows: list[dict[str, Any]], extra_columns: bool = False) -> bytes:
    """Serialize sample dicts as a Parquet file in memory (``extra_columns``: keys outside the schema become
    columns after it, see :func:`dataengine.foreign_shards.rows_table`; else they are left out)."""
    import pyarrow.parquet as pq

    if extra_columns:
        from dataengine.foreign_shards import rows_table

        table = rows_table(rows)
    else:
        table = rows_to_table(rows)
    return table_to_parquet_bytes([table])


def table_to_parquet_bytes(tables: list["pa.Table"]) -> bytes:
    """Tables of one schema, one after the other, as a Parquet file in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(tables[0] if len(tables) == 1 else pa.concat_tables(tables), buffer, compression="zstd")
    return buffer.getvalue()
