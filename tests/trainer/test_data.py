"""The training input stream: per-epoch shard order, interleaving, rank split, augmentation determinism."""

from __future__ import annotations

import pytest
import torch

from dataengine.ingest import IngestConfig, run_ingest
from dataengine.shards import load_shard_set
from dataengine.synth import SynthConfig, generate_corpus
from trainer.augment import CropConfig
import numpy as np

from dataengine.shards import ShardInfo
from trainer.data import (SHARDS_IN_FLIGHT, EpochPlan, ShardStream, batch_mix, batch_rows, epoch_shards,
                          expected_samples)
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


def _items(shard_set, epoch: int = 0, rank: int = 0, world_size: int = 1, skip_batches: int = 0, in_flight=4):
    stream = ShardStream(shard_set.shards, None, StreamConfig(seed=5, buffer_size=8), CropConfig(size=16),
                         EpochPlan(epoch, rank, world_size, skip_batches), batch_size=4, shards_in_flight=in_flight)
    return list(stream)


def _shard_of(shard_set, row: int) -> int:
    return next(i for i, shard in enumerate(shard_set.shards) if shard.first_row <= row < shard.end_row)


def test_an_epoch_emits_every_row_once_from_interleaved_shards_in_a_per_epoch_order(shard_set):
    num_rows = shard_set.shards[-1].end_row
    assert len(shard_set.shards) == 10 > 4  # shards in flight in _items: finished ones are replaced
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


def _class_sorted(num_classes: int, shards_per_class: int, shard_size: int) -> tuple[list[ShardInfo], np.ndarray]:
    """Shards that each hold one class, as an ingest of a class-sorted folder with --no-shuffle writes them."""
    num_shards = num_classes * shards_per_class
    shards = [ShardInfo(i, f"s{i}.tar", f"s{i}.tar", shard_size, i * shard_size) for i in range(num_shards)]
    return shards, np.repeat(np.arange(num_classes), shards_per_class * shard_size)


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_of_class_sorted_shards_mix_the_classes_about_as_an_iid_stream(workers):
    """CIFAR-10's layout at a fifth of its size (10 classes of 5 shards): the largest class's share of a batch
    is within 1.5x of an iid stream's with the default shards in flight, not with 4 of them."""
    shards, classes = _class_sorted(10, 5, 200)
    batch = 64
    iid_rows = np.random.default_rng(0).permutation(classes.size)
    iid = batch_mix((iid_rows[i:i + batch] for i in range(0, classes.size - batch + 1, batch)), classes)

    def mix(in_flight: int) -> dict:
        stream = ShardStream(shards, None, StreamConfig(seed=0, buffer_size=2048), CropConfig(size=8),
                             EpochPlan(0, 0, 1), batch, shards_in_flight=in_flight)
        return batch_mix(batch_rows(stream, workers), classes)

    mixed, few = mix(SHARDS_IN_FLIGHT), mix(4)
    assert mixed["batches"] == iid["batches"] == classes.size // batch
    assert mixed["max_class_share"] <= 1.5 * iid["max_class_share"] < few["max_class_share"]
    assert few["classes_per_batch"] < 8.5 < mixed["classes_per_batch"] <= 10


def test_batch_rows_are_the_rows_the_data_loader_gives(shard_set):
    stream = ShardStream(shard_set.shards, None, StreamConfig(seed=5, buffer_size=8), CropConfig(size=16),
                         EpochPlan(0, 0, 1), batch_size=4, shards_in_flight=3)
    loaded = [rows.numpy() for _, rows in torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2,
                                                                     drop_last=True)]
    planned = list(batch_rows(stream, 2))
    assert len(loaded) == len(planned) and all(np.array_equal(a, b) for a, b in zip(loaded, planned))
