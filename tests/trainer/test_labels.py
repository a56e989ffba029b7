"""Per-row training targets in the smallest integer types, read without int64 copies of the rows."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import trainer.labels as labels_module
from trainer.labels import Labels
from trainer.sampler import ClusterBalance

ROWS = 2_000_000


class _Clustering:
    """What :meth:`Labels.from_store` reads of a clustering: 4 x 1,000 clusters, a leaf of -1 for every 10th row."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.level0 = rng.integers(0, 4, ROWS).astype(np.int32)
        self.level1 = (self.level0 * 1000 + rng.integers(0, 1000, ROWS)).astype(np.int32)
        self.level0[::10] = self.level1[::10] = -1

    def assignments(self, level: int) -> np.ndarray:
        return (self.level0, self.level1)[level]

    def sizes(self, level: int) -> np.ndarray:
        return np.zeros((4, 4000)[level], np.int64)

    def parents(self, level: int) -> np.ndarray:
        return np.repeat(np.arange(4, dtype=np.int32), 1000)


def _peak(work):
    tracemalloc.start()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mode", ["deepercluster", "deepcluster"])
def test_targets_take_a_few_bytes_a_row(monkeypatch, mode):
    """2M rows of 4 x 1,000 clusters: the per-row arrays hold at most 8 bytes a row (int64 held 24, and reading
    them peaked at 64), and building them peaks below 10 bytes a row (Python-visible, tracemalloc)."""
    clustering = _Clustering()
    monkeypatch.setattr(labels_module, "open_clustering", lambda store, name: clustering)
    labels, peak = _peak(lambda: Labels.from_store(None, "c", mode))
    held = sum(a.nbytes for a in {id(a): a for a in (labels.balance, labels.parents, labels.local)}.values())
    assert held <= 8 * ROWS, f"{held / ROWS:.1f} bytes a row held"
    assert peak < 10 * ROWS, f"{peak / ROWS:.1f} bytes a row at the peak"
    rows = np.array([1, 2, 3, 10, ROWS - 1])
    parents, local = labels.targets(rows)
    assert parents.dtype == local.dtype == np.int64
    if mode == "deepercluster":
        assert labels.balance[rows].tolist() == clustering.level1[rows].tolist()
        keep = clustering.level1[rows] >= 0
        assert parents[keep].tolist() == clustering.level0[rows][keep].tolist()
        assert local[keep].tolist() == (clustering.level1[rows][keep] % 1000).tolist()
        assert labels.counts.tolist() == [1000] * 4 and labels.num_clusters == 4000
    else:
        assert parents.tolist() == clustering.level0[rows].tolist() and not local.any()


def test_balance_counts_the_labels_without_copying_them():
    """ClusterBalance of 2M int16 labels: under a byte a row at the peak (the labelled rows' copy and its int64
    copy in np.bincount took 11)."""
    labels = np.random.default_rng(1).integers(-1, 4000, ROWS).astype(np.int16)
    balance, peak = _peak(lambda: ClusterBalance(labels))
    assert peak < ROWS, f"{peak / ROWS:.1f} bytes a row"
    assert balance.sizes.tolist() == np.bincount(labels[labels >= 0]).tolist()
    assert balance.num_labelled == np.count_nonzero(labels >= 0)
    with pytest.raises(ValueError, match="no labelled row"):
        ClusterBalance(np.full(5, -1, np.int32))


def test_expected_samples_are_summed_without_an_index_per_row():
    """The steps of an epoch come from the expected emissions of the rank's rows: summed a block of shards at a
    time, not from every row's index and rate at once (41 bytes a row of the rank, 2 GB a rank of 2 at 96M)."""
    from dataengine.shards import ShardInfo
    from trainer.data import EpochPlan, epoch_shards, expected_samples

    labels = np.random.default_rng(2).integers(-1, 4000, ROWS).astype(np.int16)
    balance = ClusterBalance(labels)
    shards = [ShardInfo(i, f"shard-{i}.tar", "", 1000, first) for i, first in enumerate(range(0, ROWS, 1000))]
    plan = EpochPlan(0, 1, 2)
    total, peak = _peak(lambda: expected_samples(shards, balance, plan, seed=3))
    assert peak < 2 * ROWS, f"{peak / ROWS:.1f} bytes a row"
    rows = np.concatenate([np.arange(s.first_row, s.end_row) for s in epoch_shards(shards, 3, plan)])
    assert total == pytest.approx(balance.expected(rows).sum(), rel=1e-9)
