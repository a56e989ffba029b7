"""Per-sample quarter-turn rotations of a batch."""

from __future__ import annotations

import pytest
import torch

from trainer.rotation import random_rotations, rotate_batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(batch: int = 12, size: int = 5, dtype=torch.uint8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_rotate_batch_matches_per_sample_rot90(dtype):
    images = _images(dtype=dtype)
    rotations = random_rotations(12, torch.Generator().manual_seed(1))
    original = images.clone()
    rotated = rotate_batch(images, rotations)
    for b in range(12):
        assert torch.equal(rotated[b], torch.rot90(images[b], int(rotations[b]), dims=(-2, -1)))
    assert torch.equal(images, original)
    assert rotated.dtype == dtype


def test_quarter_turn_is_counter_clockwise_and_four_turns_are_identity():
    image = torch.zeros(1, 1, 3, 3)
    image[0, 0, 0, 2] = 1.0  # top-right corner
    turned = rotate_batch(image, torch.tensor([1]))
    assert turned[0, 0, 0, 0] == 1.0  # counter-clockwise: top-right goes to top-left
    images = _images()
    rotations = torch.arange(12) % 4
    back = rotate_batch(rotate_batch(images, rotations), (4 - rotations) % 4)
    assert torch.equal(back, images)


def test_random_rotations_are_seeded_and_cover_all_angles():
    first = random_rotations(400, torch.Generator().manual_seed(3))
    second = random_rotations(400, torch.Generator().manual_seed(3))
    assert torch.equal(first, second) and first.dtype == torch.int64
    assert not torch.equal(first, random_rotations(400, torch.Generator().manual_seed(4)))
    counts = torch.bincount(first, minlength=4)
    assert counts.min() > 60  # ~100 each


def test_rotate_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(2, 3, 4, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        rotate_batch(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rotations must be in"):
        rotate_batch(torch.zeros(2, 3, 4, 4), torch.tensor([0, 4]))
