"""Seeded subsets: water-filling quotas (oracle: brute force), hierarchical splits, per-cluster draws."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from indexes.selection import (
    balanced_quotas, capped_quotas, hierarchical_quotas, select_by_quota, select_random,
)


def _is_balanced(sizes: np.ndarray, quotas: np.ndarray, total: int) -> bool:
    """Max-min fair: every quota within its size, the right sum, and a cut cluster never gets fewer than
    another cluster's quota minus one."""
    cut = quotas < sizes
    if (quotas > sizes).any() or quotas.sum() != min(total, sizes.sum()):
        return False
    return not cut.any() or quotas[cut].min() >= quotas.max() - 1


def test_balanced_quotas_are_max_min_fair_exhaustively():
    for sizes in itertools.product(range(5), repeat=4):
        sizes = np.array(sizes)
        for total in range(sizes.sum() + 2):
            quotas = balanced_quotas(sizes, total, seed=3)
            assert _is_balanced(sizes, quotas, total), (sizes, total, quotas)


def test_balanced_quotas_cut_large_clusters_to_one_size():
    sizes = np.array([1000, 10, 500, 3, 40])
    quotas = balanced_quotas(sizes, 200, seed=0)
    # 10 + 3 + 40 kept whole; the 147 left shared by the two large clusters: 73 and 74.
    assert quotas[[1, 3, 4]].tolist() == [10, 3, 40] and sorted(quotas[[0, 2]].tolist()) == [73, 74]
    assert balanced_quotas(sizes, 10**6, seed=0).tolist() == sizes.tolist()


def test_extra_rows_go_to_seeded_clusters():
    sizes = np.full(50, 10)
    draws = {tuple(balanced_quotas(sizes, 125, seed=seed).tolist()) for seed in range(6)}
    assert len(draws) == 6  # which 25 clusters get a third row depends on the seed...
    assert balanced_quotas(sizes, 125, seed=4).tolist() == balanced_quotas(sizes, 125, seed=4).tolist()  # ...only


def test_hierarchical_quotas_are_balanced_at_every_level():
    rng = np.random.default_rng(0)
    parents1 = np.repeat(np.arange(3), [2, 5, 3])  # 3 top clusters, 10 middle ones
    parents2 = rng.integers(0, 10, size=40)
    parents2[:10] = np.arange(10)  # every middle cluster has a child
    leaf_sizes = rng.integers(0, 60, size=40)
    levels = hierarchical_quotas(leaf_sizes, [parents1, parents2], seed=1, total=300)
    sizes2 = leaf_sizes
    sizes1 = np.bincount(parents2, weights=sizes2, minlength=10).astype(int)
    sizes0 = np.bincount(parents1, weights=sizes1, minlength=3).astype(int)
    assert _is_balanced(sizes0, levels[0], 300)
    for upper, lower, parents, sizes in ((levels[0], levels[1], parents1, sizes1), (levels[1], levels[2], parents2, sizes2)):
        np.testing.assert_array_equal(np.bincount(parents, weights=lower, minlength=len(upper)), upper)
        for parent in range(len(upper)):
            children = parents == parent
            assert _is_balanced(sizes[children], lower[children], int(upper[parent]))


def test_hierarchical_per_cluster_caps_the_top_level():
    parents = np.array([0, 0, 1, 1, 1])
    levels = hierarchical_quotas(np.array([30, 2, 5, 5, 50]), [parents], seed=0, per_cluster=12)
    assert levels[0].tolist() == [12, 12] and levels[1].tolist() == [10, 2, 4, 4, 4]
    with pytest.raises(ValueError, match="exactly one"):
        hierarchical_quotas(np.array([1]), [], seed=0)


def test_select_by_quota_takes_each_clusters_quota_of_eligible_rows():
    rng = np.random.default_rng(5)
    labels = rng.integers(-1, 6, size=3000)
    sizes = np.bincount(labels[labels >= 0], minlength=6)
    quotas = capped_quotas(sizes, 100)
    kept = select_by_quota(labels, quotas, seed=2)
    assert not kept[labels < 0].any()
    np.testing.assert_array_equal(np.bincount(labels[kept], minlength=6), quotas)
    np.testing.assert_array_equal(kept, select_by_quota(labels, quotas, seed=2))
    other = select_by_quota(labels, quotas, seed=3)
    assert (other != kept).any() and np.bincount(labels[other], minlength=6).tolist() == quotas.tolist()


def test_select_by_quota_is_uniform_within_a_cluster():
    labels = np.zeros(20, dtype=np.int64)
    hits = sum(select_by_quota(labels, np.array([5]), seed=s).astype(int) for s in range(2000))
    # every row is kept with probability 1/4: 500 of 2000 draws, binomial sd ~19
    assert np.all(np.abs(hits - 500) < 100), hits


def test_select_random_draws_from_eligible_rows_only():
    eligible = np.arange(1000) % 3 != 0
    kept = select_random(eligible, 200, seed=0)
    assert kept.sum() == 200 and not kept[~eligible].any()
    np.testing.assert_array_equal(kept, select_random(eligible, 200, seed=0))
    assert (select_random(eligible, 200, seed=1) != kept).any()
    assert select_random(eligible, 10**6, seed=0).sum() == eligible.sum()
