"""``dataengine synth``: write the synthetic YFCC100M-like corpus (photos, metadata, ground truth)."""

from __future__ import annotations

from typing import Optional

import typer

from dataengine.app.cli import Timer, app, console, emit_summary, print_table, progress_bar
from dataengine.app.options import Json, Overwrite, StorageOptions


@app.command()
def synth(
    out: str = typer.Argument(..., metavar="OUT", help="Output folder (local path or fsspec URL)."),
    num_images: int = typer.Option(2000, "--num-images", help="Photo rows (videos come on top)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    num_classes: int = typer.Option(12, "--num-classes", help="Latent visual classes (2-16)."),
    num_users: Optional[int] = typer.Option(None, "--num-users", help="Users (default: max(8, num_images // 20))."),
    min_size: int = typer.Option(64, "--min-size", help="Smallest image side in pixels."),
    max_size: int = typer.Option(128, "--max-size", help="Largest image side in pixels."),
    no_anomalies: bool = typer.Option(False, "--no-anomalies", help="No duplicate, corrupt or missing files."),
    near_duplicates: int = typer.Option(
        0, "--near-duplicates", help="Photos that are resized, re-encoded or cropped copies of earlier ones."),
    overwrite: Overwrite = False,
    storage_options: StorageOptions = None,
    as_json: Json = False,
) -> None:
    """Write OUT/images/<photo_id>.jpg, OUT/metadata.tsv (YFCC100M, 25 columns), OUT/classes.tsv and more."""
    from dataengine.fs import parse_storage_options
    from dataengine.synth import SynthConfig, generate_corpus

    config = SynthConfig(num_images=num_images, seed=seed, num_classes=num_classes, num_users=num_users,
                         min_image_size=min_size, max_image_size=max_size, anomalies=not no_anomalies,
                         num_near_duplicates=near_duplicates)
    with Timer() as timer, progress_bar("synth images", total=num_images) as update:
        summary = generate_corpus(out, config, progress=update, overwrite=overwrite,
                                  storage_options=parse_storage_options(storage_options))
    if summary.skipped:
        console.print(f"{out}: already holds this corpus; nothing to do")
    print_table(f"synth: {summary.num_images} photos, {summary.num_videos} videos, {summary.num_users} users",
                ["class", "photos"], [[name, size] for name, size in summary.class_sizes.items()])
    console.print(f"{out}: {summary.num_rows} rows in {timer.seconds:.1f} s; expected ingest counts "
                  + ", ".join(f"{k}={v}" for k, v in summary.expected_counts.items()))
    emit_summary(dict(summary.to_dict(), seconds=timer.seconds), as_json)
