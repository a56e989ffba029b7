"""``dataengine demo``: the whole pipeline on the built-in synthetic corpus, end to end.

Each stage writes into its own folder under ``out`` and is resumable, so re-running the demo skips what
is done. The stages are the library functions the CLI commands call, run with demo-sized settings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import typer

from dataengine.app.cli import app, console, emit_summary, print_table
from dataengine.app.curate import print_curate_summary
from dataengine.app.options import Json

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of the demo run."""

    out: str = "demo-out"
    """Folder receiving every stage's output."""
    num_images: int = 1500
    """Photos in the synthetic corpus."""
    near_duplicates: int | None = None
    """Planted near-duplicates (resized, re-encoded, cropped copies) for the curation to find; ``None`` = one
    photo in 20."""
    seed: int = 0
    """Seed of the corpus and of every stage."""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Worker processes for the stages that use them."""

    def __post_init__(self) -> None:
        if self.num_images < 50:
            raise ValueError(f"num_images must be >= 50 for a meaningful demo, got {self.num_images}")


@dataclass
class DemoResult:
    """What each stage produced (paths and headline figures) and how long it took."""

    out: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def _stage(result: DemoResult, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    start = time.perf_counter()
    logger.info("demo: %s ...", name)
    summary = fn()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    result.stages[name] = summary
    logger.info("demo: %s done in %.1f s", name, summary["seconds"])


# Near-duplicate threshold of the demo's embedding (small convnet at 32, random init) and clustering (4 x 8,
# PCA 32): the best-F1 threshold on a validation corpus, `python tools/eval_dedup.py --images 2000` (RESULTS.md).
DEMO_DEDUP_THRESHOLD = 0.92


def run_demo(config: DemoConfig) -> DemoResult:
    """Run synth -> ingest -> embed -> cluster -> report -> train, then write a curated subset."""
    from dataengine.cluster import ClusterConfig, run_cluster
    from dataengine.clustering import layout_path
    from dataengine.curate import CurateConfig, run_curate
    from dataengine.embed import EmbedConfig, run_embed
    from dataengine.ingest import IngestConfig, run_ingest
    from dataengine.report import ReportConfig, run_report
    from dataengine.synth import SynthConfig, generate_corpus
    from trainer.config import ClusteringConfig, DataConfig, ModelConfig, ScheduleConfig, TrainConfig
    from trainer.loop import run_train

    start = time.perf_counter()
    result = DemoResult(out=os.path.abspath(config.out))
    corpus = os.path.join(result.out, "corpus")
    shards = os.path.join(result.out, "ingest")

    def synth() -> dict[str, Any]:
        near_duplicates = config.num_images // 20 if config.near_duplicates is None else config.near_duplicates
        summary = generate_corpus(corpus, SynthConfig(num_images=config.num_images, seed=config.seed,
                                                      num_near_duplicates=near_duplicates))
        return {"path": corpus, "rows": summary.num_rows, "classes": summary.num_classes}

    def ingest() -> dict[str, Any]:
        ingested = run_ingest(IngestConfig(yfcc=os.path.join(corpus, "metadata.tsv"),
                                           images=os.path.join(corpus, "images"), out=shards, shard_size=500,
                                           workers=config.workers))
        return {"path": shards, "shards": ingested.num_shards, "samples": ingested.num_samples,
                "counts": ingested.counts}

    store = os.path.join(result.out, "features.zarr")

    def embed() -> dict[str, Any]:
        embedded = run_embed(EmbedConfig(shards=shards, out=store, model="small", image_size=32, workers=1,
                                         seed=config.seed))
        return {"path": store, "rows": embedded.num_rows, "dim": embedded.dim, "model": "small (random init)"}

    def cluster() -> dict[str, Any]:
        clustered = run_cluster(ClusterConfig(store=store, name="demo", levels=(4, 8), pca_dim=32,
                                              seed=config.seed, overwrite=True))
        return {"path": f"{store}/{layout_path('demo')}", "clusters": clustered.num_clusters,
                "objective": clustered.objective, "empty_splits": clustered.empty_splits}

    def report() -> dict[str, Any]:
        reported = run_report(ReportConfig(store=store, clustering="demo", out=os.path.join(result.out, "report"),
                                           shards=shards, seed=config.seed))
        return {"path": reported.html, "nmi": {kind: round(r.nmi, 4) for kind, r in reported.nmi.items()}}

    def train() -> dict[str, Any]:
        # Two short epochs of DeeperCluster (small convnet, 32-pixel crops, re-clustering every epoch).
        run = os.path.join(result.out, "train")
        trained = run_train(TrainConfig(
            out=run, mode="deepercluster", model=ModelConfig(arch="small"),
            data=DataConfig(shards=shards, image_size=32, batch_size=64, workers=1, samples_per_epoch=768),
            clustering=ClusteringConfig(levels=(4, 8), pca_dim=32),
            schedule=ScheduleConfig(epochs=2, reassign_every=1)))
        last = trained.metrics[-1] if trained.metrics else {}
        return {"path": run, "checkpoint": trained.checkpoint, "epochs": trained.epochs, "steps": trained.steps,
                "loss": round(float(last.get("loss", float("nan"))), 4),
                "nmi_previous": last.get("clustering", {}).get("nmi_previous")}

    def curate() -> dict[str, Any]:
        # A third of the photos, balanced over the leaf clusters, without near-duplicates.
        curated = run_curate(CurateConfig(store=store, clustering="demo", out=os.path.join(result.out, "curated"),
                                          total=config.num_images // 3, seed=config.seed, shard_size=500,
                                          dedup_threshold=DEMO_DEDUP_THRESHOLD, overwrite=True))
        return dict(curated.to_dict(), path=curated.out)

    _stage(result, "synth", synth)
    _stage(result, "ingest", ingest)
    _stage(result, "embed", embed)
    _stage(result, "cluster", cluster)
    _stage(result, "report", report)
    _stage(result, "train", train)
    _stage(result, "curate", curate)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


@app.command()
def demo(
    out: str = typer.Option("demo-out", "--out", help="Folder for every stage's output."),
    num_images: int = typer.Option(1500, "--num-images", help="Photos in the synthetic corpus."),
    seed: int = typer.Option(0, "--seed", help="Seed of the corpus and every stage."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes decoding images in the ingest "
                                          "stage (0: in this process). Default: every core."),
    as_json: Json = False,
) -> None:
    """Generate the synthetic YFCC-like corpus and run the pipeline on it, printing a summary."""

    config = DemoConfig(out=out, num_images=num_images, seed=seed,
                        workers=(os.cpu_count() or 1) if workers is None else workers)
    with console.status("running the demo pipeline ..."):
        result = run_demo(config)
    rows = [[name, f"{s['seconds']:.1f}", s.get("path", "")] for name, s in result.stages.items()]
    print_table(f"demo finished in {result.seconds:.1f} s", ["stage", "seconds", "output"], rows)
    if "curate" in result.stages:
        print_curate_summary(result.stages["curate"])
    if "report" in result.stages:
        console.print(f"report: {result.stages['report']['path']}")
    if "curate" in result.stages:
        console.print(f"curated subset: {result.stages['curate']['path']}")
    emit_summary({"out": result.out, "stages": result.stages, "seconds": result.seconds}, as_json)
