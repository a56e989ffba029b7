"""The training input stream: per-epoch shard order, interleaving, rank split, augmentation determinism."""

from __future__ import annotations

import pytest
import torch

from dataengine.ingest import IngestConfig, run_ingest
from dataengine.shards import load_shard_set
from dataengine.synth import SynthConfig, generate_corpus
from trainer.augment import CropConfig
from trainer.data import INTERLEAVE, EpochPlan, ShardStream, epoch_shards, expected_samples
from trainer.sampler import StreamConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_corpus(str(root / "corpus"), SynthConfig(num_images=120, seed=3, anomalies=False,
                                                      min_image_size=20, max_image_size=28))
    run_ingest(IngestConfig(yfcc=str(root / "corpus" / "metadata.tsv"), images=str(root / "corpus" / "images"),
                            out=str(root / "ingest"), shard_size=12, workers=0))
    return load_shard_set(str(root / "ingest"))


def _items(shard_set, epoch: int = 0, rank: int = 0, world_size: int = 1, skip_batches: int = 0):
    stream = ShardStream(shard_set.shards, None, StreamConfig(seed=5, buffer_size=8), CropConfig(size=16),
                         EpochPlan(epoch, rank, world_size, skip_batches), batch_size=4)
    return list(stream)


def _shard_of(shard_set, row: int) -> int:
    return next(i for i, shard in enumerate(shard_set.shards) if shard.first_row <= row < shard.end_row)


def test_an_epoch_emits_every_row_once_from_interleaved_shards_in_a_per_epoch_order(shard_set):
    num_rows = shard_set.shards[-1].end_row
    assert len(shard_set.shards) == 10 > INTERLEAVE
    epochs = [[row for _, row in _items(shard_set, epoch)] for epoch in (0, 1)]
    for rows in epochs:
        assert sorted(rows) == list(range(num_rows))
        # The first buffer-fulls already mix several shards (ingest order would give one shard at a time).
        assert len({_shard_of(shard_set, row) for row in rows[:8]}) >= 3
    assert epochs[0] != epochs[1]
    orders = [[s.url for s in epoch_shards(shard_set.shards, 5, EpochPlan(e, 0, 1))] for e in (0, 1, 2)]
    assert all(sorted(order) == sorted(s.url for s in shard_set.shards) for order in orders)
    assert len({tuple(order) for order in orders}) == 3


def test_ranks_split_the_shards_and_the_stream_is_deterministic(shard_set):
    parts = [[row for _, row in _items(shard_set, 1, rank, 2)] for rank in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(shard_set.shards[-1].end_row))
    for rank in (0, 1):
        plan = EpochPlan(1, rank, 2)
        assert expected_samples(shard_set.shards, None, plan, 5) == len(parts[rank])
    first, again = _items(shard_set, 1), _items(shard_set, 1)
    assert [row for _, row in first] == [row for _, row in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    assert first[0][0].shape == (3, 16, 16) and first[0][0].dtype == torch.uint8


def test_resume_skips_whole_batches_and_continues_identically(shard_set):
    full, resumed = _items(shard_set, 2), _items(shard_set, 2, skip_batches=3)
    assert [row for _, row in resumed] == [row for _, row in full[12:]]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full[12:], resumed))
