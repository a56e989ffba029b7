"""Seeded random-resized-crop + flip, center crop and normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dataengine.models import IMAGENET_MEAN, IMAGENET_STD
from trainer.augment import (CROP_DRAWS, CropConfig, TrainAugment, center_crop, crop_box, normalize,
                             random_resized_crop_flip, resized_crop_flip, sample_crop)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(height: int = 40, width: int = 60, dtype=torch.uint8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), generator=generator)
    return image.to(torch.uint8) if dtype == torch.uint8 else image.float() / 255.0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_train_augment_shape_dtype_and_seeding(dtype):
    config = CropConfig(size=16)
    image = _image(dtype=dtype)
    first = [TrainAugment(config, seed=(1, 0, 0, 0))(image) for _ in range(2)]
    assert first[0].shape == (3, 16, 16) and first[0].dtype == dtype
    assert torch.equal(first[0], first[1])
    augment = TrainAugment(config, seed=(1, 0, 0, 1))
    outputs = [augment(image) for _ in range(4)]
    assert not torch.equal(outputs[0], first[0])
    assert not torch.equal(outputs[0], outputs[1])


def test_train_augment_state_round_trip():
    augment = TrainAugment(CropConfig(size=8), seed=3)
    image = _image()
    augment(image)
    state = augment.state_dict()
    expected = [augment(image) for _ in range(3)]
    resumed = TrainAugment(CropConfig(size=8), seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed(image)) for a in expected)


def test_sample_crop_respects_scale_and_ratio():
    config = CropConfig(size=8, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, height, width = sample_crop(50, 70, config, rng)
        assert 0 <= top and top + height <= 50 and 0 <= left and left + width <= 70
        # Rounding the sides to integers moves the area and ratio a little off the continuous draw.
        assert 0.2 * 0.9 <= height * width / 3500 <= 0.6 * 1.1
        assert 0.5 * 0.9 <= width / height <= 2.0 * 1.1


def test_sample_crop_falls_back_to_a_central_crop_on_extreme_shapes():
    config = CropConfig(size=8, scale=(0.9, 1.0))
    top, left, height, width = sample_crop(2, 200, config, np.random.default_rng(0))
    assert (height, width) == (2, round(2 * 4 / 3))
    assert left == (200 - width) // 2 and top == 0


def test_flip_happens_after_the_same_crop():
    image = _image()
    plain = random_resized_crop_flip(image, CropConfig(size=12, flip_probability=0.0), np.random.default_rng(5))
    flipped = random_resized_crop_flip(image, CropConfig(size=12, flip_probability=1.0), np.random.default_rng(5))
    assert torch.equal(flipped, TF.horizontal_flip(plain))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_equals_torchvision_resized_crop(dtype):
    image = _image(dtype=dtype)
    config = CropConfig(size=24, flip_probability=0.0)
    for seed in range(5):
        uniforms = np.random.default_rng(seed).random(CROP_DRAWS)
        top, left, height, width = crop_box(40, 60, config, uniforms)
        expected = TF.resized_crop(image, top, left, height, width, [24, 24], antialias=True)
        assert torch.equal(resized_crop_flip(image, config, uniforms), expected)


def test_center_crop_takes_the_middle():
    image = _image(20, 30)
    assert torch.equal(center_crop(image, 16, resize_size=20), image[:, 2:18, 7:23])
    out = center_crop(image, 14)
    assert out.shape == (3, 14, 14) and out.dtype == torch.uint8
    assert round(14 * 256 / 224) == 16
    with pytest.raises(ValueError):
        center_crop(image, 16, resize_size=12)


def test_normalize_uses_imagenet_statistics():
    images = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images)
    expected = [(1.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected))
    assert torch.allclose(normalize(images.float() / 255.0), out)


def test_crop_config_validation():
    for bad in ({"size": 0}, {"scale": (0.5, 0.2)}, {"scale": (0.0, 1.0)}, {"ratio": (2.0, 1.0)},
                {"flip_probability": 1.5}):
        with pytest.raises(ValueError):
            CropConfig(**bad)
    assert math.isclose(CropConfig().ratio[1], 4 / 3)
    with pytest.raises(TypeError):
        random_resized_crop_flip(torch.zeros(3, 4, 4, dtype=torch.int32), CropConfig(), np.random.default_rng(0))
