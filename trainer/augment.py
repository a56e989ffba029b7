"""Image transforms of the trainer: seeded random-resized-crop + horizontal flip, center crop, normalisation.

All functions take ``(C, H, W)`` tensors, uint8 or float, and keep the dtype (resizing is bilinear with
antialiasing, torchvision's tensor kernels). Randomness comes only from the :class:`numpy.random.Generator`
passed in (or owned by :class:`TrainAugment`), so a transform is reproducible from its seed alone: the
training loop seeds it from ``(seed, epoch, rank, worker)`` (:func:`trainer.sampler.stream_rng`) and can
checkpoint it with :meth:`TrainAugment.state_dict`.

Training (DeeperCluster Sec. 4.3: "cropping of random sizes and aspect ratios and horizontal flips"): a crop
covering a uniform fraction ``scale`` of the image area with a log-uniform aspect ratio in ``ratio`` (the
Inception crop; ten tries, then the largest centered crop within the ratio range), resized to
``size x size``, flipped with probability ``flip_probability``.

Embedding for re-clustering: :func:`center_crop` resizes the shorter side to ``resize_size`` and takes the
central ``size x size`` square, like ``dataengine embed`` (which does it on PIL images: results may differ
by rounding; decode with :func:`dataengine.embed.load_image` where bit-identical features matter).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataengine.models import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

_CROP_TRIES = 10


@dataclass(frozen=True, kw_only=True)
class CropConfig:
    """Random-resized-crop + flip of the training images."""

    size: int = 224
    """Side of the square output, in pixels."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop's area as a fraction of the image's area."""
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """Range of the crop's aspect ratio (width / height), sampled log-uniformly."""
    flip_probability: float = 0.5
    """Probability of a horizontal flip."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size={self.size} must be >= 1")
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"scale={self.scale} must satisfy 0 < low <= high <= 1")
        low, high = self.ratio
        if not 0.0 < low <= high:
            raise ValueError(f"ratio={self.ratio} must satisfy 0 < low <= high")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability={self.flip_probability} must be in [0, 1]")


CROP_DRAWS = 4 * _CROP_TRIES + 1
"""Uniform draws one crop + flip consumes: (scale, ratio, top, left) per try, then the flip."""


def sample_crop(height: int, width: int, config: CropConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Draw a crop box ``(top, left, crop_height, crop_width)`` inside a ``height x width`` image."""
    return crop_box(height, width, config, rng.random(CROP_DRAWS))


def crop_box(height: int, width: int, config: CropConfig, uniforms: np.ndarray) -> tuple[int, int, int, int]:
    """The crop box that ``uniforms`` (:data:`CROP_DRAWS` draws in ``[0, 1)``) select in a ``height x width``
    image: a fixed number of draws per image, so that draws for many images can be made in one call."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot crop an empty {height}x{width} image")
    area = height * width
    low_scale, high_scale = config.scale
    low_ratio, high_ratio = math.log(config.ratio[0]), math.log(config.ratio[1])
    for attempt in range(_CROP_TRIES):
        u_scale, u_ratio, u_top, u_left = uniforms[4 * attempt:4 * attempt + 4].tolist()
        target_area = area * (low_scale + (high_scale - low_scale) * u_scale)
        aspect = math.exp(low_ratio + (high_ratio - low_ratio) * u_ratio)
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(u_top * (height - crop_height + 1))
            left = int(u_left * (width - crop_width + 1))
            return top, left, crop_height, crop_width
    # No draw fitted (extreme aspect ratio): the largest centered crop whose ratio is in range.
    aspect = width / height
    crop_height, crop_width = height, width
    if aspect < config.ratio[0]:
        crop_height = min(height, round(width / config.ratio[0]))
    elif aspect > config.ratio[1]:
        crop_width = min(width, round(height * config.ratio[1]))
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop_flip(image: torch.Tensor, config: CropConfig, rng: np.random.Generator) -> torch.Tensor:
    """Crop a random box of ``image`` (``(C, H, W)``), resize it to ``config.size`` square, maybe flip it."""
    return resized_crop_flip(image, config, rng.random(CROP_DRAWS))


def resized_crop_flip(image: torch.Tensor, config: CropConfig, uniforms: np.ndarray) -> torch.Tensor:
    """:func:`random_resized_crop_flip` with its :data:`CROP_DRAWS` uniform draws given."""
    _check_image(image)
    top, left, crop_height, crop_width = crop_box(image.shape[-2], image.shape[-1], config, uniforms)
    # torchvision's resized_crop kernel called directly (same result, half its per-image overhead).
    crop = image[None, :, top:top + crop_height, left:left + crop_width]
    out = torch.nn.functional.interpolate(crop if image.dtype == torch.uint8 else crop.float(),
                                          size=(config.size, config.size), mode="bilinear", antialias=True,
                                          align_corners=False)[0].to(image.dtype)
    return out.flip(-1) if uniforms[-1] < config.flip_probability else out


class TrainAugment:
    """A seeded training transform: ``augment(image) -> (C, size, size)`` tensor of the same dtype.

    Args:
        config: the crop and flip options.
        seed: an int or a sequence of ints (e.g. ``(seed, epoch, rank, worker)``) seeding the generator.
    """

    def __init__(self, config: CropConfig, seed: int | tuple[int, ...] = 0) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return random_resized_crop_flip(image, self.config, self.rng)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (a JSON-able dict of ints)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator saved by :meth:`state_dict`."""
        self.rng.bit_generator.state = state["rng"]


def center_crop(image: torch.Tensor, size: int, resize_size: int | None = None) -> torch.Tensor:
    """Resize the shorter side of ``image`` (``(C, H, W)``) to ``resize_size`` then take the central square.

    ``resize_size=None`` uses the ImageNet evaluation convention ``round(size * 256 / 224)``, as
    ``dataengine embed`` does.
    """
    from torchvision.transforms.v2 import functional as TF

    _check_image(image)
    resize_size = round(size * 256 / 224) if resize_size is None else resize_size
    if size < 1 or resize_size < size:
        raise ValueError(f"need 1 <= size ({size}) <= resize_size ({resize_size})")
    if min(image.shape[-2:]) != resize_size:
        image = TF.resize(image, [resize_size], antialias=True)
    return TF.center_crop(image, [size, size])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in ``[0, 255]`` (or float in ``[0, 1]``), ``(..., 3, H, W)`` -> float32 normalised with
    the ImageNet mean and std that the backbones of :mod:`dataengine.models` expect."""
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images must be (..., 3, H, W), got {tuple(images.shape)}")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 3:
        raise ValueError(f"expected one (C, H, W) image, got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"expected a uint8 or float image, got {image.dtype}")
