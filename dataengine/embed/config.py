"""What one embedding run computes: :class:`EmbedConfig` and the summary it returns."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float16", "float32")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Configuration of one embedding run."""

    shards: str
    """Ingest output folder (holding ``manifest.json``), local path or fsspec URL."""
    out: str
    """Feature store (Zarr v3 group), local path or fsspec URL."""
    model: str | None = None
    """What to run (see :mod:`dataengine.pretrained`): an architecture (:data:`dataengine.models.ARCHS`),
    torchvision weights ``ARCH:WEIGHTS`` read from the torch hub cache, a TorchScript file or a
    ``module:function`` entry point; default ``resnet18``, or the checkpoint's architecture."""
    sobel: bool = False
    """Put the fixed grayscale + Sobel layer in front of the model (a checkpoint says for itself)."""
    weights: str | None = None
    """Local state-dict file (torchvision layout or ``Backbone.state_dict()``) for an architecture without
    weights of its own; ``None`` (and no checkpoint, no pretrained ``model``) = random init."""
    checkpoint: str | None = None
    """Trainer checkpoint file (or run folder holding ``checkpoint.pt``): arch, sobel and weights."""
    layer: str | None = None
    """Layer whose output is the feature (global-average-pooled); ``None`` = the architecture's default."""
    image_size: int = 224
    """Side of the square center crop fed to the model."""
    resize_size: int | None = None
    """Shorter side after resizing, before the crop; ``None`` = ``round(image_size * 256 / 224)``."""
    batch_size: int | None = None
    """Images per forward pass; ``None`` = the largest that fits (up to 64 on CPU, 512 on CUDA)."""
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    """DataLoader worker processes decoding images; 0 decodes in the main process."""
    dtype: str = "float16"
    """Stored feature type: ``float16`` or ``float32``."""
    chunk_rows: int | None = None
    """Rows per ``features`` chunk; ``None`` = smallest multiple of the batch size giving >= 1 MiB chunks."""
    chunks_per_shard: int = 1
    """Chunks per stored object with the Zarr sharding codec; 1 = no sharding."""
    seed: int = 0
    """Seed of the random initialisation (used when no weights are given)."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    num_threads: int | None = None
    """torch intra-op threads in this process; ``None`` leaves torch's default."""
    amp: bool | None = None
    """bf16 autocast; ``None`` = on CUDA only."""
    channels_last: bool | None = None
    """channels_last memory format; ``None`` = on CUDA only (on CPU it measured no faster for resnet18)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for remote shards and store (``endpoint_url``, ``key``, ``secret``...)."""
    overwrite: bool = False
    """Replace a store made with another configuration instead of raising."""

    def __post_init__(self) -> None:
        if self.weights and self.checkpoint:
            raise ValueError("give weights=FILE or checkpoint=RUN, not both")
        spec = self.model_spec
        if spec.pretrained and (self.weights or self.checkpoint):
            raise ValueError(f"model {spec.text!r} names its own weights: drop "
                             + ("--weights" if self.weights else "--checkpoint"))
        if spec.kind in ("torchscript", "entry") and (self.sobel or self.layer):
            raise ValueError(f"--sobel and --layer apply to architectures, not to the {spec.kind} model "
                             f"{spec.text!r}: make the model return the feature wanted")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("image_size", "chunks_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "chunk_rows", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None for automatic), got {getattr(self, name)}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size}): the "
                             "center crop must fit inside the resized image")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def model_spec(self) -> Any:
        """The parsed ``model`` (:class:`dataengine.pretrained.ModelSpec`); a checkpoint's architecture is
        read when the network is built."""
        from dataengine.models import ARCHS
        from dataengine.pretrained import ModelSpec, parse_model_spec

        name = self.model or "resnet18"
        return ModelSpec(name, "arch", arch=name) if name in ARCHS else parse_model_spec(name)

    @property
    def random_init(self) -> bool:
        """True when the network runs with random weights (no checkpoint, weights file or pretrained model)."""
        return not (self.checkpoint or self.weights or self.model_spec.pretrained)

    @property
    def resolved_resize_size(self) -> int:
        """``resize_size``, or the ImageNet evaluation convention 256/224 of ``image_size``."""
        return self.resize_size if self.resize_size is not None else round(self.image_size * 256 / 224)


@dataclass
class EmbedResult:
    """Summary of an embedding run (as seen by this rank)."""

    out: str
    num_rows: int
    dim: int
    num_blocks: int
    computed_blocks: int
    resumed_blocks: int
    computed_rows: int
    num_invalid: int
    seconds: float
    images_per_second: float
    rank: int = 0
    world_size: int = 1
    complete: bool = True
    batch_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
