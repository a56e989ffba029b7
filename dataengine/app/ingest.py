"""``dataengine ingest``: photos + YFCC100M metadata, or an image folder / tar, into webdataset shards."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import typer

from dataengine.app.cli import app, console, emit_summary, fail, print_table, progress_bar, rate_text
from dataengine.app.plan import DRY_RUN_HELP, show_dry_run
from dataengine.app.options import Json, Overwrite, StorageOptions


def _node_split(num_nodes: Optional[int], node_rank: Optional[int]) -> tuple[int, int]:
    """--num-nodes/--node-rank, else torchrun's WORLD_SIZE/RANK, else a single node."""
    if num_nodes is None:
        num_nodes = int(os.environ.get("WORLD_SIZE", "1"))
        node_rank = int(os.environ.get("RANK", "0")) if node_rank is None else node_rank
    return num_nodes, node_rank or 0


def _columns(text: Optional[str]) -> tuple[str, ...]:
    """``a,b`` or img2dataset's JSON list ``["a", "b"]``."""
    if not text:
        return ()
    if text.lstrip().startswith("["):
        import json

        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--save-additional-columns {text!r} is not a JSON list: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"--save-additional-columns {text!r} is not a list of column names")
        return tuple(names)
    return tuple(name.strip() for name in text.split(",") if name.strip())


