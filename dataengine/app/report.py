"""``dataengine report``: NMI of a clustering against the metadata, and a self-contained HTML report."""

from __future__ import annotations

from typing import List, Optional

import typer

from dataengine.app.cli import app, console, emit_summary, print_table, progress_bar
from dataengine.app.options import Json, StorageOptions


@app.command()
def report(
    store: str = typer.Argument(..., metavar="STORE", help="Feature store (written by `dataengine embed`), local "
                                "path or s3://."),
    clustering: str = typer.Option(..., "--clustering", help="Name of the clustering to report on."),
    out: str = typer.Option(..., "--out", help="Output folder for index.html, report.json, plots and grids."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", help="Another clustering (repeatable): NMI "
                                                "between them and along the sequence NAME, COMPARE..."),
    level: Optional[int] = typer.Option(None, "--level", help="Level reported in detail (default: the finest)."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Ingest output with the photos (default: the "
                                         "store's source)."),
    thumbnails: bool = typer.Option(True, "--thumbnails/--no-thumbnails", help="Draw photo grids of selected "
                                    "clusters."),
    gps_cell_deg: float = typer.Option(1.0, "--gps-cell-deg", help="Side of the GPS grid cells in degrees."),
    block_rows: int = typer.Option(1 << 20, "--block-rows", help="Rows read from the store at a time."),
    seed: int = typer.Option(0, "--seed", help="Seed of the chance levels and of the photos shown."),
    nmi_average: str = typer.Option("geometric", "--nmi-average", help="Normalisation of the NMI: geometric "
                                    "(I/sqrt(H(A)H(B)), DeepCluster's) or arithmetic (scikit-learn's default)."),
    storage_options: StorageOptions = None,
    as_json: Json = False,
) -> None:
    """Score a clustering against hashtags, users, GPS, devices and labels; write report.json and index.html."""
    from dataengine.fs import parse_storage_options
    from dataengine.report import ReportConfig, run_report
    from dataengine.report.run import progress_total

    config = ReportConfig(store=store, clustering=clustering, out=out, compare=tuple(compare or ()), level=level,
                          shards=shards, thumbnails=thumbnails, gps_cell_deg=gps_cell_deg, block_rows=block_rows,
                          seed=seed, nmi_average=nmi_average,
                          storage_options=parse_storage_options(storage_options))
    total = progress_total(config) if console.is_terminal else None
    with progress_bar("report", total=total) as update:
        result = run_report(config, progress=update)
    rows = [[kind, r.nmi, r.chance_nmi, r.ami, "within noise" if r.near_chance else "", r.coverage]
            for kind, r in result.nmi.items()]
    print_table(f"{result.clustering} level {result.level}: {result.num_clusters} clusters, {result.num_rows} rows "
                f"(NMI {config.nmi_average})", ["metric", "NMI", "chance NMI", "AMI", "vs chance", "coverage"], rows)
    if result.thumbnail_failures:
        console.print(f"[yellow]{len(result.thumbnail_failures)} photos could not be shown (see report.json)")
    console.print(f"report: {result.html}")
    emit_summary(result.summary(), as_json)
