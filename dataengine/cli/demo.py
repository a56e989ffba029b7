"""``dataengine demo``: every stage on the built-in synthetic corpus."""

from __future__ import annotations

import os
from typing import Optional

import typer

from dataengine.cli.app import app, console, emit_summary, fail, print_table


@app.command()
def demo(
    out: str = typer.Option("demo-out", "--out", help="Folder for every stage's output."),
    num_images: int = typer.Option(1500, "--num-images", help="Photos in the synthetic corpus."),
    seed: int = typer.Option(0, "--seed", help="Seed of the corpus and every stage."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line."),
) -> None:
    """Generate the synthetic YFCC-like corpus and run the pipeline on it, printing a summary."""
    from dataengine.cli import load_plugins
    from dataengine.demo import DemoConfig, run_demo
    from dataengine.errors import DataEngineError

    load_plugins()  # their stages (the trainer's) run after the report

    try:
        config = DemoConfig(out=out, num_images=num_images, seed=seed,
                            workers=(os.cpu_count() or 1) if workers is None else workers)
        with console.status("running the demo pipeline ..."):
            result = run_demo(config)
    except (ValueError, DataEngineError) as exc:
        fail(str(exc))
    rows = [[name, f"{s['seconds']:.1f}", s.get("path", "")] for name, s in result.stages.items()]
    print_table(f"demo finished in {result.seconds:.1f} s", ["stage", "seconds", "output"], rows)
    if "report" in result.stages:
        console.print(f"report: {result.stages['report']['path']}")
    emit_summary({"out": result.out, "stages": result.stages, "seconds": result.seconds}, as_json)
