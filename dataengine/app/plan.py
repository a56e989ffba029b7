"""``dataengine plan``: expected wall time, peak memory and bytes of every stage, before running anything."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import typer

from dataengine.app.cli import app, console, emit_summary, parse_ints, print_table
from dataengine.app.options import Json

if TYPE_CHECKING:
    from dataengine.dryrun import DryRun

DRY_RUN_HELP = "Check the inputs and the output, print the resolved configuration and the plan; write nothing."


def _bytes(value: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def print_plans(plans: list, title: str) -> None:
    """The stages' plans as a table, then their notes (stderr)."""
    rows = [[p.stage, _duration(p.seconds), p.processes, _bytes(p.peak_memory_bytes), _bytes(p.disk_bytes),
             _bytes(p.object_bytes)] for p in plans]
    print_table(title, ["stage", "wall time", "processes", "peak memory / process", "disk", "object storage"], rows)
    for p in plans:
        for note in p.notes:
            console.print(f"{p.stage}: {note}")


def show_dry_run(dry: "DryRun", as_json: bool) -> None:
    """What a ``--dry-run`` found: the resolved configuration, the output's state and the plan (stderr), and
    the ``--json`` summary."""
    import json

    from rich.text import Text

    console.print(Text(f"{dry.stage} --dry-run: the resolved configuration (nothing is written)"))
    console.print(Text(json.dumps(dry.config, indent=1, sort_keys=True, default=str)), soft_wrap=True)
    rows = "unknown" if dry.rows is None else f"{dry.rows:,}"
    todo = "" if dry.todo_rows is None else f", {dry.todo_rows:,} to process"
    console.print(Text(f"input: {rows} rows{todo}; output: {dry.output}"))
    if dry.plan is not None:
        print_plans([dry.plan], f"{dry.stage}: plan (rates of BENCHMARKS.md)")
    for note in dry.notes:
        console.print(Text(f"note: {note}"), soft_wrap=True)
    emit_summary(dry.to_dict(), as_json)


@app.command()
def plan(
    images: int = typer.Option(..., "--images", help="Photos in the run."),
    gpus: int = typer.Option(0, "--gpus", help="GPUs per node (embed and train use one process per GPU)."),
    nodes: int = typer.Option(1, "--nodes", help="Machines."),
    cores: Optional[int] = typer.Option(None, "--cores", help="CPU cores per node (default: this machine's)."),
    levels: str = typer.Option("4,256", "--levels", help="Clusters per level, m,k."),
    dim: Optional[int] = typer.Option(None, "--dim", help="Feature dimension (default: the model's)."),
    pca: int = typer.Option(256, "--pca", help="Whitened dimension (0: the feature dimension)."),
    model: str = typer.Option("resnet18", "--model", help="Embedding model: small, resnet18, resnet50, vgg16_bn."),
    image_size: int = typer.Option(224, "--image-size", help="Embedding crop size."),
    niter: int = typer.Option(10, "--niter", help="Lloyd iterations per k-means."),
    sample_per_centroid: int = typer.Option(256, "--sample-per-centroid", help="Training rows per centroid."),
    neighbor_index: bool = typer.Option(True, "--neighbor-index/--no-neighbor-index", help="Plan the row index."),
    index_memory_gb: float = typer.Option(2.0, "--index-memory-gb", help="Memory budget of the neighbour index."),
    epochs: int = typer.Option(0, "--epochs", help="Training epochs (0: no training)."),
    reassign_every: int = typer.Option(1, "--reassign-every", help="Epochs between re-clusterings."),
    arch: str = typer.Option("small", "--arch", help="Trained architecture."),
    train_image_size: int = typer.Option(32, "--train-image-size", help="Training crop size."),
    storage: str = typer.Option("local", "--storage", help="Where outputs live: local or s3."),
    calibration: Optional[str] = typer.Option(None, "--calibration",
                                              help="Calibration file written by tools/bench_*.py --calibrate."),
    as_json: Json = False,
) -> None:
    """Print, per stage, the expected wall time, peak memory per process, disk and object-storage bytes."""
    from dataengine.plan import PlanConfig, load_calibration, plan_run

    config = PlanConfig(
        num_images=images, nodes=nodes, cores=cores or os.cpu_count() or 1, gpus=gpus, model=model,
        image_size=image_size, dim=dim, levels=parse_ints(levels, "--levels"), pca_dim=pca or None,
        num_iterations=niter, sample_per_centroid=sample_per_centroid, neighbor_index=neighbor_index,
        index_memory_bytes=int(index_memory_gb * (1 << 30)), epochs=epochs, reassign_every=reassign_every,
        train_arch=arch, train_image_size=train_image_size, storage=storage,
    )
    rates = load_calibration(calibration)
    plans = plan_run(config, rates)
    known = [p.seconds for p in plans if p.seconds is not None]
    total = sum(known) if len(known) == len(plans) else None
    print_plans(plans, f"plan: {images:,} images on {nodes} node(s) x {config.cores} cores"
                + (f" x {gpus} GPUs" if gpus else "") + f"; total {_duration(total)}")
    console.print(f"rates: {calibration or 'BENCHMARKS.md defaults'} ({rates['machine']})")
    emit_summary({"config": {k: v for k, v in vars(config).items()}, "stages": [p.to_dict() for p in plans],
                  "total_seconds": total, "calibration": calibration}, as_json)
