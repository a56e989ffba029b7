"""Training input: shards streamed from local disk or object storage, balanced over clusters.

Every epoch the shards are put in a seeded random order (the same on every rank) and dealt to ``(rank,
DataLoader worker)`` pairs round-robin; each pair reads its shards ``shards_in_flight`` at a time, taking
samples from them in turn (shards ingested in input order from a class-sorted folder hold one class each:
read one at a time, even a large shuffle buffer would make single-class batches; read 32 at a time, a batch
mixes up to 32 shards' classes: :func:`batch_mix` measures it). It numbers every sample by
its global row (the shard's first row + its position in the shard: the row order of ``metadata.parquet``
and of the feature store), lets a :class:`~trainer.sampler.BalancedStream` decide how many times it is
emitted and in which order, and only then decodes and augments it. The labels join in the main process as
``labels[row]`` (flat arrays).

Determinism: the augmentation draws of item ``i`` of a worker come from a generator seeded by ``(seed, epoch,
rank, worker, i // 256)`` (one draw of 256 items' uniforms at a time: seeding a generator per item cost more
than decoding a 32-pixel JPEG), so a run resumed at batch ``b`` can skip the first items of every worker
*without decoding them* and continue with exactly the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from dataengine.shards import ShardInfo, StreamErrors, image_member, register_fsspec_opener, sample_stream
from trainer.augment import CROP_DRAWS, CropConfig, resized_crop_flip
from trainer.elastic import Piece, StreamLayout, slot_pieces
from trainer.sampler import BalancedStream, ClusterBalance, StreamConfig, stream_rng

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TAG_AUGMENT = 11
_TAG_SHARDS = 12
_AUGMENT_BLOCK = 256  # items whose augmentation draws one generator makes
SHARDS_IN_FLIGHT = 32
"""Shards a DataLoader worker reads at a time by default, alternating between them sample by sample."""


@dataclass(frozen=True)
class EpochPlan:
    """What one rank streams in one epoch."""

    epoch: int
    rank: int
    world_size: int
    skip_batches: int = 0
    """Batches this rank already consumed in this epoch (resume): skipped without decoding, unless ``layout``
    has pieces."""
    layout: StreamLayout | None = None
    """The epoch's stream layout after an elastic resume (:mod:`trainer.elastic`): with ``pieces``, the rank's
    workers read the pieces dealt to them (and yield each item's piece number) instead of their own sources."""


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG bytes (or any image PIL reads) -> (3, H, W) uint8 tensor."""
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
        shards_in_flight: shards each DataLoader worker reads at a time, sample by sample in turn.
    """

    def __init__(self, shards: list[ShardInfo], balance: ClusterBalance | None, stream: StreamConfig,
                 crop: CropConfig, plan: EpochPlan, batch_size: int,
                 storage_options: dict[str, Any] | None = None, shards_in_flight: int = SHARDS_IN_FLIGHT) -> None:
        super().__init__()
        if shards_in_flight < 1:
            raise ValueError(f"shards_in_flight={shards_in_flight} must be >= 1")
        self.shards_in_flight = shards_in_flight
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

    def worker_stream(self, worker: int, num_workers: int, rows_of: Callable[[ShardInfo], Iterator[tuple[int, T]]],
                      plan: EpochPlan | None = None) -> Iterator[tuple[int, T]]:
        """The ``(row, item)`` sequence worker ``worker`` emits (balanced and shuffled), items read by
        ``rows_of(shard)``: the samples themselves, or anything else in their place (:func:`batch_rows`);
        ``plan``: the epoch and rank whose worker it is (by default this stream's)."""
        plan = plan or self.plan
        # Rank r streams this epoch's shards r, r + world, ...; its worker w takes every W-th of those.
        mine = epoch_shards(self.shards, self.stream.seed, plan)[worker::num_workers]
        stream = BalancedStream(self.balance, self.stream, epoch=plan.epoch, rank=plan.rank, worker=worker)
        return stream(interleave((rows_of(shard) for shard in mine), self.shards_in_flight))

    @staticmethod
    def _shard_rows(shard: ShardInfo) -> Iterator[tuple[int, dict[str, Any]]]:
        position = 0
        for sample in sample_stream([shard.url], handler=StreamErrors()):
            yield shard.first_row + position, sample
            position += 1
        if position != shard.num_samples:
            logger.warning("%s: streamed %d samples, the manifest says %d (rows after the gap are shifted)",
                           shard.url, position, shard.num_samples)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]]:
        worker, num_workers = self._worker()
        register_fsspec_opener(self.storage_options)
        layout = self.plan.layout
        if layout is None or layout.pieces is None:
            own = Piece(self.plan.rank * num_workers + worker, self._skip_items(worker, num_workers))
            yield from self._source_items(own, self.plan, worker, num_workers)
            return
        if num_workers != layout.workers:
            raise ValueError(f"the epoch's stream was laid out for {layout.workers} workers per rank, not "
                             f"{num_workers}")
        slots = self.plan.world_size * num_workers
        mine = slot_pieces(layout.pieces, self.plan.rank * num_workers + worker, slots)
        streams = [self._piece_items(number, piece, layout) for number, piece in mine]
        yield from interleave(streams, max(len(streams), 1))

    def _piece_items(self, number: int, piece: Piece, layout: StreamLayout) -> Iterator[tuple[torch.Tensor, int, int]]:
        rank, worker = divmod(piece.source, layout.workers)
        plan = EpochPlan(self.plan.epoch, rank, layout.world_size)
        return ((image, row, number) for image, row in self._source_items(piece, plan, worker, layout.workers))

    def _source_items(self, piece: Piece, plan: EpochPlan, worker: int,
                      num_workers: int) -> Iterator[tuple[torch.Tensor, int]]:
        """``(crop, row)`` of the items of ``piece``, a part of the source of ``plan``'s rank and ``worker``: each
        item decoded and cropped as that source's own worker does, the others skipped without decoding."""
        draws, drawn = np.empty((0, CROP_DRAWS)), -1
        for index, (row, sample) in enumerate(self.worker_stream(worker, num_workers, self._shard_rows, plan)):
            if not piece.takes(index):
                continue
            block, offset = divmod(index, _AUGMENT_BLOCK)
            if block != drawn:
                rng = stream_rng(self.stream.seed, _TAG_AUGMENT, plan.epoch, plan.rank, worker, block)
                draws, drawn = rng.random((_AUGMENT_BLOCK, CROP_DRAWS)), block
            yield resized_crop_flip(self._image(sample, row), self.crop, draws[offset]), row

    def _image(self, sample: dict[str, Any], row: int) -> torch.Tensor:
        """The sample's decoded image; a black one for a sample without a decodable image (possible in shards
        another tool wrote), so that every stream position still yields one item (resume counts items)."""
        data = image_member(sample)
        try:
            if data is None:
                raise ValueError(f"no image member among {sorted(sample)}")
            return decode_rgb(data)
        except Exception as exc:  # any decode failure of one sample: logged, the run goes on
            logger.warning("row %d (%s): no decodable image (%s); a black image stands in", row,
                           sample.get("__key__"), f"{type(exc).__name__}: {exc}")
            return torch.zeros((3, self.crop.size, self.crop.size), dtype=torch.uint8)


