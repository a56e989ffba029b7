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
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dataengine.models import build_backbone
from dataengine.shards import load_shard_set
from trainer.augment import CropConfig, normalize
from trainer.data import EpochPlan, ShardStream, expected_samples, make_loader
from trainer.losses import (ClusterHead, HierarchicalHead, RotationHead, local_sub_targets, rotation_sub_counts,
                            super_targets)
from trainer.rotation import random_rotations, rotate_batch
from trainer.sampler import ClusterBalance, StreamConfig, torch_generator

logger = logging.getLogger(__name__)

MODES = ("deepercluster", "deepcluster", "rotnet", "clusterfit")
BUDGET_CLOCKS = ("wall", "cpu")
CHECKPOINT_FORMAT = "trainer.checkpoint"
_TAG_INIT, _TAG_HEAD, _TAG_ROTATE = 21, 22, 23


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Configuration of a training run."""

    shards: str
    """Ingest output to train on (local or s3://)."""
    out: str
    """Run folder (local): checkpoint, metrics, feature stores of the re-clusterings."""
    mode: str = "deepercluster"
    """``deepercluster``, ``deepcluster``, ``rotnet`` or ``clusterfit``."""
    arch: str = "small"
    """Backbone architecture (``small``, ``vgg16_bn``, ``resnet18``, ``resnet50``)."""
    sobel: bool = True
    """Fixed grayscale + Sobel input layer (as in the paper)."""
    image_size: int = 224
    """Side of the training crops and of the embedding center crops."""
    resize_size: int | None = None
    """Shorter side before the embedding's center crop (default: image_size * 8 / 7, or image_size <= 64)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Area range of the random-resized crops."""
    epochs: int = 10
    """Training epochs."""
    reassign_every: int = 3
    """Re-cluster every T epochs (the paper uses 3)."""
    levels: tuple[int, ...] = (4, 64)
    """Clusters per level: ``(m, k)`` for deepercluster, ``(k,)`` for deepcluster/clusterfit."""
    pca_dim: int | None = 64
    """Whitened dimension for the clusterings."""
    kmeans_iterations: int = 10
    """Lloyd iterations per k-means."""
    balanced_sampling: bool = True
    """Draw every cluster about equally often (not for rotnet)."""
    samples_per_epoch: int | None = None
    """Expected samples per epoch over all ranks with balanced sampling (default: the dataset size)."""
    batch_size: int = 64
    """Samples per step and rank."""
    lr: float = 0.05
    """SGD learning rate (constant; the paper uses 0.1 with VGG-16)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-5
    """SGD weight decay."""
    dropout: float = 0.0
    """Dropout before the heads."""
    workers: int = 1
    """DataLoader workers per rank (decoding, augmentation)."""
    buffer_size: int = 2048
    """Shuffle buffer of the balanced stream (input samples per block)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (also at every epoch end)."""
    init: str | None = None
    """Checkpoint to initialise the backbone from (e.g. a RotNet run, as the paper does)."""
    features_from: str | None = None
    """ClusterFit: checkpoint whose features are clustered (default: ``init``)."""
    time_budget: float | None = None
    """Stop (with a checkpoint) once the run has taken this many seconds, re-clusterings included (the
    budget of method comparisons), counted across resumes."""
    budget_clock: str = "wall"
    """What ``time_budget`` counts: ``wall`` seconds, or ``cpu`` seconds of this process and its children
    (DataLoader workers included), which stay comparable when other work shares the machine."""
    seed: int = 0
    """Seed of initialisation, sampling, augmentation, rotations and clusterings."""
    num_threads: int | None = None
    """CPU threads for torch/faiss/BLAS (default: every core)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for remote shards."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {', '.join(MODES)}")
        if self.mode == "deepercluster" and len(self.levels) != 2:
            raise ValueError(f"deepercluster needs --levels m,k (two levels), got {self.levels}")
        if self.mode in ("deepcluster", "clusterfit") and len(self.levels) != 1:
            raise ValueError(f"{self.mode} clusters flat: give --levels k (one level), got {self.levels}")
        if self.mode == "clusterfit" and not (self.features_from or self.init):
            raise ValueError("clusterfit clusters the features of a given network: pass --features-from CKPT")
        for name in ("epochs", "reassign_every", "batch_size", "image_size", "checkpoint_every", "buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.budget_clock not in BUDGET_CLOCKS:
            raise ValueError(f"budget_clock={self.budget_clock!r} must be one of {', '.join(BUDGET_CLOCKS)}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1")

    @property
    def resolved_resize(self) -> int:
        if self.resize_size:
            return self.resize_size
        return self.image_size if self.image_size <= 64 else int(round(self.image_size * 8 / 7))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("storage_options")
        return values


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


# ----------------------------------------------------------------------------------------------- model


class Network(nn.Module):
    """Backbone + the head of the mode; the head is rebuilt at every re-clustering."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        torch.manual_seed(torch_generator(config.seed, _TAG_INIT).initial_seed())
        self.backbone, self.feature_dim = build_backbone(config.arch, config.sobel)
        self.dropout = nn.Dropout(config.dropout)
        self.head: nn.Module = RotationHead(self.feature_dim) if config.mode == "rotnet" else nn.Identity()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.backbone(normalize(images)))


def _new_head(config: TrainConfig, feature_dim: int, labels: "_Labels", epoch: int) -> nn.Module:
    generator = torch_generator(config.seed, _TAG_HEAD, epoch)
    if config.mode == "deepercluster":
        return HierarchicalHead(feature_dim, rotation_sub_counts(labels.counts), generator=generator)
    return ClusterHead(feature_dim, int(labels.num_clusters), generator=generator)


# ----------------------------------------------------------------------------------------------- labels


@dataclass
class _Labels:
    """Per-row targets of a clustering (row order of the store and of the shards)."""

    name: str
    balance: np.ndarray  # (N,) leaf cluster, -1 = never emitted
    parents: np.ndarray  # (N,) level-0 cluster (deepercluster) or the cluster (flat)
    local: np.ndarray  # (N,) level-1 index within the parent (deepercluster)
    counts: np.ndarray  # children per level-0 cluster (deepercluster)
    num_clusters: int

    @classmethod
    def from_store(cls, store: Any, name: str, mode: str) -> "_Labels":
        level0 = store.read_array(f"clusterings/{name}/level0").astype(np.int64)
        if mode != "deepercluster":
            k = len(store.read_array(f"clusterings/{name}/level0_sizes"))
            return cls(name, level0, level0, np.zeros_like(level0), np.zeros(0, np.int64), k)
        level1 = store.read_array(f"clusterings/{name}/level1").astype(np.int64)
        parents = store.read_array(f"clusterings/{name}/level1_parents")
        m = len(store.read_array(f"clusterings/{name}/level0_sizes"))
        targets = local_sub_targets(np.maximum(level1, 0), parents, num_parents=m)
        return cls(name, level1, np.maximum(level0, 0), targets.local, targets.counts, int(len(parents)))


# ----------------------------------------------------------------------------------------------- run


class Trainer:
    """One training run (all ranks of the process group construct one and call :meth:`run`)."""

    def __init__(self, config: TrainConfig, progress: Callable[[int], None] | None = None) -> None:
        from dataengine.shards import register_fsspec_opener

        self.config = config
        self.progress = progress
        self.rank, self.world_size = _dist_info()
        os.makedirs(config.out, exist_ok=True)
        register_fsspec_opener(config.storage_options)
        self.shard_set = load_shard_set(config.shards, config.storage_options)
        self.network = Network(config)
        if config.init and config.mode != "clusterfit":
            self._load_backbone(config.init)
        self.labels: _Labels | None = None
        self.previous: _Labels | None = None
        self.optimizer = self._optimizer()
        self.epoch, self.step, self.total_steps = 0, 0, 0
        self.metrics: list[dict[str, Any]] = []
        self.elapsed_before = 0.0  # seconds spent by earlier sessions of this run (resume)
        self.recluster_seconds = 0.0  # duration of the last re-clustering
        self.clock: Callable[[], float] = CpuClock() if config.budget_clock == "cpu" else time.perf_counter
        self.session_start = self.clock()
        self.crop = CropConfig(size=config.image_size, scale=tuple(config.crop_scale))

    # -------------------------------------------------------------------------------------- state

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.config.out, "checkpoint.pt")

    def _load_backbone(self, path: str) -> None:
        from dataengine.models import read_checkpoint

        arch, sobel, state = read_checkpoint(path)
        if (arch, sobel) != (self.config.arch, self.config.sobel):
            raise ValueError(f"{path} holds a {arch} backbone (sobel={sobel}); this run is {self.config.arch} "
                             f"(sobel={self.config.sobel})")
        self.network.backbone.load_state_dict(state)

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.network.parameters(), lr=self.config.lr, momentum=self.config.momentum,
                               weight_decay=self.config.weight_decay)

    def save(self) -> None:
        """Write the full checkpoint atomically (rank 0)."""
        if self.rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "version": 1, "arch": self.config.arch, "sobel": self.config.sobel,
            "mode": self.config.mode, "backbone": self.network.backbone.state_dict(),
            "head": self.network.head.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step": self.step, "total_steps": self.total_steps,
            "clustering": self.labels.name if self.labels else "",
            "previous_clustering": self.previous.name if self.previous else "",
            "torch_rng": torch.get_rng_state(), "elapsed": self.elapsed,
            "metrics": json.dumps(self.metrics), "config": json.dumps(self.config.to_dict()),
        }
        _save_atomic(state, self.checkpoint_path)

    def _resume(self) -> bool:
        if not os.path.exists(self.checkpoint_path):
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        wanted = json.loads(json.dumps(self.config.to_dict()))  # tuples become lists, as in the checkpoint
        if state.get("format") != CHECKPOINT_FORMAT or json.loads(state["config"]) != wanted:
            raise ValueError(f"{self.checkpoint_path} was written by another configuration; use another --out")
        self.network.backbone.load_state_dict(state["backbone"])
        self.epoch, self.step, self.total_steps = state["epoch"], state["step"], state["total_steps"]
        self.metrics = json.loads(state["metrics"])
        self.elapsed_before = state["elapsed"]
        if state["previous_clustering"]:
            self.previous = self._labels_of(state["previous_clustering"])
        if state["clustering"]:
            self.labels = self._labels_of(state["clustering"])
            self.network.head = _new_head(self.config, self.network.feature_dim, self.labels, 0)
        self.network.head.load_state_dict(state["head"])
        self.optimizer = self._optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed %s at epoch %d step %d", self.config.out, self.epoch, self.step)
        return True

    # -------------------------------------------------------------------------------------- clustering

    def _store_url(self, name: str) -> str:
        return os.path.join(self.config.out, "features", name)

    def _labels_of(self, name: str) -> _Labels:
        from dataengine.store import open_store

        return _Labels.from_store(open_store(self._store_url(name)), name, self.config.mode)

    def recluster(self, epoch: int) -> dict[str, Any]:
        """Embed the training set with the current backbone and cluster it; rebuild the head."""
        from dataengine.cluster import ClusterConfig, run_cluster
        from dataengine.embed import EmbedConfig, run_embed

        name = f"epoch{epoch:03d}"
        checkpoint = self.config.features_from or self.config.init if self.config.mode == "clusterfit" else None
        if checkpoint is None:
            checkpoint = os.path.join(self.config.out, f"backbone-{name}.pt")
            if self.rank == 0:
                _save_atomic({"arch": self.config.arch, "sobel": self.config.sobel,
                              "backbone": self.network.backbone.state_dict()}, checkpoint)
            _barrier()
        store = self._store_url(name)
        run_embed(EmbedConfig(shards=self.config.shards, out=store, checkpoint=checkpoint,
                              image_size=self.config.image_size, resize_size=self.config.resolved_resize,
                              workers=self.config.workers, dtype="float32", seed=self.config.seed,
                              storage_options=self.config.storage_options, num_threads=self.config.num_threads))
        reducer = _reducer()
        pca_dim = min(self.config.pca_dim or self.network.feature_dim, self.network.feature_dim)
        run_cluster(ClusterConfig(store=store, name=name, levels=tuple(self.config.levels), pca_dim=pca_dim,
                                  num_iterations=self.config.kmeans_iterations, seed=self.config.seed + epoch,
                                  neighbor_index=False, overwrite=True, num_threads=self.config.num_threads),
                    reducer=reducer)
        self.previous, self.labels = self.labels, self._labels_of(name)
        self.network.head = _new_head(self.config, self.network.feature_dim, self.labels, epoch)
        self.optimizer = self._optimizer()
        metrics = self._clustering_metrics(store, name)
        self._drop_old_stores()
        return metrics

    def _drop_old_stores(self) -> None:
        """Keep the feature stores of the current and the previous clustering only (N x d floats each)."""
        import shutil

        keep = {labels.name for labels in (self.labels, self.previous) if labels is not None}
        folder = os.path.join(self.config.out, "features")
        if self.rank == 0:
            for name in sorted(os.listdir(folder)):
                if name not in keep:
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                    backbone = os.path.join(self.config.out, f"backbone-{name}.pt")
                    if os.path.exists(backbone):
                        os.remove(backbone)

    def _clustering_metrics(self, store_url: str, name: str) -> dict[str, Any]:
        from trainer.monitor import clustering_nmi

        previous = self._store_url(self.previous.name) if self.previous else None
        return clustering_nmi(store_url, name, previous, self.previous.name if self.previous else None)

    # -------------------------------------------------------------------------------------- training

    def _needs_clustering(self, epoch: int) -> bool:
        mode = self.config.mode
        if mode == "rotnet":
            return False
        if mode == "clusterfit":
            return self.labels is None
        return epoch % self.config.reassign_every == 0 or self.labels is None

    def _loss(self, images: torch.Tensor, rows: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        mode = self.config.mode
        if mode in ("rotnet", "deepercluster"):
            rotations = random_rotations(len(images), torch_generator(self.config.seed, _TAG_ROTATE, self.epoch,
                                                                      self.rank, step))
            features = self.network.features(rotate_batch(images, rotations))
            if mode == "rotnet":
                return self.network.head(features, rotations)
            index = rows.numpy()
            parents = torch.from_numpy(self.labels.parents[index])
            local = torch.from_numpy(self.labels.local[index])
            return self.network.head(features, super_targets(parents, rotations), local)
        targets = torch.from_numpy(self.labels.parents[rows.numpy()])
        return self.network.head(self.network.features(images), targets)

    def _loader(self, epoch: int) -> tuple[Any, int]:
        config = self.config
        balance = None
        if self.labels is not None and config.balanced_sampling:
            balance = ClusterBalance(self.labels.balance, config.samples_per_epoch)
        plan = EpochPlan(epoch=epoch, rank=self.rank, world_size=self.world_size, skip_batches=self.step)
        stream = ShardStream(self.shard_set.shards, balance, StreamConfig(seed=config.seed,
                                                                          buffer_size=config.buffer_size),
                             self.crop, plan, config.batch_size, config.storage_options)
        expected = _min_over_ranks(expected_samples(self.shard_set.shards, balance, plan, config.seed))
        # A few standard deviations below the expected count, so that no rank runs dry before the others.
        steps = int((expected - 4 * math.sqrt(max(expected, 1.0))) // config.batch_size)
        return make_loader(stream, config.batch_size, config.workers), max(steps, 1)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        loader, steps = self._loader(epoch)
        self.network.train()
        sums: dict[str, float] = {}
        count, start, images_seen = 0, time.perf_counter(), 0
        for images, rows in loader:
            if self.step >= steps or not _all_have_batch(not self._out_of_time()):
                break
            loss, stats = self._loss(images, rows, self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _all_reduce_grads(self.network)
            self.optimizer.step()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count, images_seen = count + 1, images_seen + len(images)
            self.step, self.total_steps = self.step + 1, self.total_steps + 1
            if self.progress:
                self.progress(1)
            if self.step % self.config.checkpoint_every == 0:
                self.save()
        else:
            _all_have_batch(False)
        seconds = time.perf_counter() - start
        return {key: value / max(count, 1) for key, value in sums.items()} | {
            "steps": count, "samples_per_second": images_seen * self.world_size / max(seconds, 1e-9)}

    @property
    def elapsed(self) -> float:
        """Seconds (of the budget's clock) this run has taken so far, over all its sessions."""
        return self.elapsed_before + self.clock() - self.session_start

    def _time_to_recluster(self) -> bool:
        """False when a time budget would run out during this re-clustering: train on with the labels in hand
        rather than spend the rest of the budget on a clustering no step would use."""
        if self.labels is None or self.config.time_budget is None:
            return True
        return self.elapsed + self.recluster_seconds < self.config.time_budget

    def _out_of_time(self) -> bool:
        return self.config.time_budget is not None and self.elapsed >= self.config.time_budget

    def run(self) -> TrainResult:
        """Train until ``epochs`` (or the time budget), resuming from ``RUN/checkpoint.pt`` if present."""
        start = time.perf_counter()
        self._resume()
        while self.epoch < self.config.epochs and not self._out_of_time():
            record: dict[str, Any] = {"epoch": self.epoch}
            if self.step == 0 and self._needs_clustering(self.epoch) and self._time_to_recluster():
                started, started_clock = time.perf_counter(), self.clock()
                record["clustering"] = self.recluster(self.epoch)
                record["clustering"]["seconds"] = time.perf_counter() - started
                self.recluster_seconds = self.clock() - started_clock
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


def _save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary then rename: a kill never leaves a torn file under ``path``."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def process_tree_cpu_seconds() -> float:
    """CPU seconds used by this process (all threads) and its children, live or finished (Linux ``/proc``;
    elsewhere this process and its finished children only).

    Not monotonic on its own: a child reaped between the two reads is briefly counted twice (use
    :class:`CpuClock` for budgets).
    """
    total = time.process_time()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    ticks = os.sysconf("SC_CLK_TCK")
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as handle:
                children = handle.read().split()
        except OSError:
            continue
        for pid in children:
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited in between: counted in children_* once reaped
            # utime, stime, cutime, cstime are fields 14-17 of stat(5); fields[0] is field 3 (state).
            total += sum(int(value) for value in fields[11:15]) / ticks
    # Read after the live children: a child reaped in between is counted twice for a moment, never missed.
    times = os.times()
    return total + times.children_user + times.children_system


class CpuClock:
    """:func:`process_tree_cpu_seconds` made monotonic (a reading never goes below an earlier one)."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self) -> float:
        self.last = max(self.last, process_tree_cpu_seconds())
        return self.last


def run_train(config: TrainConfig, progress: Callable[[int], None] | None = None) -> TrainResult:
    """Train a network as ``config`` says (see the module docstring)."""
    from indexes.threads import set_num_threads

    set_num_threads(config.num_threads)
    return Trainer(config, progress).run()


# ----------------------------------------------------------------------------------------------- distributed


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reducer() -> Any:
    from indexes.distributed import TorchReducer

    return TorchReducer() if _dist_info()[1] > 1 else None


def _barrier() -> None:
    import torch.distributed as dist

    if _dist_info()[1] > 1:
        dist.barrier()


def _min_over_ranks(value: float) -> float:
    import torch.distributed as dist

    if _dist_info()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return float(tensor.item())


def _all_have_batch(has_batch: bool) -> bool:
    """True when every rank has a batch for this step (one tiny all-reduce per step under DDP)."""
    import torch.distributed as dist

    if _dist_info()[1] == 1:
        return has_batch
    flag = torch.tensor([1 if has_batch else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _all_reduce_grads(network: nn.Module) -> None:
    """Average gradients over ranks (heads included; unused sub-heads contribute zeros)."""
    import torch.distributed as dist

    world = _dist_info()[1]
    if world == 1:
        return
    for parameter in network.parameters():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= world
