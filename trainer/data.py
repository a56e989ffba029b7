"""Training input: shards streamed from local disk or object storage, balanced over clusters.

Shards are dealt to ``(rank, DataLoader worker)`` pairs round-robin; each pair streams its shards in order
with webdataset (an fsspec opener for ``s3://``), numbers every sample by its global row (the shard's first
row + its position in the shard: the row order of ``metadata.parquet`` and of the feature store), lets a
:class:`~trainer.sampler.BalancedStream` decide how many times it is emitted and in which order, and only
then decodes and augments it. The labels join in the main process as ``labels[row]`` (flat arrays).

Determinism: augmentation draws come from a generator seeded by ``(seed, epoch, rank, worker, item)``, so
a run resumed at batch ``b`` can skip the first items of every worker *without decoding them* and continue
with exactly the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from dataengine.shards import ShardInfo, StreamErrors, register_fsspec_opener, sample_stream
from trainer.augment import CropConfig, random_resized_crop_flip
from trainer.sampler import BalancedStream, ClusterBalance, StreamConfig, stream_rng

logger = logging.getLogger(__name__)

_TAG_AUGMENT = 11


@dataclass(frozen=True)
class EpochPlan:
    """What one rank streams in one epoch."""

    epoch: int
    rank: int
    world_size: int
    skip_batches: int = 0
    """Batches this rank already consumed in this epoch (resume): skipped without decoding."""


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG bytes -> (3, H, W) uint8 tensor."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ShardStream(torch.utils.data.IterableDataset):
    """Yields ``(image uint8 (3, S, S), row)`` for one rank's share of one epoch.

    Args:
        shards: every shard of the ingest, in manifest order.
        balance: emission rates per cluster (``None``: every sample once, e.g. RotNet).
        stream: seed and shuffle-buffer size.
        crop: the random-resized-crop + flip applied to every emitted sample.
        plan: epoch, rank, world size, and batches to skip on resume.
        batch_size: batch size of the DataLoader (to turn skipped batches into skipped items).
        storage_options: fsspec options for remote shards.
    """

    def __init__(self, shards: list[ShardInfo], balance: ClusterBalance | None, stream: StreamConfig,
                 crop: CropConfig, plan: EpochPlan, batch_size: int,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.shards = shards
        self.balance = balance
        self.stream = stream
        self.crop = crop
        self.plan = plan
        self.batch_size = batch_size
        self.storage_options = dict(storage_options or {})

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _skip_items(self, worker: int, num_workers: int) -> int:
        # The DataLoader takes batches from its workers round-robin: batch b comes from worker b % W.
        batches = max(0, -(-(self.plan.skip_batches - worker) // num_workers))
        return batches * self.batch_size

    def _rows(self, shards: list[ShardInfo]) -> Iterator[tuple[int, dict[str, Any]]]:
        errors = StreamErrors()
        for shard in shards:
            position = 0
            for sample in sample_stream([shard.url], handler=errors):
                yield shard.first_row + position, sample
                position += 1
            if position != shard.num_samples:
                logger.warning("%s: streamed %d samples, the manifest says %d (rows after the gap are shifted)",
                               shard.url, position, shard.num_samples)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        worker, num_workers = self._worker()
        register_fsspec_opener(self.storage_options)
        # Rank r streams shards r, r + world, ...; its worker w takes every W-th of those.
        mine = self.shards[self.plan.rank::self.plan.world_size][worker::num_workers]
        stream = BalancedStream(self.balance, self.stream, epoch=self.plan.epoch, rank=self.plan.rank, worker=worker)
        skip = self._skip_items(worker, num_workers)
        for index, (row, sample) in enumerate(stream(self._rows(mine))):
            if index < skip:
                continue
            rng = stream_rng(self.stream.seed, _TAG_AUGMENT, self.plan.epoch, self.plan.rank, worker, index)
            image = random_resized_crop_flip(decode_rgb(sample["jpg"]), self.crop, rng)
            yield image, row


def make_loader(dataset: ShardStream, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over a :class:`ShardStream` (in-order batches; the last partial batch is dropped)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )


def expected_samples(shards: list[ShardInfo], balance: ClusterBalance | None, plan: EpochPlan) -> float:
    """Expected samples this rank emits in the epoch (all its workers together)."""
    rows = [np.arange(s.first_row, s.end_row) for s in shards[plan.rank::plan.world_size]]
    if not rows:
        return 0.0
    rows_all = np.concatenate(rows)
    return float(rows_all.size if balance is None else balance.expected(rows_all).sum())