def interleave(streams: Iterable[Iterator[T]], in_flight: int) -> Iterator[T]:
    """The items of ``streams``, ``in_flight`` of them at a time, one item of each in turn; a finished stream
    is replaced by the next one."""
    waiting = iter(streams)
    active = list(itertools.islice(waiting, in_flight))
    while active:
        for stream in list(active):
            item = next(stream, None)
            if item is not None:
                yield item
                continue
            active.remove(stream)
            following = next(waiting, None)
            if following is not None:
                active.append(following)


def batch_rows(dataset: ShardStream, workers: int) -> Iterator[np.ndarray]:
    """The rows of every batch the DataLoader of ``dataset`` gives (``workers`` workers, ``drop_last``), in
    order, without reading a shard: a diagnosis of the stream's mix (classes per batch, repeats)."""
    def rows_of(shard: ShardInfo) -> Iterator[tuple[int, None]]:
        return ((row, None) for row in range(shard.first_row, shard.end_row))

    num = max(workers, 1)
    streams = [dataset.worker_stream(worker, num, rows_of) for worker in range(num)]
    active = list(range(num))
    while active:  # the DataLoader takes one batch of each worker in turn
        for worker in list(active):
            batch = [row for row, _ in itertools.islice(streams[worker], dataset.batch_size)]
            if len(batch) < dataset.batch_size:
                active.remove(worker)
            else:
                yield np.asarray(batch, dtype=np.int64)


