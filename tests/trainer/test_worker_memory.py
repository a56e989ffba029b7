"""DataLoader workers share the per-row label arrays with the main process instead of holding a copy each."""

from __future__ import annotations

import dataclasses

import numpy as np
import psutil
import pytest

from dataengine.shards import load_shard_set
from trainer.augment import CropConfig
from trainer.data import EpochPlan, ShardStream, make_loader
from trainer.sampler import ClusterBalance, StreamConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = 20_000_000


def _workers_private_mb(train_shards: str, context: str | None = None) -> list[float]:
    """Private memory (USS) of each of 2 DataLoader workers streaming a 20M-row labelling."""
    shards = load_shard_set(train_shards).shards
    # The 160 real samples sit at the two ends of 20M rows, so that the labels must span all of them.
    shards = [dataclasses.replace(s, first_row=s.first_row if i < 2 else ROWS - (len(shards) - i) * s.num_samples)
              for i, s in enumerate(shards)]
    labels = np.random.default_rng(0).integers(0, 1000, ROWS)  # 160 MB of int64
    stream = ShardStream(shards, ClusterBalance(labels), StreamConfig(seed=0, buffer_size=32), CropConfig(size=8),
                         EpochPlan(0, 0, 1), batch_size=8)
    loader = make_loader(stream, 8, workers=2)
    if context:
        loader.multiprocessing_context = context
    batches = iter(loader)
    next(batches)  # the workers are running
    workers = [psutil.Process(worker.pid) for worker in batches._workers]  # not other children of this process
    private = [worker.memory_full_info().uss / 2**20 for worker in workers]
    del batches
    return private


def test_data_loader_workers_do_not_copy_the_per_row_labels(train_shards):
    private = _workers_private_mb(train_shards)
    assert len(private) == 2 and max(private) < 80, f"worker private memory {private} MB (labels: 160 MB)"
