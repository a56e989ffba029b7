"""The network embed runs: built from an architecture, a weights file or a trainer checkpoint; the forward
pass (AMP and channels_last on CUDA only) and the automatic batch size."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataengine.embed.config import EmbedConfig
from dataengine.embed.decode import describe_error
from dataengine.fs import is_remote
from dataengine.models import resolve_device

logger = logging.getLogger(__name__)

# Largest batch tried when the batch size is automatic.
AUTO_MAX_BATCH = {"cpu": 64, "cuda": 512}


@dataclass
class EmbedModel:
    extractor: Any
    device: Any
    amp: bool
    channels_last: bool
    arch: str
    sobel: bool
    layer: str
    dim: int
    weights: dict[str, Any] | None
    checkpoint: dict[str, Any] | None
    record: dict[str, Any]
    """What the network was built from: name, kind, source, sha256 of the weights (and of their file)."""


def build_model(config: EmbedConfig) -> EmbedModel:
    """The network ``config`` names, on its device, with the record of what it was built from."""
    from dataengine import models
    from dataengine.pretrained import build_arch_backbone, build_external

    device = resolve_device(config.device)
    weights = checkpoint = None
    spec = config.model_spec
    if config.checkpoint:
        backbone = models.load_checkpoint(config.checkpoint, config.storage_options)
        if config.model and config.model != backbone.arch:
            raise ValueError(f"model {config.model} differs from the checkpoint's architecture {backbone.arch}")
        if config.sobel and not backbone.has_sobel:
            raise ValueError("sobel=True, but the checkpoint's backbone has no Sobel layer")
        path = models.checkpoint_file(config.checkpoint, config.storage_options)
        # The weights, not the file: a checkpoint re-saved with other optimizer state embeds the same.
        digest = models.weights_digest(backbone)
        checkpoint = {"name": os.path.basename(path.rstrip("/")), "weights_sha256": digest}
        record = {"name": backbone.arch, "kind": "checkpoint", "source": path if is_remote(path) else os.path.abspath(path),
                  "weights_sha256": digest, "file_sha256": None}
    elif spec.kind in ("torchscript", "entry"):
        extractor, built = build_external(spec)
        return _on_device(config, extractor.to(device).eval(), device, spec.text, False, None, None,
                          built.to_dict())
    else:
        # Random init must be identical on every rank and every resume: seeded inside.
        backbone, built = build_arch_backbone(spec, config.sobel, config.seed, config.weights)
        record = built.to_dict()
        if config.weights:
            weights = {"name": os.path.basename(config.weights.rstrip("/")), "sha256": built.file_sha256}
    extractor = models.FeatureExtractor(backbone, config.layer).to(device).eval()
    return _on_device(config, extractor, device, backbone.arch, backbone.has_sobel, weights, checkpoint, record)


def _on_device(config: EmbedConfig, extractor: Any, device: Any, arch: str, sobel: bool,
               weights: dict[str, Any] | None, checkpoint: dict[str, Any] | None,
               record: dict[str, Any]) -> EmbedModel:
    from dataengine import models

    amp = device.type == "cuda" if config.amp is None else config.amp
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    dim = models.feature_dim(extractor, config.image_size)
    return EmbedModel(extractor, device, amp, channels_last, arch, sobel, extractor.layer, dim, weights, checkpoint,
                      record)


def forward(model: EmbedModel, images: Any) -> np.ndarray:
    x = images.to(model.device, non_blocking=True)
    if model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.amp):
        out = model.extractor(x)
    return out.float().cpu().numpy()


def checked_forward(model: EmbedModel, images: torch.Tensor) -> np.ndarray:
    try:
        return forward(model, images)
    except (RuntimeError, MemoryError) as exc:
        if _is_oom(exc):
            raise MemoryError(f"a batch of {len(images)} images does not fit in {model.device.type} memory "
                              f"({describe_error(exc)}); pass a smaller --batch-size") from exc
        raise


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) or \
        "out of memory" in str(exc).lower()


def fit_batch_size(model: EmbedModel, image_size: int, requested: int | None) -> int:
    """The requested batch size if one forward pass of it fits in memory, else (automatic) the largest power
    of two up to :data:`AUTO_MAX_BATCH` that does (probed on CUDA, estimated on CPU).

    Raises:
        MemoryError: the requested size, or a batch of 1, does not fit; the message says what to do.
    """
    size = requested or AUTO_MAX_BATCH[model.device.type]
    if requested is None and model.device.type == "cpu":
        # CPU allocators rarely fail cleanly (the OS kills the process instead): size from an estimate.
        return min(size, _cpu_memory_cap(model, image_size))
    while True:
        try:
            forward(model, torch.zeros((size, 3, image_size, image_size), dtype=torch.uint8))
            return size
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise
            if requested is not None or size == 1:
                raise MemoryError(f"a batch of {size} images of {image_size}px does not fit in "
                                  f"{model.device.type} memory ({describe_error(exc)}); "
                                  + ("pass a smaller --batch-size" if requested else "use a smaller model or "
                                     "--image-size")) from exc
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            size //= 2
            logger.info("batch does not fit in memory; trying %d", size)


def _cpu_memory_cap(model: EmbedModel, image_size: int) -> int:
    """Batch size whose activations (the sum of every layer's output for one image, an upper bound) take at
    most half of the available memory, rounded down to a power of two."""
    import psutil

    total = [0]

    def count(_module: Any, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in model.extractor.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        forward(model, torch.zeros((1, 3, image_size, image_size), dtype=torch.uint8))
    finally:
        for handle in handles:
            handle.remove()
    cap = int(psutil.virtual_memory().available * 0.5 // max(1, total[0]))
    return max(1, 2 ** int(math.log2(max(1, cap))))
