"""The training loop: DeeperCluster, DeepCluster, RotNet and ClusterFit on streamed shards.

Every ``reassign_every`` epochs (DeeperCluster, DeepCluster) the current backbone embeds the training set
without rotation and with center crops (the embed stage, into ``RUN/features/epochNNN``), the features are
PCA-whitened, l2-normalised and clustered (the cluster stage, stored as the named clustering
``epochNNN``), the heads are re-initialised, and training goes on for ``reassign_every`` epochs. ClusterFit
clusters the features of a given network once and trains a new network from scratch on those labels;
RotNet needs no clustering. After every epoch one JSON line goes to ``RUN/metrics.jsonl``: losses,
rotation and cluster accuracy, NMI between consecutive clusterings and against each metadata kind, and
samples/s.

Checkpoints (``RUN/checkpoint.pt``, written atomically every ``checkpoint_every`` steps and at the end of
every epoch) hold the backbone, heads, optimizers, epoch and step, the clustering in use and the RNG states
(the sub-class heads in one file per rank, see :mod:`trainer.checkpoint`); they load with
``torch.load(weights_only=True)``, and ``dataengine embed --checkpoint RUN`` reads them.
After a SIGKILL, re-running the same command continues from the last checkpoint with exactly the batches an
uninterrupted run would have used (the stream is a pure function of seed, epoch, rank, worker and position).

The network, heads and batches live on ``device`` (CUDA when available by default; batches are pinned and
copied asynchronously, the backbone uses channels-last batches there), forward passes optionally under
bfloat16 autocast, the backbone optionally compiled. Over several ranks the backbone and the replicated head
are data-parallel (DDP) and DeeperCluster's sub-class heads model-parallel (:mod:`trainer.parallel`).

Modules: :mod:`trainer.config` (the run's options), :mod:`trainer.network` (backbone, heads, optimizers),
:mod:`trainer.labels` (targets of a clustering), :mod:`trainer.recluster` (embed + cluster inside the run),
:mod:`trainer.step` (an epoch's input, a step's loss), :mod:`trainer.checkpoint`, :mod:`trainer.budget`
(time budgets) and :mod:`trainer.parallel` (DDP, synchronised BatchNorm, sharded sub-class heads; the
collectives are in :mod:`indexes.distributed`); this module runs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dataengine.locks import check_output_path, locked_output
from dataengine.models import resolve_device
from dataengine.shards import load_shard_set
from indexes import distributed
from trainer.augment import CropConfig
from trainer.budget import Budget
from trainer.checkpoint import (CHECKPOINT_FILE, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, config_json, load_sub_heads,
                                read_checkpoint_state, remove_sub_heads, save_checkpoint, save_sub_heads,
                                split_legacy_state)
from trainer.config import TrainConfig
from trainer.data import EpochPlan
from trainer.elastic import PieceCounter, StreamLayout, resume_layout
from trainer.labels import Labels
from trainer.network import Network, Optimizers
from trainer.parallel import Replicas, sync_batchnorm
from trainer.recluster import Reclusterer, clustering_name
from trainer.run_folder import RunFolder
from trainer.step import batch_loss, epoch_loader, step_inputs

logger = logging.getLogger(__name__)


METRICS_FILE = "metrics.jsonl"

Milestone = Callable[[str], None]
"""Called with the name of each step of a run whose completion is durable (tests stop the process there):
``recluster.backbone_saved``, ``recluster.embed_block`` (each block of features written),
``recluster.embedded``, ``recluster.clustered``, ``recluster.checkpointed``, ``recluster.dropping`` (an
unused feature store removed, its backbone snapshot not yet), ``checkpoint.written`` (a checkpoint complete on disk, not
yet renamed into place or uploaded), ``checkpoint.uploading`` (the first part of a checkpoint's multipart upload
sent, the upload not complete; remote run folders only), ``epoch.ending`` (an epoch's record made, its checkpoint not yet written) and
``epoch.saved``."""


@dataclass
class TrainResult:
    """Summary of a run."""

    out: str
    checkpoint: str
    epochs: int
    steps: int
    seconds: float
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["last"] = self.metrics[-1] if self.metrics else {}
        values.pop("metrics")
        return values


@dataclass
class EpochProgress:
    """The epoch in progress, checkpointed with the run so that a resumed epoch logs what an uninterrupted one
    would: its record so far (epoch number, the clustering made at its start) and the sums of its steps."""

    record: dict[str, Any]
    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    """Seconds spent in steps (over the sessions of the run), for the samples/s figure."""
    stream: dict[str, Any] | None = None
    """Where the epoch's input stands (:class:`trainer.elastic.StreamLayout` as JSON); ``None`` before its first
    step, and in checkpoints written before it was recorded (read as laid out for the resuming ranks)."""

    def add(self, stats: dict[str, Any], images: int) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps, self.images = self.steps + 1, self.images + images

    def finish(self, world_size: int) -> dict[str, Any]:
        """The epoch's metrics record: the mean of every statistic over its steps, steps and samples/s."""
        return self.record | {key: value / max(self.steps, 1) for key, value in self.sums.items()} | {
            "steps": self.steps, "samples_per_second": self.images * world_size / max(self.seconds, 1e-9)}


class Trainer:
    """One training run (all ranks of the process group construct one and call :meth:`run`)."""

    def __init__(self, config: TrainConfig, progress: Callable[[int], None] | None = None,
                 milestone: Milestone | None = None,
                 epoch_start: Callable[[int, int, int], None] | None = None) -> None:
        from dataengine.shards import register_fsspec_opener

        self.config = config
        self.progress = progress
        self.epoch_start = epoch_start
        self.milestone: Milestone = milestone or (lambda _name: None)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.device = resolve_device(config.distributed.device)
        self.folder = RunFolder(config.out, config.data.storage_options)
        register_fsspec_opener(config.data.storage_options)
        self.shard_set = load_shard_set(config.data.shards, config.data.storage_options)
        self.network = Network(config)
        if config.model.init and config.mode != "clusterfit":
            self._load_backbone(config.model.init)
        self._place_network()
        self.replicas = Replicas(self.network, str(self.device), config.distributed.compile)
        self.optimizers = Optimizers(config.optim, self.network)
        self.reclusterer = Reclusterer(config, self.rank, self.milestone, self.folder)
        self.labels: Labels | None = None
        self.previous: Labels | None = None
        self.saves, self.sub_heads_tag = 0, ""
        self.epoch, self.step, self.total_steps = 0, 0, 0
        self.current: EpochProgress | None = None
        self.pieces: PieceCounter | None = None
        self.metrics: list[dict[str, Any]] = []
        self.budget = Budget(config.schedule.time_budget, config.schedule.budget_clock)
        self.crop = CropConfig(size=config.data.image_size, scale=tuple(config.data.crop_scale))

    # -------------------------------------------------------------------------------------- state

    @property
    def checkpoint_path(self) -> str:
        return self.folder.child(CHECKPOINT_FILE)

    def _load_backbone(self, path: str) -> None:
        from dataengine.models import read_checkpoint
        from dataengine.pretrained import build_arch_backbone, names_pretrained_model, parse_model_spec

        if names_pretrained_model(path):
            spec, arch = parse_model_spec(path), self.config.model.arch
            if spec.kind != "torchvision" or spec.arch != arch:
                raise ValueError(f"--init {path}: a pretrained initialisation is torchvision weights of --arch "
                                 f"{arch} (e.g. {arch}:DEFAULT), or a trainer checkpoint")
            backbone, record = build_arch_backbone(spec, self.config.model.sobel, self.config.seed)
            self.network.backbone.load_state_dict(backbone.state_dict())
            logger.info("backbone initialised with %s from %s", spec.text, record.source)
            return
        arch, sobel, state = read_checkpoint(path, self.config.data.storage_options)
        model = self.config.model
        if (arch, sobel) != (model.arch, model.sobel):
            raise ValueError(f"{path} holds a {arch} backbone (sobel={sobel}); this run is {model.arch} "
                             f"(sobel={model.sobel})")
        self.network.backbone.load_state_dict(state)

    def _place_network(self) -> None:
        """Move the network to the device (channels-last on CUDA) and synchronise its BatchNorm if asked."""
        network = self.network.to(self.device)
        if self.device.type == "cuda":
            network.to(memory_format=torch.channels_last)
            network.channels_last = True
        if self.config.distributed.sync_bn:
            network.backbone = sync_batchnorm(network.backbone, self.device)

    def _set_heads(self, labels: Labels, epoch: int) -> None:
        """Fresh heads (this rank's shard of the sub-class heads) and head optimizers; the backbone's optimizer
        keeps its momentum."""
        self.network.set_heads(self.config, labels, epoch, self.rank, self.world_size)
        self.replicas.wrap_head()
        self.optimizers.reset_heads()

    def save(self) -> None:
        """Write the full checkpoint durably (every rank calls it; every rank writes its shard of the sub-class
        heads, rank 0 the rest): once this returns it survives any kill."""
        self._record_stream()
        self.saves += 1
        tag, previous = "", self.sub_heads_tag
        if self.network.sub_heads is not None:
            tag = f"{self.saves:08d}"
            save_sub_heads(self.folder, tag, self.rank, self._sub_heads_state())
            distributed.barrier()
        self.sub_heads_tag = tag
        if self.rank != 0:
            return
        optimizers, shards = self.optimizers, self.network.shards
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": self.config.model.arch,
            "sobel": self.config.model.sobel, "mode": self.config.mode,
            "backbone": _cpu(self.network.backbone.state_dict()), "head": _cpu(self.network.head.state_dict()),
            "optimizer": _cpu(optimizers.backbone.state_dict()),
            "head_optimizer": _cpu(optimizers.head.state_dict()) if optimizers.head else None,
            "sub_heads": {"tag": tag, "bounds": list(shards.bounds),
                          "sub_counts": self.network.sub_heads.sub_counts} if tag else None,
            "saves": self.saves, "epoch": self.epoch, "step": self.step, "total_steps": self.total_steps,
            "clustering": self.labels.name if self.labels else "",
            "previous_clustering": self.previous.name if self.previous else "",
            "torch_rng": torch.get_rng_state(), "elapsed": self.budget.elapsed,
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "metrics": json.dumps(self.metrics), "config": config_json(self.config),
            "epoch_progress": json.dumps(asdict(self.current)) if self.current else "",
        }
        save_checkpoint(self.folder, state, before_publish=lambda: self.milestone("checkpoint.written"),
                        on_part=lambda: self.milestone("checkpoint.uploading"))
        if previous and previous != tag:
            remove_sub_heads(self.folder, only=previous)

    def _sub_heads_state(self) -> dict[str, Any]:
        heads, optimizer = self.network.sub_heads, self.optimizers.sub_heads
        momentum = [optimizer.state.get(p, {}).get("momentum_buffer") for p in (heads.sub_weight, heads.sub_bias)]
        return _cpu({"first": heads.first, "stop": heads.stop, "weight": heads.sub_weight.detach(),
                     "bias": heads.sub_bias.detach(), "momentum_weight": momentum[0], "momentum_bias": momentum[1]})

    def _resume(self) -> bool:
        state = read_checkpoint_state(self.folder, self.config)
        if state is None:
            return False
        self.network.backbone.load_state_dict(state["backbone"])
        self.epoch, self.step, self.total_steps = state["epoch"], state["step"], state["total_steps"]
        self.saves, self.metrics = state.get("saves", 0), json.loads(state["metrics"])
        self.current = _epoch_progress(state)
        self.budget.elapsed_before = state["elapsed"]
        if state["previous_clustering"]:
            self.previous = self.reclusterer.labels_of(state["previous_clustering"])
        if state["clustering"]:
            self.labels = self.reclusterer.labels_of(state["clustering"])
            self._set_heads(self.labels, 0)
        if "head_optimizer" not in state:  # versions 1 and 2: one optimizer, the whole head in the file
            sub_heads = self.network.sub_heads
            state = split_legacy_state(state, list(self.network.backbone.parameters()), self.config.mode,
                                       sub_heads.sub_counts if sub_heads is not None else None)
        self.network.head.load_state_dict(state["head"])
        if state.get("sub_heads"):
            self._load_sub_heads(state["sub_heads"])
            self.sub_heads_tag = state["sub_heads"].get("tag", "")
        self.optimizers.backbone.load_state_dict(state["optimizer"])
        if self.optimizers.head is not None:
            self.optimizers.head.load_state_dict(state["head_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        logger.info("resumed %s at epoch %d step %d", self.config.out, self.epoch, self.step)
        return True

    def _load_sub_heads(self, reference: dict[str, Any]) -> None:
        """This rank's rows of the checkpoint's sub-class heads and their momentum."""
        heads, optimizer = self.network.sub_heads, self.optimizers.sub_heads
        rows = load_sub_heads(self.folder, reference, heads.first, heads.stop)
        with torch.no_grad():
            heads.sub_weight.copy_(rows["weight"])
            heads.sub_bias.copy_(rows["bias"])
        momentum = {index: {"momentum_buffer": rows[key]}
                    for index, key in enumerate(("momentum_weight", "momentum_bias")) if rows[key] is not None}
        optimizer.load_state_dict({"state": momentum, "param_groups": optimizer.state_dict()["param_groups"]})

    # -------------------------------------------------------------------------------------- clustering

    def recluster(self, epoch: int) -> dict[str, Any]:
        """Embed the training set with the current backbone and cluster it; rebuild the heads and their optimizers
        (the backbone's keeps its momentum).

        The feature stores this makes unused are not removed here: see :meth:`_start_epoch`."""
        labels = self.reclusterer.run(epoch, self.network.backbone, self.network.feature_dim)
        self.previous, self.labels = self.labels, labels
        self._set_heads(self.labels, epoch)
        return self.reclusterer.metrics(self.labels, self.previous)

    def _needs_clustering(self, epoch: int) -> bool:
        mode = self.config.mode
        if mode == "rotnet":
            return False
        if mode == "clusterfit":
            return self.labels is None
        return epoch % self.config.schedule.reassign_every == 0 or self.labels is None

    # -------------------------------------------------------------------------------------- training

    def _start_epoch(self) -> None:
        """Begin ``self.epoch``, re-clustering first when it is due.

        After a re-clustering the checkpoint is written before anything is removed: until it is on disk the
        last checkpoint names the previous clusterings, whose feature stores a resume reads."""
        self.current, self.pieces = EpochProgress({"epoch": self.epoch}), None
        budget = self.budget
        if not (self._needs_clustering(self.epoch) and budget.time_to_recluster(self.labels is not None)):
            return
        started, started_clock = time.perf_counter(), budget.clock()
        clustering = self.recluster(self.epoch)
        clustering["seconds"] = time.perf_counter() - started
        budget.recluster_seconds = budget.clock() - started_clock
        self.current.record["clustering"] = clustering
        self.save()
        self.milestone("recluster.checkpointed")
        self.reclusterer.drop_unused({labels.name for labels in (self.labels, self.previous) if labels is not None})

    def train_epoch(self, epoch: int) -> None:
        """Train on the rest of ``epoch`` (from ``self.step``), adding every step to ``self.current``."""
        plan = self._epoch_plan(epoch)
        loader, steps = epoch_loader(self.config, self.shard_set, self.labels, self.crop, plan,
                                     pin_memory=self.device.type == "cuda")
        self._lay_out_stream(plan, steps)
        if self.epoch_start:
            self.epoch_start(epoch, steps, self.step)
        self.network.train()
        current, start = self.current, time.perf_counter()
        for images, rows, *pieces in loader:
            if self.step >= steps or self._out_of_time():
                break
            # Copied from pinned memory while the rotations are drawn; rotated on the device.
            images = images.to(self.device, non_blocking=True)
            inputs, targets = step_inputs(self.config, self.labels, images, rows, self.epoch, self.rank, self.step)
            current.add(self.train_step(inputs, targets), len(images))
            if pieces:
                self.pieces.add(pieces[0])
            self.step, self.total_steps = self.step + 1, self.total_steps + 1
            if self.progress:
                self.progress(1)
            if self.step % self.config.schedule.checkpoint_every == 0:
                current.seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.save()
        else:
            distributed.all_true(False)
        current.seconds += time.perf_counter() - start

    def _epoch_plan(self, epoch: int) -> EpochPlan:
        """This rank's plan for the rest of ``epoch``: laid out for the ranks it started with, or (elastic resume
        with another number of ranks) on the pieces left of their sources."""
        stored = self.current.stream if self.current is not None else None
        layout = None
        if stored is not None:
            layout = resume_layout(StreamLayout.from_json(stored), self.step, self.config.data.batch_size,
                                   self.world_size)
            if layout.pieces is not None and stored.get("pieces") is None:
                logger.info("epoch %d: %d ranks continue what %d ranks left after %d steps", epoch, self.world_size,
                            layout.world_size, self.step)
        return EpochPlan(epoch=epoch, rank=self.rank, world_size=self.world_size, skip_batches=self.step,
                         layout=layout)

    def _lay_out_stream(self, plan: EpochPlan, steps: int) -> None:
        """Record the epoch's stream layout (at its first step: these ranks, ``steps`` steps each) and count the
        items of an elastic resume's pieces from here."""
        layout = plan.layout or StreamLayout(world_size=self.world_size, workers=max(self.config.data.workers, 1),
                                             planned=steps * self.world_size * self.config.data.batch_size)
        self.current.stream = layout.to_json()
        self.pieces = PieceCounter(layout)

    def _record_stream(self) -> None:
        """Store in the epoch's progress where its input stands (a collective over the ranks after an elastic
        resume)."""
        if self.current is not None and self.pieces is not None:
            self.current.stream = self.pieces.layout_now(distributed.reducer().all_reduce_sum).to_json()

    def train_step(self, images: torch.Tensor, targets: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """One SGD step on a batch (images and targets as :func:`trainer.step.step_inputs` makes them, on any
        device); its stats."""
        images = images.to(self.device, non_blocking=True)
        targets = tuple(target.to(self.device, non_blocking=True) for target in targets)
        with self._autocast():
            loss, stats = batch_loss(self.config, self.network, images, targets, self.replicas)
        self.optimizers.zero_grad()
        loss.backward()
        self.optimizers.step()
        return stats

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast of the forward pass when ``precision`` is ``bf16`` (else nothing)."""
        if self.config.distributed.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _end_epoch(self) -> bool:
        """Log the epoch's record, then checkpoint, then rewrite ``metrics.jsonl`` from the checkpoint's records
        (so a kill in between never leaves a line the resumed run would write twice). Returns whether the time
        budget was spent before the checkpoint: a run that stops for it leaves a checkpoint that says so, and
        its resume trains no further."""
        record = self.current.finish(self.world_size)
        if self.labels is not None:
            record["clustering_name"] = self.labels.name
        self.metrics.append(record)
        logger.info("epoch %d: %s", record["epoch"], {k: v for k, v in record.items() if k != "clustering"})
        self.epoch, self.step, self.current = self.epoch + 1, 0, None
        out_of_time = self._out_of_time()  # before the checkpoint, so that it records at least that much time
        self.milestone("epoch.ending")
        self.save()
        self.milestone("epoch.saved")
        self._write_metrics()
        return out_of_time

    def _out_of_time(self) -> bool:
        """Whether the time budget is spent, on every rank if on any (ranks stop together)."""
        return not distributed.all_true(not self.budget.out_of_time())

    def run(self) -> TrainResult:
        """Train until ``epochs`` (or the time budget), resuming from ``RUN/checkpoint.pt`` if present."""
        start = time.perf_counter()
        self.folder.make()  # only now: the inputs were checked in the constructor
        if self.rank == 0:
            self.folder.remove_leftovers()
        if self._resume():
            # Leftovers of a run killed between a checkpoint and the removals it allowed; the clustering of the
            # epoch to start (if any) may be half made: its stores are kept for the resume to finish.
            self.reclusterer.drop_unused({labels.name for labels in (self.labels, self.previous) if labels}
                                         | {clustering_name(self.epoch)})
        if self.rank == 0:  # shards of checkpoints that never were written, or were replaced
            remove_sub_heads(self.folder, keep=self.sub_heads_tag)
        self._write_metrics()  # a line written after the last checkpoint belongs to work that is redone
        out_of_time = self._out_of_time()
        while self.epoch < self.config.schedule.epochs and not out_of_time:
            if self.current is None:
                self._start_epoch()
            self.train_epoch(self.epoch)
            out_of_time = self._end_epoch()
        return TrainResult(self.config.out, self.checkpoint_path, self.epoch, self.total_steps,
                           time.perf_counter() - start, self.metrics)

    def _write_metrics(self) -> None:
        """``RUN/metrics.jsonl``: one JSON line per finished epoch, as the checkpoint records them (rank 0)."""
        if self.rank == 0:
            text = "".join(json.dumps(record, sort_keys=True, default=float) + "\n" for record in self.metrics)
            self.folder.write_text(METRICS_FILE, text)


def _epoch_progress(state: dict[str, Any]) -> EpochProgress | None:
    """The epoch in progress at a checkpoint; checkpoints written before it was recorded only say whether one
    was (``step > 0``)."""
    if state.get("epoch_progress"):
        return EpochProgress(**json.loads(state["epoch_progress"]))
    return EpochProgress({"epoch": state["epoch"]}) if state["step"] > 0 else None


def run_train(config: TrainConfig, progress: Callable[[int], None] | None = None,
              milestone: Milestone | None = None,
              epoch_start: Callable[[int, int, int], None] | None = None) -> TrainResult:
    """Train a network as ``config`` says (see the module docstring); ``milestone`` as in :data:`Milestone`.

    ``progress`` is called with 1 after every step; ``epoch_start(epoch, steps, done)`` as each epoch's training
    starts, with its number of steps and those already done (a resumed epoch).

    Raises:
        OutputUnusableError: ``out`` is a file, lies under a file, or is not writable.
        OutputLockedError: another run is writing ``out`` (rank 0 holds its lock for every rank).
    """
    from indexes.threads import set_num_threads

    check_output_path(config.out)
    set_num_threads(config.distributed.num_threads)
    trainer = Trainer(config, progress, milestone, epoch_start)  # checks the inputs; creates nothing
    with locked_output(config.out, config.data.storage_options, rank=trainer.rank,
                       all_true=distributed.all_true if trainer.world_size > 1 else None):
        return trainer.run()


def _cpu(value: Any) -> Any:
    """``value`` (a tensor, or dicts/lists of them) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(item) for item in value)
    return value
