"""Rotations by multiples of 90 degrees, the self-supervised task of RotNet and DeeperCluster.

Rotation ``r`` in ``{0, 1, 2, 3}`` means ``r`` quarter turns counter-clockwise (0, 90, 180, 270 degrees),
as :func:`torch.rot90` with ``dims=(-2, -1)`` applies them. Images must be square so that a rotated batch
keeps its shape (training crops are).
"""

from __future__ import annotations

import logging

import torch

from trainer.losses import NUM_ROTATIONS

logger = logging.getLogger(__name__)


def random_rotations(batch_size: int, generator: torch.Generator, device: torch.device | str | None = None
                     ) -> torch.Tensor:
    """``batch_size`` rotations drawn uniformly from ``{0, 1, 2, 3}`` with ``generator`` (int64).

    The draw happens on the generator's device (CPU for a default ``torch.Generator()``) and the result
    is then moved to ``device``, so the same seed gives the same rotations whatever the target device.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 0")
    rotations = torch.randint(0, NUM_ROTATIONS, (batch_size,), generator=generator, device=generator.device)
    return rotations.to(device) if device is not None else rotations


def rotate_batch(images: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``images`` (``(B, C, H, H)``, any dtype) by its own ``rotations[b]`` quarter turns.

    Vectorised per rotation: one :func:`torch.rot90` call per rotation present in the batch (at most four),
    on the rows that need it. Returns a new tensor; ``images`` is untouched.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be a (B, C, H, H) batch of square images, got {tuple(images.shape)}")
    if rotations.shape != (images.shape[0],):
        raise ValueError(f"rotations must have shape ({images.shape[0]},), got {tuple(rotations.shape)}")
    if rotations.numel() and (rotations.min() < 0 or rotations.max() >= NUM_ROTATIONS):
        raise ValueError(f"rotations must be in [0, {NUM_ROTATIONS}), got [{int(rotations.min())}, "
                         f"{int(rotations.max())}]")
    rotations = rotations.to(images.device)
    rotated = images.clone()
    for quarter_turns in range(1, NUM_ROTATIONS):
        rows = (rotations == quarter_turns).nonzero().squeeze(1)
        if rows.numel():
            rotated[rows] = torch.rot90(images[rows], quarter_turns, dims=(-2, -1))
    return rotated
