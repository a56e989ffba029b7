"""Seeded subsets of clustered rows: random, balanced over clusters, or balanced at every level of a hierarchy.

Balanced selection follows the clustering-based curation of Vo et al. (2024, "Automatic data curation for
self-supervised learning"): to draw ``total`` rows from clusters of sizes ``n_c``, every cluster gets
``min(n_c, t)`` rows for the largest cut ``t`` that stays within ``total`` (water-filling: small clusters are
kept whole, large ones are cut to the same size), and the few rows still missing go one each to clusters
larger than ``t``, chosen at random. Hierarchical selection applies the same rule at every level: the
top-level clusters share ``total``, each cluster's quota is shared among its children, down to the leaves.
Within a cluster the rows kept are those with the smallest pseudo-random keys (:func:`indexes.data.row_keys`
of the row index), so a selection depends only on the rows, the clusters and the seed: not on block sizes,
storage or the order in which clusters are visited.
"""

from __future__ import annotations

import numpy as np

from indexes.data import row_keys


def key_offset(seed: int) -> int:
    """The offset added to row indices before hashing, drawn from ``seed``.

    :func:`indexes.data.row_keys` hashes ``index + seed``, so seeds ``s`` and ``s + 1`` would give the same keys
    shifted by one row; an offset drawn from the seed makes the key sequences of different seeds unrelated.
    """
    return int(np.random.default_rng(np.random.SeedSequence([seed, 0x5E1EC7])).integers(0, 2**62))


