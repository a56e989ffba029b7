"""``dataengine train`` and ``dataengine eval``: the trainer's commands.

The trainer is imported inside the commands, so the other commands (and ``--help``) never load it. The train
command's options are derived from the training config when the command is run (:func:`lazy_command`), so
that reading the config costs the other commands nothing.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any, Optional

import typer

from dataengine.app.cli import app, console, emit_summary, lazy_command, parse_ints, print_table, progress_bar
from dataengine.app.cluster import MAX_SAMPLE_HELP, SAMPLE_HELP
from dataengine.app.options import (STORAGE_OPTIONS_HELP, BatchSize, Checkpoint, DecodeWorkers, Device, Flag,
                                    ImageSize, InitSeed, Json, Layer, Overwrite, StorageOptions, Threads,
                                    config_options, given, with_parameters)
from dataengine.app.plan import DRY_RUN_HELP, show_dry_run

if TYPE_CHECKING:
    from dataengine.dryrun import DryRun
    from trainer.config import TrainConfig


def _train_flags() -> dict[str, Flag]:
    """Where the train command's options differ from their config fields' names and types."""
    return {
        "pca_dim": Flag(name="--pca"),
        "balanced_sampling": Flag(name="--balanced/--no-balanced"),
        "num_threads": Flag(name="--threads"),
        "buffer_size": Flag(name="--shuffle-buffer"),
        "levels": Flag(type=str, parse=lambda text: parse_ints(text, "--levels"), metavar="M,K",
                       help="Clusters per level: m,k (deepercluster) or k (deepcluster, clusterfit)."),
        "sample_per_centroid": Flag(type=str, parse=lambda text: parse_ints(text, "--sample-per-centroid"),
                                    metavar="P,P", help=SAMPLE_HELP),
        "max_sample_rows": Flag(parse=lambda rows: rows or None, metavar="ROWS", help=MAX_SAMPLE_HELP),
        "crop_scale": Flag(type=float, parse=lambda low: (low, 1.0), metavar="FRACTION",
                           help="Smallest random crop, as a fraction of the image's area."),
        "storage_options": Flag(type=str, parse=_storage_options, metavar="JSON", help=STORAGE_OPTIONS_HELP),
    }


def _storage_options(text: str) -> dict[str, Any]:
    from dataengine.fs import parse_storage_options

    return parse_storage_options(text)


def _train_parameters() -> list[inspect.Parameter]:
    """The train command's options: every field of the training config, once, from the config itself."""
    from trainer.config import SECTIONS, TrainConfig

    positional = [
        inspect.Parameter("shards", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                          default=typer.Argument(..., metavar="INGEST_OUT", help="Ingest output to train on.")),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            ..., "--out", metavar="RUN", help="Run folder, local or s3:// (checkpoint.pt, metrics.jsonl, features/).")),
        inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--dry-run", help=DRY_RUN_HELP)),
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=Json, default=False),
    ]
    return positional + config_options([TrainConfig, *SECTIONS.values()], _train_flags(), skip={"shards", "out"})


def train(shards: str, out: str, dry_run: bool, as_json: bool, **options: Any) -> None:
    """Train DeeperCluster (or DeepCluster, RotNet, ClusterFit) on streamed shards, resumably."""
    from dataengine.fs import join
    from indexes.distributed import process_group
    from trainer.config import TrainConfig
    from trainer.loop import run_train

    config = TrainConfig.from_flat(dict(given(options, _train_flags()), shards=shards, out=out))
    if dry_run:
        show_dry_run(_train_dry_run(config), as_json)
        return
    mode, epochs = config.mode, config.schedule.epochs
    # The backend follows the device the trainer's tensors live on: NCCL for CUDA, gloo for the CPU.
    with process_group(config.distributed.device), progress_bar(f"train {mode}", unit="steps") as update:
        def epoch_start(epoch: int, steps: int, done: int) -> None:
            update(total=steps, completed=done, description=f"train {mode} epoch {epoch + 1}/{epochs}")

        result = run_train(config, progress=update, epoch_start=epoch_start)
    rows = [[m["epoch"], f"{m.get('loss', float('nan')):.3f}", f"{m.get('samples_per_second', 0):.0f}",
             m.get("clustering", {}).get("nmi_previous", "")] for m in result.metrics]
    print_table(f"train {config.mode}: {result.epochs} epochs, {result.steps} steps in {result.seconds:.1f} s",
                ["epoch", "loss", "samples/s", "NMI t-1/t"], rows)
    emit_summary(dict(result.to_dict(), metrics=join(out, "metrics.jsonl")), as_json)


