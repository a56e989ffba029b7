"""``dataengine curate``: a balanced, random or hierarchical subset of a clustered collection, deduplicated, as
a new shard set."""

from __future__ import annotations

from typing import Any, Optional

import typer

from dataengine.app.cli import app, console, emit_summary, print_table, progress_bar
from dataengine.app.options import Json, Overwrite, StorageOptions


def print_curate_summary(result: dict[str, Any]) -> None:
    """The human summary of a curation (``CurateResult.to_dict()``): rows per status, then the subset beside
    the original."""
    from dataengine.curate import STATUSES

    print_table(f"curate: {result['num_selected']} of {result['num_rows']} rows kept in {result['num_shards']} "
                "shards", ["status", "rows"], [[status, result["counts"].get(status, 0)] for status in STATUSES])
    report = result["report"]
    sizes, nmi = report["sizes"], report["nmi"]
    rows: list[list[Any]] = []
    for stat in ("min", "median", "max", "normalized_entropy", "gini"):
        rows.append([f"cluster size {stat}", _figure(sizes["original"][stat]), _figure(sizes["curated"][stat])])
    for kind in nmi["original"]:
        before, after = nmi["original"][kind], nmi["curated"][kind]
        rows.append([f"NMI {kind} (chance)", f"{_figure(before['nmi'])} ({_figure(before['chance_nmi'])})",
                     f"{_figure(after['nmi'])} ({_figure(after['chance_nmi'])})"])
    print_table(f"level {result['level']} ({result['num_clusters']} clusters): original and curated",
                ["figure", "original", "curated"], rows)


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
def curate(
    store: str = typer.Argument(..., metavar="STORE", help="Feature store holding the clustering."),
    clustering: str = typer.Option(..., "--clustering", help="Name of the clustering to curate with."),
    out: str = typer.Option(..., "--out", help="Output folder for the curated shard set (local or s3://)."),
    strategy: str = typer.Option("balanced", "--strategy",
                                 help="balanced (even over clusters), random, or hierarchical (balanced at every level)."),
    total: Optional[int] = typer.Option(None, "--total", help="Rows to keep."),
    per_cluster: Optional[int] = typer.Option(None, "--per-cluster",
                                              help="Or: at most N rows per cluster (hierarchical: per top-level cluster)."),
    level: Optional[int] = typer.Option(None, "--level", help="Clustering level to balance and deduplicate within "
                                        "(default: the finest)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice."),
    dedup_threshold: Optional[float] = typer.Option(
        None, "--dedup-threshold", help="Drop rows whose most similar earlier row of their cluster has a cosine "
        "similarity above this (SemDeDup's rule)."),
    dedup_space: str = typer.Option("whitened", "--dedup-space",
                                    help="Vectors compared: whitened (the clustering's space) or features."),
    dedup_memory_gb: float = typer.Option(1.0, "--dedup-memory-gb", help="Vectors held at once while deduplicating."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per output shard."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Ingest output of the store (default: recorded)."),
    storage_options: StorageOptions = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Write a seeded subset of a clustered collection (optionally without near-duplicates) as a new shard set."""
    from dataengine.curate import CurateConfig, run_curate
    from dataengine.fs import parse_storage_options

    config = CurateConfig(
        store=store, clustering=clustering, out=out, shards=shards, strategy=strategy, total=total,
        per_cluster=per_cluster, level=level, seed=seed, dedup_threshold=dedup_threshold, dedup_space=dedup_space,
        dedup_memory_bytes=int(dedup_memory_gb * (1 << 30)), shard_size=shard_size,
        storage_options=parse_storage_options(storage_options), overwrite=overwrite,
    )
    with progress_bar("curate rows") as update:
        result = run_curate(config, progress=update)
    print_curate_summary(result.to_dict())
    console.print(f"{result.out}: {result.num_selected} samples in {result.num_shards} shards, "
                  f"{result.seconds:.1f} s" + (f" ({result.resumed_shards} shards already done)"
                                               if result.resumed_shards else ""))
    emit_summary(result.to_dict(), as_json)
