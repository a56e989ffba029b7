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
every epoch) hold the backbone, heads, optimizer, epoch and step, the clustering in use and the RNG states;
they load with ``torch.load(weights_only=True)``, and ``dataengine embed --checkpoint RUN`` reads them.
After a SIGKILL, re-running the same command continues from the last checkpoint with exactly the batches an
uninterrupted run would have used (the stream is a pure function of seed, epoch, rank, worker and position).

Modules: :mod:`trainer.config` (the run's options), :mod:`trainer.network` (backbone and heads),
:mod:`trainer.labels` (targets of a clustering), :mod:`trainer.recluster` (embed + cluster inside the run),
:mod:`trainer.step` (an epoch's input, a step's loss), :mod:`trainer.checkpoint`, :mod:`trainer.budget`
(time budgets) and :mod:`trainer.parallel` (gradient averaging; the other collectives are in
:mod:`indexes.distributed`); this module runs them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dataengine.shards import load_shard_set
from indexes import distributed
from trainer.augment import CropConfig
from trainer.budget import Budget
from trainer.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, checkpoint_path, config_json, \
    read_checkpoint_state, save_atomic
from trainer.config import TrainConfig
from trainer.data import EpochPlan
from trainer.labels import Labels
from trainer.network import Network, new_head
from trainer.parallel import all_reduce_grads
from trainer.recluster import Reclusterer
from trainer.step import epoch_loader, step_loss

logger = logging.getLogger(__name__)


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


class Trainer:
    """One training run (all ranks of the process group construct one and call :meth:`run`)."""

    def __init__(self, config: TrainConfig, progress: Callable[[int], None] | None = None) -> None:
        from dataengine.shards import register_fsspec_opener

        self.config = config
        self.progress = progress
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        os.makedirs(config.out, exist_ok=True)
        register_fsspec_opener(config.data.storage_options)
        self.shard_set = load_shard_set(config.data.shards, config.data.storage_options)
        self.network = Network(config)
        if config.model.init and config.mode != "clusterfit":
            self._load_backbone(config.model.init)
        self.reclusterer = Reclusterer(config, self.rank)
        self.labels: Labels | None = None
        self.previous: Labels | None = None
        self.optimizer = self._optimizer()
        self.epoch, self.step, self.total_steps = 0, 0, 0
        self.metrics: list[dict[str, Any]] = []
        self.budget = Budget(config.schedule.time_budget, config.schedule.budget_clock)
        self.crop = CropConfig(size=config.data.image_size, scale=tuple(config.data.crop_scale))

    # -------------------------------------------------------------------------------------- state

    @property
    def checkpoint_path(self) -> str:
        return checkpoint_path(self.config.out)

    def _load_backbone(self, path: str) -> None:
        from dataengine.models import read_checkpoint

        arch, sobel, state = read_checkpoint(path)
        model = self.config.model
        if (arch, sobel) != (model.arch, model.sobel):
            raise ValueError(f"{path} holds a {arch} backbone (sobel={sobel}); this run is {model.arch} "
                             f"(sobel={model.sobel})")
        self.network.backbone.load_state_dict(state)

    def _optimizer(self) -> torch.optim.Optimizer:
        optim = self.config.optim
        return torch.optim.SGD(self.network.parameters(), lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)

    def save(self) -> None:
        """Write the full checkpoint atomically (rank 0)."""
        if self.rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": self.config.model.arch,
            "sobel": self.config.model.sobel, "mode": self.config.mode,
            "backbone": self.network.backbone.state_dict(),
            "head": self.network.head.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step": self.step, "total_steps": self.total_steps,
            "clustering": self.labels.name if self.labels else "",
            "previous_clustering": self.previous.name if self.previous else "",
            "torch_rng": torch.get_rng_state(), "elapsed": self.budget.elapsed,
            "metrics": json.dumps(self.metrics), "config": config_json(self.config),
        }
        save_atomic(state, self.checkpoint_path)

    def _resume(self) -> bool:
        state = read_checkpoint_state(self.checkpoint_path, self.config)
        if state is None:
            return False
        self.network.backbone.load_state_dict(state["backbone"])
        self.epoch, self.step, self.total_steps = state["epoch"], state["step"], state["total_steps"]
        self.metrics = json.loads(state["metrics"])
        self.budget.elapsed_before = state["elapsed"]
        if state["previous_clustering"]:
            self.previous = self.reclusterer.labels_of(state["previous_clustering"])
        if state["clustering"]:
            self.labels = self.reclusterer.labels_of(state["clustering"])
            self.network.head = new_head(self.config, self.network.feature_dim, self.labels, 0)
        self.network.head.load_state_dict(state["head"])
        self.optimizer = self._optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed %s at epoch %d step %d", self.config.out, self.epoch, self.step)
        return True

    # -------------------------------------------------------------------------------------- clustering

    def recluster(self, epoch: int) -> dict[str, Any]:
        """Embed the training set with the current backbone and cluster it; rebuild the head."""
        labels = self.reclusterer.run(epoch, self.network.backbone, self.network.feature_dim)
        self.previous, self.labels = self.labels, labels
        self.network.head = new_head(self.config, self.network.feature_dim, self.labels, epoch)
        self.optimizer = self._optimizer()
        metrics = self.reclusterer.metrics(self.labels, self.previous)
        self.reclusterer.drop_old_stores({labels.name for labels in (self.labels, self.previous)
                                          if labels is not None})
        return metrics

    def _needs_clustering(self, epoch: int) -> bool:
        mode = self.config.mode
        if mode == "rotnet":
            return False
        if mode == "clusterfit":
            return self.labels is None
        return epoch % self.config.schedule.reassign_every == 0 or self.labels is None

    # -------------------------------------------------------------------------------------- training

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        plan = EpochPlan(epoch=epoch, rank=self.rank, world_size=self.world_size, skip_batches=self.step)
        loader, steps = epoch_loader(self.config, self.shard_set, self.labels, self.crop, plan)
        self.network.train()
        sums: dict[str, float] = {}
        count, start, images_seen = 0, time.perf_counter(), 0
        for images, rows in loader:
            if self.step >= steps or not distributed.all_true(not self.budget.out_of_time()):
                break
            loss, stats = step_loss(self.config, self.network, self.labels, images, rows, self.epoch, self.rank,
                                    self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_grads(self.network)
            self.optimizer.step()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count, images_seen = count + 1, images_seen + len(images)
            self.step, self.total_steps = self.step + 1, self.total_steps + 1
            if self.progress:
                self.progress(1)
            if self.step % self.config.schedule.checkpoint_every == 0:
                self.save()
        else:
            distributed.all_true(False)
        seconds = time.perf_counter() - start
        return {key: value / max(count, 1) for key, value in sums.items()} | {
            "steps": count, "samples_per_second": images_seen * self.world_size / max(seconds, 1e-9)}

    def run(self) -> TrainResult:
        """Train until ``epochs`` (or the time budget), resuming from ``RUN/checkpoint.pt`` if present."""
        start = time.perf_counter()
        self._resume()
        budget = self.budget
        while self.epoch < self.config.schedule.epochs and not budget.out_of_time():
            record: dict[str, Any] = {"epoch": self.epoch}
            if (self.step == 0 and self._needs_clustering(self.epoch)
                    and budget.time_to_recluster(self.labels is not None)):
                started, started_clock = time.perf_counter(), budget.clock()
                record["clustering"] = self.recluster(self.epoch)
                record["clustering"]["seconds"] = time.perf_counter() - started
                budget.recluster_seconds = budget.clock() - started_clock
            record.update(self.train_epoch(self.epoch))
            if self.labels is not None:
                record["clustering_name"] = self.labels.name
            self.metrics.append(record)
            self._write_metrics(record)
            self.epoch, self.step = self.epoch + 1, 0
            self.save()
        return TrainResult(self.config.out, self.checkpoint_path, self.epoch, self.total_steps,
                           time.perf_counter() - start, self.metrics)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(os.path.join(self.config.out, "metrics.jsonl"), "a") as handle:
                handle.write(json.dumps(record, sort_keys=True, default=float) + "\n")
            logger.info("epoch %d: %s", record["epoch"], {k: v for k, v in record.items() if k != "clustering"})


def run_train(config: TrainConfig, progress: Callable[[int], None] | None = None) -> TrainResult:
    """Train a network as ``config`` says (see the module docstring)."""
    from indexes.threads import set_num_threads

    set_num_threads(config.distributed.num_threads)
    return Trainer(config, progress).run()
