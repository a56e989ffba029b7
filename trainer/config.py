"""The configuration of a training run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("deepercluster", "deepcluster", "rotnet", "clusterfit")
BUDGET_CLOCKS = ("wall", "cpu")


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