def balanced_quotas(sizes: np.ndarray, total: int, seed: int, ids: np.ndarray | None = None) -> np.ndarray:
    """Rows to take from each cluster so that ``total`` rows are spread as evenly as the sizes allow.

    Args:
        sizes: rows available per cluster (non-negative).
        total: rows wanted; every row is taken when ``total >= sizes.sum()``.
        seed: decides which clusters above the cut give one extra row.
        ids: global ids of the clusters, hashed with ``seed`` to rank them for the extra rows (default: their
            positions); splits of a hierarchy pass their children's ids so that no position is favoured.

    Returns:
        ``(len(sizes),)`` int64 quotas, each ``<= sizes``, summing to ``min(total, sizes.sum())``; any two
        quotas of clusters that are not taken whole differ by at most one.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError("sizes must be a 1-D array of non-negative counts")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if total >= sizes.sum():
        return sizes.copy()
    low, high = 0, int(sizes.max())  # invariant: sum(min(sizes, low)) <= total < sum(min(sizes, high))
    while high - low > 1:
        middle = (low + high) // 2
        if np.minimum(sizes, middle).sum() <= total:
            low = middle
        else:
            high = middle
    quotas = np.minimum(sizes, low)
    remainder = total - int(quotas.sum())  # < the number of clusters above the cut, by the invariant
    if remainder:
        above = np.flatnonzero(sizes > low)
        keys = row_keys(above if ids is None else np.asarray(ids, dtype=np.int64)[above], key_offset(seed) + 1)
        quotas[above[np.argsort(keys, kind="stable")[:remainder]]] += 1
    return quotas


def capped_quotas(sizes: np.ndarray, per_cluster: int) -> np.ndarray:
    """``min(size, per_cluster)`` rows from every cluster."""
    if per_cluster < 0:
        raise ValueError(f"per_cluster must be >= 0, got {per_cluster}")
    return np.minimum(np.asarray(sizes, dtype=np.int64), per_cluster)


def hierarchical_quotas(leaf_sizes: np.ndarray, parents: list[np.ndarray], seed: int, *,
                        total: int | None = None, per_cluster: int | None = None) -> list[np.ndarray]:
    """Quotas at every level of a hierarchy, balanced among the children of each cluster.

    Args:
        leaf_sizes: rows available per cluster of the last level.
        parents: for each level ``l >= 1``, ``parents[l - 1][c]`` is the level ``l - 1`` parent of level-``l``
            cluster ``c`` (so ``len(parents)`` is the number of levels minus one).
        seed: decides which children of each split get the extra rows.
        total: rows wanted overall, shared among the top-level clusters with :func:`balanced_quotas`...
        per_cluster: ...or at most this many rows from each top-level cluster. Exactly one of the two.

    Returns:
        Quotas per level, top level first; each cluster's quota is the sum of its children's.
    """
    if (total is None) == (per_cluster is None):
        raise ValueError("give exactly one of total and per_cluster")
    sizes = [np.asarray(leaf_sizes, dtype=np.int64)]
    for level_parents in reversed(parents):
        level_parents = np.asarray(level_parents, dtype=np.int64)
        if level_parents.shape != sizes[0].shape:
            raise ValueError(f"parents of {level_parents.shape[0]} clusters for {sizes[0].shape[0]} clusters")
        sizes.insert(0, np.bincount(level_parents, weights=sizes[0], minlength=int(level_parents.max(initial=-1)) + 1)
                     .astype(np.int64))
    quotas = [balanced_quotas(sizes[0], total, seed) if total is not None else capped_quotas(sizes[0], per_cluster)]
    for level in range(1, len(sizes)):
        level_parents = np.asarray(parents[level - 1], dtype=np.int64)
        level_quotas = np.zeros_like(sizes[level])
        order = np.argsort(level_parents, kind="stable")
        bounds = np.searchsorted(level_parents[order], np.arange(len(sizes[level - 1]) + 1))
        for parent in np.flatnonzero(quotas[-1]):
            children = order[bounds[parent]:bounds[parent + 1]]
            # Child ids are global per level, so one seed ranks every split's candidates independently.
            level_quotas[children] = balanced_quotas(sizes[level][children], int(quotas[-1][parent]), seed,
                                                     ids=children)
        quotas.append(level_quotas)
    return quotas


def select_by_quota(labels: np.ndarray, quotas: np.ndarray, seed: int) -> np.ndarray:
    """Rows kept when cluster ``c`` keeps ``quotas[c]`` of its rows, those with the smallest keys.

    Args:
        labels: cluster of every row; negative = not eligible (never kept).
        quotas: rows to keep per cluster (at most its eligible rows).
        seed: the row keys' seed.

    Returns:
        ``(len(labels),)`` bool mask of the kept rows.
    """
    labels = np.asarray(labels, dtype=np.int64)
    quotas = np.asarray(quotas, dtype=np.int64)
    eligible = np.flatnonzero(labels >= 0)
    clusters = labels[eligible]
    if clusters.size and clusters.max() >= len(quotas):
        raise ValueError(f"labels reach {clusters.max()} but there are quotas for {len(quotas)} clusters")
    order = np.lexsort((row_keys(eligible, key_offset(seed)), clusters))
    ordered = clusters[order]
    rank = np.arange(len(ordered)) - np.searchsorted(ordered, ordered, side="left")
    kept = np.zeros(len(labels), dtype=bool)
    kept[eligible[order[rank < quotas[ordered]]]] = True
    return kept


def select_random(eligible: np.ndarray, total: int, seed: int) -> np.ndarray:
    """``total`` eligible rows drawn uniformly without replacement (all of them if there are fewer).

    Args:
        eligible: ``(N,)`` bool mask of the rows that may be drawn.
        total: rows wanted.
        seed: the row keys' seed.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    rows = np.flatnonzero(np.asarray(eligible, dtype=bool))
    kept = np.zeros(len(eligible), dtype=bool)
    if total >= len(rows):
        kept[rows] = True
    elif total:
        keys = row_keys(rows, key_offset(seed))
        kept[rows[np.argpartition(keys, total - 1)[:total]]] = True
    return kept


__all__ = ["balanced_quotas", "capped_quotas", "hierarchical_quotas", "key_offset", "select_by_quota", "select_random"]
