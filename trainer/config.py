"""The configuration of a training run, in sections (as torchtitan's job config is).

:class:`TrainConfig` holds the run folder, the method (``mode``) and the seed, and one frozen section per
concern: :class:`DataConfig` (what is read and how it becomes crops), :class:`ModelConfig` (the network),
:class:`OptimConfig` (the optimiser), :class:`ClusteringConfig` (the re-clusterings), :class:`ScheduleConfig`
(how long, how often) and :class:`DistributedConfig` (what each process uses: device, precision, threads,
synchronised BatchNorm). Every section checks its own values; :class:`TrainConfig` checks those that depend
on the mode. Field names are unique over all sections, so a flat mapping of options
(:meth:`TrainConfig.from_flat`, e.g. the command line's, or the configuration stored by an older checkpoint)
names its section unambiguously.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("deepercluster", "deepcluster", "rotnet", "clusterfit")
DEFAULT_WHITENED_DIM = 64
"""Dimension of the whitened features the k-means sees by default."""
BUDGET_CLOCKS = ("wall", "cpu")
PRECISIONS = ("fp32", "bf16")
SUB_HEAD_GRAD_MEANS = ("batch", "superclass")


def _at_least(section: Any, minimum: float, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        if optional and value is None:
            continue
        if value < minimum:
            raise ValueError(f"{name}={value} must be >= {minimum}" + (" (or unset)" if optional else ""))


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What the run reads, and how every sample becomes a training crop."""

    shards: str
    """Ingest output to train on (local or s3://)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for remote shards and a remote run folder."""
    image_size: int = 224
    """Side of the training crops and of the embedding center crops."""
    resize_size: int | None = None
    """Shorter side before the embedding's center crop (default: image_size * 8 / 7, or image_size <= 64)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the random-resized crops (torchvision's ``RandomResizedCrop`` default, which the reference
    implementations use)."""
    batch_size: int = 64
    """Samples per step and rank."""
    workers: int = 1
    """Processes decoding images (DataLoader workers, which also augment them), per rank; 0: in the training
    process."""
    buffer_size: int = 2048
    """Shuffle buffer of the balanced stream (input samples per block)."""
    shards_in_flight: int = 32
    """Shards each DataLoader worker reads at a time, a sample of each in turn: on shards that each hold one
    class (an ingest of a class-sorted folder without its shuffle) a batch mixes up to this many shards'
    classes. A remote shard in flight holds an 8 MiB read-ahead."""
    copy_spread: int = 4
    """Shuffle blocks over which the copies of a row repeated by the balanced sampling (rows of small
    clusters) are spread, instead of all falling in the block the row was read in."""
    balanced_sampling: bool | None = None
    """Draw every cluster about equally often (DeepCluster's uniform sampling over clusters; not for rotnet).
    ``None``: the mode's default, on except for clusterfit (ClusterFit samples images, not clusters)."""
    samples_per_epoch: int | None = None
    """Expected samples per epoch over all ranks with balanced sampling (default: the dataset size)."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "image_size", "batch_size", "buffer_size", "shards_in_flight", "copy_spread")
        _at_least(self, 0, "workers")
        _at_least(self, 1, "resize_size", "samples_per_epoch", optional=True)
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1")

    @property
    def resolved_resize(self) -> int:
        """``resize_size``, or ``image_size * 8 / 7`` (``image_size`` itself up to 64 pixels)."""
        if self.resize_size:
            return self.resize_size
        return self.image_size if self.image_size <= 64 else int(round(self.image_size * 8 / 7))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The network: backbone, input layer, and where its first weights come from."""

    arch: str = "small"
    """Backbone architecture (``small``, ``vgg16_bn``, ``resnet18``, ``resnet50``)."""
    sobel: bool | None = None
    """Fixed grayscale + Sobel input layer (DeepCluster, DeeperCluster). ``None``: the mode's default, on except
    for clusterfit (ClusterFit trains on RGB images)."""
    dropout: float = 0.0
    """Dropout on the features before the heads (after vgg16_bn's fc7 ReLU, which the reference ends with no
    dropout)."""
    init: str | None = None
    """Checkpoint to initialise the backbone from (e.g. a RotNet run, as the paper does), or torchvision weights
    of ``arch`` from the torch hub cache (``resnet50:IMAGENET1K_V2``, without the Sobel layer)."""

    def __post_init__(self) -> None:
        from dataengine.models import ARCHS

        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} must be one of {', '.join(ARCHS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The SGD optimiser (constant learning rate)."""

    lr: float = 0.05
    """SGD learning rate (constant; the paper uses 0.1 with VGG-16)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-5
    """SGD weight decay."""
    sub_head_grad_mean: str = "superclass"
    """DeeperCluster: the gradient of each sub-class head ``W_s`` is the mean over the batch's rows (``batch``,
    Eq. 5 as written) or over the rows of its own super-class (``superclass``, as the reference code's
    communication groups compute it; ``W_s`` then learns about ``4m`` times faster). The backbone's is the
    batch mean either way."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
        _at_least(self, 0, "weight_decay")
        if self.sub_head_grad_mean not in SUB_HEAD_GRAD_MEANS:
            raise ValueError(f"sub_head_grad_mean={self.sub_head_grad_mean!r} must be one of "
                             f"{', '.join(SUB_HEAD_GRAD_MEANS)}")


@dataclass(frozen=True, kw_only=True)
class ClusteringConfig:
    """The clusterings that give the targets (not used by rotnet)."""

    levels: tuple[int, ...] = (4, 64)
    """Clusters per level: ``(m, k)`` for deepercluster, ``(k,)`` for deepcluster/clusterfit."""
    pca_dim: int | None = None
    """Dimension the features are projected on before the k-means (0: every dimension). ``None``: the mode's
    default, 64 with whitening, every dimension without (clusterfit)."""
    whiten: bool | None = None
    """PCA-whiten and l2-normalise the features before the k-means (DeepCluster, DeeperCluster). ``None``: the
    mode's default, on except for clusterfit (ClusterFit runs k-means on the network's features as they
    are)."""
    kmeans_iterations: int = 10
    """Lloyd iterations per k-means."""
    sample_per_centroid: tuple[int, ...] = (0, 256)
    """Training rows of each level's k-means: k x this many rows of its group, 0 = every row (up to
    ``max_sample_rows``); one value per level, the last for the deeper levels (as ``dataengine cluster``)."""
    max_sample_rows: int | None = 1 << 20
    """Rows at most of a k-means told to train on every row (``None``: no limit)."""
    nmi_average: str = "geometric"
    """Normalisation of the NMI logged at every re-clustering: ``geometric`` (DeepCluster's definition) or
    ``arithmetic`` (scikit-learn's default); both are logged whatever this is."""
    features_from: str | None = None
    """ClusterFit: checkpoint whose features are clustered (default: the model's ``init``), or a pretrained
    network as embed's ``--model`` takes it (``resnet50:IMAGENET1K_V2``, a TorchScript file, ``module:function``)."""

    def __post_init__(self) -> None:
        if not self.levels or any(k < 1 for k in self.levels):
            raise ValueError(f"levels={self.levels} must be one or more cluster counts >= 1")
        _at_least(self, 1, "kmeans_iterations")
        _at_least(self, 0, "pca_dim", optional=True)
        _at_least(self, 1, "max_sample_rows", optional=True)
        from dataengine.metrics.nmi import AVERAGE_METHODS

        if self.nmi_average not in AVERAGE_METHODS:
            raise ValueError(f"nmi_average={self.nmi_average!r} must be one of {', '.join(AVERAGE_METHODS)}")
        if not self.sample_per_centroid or min(self.sample_per_centroid) < 0:
            raise ValueError(f"sample_per_centroid={self.sample_per_centroid} must be one or more values >= 0")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """How long the run lasts and how often it re-clusters and checkpoints."""

    epochs: int = 10
    """Training epochs."""
    reassign_every: int = 3
    """Re-cluster every T epochs (the paper uses 3)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (also at every epoch end)."""
    time_budget: float | None = None
    """Stop (with a checkpoint) once the run has taken this many seconds, re-clusterings included (the
    budget of method comparisons), counted across resumes."""
    budget_clock: str = "wall"
    """What ``time_budget`` counts: ``wall`` seconds, or ``cpu`` seconds of this process and its children
    (DataLoader workers included), which stay comparable when other work shares the machine."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "epochs", "reassign_every", "checkpoint_every")
        if self.budget_clock not in BUDGET_CLOCKS:
            raise ValueError(f"budget_clock={self.budget_clock!r} must be one of {', '.join(BUDGET_CLOCKS)}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget={self.time_budget} must be > 0 (or unset)")


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """What each process (rank) of the run uses; the ranks themselves come from the process group
    (``torchrun``)."""

    num_threads: int | None = None
    """CPU threads for torch/faiss/BLAS per process (default: every core)."""
    device: str = "auto"
    """Where the network, heads and batches live: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or
    ``cuda:N``; several ranks on CUDA use the device of their ``LOCAL_RANK``."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: forward passes under bfloat16 autocast (weights, gradients and the optimizer stay
    float32)."""
    compile: bool = False
    """Run the backbone through ``torch.compile``."""
    sync_bn: bool = False
    """Batch statistics of BatchNorm layers over every rank's rows (the paper's), not each rank's own."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_threads", optional=True)
        device = self.device
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"device={device!r} must be auto, cpu, cuda or cuda:N")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                             "clustering": ClusteringConfig, "schedule": ScheduleConfig,
                             "distributed": DistributedConfig}