def batch_mix(batches: Iterable[np.ndarray], classes: np.ndarray) -> dict[str, float]:
    """How well batches mix ``classes`` (a class id per row): the mean over batches of the largest class's
    share of the batch, and of the number of classes in the batch (an iid stream of ``C`` equal classes gives
    about ``1/C`` plus noise, and ``min(C, batch size)``)."""
    shares, present = [], []
    for rows in batches:
        counts = np.bincount(classes[rows])
        shares.append(counts.max() / len(rows))
        present.append(np.count_nonzero(counts))
    if not shares:
        raise ValueError("no batch to measure")
    return {"max_class_share": float(np.mean(shares)), "classes_per_batch": float(np.mean(present)),
            "batches": len(shares)}


def make_loader(dataset: ShardStream, batch_size: int, workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a :class:`ShardStream` (in-order batches; the last partial batch is dropped; batches in
    page-locked memory with ``pin_memory``, for asynchronous copies to a GPU)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
        persistent_workers=False, pin_memory=pin_memory,
    )


def epoch_shards(shards: list[ShardInfo], seed: int, plan: EpochPlan) -> list[ShardInfo]:
    """The shards ``plan.rank`` streams in ``plan.epoch``, in order: a seeded per-epoch permutation of all
    shards (the same on every rank), dealt round-robin to the ranks."""
    order = stream_rng(seed, _TAG_SHARDS, plan.epoch).permutation(len(shards))
    return [shards[index] for index in order[plan.rank::plan.world_size]]


_EXPECTED_BLOCK_ROWS = 1 << 16


def expected_samples(shards: list[ShardInfo], balance: ClusterBalance | None, plan: EpochPlan, seed: int,
                     worker: int = 0, num_workers: int = 1) -> float:
    """Expected samples this rank emits in the epoch (all its workers together; one of ``num_workers`` with
    ``worker``)."""
    mine = epoch_shards(shards, seed, plan)[worker::num_workers]
    if balance is None:
        return float(sum(s.num_samples for s in mine))
    # Summed a block of shards at a time: every row's index and rate at once took 41 bytes a row of the rank.
    total, block = 0.0, []
    for shard in [*mine, None]:
        if shard is not None:
            block.append(np.arange(shard.first_row, shard.end_row))
        if block and (shard is None or sum(len(b) for b in block) >= _EXPECTED_BLOCK_ROWS):
            total += float(balance.expected(np.concatenate(block)).sum())
            block = []
    return total


def expected_piece_samples(shards: list[ShardInfo], balance: ClusterBalance | None, plan: EpochPlan,
                           seed: int) -> float:
    """Expected samples this rank's workers emit from the pieces an elastic resume dealt them (``plan.layout``)."""
    layout = plan.layout
    assert layout is not None and layout.pieces is not None
    slots = plan.world_size * layout.workers
    total = 0.0
    for worker in range(layout.workers):
        for _, piece in slot_pieces(layout.pieces, plan.rank * layout.workers + worker, slots):
            rank, source_worker = divmod(piece.source, layout.workers)
            source = expected_samples(shards, balance, EpochPlan(plan.epoch, rank, layout.world_size), seed,
                                      source_worker, layout.workers)
            total += piece.expected_left(source)
    return total
