"""``dataengine train`` and ``dataengine eval``: the trainer's commands.

The trainer is imported inside the commands, so the other commands (and ``--help``) never load it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import typer

from dataengine.app.cli import app, console, emit_summary, fail, parse_ints, print_table, progress_bar
from dataengine.app.cluster import MAX_SAMPLE_HELP, SAMPLE_HELP
from dataengine.app.plan import DRY_RUN_HELP, show_dry_run

if TYPE_CHECKING:
    from dataengine.dryrun import DryRun
    from trainer.config import TrainConfig


@app.command()
def train(
    shards: str = typer.Argument(..., help="Ingest output to train on (local or s3://)."),
    out: str = typer.Option(..., "--out", help="Run folder, local or s3:// (checkpoint.pt, metrics.jsonl, features/)."),
    mode: str = typer.Option("deepercluster", "--mode", help="deepercluster, deepcluster, rotnet or clusterfit."),
    arch: str = typer.Option("small", "--arch", help="small, vgg16_bn, resnet18 or resnet50."),
    sobel: Optional[bool] = typer.Option(None, "--sobel/--no-sobel", help="Fixed grayscale + Sobel input layer "
                                         "(default: on, off for clusterfit)."),
    image_size: int = typer.Option(224, "--image-size", help="Training crop and embedding crop size."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs."),
    reassign_every: int = typer.Option(3, "--reassign-every", help="Re-cluster every T epochs."),
    levels: str = typer.Option("4,64", "--levels", help="m,k (deepercluster) or k (deepcluster, clusterfit)."),
    pca: Optional[int] = typer.Option(None, "--pca", help="Dimension the features are projected on before the "
                                      "k-means, 0 = all (default: 64 with whitening, all without)."),
    whiten: Optional[bool] = typer.Option(None, "--whiten/--no-whiten", help="PCA-whiten and l2-normalise the "
                                          "features before the k-means (default: on, off for clusterfit)."),
    sample_per_centroid: str = typer.Option("0,256", "--sample-per-centroid", help=SAMPLE_HELP),
    max_sample_rows: int = typer.Option(1 << 20, "--max-sample-rows", help=MAX_SAMPLE_HELP),
    nmi_average: str = typer.Option("geometric", "--nmi-average", help="Normalisation of the logged NMI: geometric "
                                    "(DeepCluster's) or arithmetic (scikit-learn's default)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per step and rank."),
    lr: float = typer.Option(0.05, "--lr", help="SGD learning rate (constant)."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="SGD weight decay."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the features before the heads (after fc7)."),
    workers: int = typer.Option(1, "--workers", help="DataLoader workers per rank."),
    balanced: Optional[bool] = typer.Option(None, "--balanced/--no-balanced", help="Cluster-balanced sampling "
                                            "(default: on, off for clusterfit)."),
    shuffle_buffer: int = typer.Option(2048, "--shuffle-buffer", help="Input samples per shuffle block."),
    shards_in_flight: int = typer.Option(32, "--shards-in-flight",
                                         help="Shards each DataLoader worker reads at a time, a sample of each in turn."),
    copy_spread: int = typer.Option(4, "--copy-spread", help="Shuffle blocks over which the balanced sampling's "
                                    "copies of a row are spread."),
    samples_per_epoch: Optional[int] = typer.Option(None, "--samples-per-epoch",
                                                    help="Samples per epoch with balancing (default: all)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints."),
    init: Optional[str] = typer.Option(None, "--init", help="Checkpoint to initialise the backbone from, or "
                                       "torchvision weights of --arch from the hub cache (resnet50:IMAGENET1K_V2, "
                                       "with --no-sobel)."),
    features_from: Optional[str] = typer.Option(None, "--features-from", help="ClusterFit: network whose "
                                                "features are clustered: a checkpoint, or a pretrained model as "
                                                "embed's --model (resnet50:IMAGENET1K_V2, model.pt, mod:fn)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Stop after this many seconds."),
    budget_clock: str = typer.Option("wall", "--budget-clock",
                                     help="What --time-budget counts: wall, or cpu (this process + workers)."),
    crop_scale: float = typer.Option(0.08, "--crop-scale", help="Smallest random crop, as a fraction of the area."),
    sub_head_grad_mean: str = typer.Option("superclass", "--sub-head-grad-mean",
                                           help="Average each sub-class head's gradient over the batch, or over "
                                                "the rows of its super-class (superclass, the reference code's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of everything random."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: every core)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 (bfloat16 autocast)."),
    compile_backbone: bool = typer.Option(False, "--compile", help="Run the backbone through torch.compile."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="BatchNorm statistics over every rank's rows."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line."),
) -> None:
    """Train DeeperCluster (or DeepCluster, RotNet, ClusterFit) on streamed shards, resumably."""
    from dataengine.errors import DataEngineError
    from dataengine.fs import join, parse_storage_options
    from indexes.distributed import process_group
    from trainer.config import (ClusteringConfig, DataConfig, DistributedConfig, ModelConfig, OptimConfig,
                                ScheduleConfig, TrainConfig)
    from trainer.loop import run_train

    try:
        config = TrainConfig(
            out=out, mode=mode, seed=seed,
            data=DataConfig(shards=shards, storage_options=parse_storage_options(storage_options),
                            image_size=image_size, crop_scale=(crop_scale, 1.0), batch_size=batch_size,
                            workers=workers, balanced_sampling=balanced, samples_per_epoch=samples_per_epoch,
                            buffer_size=shuffle_buffer, shards_in_flight=shards_in_flight, copy_spread=copy_spread),
            model=ModelConfig(arch=arch, sobel=sobel, dropout=dropout, init=init),
            optim=OptimConfig(lr=lr, weight_decay=weight_decay, sub_head_grad_mean=sub_head_grad_mean),
            clustering=ClusteringConfig(levels=parse_ints(levels, "--levels"), pca_dim=pca, whiten=whiten,
                                        sample_per_centroid=parse_ints(sample_per_centroid, "--sample-per-centroid"),
                                        max_sample_rows=max_sample_rows or None, nmi_average=nmi_average,
                                        features_from=features_from),
            schedule=ScheduleConfig(epochs=epochs, reassign_every=reassign_every, checkpoint_every=checkpoint_every,
                                    time_budget=time_budget, budget_clock=budget_clock),
            distributed=DistributedConfig(num_threads=threads, device=device, precision=precision,
                                          compile=compile_backbone, sync_bn=sync_bn),
        )
        if dry_run:
            show_dry_run(_train_dry_run(config), as_json)
            return
        # The backend follows the device the trainer's tensors live on: NCCL for CUDA, gloo for the CPU.
        with process_group(device), progress_bar(f"train {mode}", unit="steps") as update:
            def epoch_start(epoch: int, steps: int, done: int) -> None:
                update(total=steps, completed=done, description=f"train {mode} epoch {epoch + 1}/{epochs}")

            result = run_train(config, progress=update, epoch_start=epoch_start)
    except (ValueError, FileNotFoundError, DataEngineError) as exc:
        fail(str(exc))
    rows = [[m["epoch"], f"{m.get('loss', float('nan')):.3f}", f"{m.get('samples_per_second', 0):.0f}",
             m.get("clustering", {}).get("nmi_previous", "")] for m in result.metrics]
    print_table(f"train {mode}: {result.epochs} epochs, {result.steps} steps in {result.seconds:.1f} s",
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


@app.command("eval")
def evaluate(
    train: str = typer.Option(..., "--train", help="Labelled ingest output (class folders) to fit on."),
    test: str = typer.Option(..., "--test", help="Labelled ingest output to measure top-1 on."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Trainer checkpoint file or run folder."),
    random: bool = typer.Option(False, "--random", help="Evaluate a randomly initialised network (seeded)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="small, vgg16_bn, resnet18 or resnet50 (default: "
                                       "the checkpoint's, or small with --random); or a pretrained model as embed's "
                                       "--model takes it (resnet50:IMAGENET1K_V2, a TorchScript file, "
                                       "module:function), evaluated without --checkpoint/--random."),
    sobel: bool = typer.Option(False, "--sobel", help="With --random: fixed grayscale + Sobel input layer."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Feature layer (default: the penultimate)."),
    image_size: int = typer.Option(224, "--image-size", help="Center-crop side fed to the network."),
    resize_size: Optional[int] = typer.Option(None, "--resize-size", help="Shorter side before the crop "
                                              "(default: image-size up to 64, else image-size * 256/224)."),
    out: Optional[str] = typer.Option(None, "--out", help="Keep the feature stores and eval.json here "
                                      "(default: a temporary folder)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward (default: automatic)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding processes (default min(4, cores))."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    weight_decay: float = typer.Option(5e-3, "--weight-decay", help="L2 penalty of the linear probe."),
    probe_iterations: int = typer.Option(300, "--probe-iterations", help="Linear probe L-BFGS iterations at most."),
    knn_k: int = typer.Option(20, "--knn-k", help="Neighbours voting in the k-NN classifier."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's)."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help="fsspec options as JSON."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace feature stores of another model in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary as the last line."),
) -> None:
    """Linear-probe and k-NN top-1 of a checkpoint's (a pretrained or a random network's) frozen features."""
    from dataengine.errors import DataEngineError
    from dataengine.fs import parse_storage_options
    from dataengine.models import WeightsMismatchError
    from trainer.evaluation import EvalConfig, run_eval

    try:
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
    except (ValueError, FileNotFoundError, DataEngineError, MemoryError, WeightsMismatchError) as exc:
        fail(str(exc))
    console.print(f"linear top-1 {result.linear_top1:.4f}, k-NN top-1 {result.knn_top1:.4f} ({result.num_train} "
                  f"train, {result.num_test} test rows, {result.num_classes} classes, {result.feature_dim}-d "
                  f"{result.model['arch']} features) in {result.seconds:.1f} s")
    emit_summary(result.to_dict(), as_json)