@app.command()
def ingest(
    out: str = typer.Option(..., "--out", help="Output folder (local path or s3://bucket/prefix)."),
    yfcc: Optional[str] = typer.Option(None, "--yfcc", help="YFCC100M metadata file (.gz/.bz2 ok, local or URL)."),
    images: Optional[str] = typer.Option(None, "--images", help="Images root for --yfcc, or an image folder/tar."),
    download: bool = typer.Option(False, "--download", help="Fetch photos from their download URLs (HTTP)."),
    metadata_only: bool = typer.Option(False, "--metadata-only",
                                       help="Only parse and validate --yfcc: ledger and metadata.parquet, no images."),
    url_list: Optional[str] = typer.Option(None, "--url-list", help="URL list to download, as img2dataset's: "
                                           "txt, csv, tsv, json, jsonl or parquet (.gz/.bz2 ok, local or URL)."),
    input_format: Optional[str] = typer.Option(None, "--input-format", help="Format of --url-list (default: "
                                               "from its name)."),
    url_col: str = typer.Option("url", "--url-col", help="Column of --url-list holding the URLs."),
    caption_col: Optional[str] = typer.Option(None, "--caption-col", help="Column of --url-list holding captions."),
    save_additional_columns: Optional[str] = typer.Option(
        None, "--save-additional-columns", help="Columns of --url-list kept in the metadata: a,b or a JSON list."),
    resize_mode: str = typer.Option("keep_ratio", "--resize-mode", help="keep_ratio, center_crop, border or no."),
    resize_only_if_bigger: bool = typer.Option(True, "--resize-only-if-bigger/--no-resize-only-if-bigger",
                                               help="Never upscale smaller images (img2dataset's default upscales)."),
    min_image_size: int = typer.Option(0, "--min-image-size", help="Refuse images whose shorter side is smaller."),
    max_aspect_ratio: float = typer.Option(float("inf"), "--max-aspect-ratio",
                                           help="Refuse images whose longer side over shorter side is larger."),
    distributor: str = typer.Option("multiprocessing", "--distributor",
                                    help="multiprocessing (--workers processes here) or ray (tasks on the Ray "
                                    "cluster that ray.init() finds; pip install 'dataengine[ray]')."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per shard."),
    image_size: int = typer.Option(256, "--image-size", help="Size of stored images: the shorter side with "
                                   "keep_ratio, the square's side with center_crop and border."),
    quality: int = typer.Option(90, "--quality", help="JPEG quality of stored images."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes decoding images (fetch, decode, "
                                          "resize, encode; 0: in this process). Default: every core."),
    keep_duplicates: bool = typer.Option(False, "--keep-duplicates", help="Keep exact duplicate images."),
    shuffle: Optional[bool] = typer.Option(None, "--shuffle/--no-shuffle",
                                           help="Write the rows in a seeded permutation (default: yes for an "
                                           "image folder or tar, no for --yfcc metadata)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --shuffle permutation."),
    num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="Nodes splitting the input (default: WORLD_SIZE or 1)."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This node's rank (default: RANK or 0)."),
    merge_only: bool = typer.Option(False, "--merge", help="Only merge finished node parts into the manifest."),
    download_threads: int = typer.Option(16, "--download-threads", help="Concurrent HTTP requests per worker."),
    download_timeout: float = typer.Option(10.0, "--download-timeout", help="Seconds an HTTP attempt may take in all."),
    download_retries: int = typer.Option(2, "--download-retries", help="Retries of transient HTTP failures."),
    storage_options: StorageOptions = None,
    overwrite: Overwrite = False,
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    as_json: Json = False,
) -> None:
    """Ingest images (+ YFCC100M metadata) into sharded webdataset tar streams, resumably."""
    # Ingest multiplies no matrices, but pyarrow imports numpy, whose OpenBLAS starts a thread per core that
    # spins for a while: 0.1 CPU-s taken from the image workers (2 cores). Set before numpy is imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from dataengine.fs import parse_storage_options
    from dataengine.ingest import STATUSES, IngestConfig, run_ingest, run_merge
    from dataengine.ingest.inputs import count_input_rows, pending_rows

    options = parse_storage_options(storage_options)
    if merge_only and dry_run:
        fail("--dry-run checks an ingest before it runs; --merge only merges finished node parts: give one")
    if merge_only:
        manifest = run_merge(out, options)
        if manifest is None:
            fail("not every node has finished; nothing merged")
        emit_summary({"out": out, "num_shards": manifest["num_shards"], "counts": manifest["counts"],
                      "num_samples": manifest["num_samples"]}, as_json)
        return
    nodes, rank = _node_split(num_nodes, node_rank)
    config = IngestConfig(
        out=out, yfcc=yfcc, images=images, download=download, metadata_only=metadata_only, url_list=url_list, input_format=input_format,
        url_col=url_col, caption_col=caption_col, save_additional_columns=_columns(save_additional_columns),
        resize_mode=resize_mode, resize_only_if_bigger=resize_only_if_bigger, min_image_size=min_image_size,
        max_aspect_ratio=max_aspect_ratio, distributor=distributor, shard_size=shard_size, image_size=image_size,
        quality=quality, workers=(os.cpu_count() or 1) if workers is None else workers,
        keep_duplicates=keep_duplicates, shuffle=shuffle, seed=seed, num_nodes=nodes, node_rank=rank,
        download_threads=download_threads,
        download_timeout=download_timeout, download_retries=download_retries, storage_options=options,
        overwrite=overwrite,
    )
    if dry_run:
        from dataengine.dryrun import ingest_dry_run

        show_dry_run(ingest_dry_run(config), as_json)
        return
    done_now = [0]  # rows processed by this run (a resumed run's earlier rows are not counted in its rate)
    with contextlib.ExitStack() as stack:
        bar: list = []
        # The bar's total: rows this run still has to process, counted from the input's listing (None when
        # that would read the whole input: compressed or remote metadata and tars).
        pending = (pending_rows(config, count_input_rows(config.yfcc, config.images, config.storage_options,
                                                         config.url_list_spec))
                   if console.is_terminal else None)

        def progress(rows: int) -> None:
            # The bar starts with the first finished rows, once the workers are forked: on a terminal its
            # refresh thread would otherwise make ingest spawn its workers rather than fork them (fork is
            # only used in a single-threaded process), each re-importing everything, and without the shared
            # arena: +0.4 CPU-s on 4,000 photos with 2 workers.
            if not bar:
                bar.append(stack.enter_context(progress_bar(
                    "ingest", total=None if pending is None else sum(pending),
                    completed=0 if pending is None else pending[1])))
            done_now[0] += rows
            bar[0](rows)

        result = run_ingest(config, progress=progress)
    rows = [[status, result.counts.get(status, 0)] for status in STATUSES]
    print_table(f"ingest: {result.num_samples} samples in {result.num_shards} shards", ["status", "rows"], rows)
    total, rate = sum(result.counts.values()), done_now[0] / max(result.seconds, 1e-9)
    resumed = f", {total - done_now[0]} of them not by this run (resumed, or other nodes)" if total > done_now[0] else ""
    console.print(f"{out}: {total} rows{resumed}; {done_now[0]} in {result.seconds:.1f} s ({rate_text(rate)} rows/s)"
                  + ("" if result.complete else "; waiting for other nodes before the manifest is written"))
    emit_summary(dict(result.to_dict(), rows_this_run=done_now[0], rows_per_second=rate), as_json)
