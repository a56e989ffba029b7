"""``dataengine embed``: ingest shards -> Zarr v3 feature store (resumable; distributed under ``torchrun``)."""

from __future__ import annotations

import os
from typing import Optional

import typer

from dataengine.app.cli import app, console, emit_summary, progress_bar
from dataengine.app.options import (BatchSize, Checkpoint, DecodeWorkers, Device, ImageSize, InitSeed, Json, Layer,
                                    Overwrite, StorageOptions, Threads)
from dataengine.app.plan import DRY_RUN_HELP, show_dry_run


@app.command()
def embed(
    ingest_out: str = typer.Argument(..., metavar="INGEST_OUT", help="Output of `dataengine ingest` (local or "
                                     "s3://), or webdataset shards (a brace pattern, a :: list, a folder of tars)."),
    out: str = typer.Option(..., "--out", help="Feature store (Zarr v3 group), local path or s3:// URL."),
    model: Optional[str] = typer.Option(None, "--model", help="small, resnet18, resnet50, vgg16_bn (random init "
                                        "unless --weights/--checkpoint); torchvision weights ARCH:WEIGHTS from the "
                                        "torch hub cache (resnet50:IMAGENET1K_V2); a TorchScript file; or a "
                                        "module:function returning a model. Default resnet18, or the checkpoint's."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local state-dict file (torchvision layout)."),
    checkpoint: Checkpoint = None,
    sobel: bool = typer.Option(False, "--sobel", help="Fixed grayscale + Sobel input layer."),
    layer: Layer = None,
    image_size: ImageSize = 224,
    resize_size: Optional[int] = typer.Option(None, "--resize-size", help="Shorter side before the crop "
                                              "(default image-size * 256/224)."),
    batch_size: BatchSize = None,
    workers: DecodeWorkers = None,
    dtype: str = typer.Option("float16", "--dtype", help="Stored feature type: float16 or float32."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", help="Rows per chunk (default: >= 1 MB)."),
    chunks_per_shard: int = typer.Option(1, "--chunks-per-shard", help="Chunks per object (Zarr sharding codec)."),
    seed: InitSeed = 0,
    device: Device = "auto",
    threads: Threads = None,
    storage_options: StorageOptions = None,
    overwrite: Overwrite = False,
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    as_json: Json = False,
) -> None:
    """Embed every sample of an ingest output into a chunked Zarr feature store, resumably."""
    from dataengine.embed import EmbedConfig, run_embed
    from dataengine.fs import parse_storage_options
    from dataengine.shards import load_shard_set
    from indexes import distributed

    config = EmbedConfig(
        shards=ingest_out, out=out, model=model, weights=weights, checkpoint=checkpoint, sobel=sobel, layer=layer,
        image_size=image_size, resize_size=resize_size, batch_size=batch_size,
        workers=min(4, os.cpu_count() or 1) if workers is None else workers, dtype=dtype,
        chunk_rows=chunk_rows, chunks_per_shard=chunks_per_shard, seed=seed, device=device,
        num_threads=threads, storage_options=parse_storage_options(storage_options), overwrite=overwrite,
    )
    if dry_run:
        from dataengine.dryrun import embed_dry_run

        show_dry_run(embed_dry_run(config), as_json)
        return
    total = load_shard_set(ingest_out, config.storage_options).num_samples if console.is_terminal else None
    with distributed.process_group(device) as placement, progress_bar(
            "embed", total=total if placement.world_size == 1 else None) as update:
        result = run_embed(config, progress=lambda rows: update(rows))
    if placement.rank != 0:
        return
    if config.random_init:  # after the run, so that a command that fails prints its error line alone
        console.print(f"[yellow]warning:[/yellow] no pretrained weights: embedded with a randomly "
                      f"initialised {config.model or 'resnet18'} (seed {seed}); name weights with --model "
                      "ARCH:WEIGHTS, --weights FILE or --checkpoint RUN", soft_wrap=True)
    console.print(f"{out}: {result.num_rows} rows x {result.dim}, {result.computed_rows} embedded in "
                  f"{result.seconds:.1f} s ({result.images_per_second:.1f} images/s), {result.resumed_blocks} of "
                  f"{result.num_blocks} blocks already done, {result.num_invalid} invalid rows")
    emit_summary(result.to_dict(), as_json)