"""Section name -> its dataclass, in the order of :class:`TrainConfig`."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Configuration of a training run."""

    out: str
    """Run folder (local, or a prefix on object storage such as ``s3://bucket/run``): checkpoint, metrics,
    feature stores and backbone snapshots of the re-clusterings."""
    mode: str = "deepercluster"
    """``deepercluster``, ``deepcluster``, ``rotnet`` or ``clusterfit``."""
    seed: int = 0
    """Seed of initialisation, sampling, augmentation, rotations and clusterings."""
    data: DataConfig
    """What is read and how it becomes crops."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimiser."""
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    """The re-clusterings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Epochs, re-clustering period, checkpoints, time budget."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Per-process resources."""

    def __post_init__(self) -> None:
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {', '.join(MODES)}")
        self._resolve_mode_defaults()
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        levels = self.clustering.levels
        if self.mode == "deepercluster" and len(levels) != 2:
            raise ValueError(f"deepercluster needs --levels m,k (two levels), got {levels}")
        if self.mode in ("deepcluster", "clusterfit") and len(levels) != 1:
            raise ValueError(f"{self.mode} clusters flat: give --levels k (one level), got {levels}")
        if self.mode == "clusterfit" and not self.features_checkpoint:
            raise ValueError("clusterfit clusters the features of a given network: pass --features-from CKPT")

    def _resolve_mode_defaults(self) -> None:
        """Fill the options left to the mode (``None``): DeepCluster's additions (Sobel input, whitening,
        cluster-balanced sampling) for every mode but clusterfit, which ClusterFit does not define."""
        faithful_clusterfit = self.mode == "clusterfit"
        model, data, clustering = self.model, self.data, self.clustering
        if model.sobel is None:
            model = dataclasses.replace(model, sobel=not faithful_clusterfit)
        if data.balanced_sampling is None:
            data = dataclasses.replace(data, balanced_sampling=not faithful_clusterfit)
        if clustering.whiten is None:
            clustering = dataclasses.replace(clustering, whiten=not faithful_clusterfit)
        if clustering.pca_dim is None:
            clustering = dataclasses.replace(clustering, pca_dim=DEFAULT_WHITENED_DIM if clustering.whiten else 0)
        for name, section in (("model", model), ("data", data), ("clustering", clustering)):
            object.__setattr__(self, name, section)

    @property
    def features_checkpoint(self) -> str | None:
        """ClusterFit: the network whose features are clustered (``features_from``, else ``init``)."""
        return self.clustering.features_from or self.model.init

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """The configuration from one flat mapping of field names (``out``, ``mode``, ``seed`` and the fields of
        every section; lists are taken as tuples).

        Raises:
            ValueError: a name is no field of any section.
        """
        top = {name: values[name] for name in ("out", "mode", "seed") if name in values}
        owner = {f.name: section for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
        unknown = sorted(set(values) - set(top) - set(owner))
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        parts: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for name, value in values.items():
            if name in owner:
                parts[owner[name]][name] = tuple(value) if isinstance(value, list) else value
        return cls(**top, **{section: SECTIONS[section](**kwargs) for section, kwargs in parts.items()})

    def to_dict(self) -> dict[str, Any]:
        """Every option by section, without the storage options (they may hold credentials)."""
        values = asdict(self)
        values["data"].pop("storage_options")
        return values
