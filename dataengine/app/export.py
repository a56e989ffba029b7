"""``dataengine export``: a feature store (keys, metadata, cluster ids, optionally features) as one Parquet file."""

from __future__ import annotations

from typing import List, Optional

import typer

from dataengine.app.cli import app, console, emit_summary, progress_bar
from dataengine.app.options import Json, Overwrite, StorageOptions


@app.command()
def export(
    store: str = typer.Argument(..., metavar="STORE",
                                help="Feature store written by `dataengine embed`, local path or s3://."),
    out: str = typer.Option(..., "--out", help="Parquet file to write, local path or s3:// URL."),
    clustering: Optional[List[str]] = typer.Option(None, "--clustering", help="Clustering whose levels become "
                                                   "columns level0, level1... (repeatable: NAME_level0...)."),
    features: bool = typer.Option(False, "--features", help="Also write the features (fixed-size list of float32)."),
    source_metadata: bool = typer.Option(False, "--source-metadata", help="Every column of the source's "
                                         "metadata.parquet instead of the store's metadata columns."),
    shards: Optional[str] = typer.Option(None, "--shards", help="The source shards for --source-metadata "
                                         "(default: the store's recorded source)."),
    block_rows: Optional[int] = typer.Option(None, "--block-rows", help="Rows per block and row group "
                                             "(default: about 16 MiB of features)."),
    storage_options: StorageOptions = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Export keys, metadata, cluster ids per level (and features) to Parquet for pandas, polars, duckdb."""
    from dataengine.export import ExportConfig, run_export
    from dataengine.fs import parse_storage_options

    config = ExportConfig(store=store, out=out, clusterings=tuple(clustering or ()), features=features,
                          source_metadata=source_metadata, shards=shards, block_rows=block_rows,
                          overwrite=overwrite, storage_options=parse_storage_options(storage_options))
    with progress_bar("export rows") as update:
        result = run_export(config, progress=update)
    done = "already exported" if result.skipped else f"{result.row_groups} row groups in {result.seconds:.1f} s"
    console.print(f"{out}: {result.num_rows} rows x {result.num_columns} columns ({', '.join(result.columns)}), "
                  f"{result.bytes / 1e6:.1f} MB, {done}", soft_wrap=True)
    emit_summary(result.to_dict(), as_json)