def _train_dry_run(config: "TrainConfig") -> "DryRun":
    """The trainer's dry run: its input shards, the run folder (a checkpoint of this configuration resumes, one of
    another is refused, as the run would), the plan."""
    from dataengine.dryrun import DryRun, train_plan
    from dataengine.shards import load_shard_set
    from trainer.checkpoint import read_checkpoint_state
    from trainer.run_folder import RunFolder

    if os.path.isfile(config.out):
        raise ValueError(f"{config.out} is a file, not a run folder; choose another --out")
    rows = load_shard_set(config.data.shards, config.data.storage_options).num_samples
    state = read_checkpoint_state(RunFolder(config.out, config.data.storage_options), config)
    output = "new" if state is None else "resume"
    plan = train_plan(rows, epochs=config.schedule.epochs, reassign_every=config.schedule.reassign_every,
                      arch=config.model.arch, image_size=config.data.image_size,
                      levels=tuple(config.clustering.levels), out=config.out)
    return DryRun(stage="train", config=config.to_dict(), rows=rows, output=output, todo_rows=rows, plan=plan)


lazy_command("train", lambda: with_parameters(train, _train_parameters()), train.__doc__)


@app.command("eval")
def evaluate(
    train: str = typer.Option(..., "--train", help="Labelled ingest output (class folders) to fit on."),
    test: str = typer.Option(..., "--test", help="Labelled ingest output to measure top-1 on."),
    checkpoint: Checkpoint = None,
    random: bool = typer.Option(False, "--random", help="Evaluate a randomly initialised network (seeded)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="small, vgg16_bn, resnet18 or resnet50 (default: "
                                       "the checkpoint's, or small with --random); or a pretrained model as embed's "
                                       "--model takes it (resnet50:IMAGENET1K_V2, a TorchScript file, "
                                       "module:function), evaluated without --checkpoint/--random."),
    sobel: bool = typer.Option(False, "--sobel", help="With --random: fixed grayscale + Sobel input layer."),
    layer: Layer = None,
    image_size: ImageSize = 224,
    resize_size: Optional[int] = typer.Option(None, "--resize-size", help="Shorter side before the crop "
                                              "(default: image-size up to 64, else image-size * 256/224)."),
    out: Optional[str] = typer.Option(None, "--out", help="Keep the feature stores and eval.json here "
                                      "(default: a temporary folder)."),
    batch_size: BatchSize = None,
    workers: DecodeWorkers = None,
    seed: InitSeed = 0,
    weight_decay: float = typer.Option(5e-3, "--weight-decay", help="L2 penalty of the linear probe."),
    probe_iterations: int = typer.Option(300, "--probe-iterations", help="Linear probe L-BFGS iterations at most."),
    knn_k: int = typer.Option(20, "--knn-k", help="Neighbours voting in the k-NN classifier."),
    device: Device = "auto",
    threads: Threads = None,
    storage_options: StorageOptions = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Linear-probe and k-NN top-1 of a checkpoint's (a pretrained or a random network's) frozen features."""
    from dataengine.fs import parse_storage_options
    from trainer.evaluation import EvalConfig, run_eval

    config = EvalConfig(
        train=train, test=test, checkpoint=checkpoint, random=random, arch=arch, sobel=sobel, layer=layer,
        image_size=image_size, resize_size=resize_size, out=out, batch_size=batch_size,
        workers=min(4, os.cpu_count() or 1) if workers is None else workers, seed=seed,
        weight_decay=weight_decay, probe_iterations=probe_iterations, knn_k=knn_k, device=device,
        num_threads=threads,
        storage_options=parse_storage_options(storage_options), overwrite=overwrite,
    )
    with progress_bar("eval: embed rows") as update:
        result = run_eval(config, progress=lambda rows: update(rows))
    console.print(f"linear top-1 {result.linear_top1:.4f}, k-NN top-1 {result.knn_top1:.4f} ({result.num_train} "
                  f"train, {result.num_test} test rows, {result.num_classes} classes, {result.feature_dim}-d "
                  f"{result.model['arch']} features) in {result.seconds:.1f} s")
    emit_summary(result.to_dict(), as_json)
