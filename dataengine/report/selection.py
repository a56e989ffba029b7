"""Choosing the clusters shown as photo grids, and the photos drawn from each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataengine.metrics import KIND_HASHTAG, ClusterFlagConfig, ClusterProfiles


def select_clusters(profiles: ClusterProfiles, tag_counts: np.ndarray | None, *, flags: ClusterFlagConfig,
                    max_landmarks: int) -> dict[int, list[str]]:
    """The clusters worth a photo grid, each with the reasons it was chosen (deterministic, in this order).

    The largest cluster; per kind the purest cluster with at least ``flags.min_size`` rows and
    ``flags.min_labelled`` labelled rows (ties: more labelled rows, then the smaller id); the largest landmark
    clusters; the largest device cluster; and, among clusters whose dominant hashtag is held by at least two
    of their rows, the one whose hashtag is most frequent in the whole corpus (head tag) and the one whose
    hashtag is rarest (tail tag).

    Args:
        profiles: per-cluster profiles of the reported clustering.
        tag_counts: global count of each hashtag code (``TagVocabulary.counts``), None without hashtags.
        flags: thresholds (see :class:`~dataengine.metrics.ClusterFlagConfig`).
        max_landmarks: landmark clusters to show at most.
    """
    ids, sizes = profiles.cluster_ids, profiles.sizes
    chosen: dict[int, list[str]] = {}

    def add(index: int, reason: str) -> None:
        chosen.setdefault(int(ids[index]), []).append(reason)

    if ids.size:
        add(int(np.argmax(sizes)), "largest")
    big = sizes >= flags.min_size
    for kind, table in profiles.purity.items():
        eligible = np.flatnonzero(big & (table.labelled >= max(flags.min_labelled, 1)))
        if eligible.size:
            add(int(eligible[np.lexsort((ids[eligible], -table.labelled[eligible], -table.purity[eligible]))[0]]),
                f"purest {kind}")
    by_size = np.argsort(-sizes, kind="stable")
    for index in [i for i in by_size if profiles.landmark[i]][:max_landmarks]:
        add(int(index), "landmark")
    for index in [i for i in by_size if profiles.device[i]][:1]:
        add(int(index), "device cluster")
    if tag_counts is not None and KIND_HASHTAG in profiles.purity:
        for index, reason in _tag_clusters(profiles, tag_counts, flags):
            add(index, reason)
    return chosen


def _tag_clusters(profiles: ClusterProfiles, tag_counts: np.ndarray,
                  flags: ClusterFlagConfig) -> list[tuple[int, str]]:
    """The head-tag and tail-tag clusters (see :func:`select_clusters`)."""
    table = profiles.purity[KIND_HASHTAG]
    eligible = np.flatnonzero((profiles.sizes >= flags.min_size) & (table.labelled >= max(flags.min_labelled, 1))
                              & (table.dominant_count >= 2))
    if not eligible.size:
        return []
    corpus_count = tag_counts[table.dominant[eligible]]
    ids, purity = profiles.cluster_ids[eligible], table.purity[eligible]
    head = eligible[np.lexsort((ids, -purity, -corpus_count))[0]]
    found = [(int(head), "head tag")]
    rest = eligible != head
    if rest.any():
        tail = eligible[rest][np.lexsort((ids[rest], -purity[rest], corpus_count[rest]))[0]]
        found.append((int(tail), "tail tag"))
    return found


def sample_rows(ids: Any, wanted: dict[int, int], sizes: dict[int, int], *, seed: int,
                blocks: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """``wanted[c]`` random rows of each cluster ``c`` in one pass over an id array, ascending.

    The photos are fixed before reading: ranks drawn with ``numpy.random.default_rng((seed, c))`` among the
    cluster's ``sizes[c]`` rows, so a cluster shows the same photos whichever other clusters are chosen.

    Args:
        ids: the clustering's id array (zarr array or numpy), read in ``blocks``.
        wanted: photos per cluster.
        sizes: rows per cluster.
        seed: seed of the draw.
        blocks: ``(start, end)`` row blocks covering the array.
    """
    ranks = {c: np.sort(np.random.default_rng((seed, c)).choice(sizes[c], min(k, sizes[c]), replace=False))
             for c, k in wanted.items()}
    seen = dict.fromkeys(wanted, 0)
    rows: dict[int, list[int]] = {c: [] for c in wanted}
    targets = np.array(sorted(wanted), dtype=np.int64)
    for start, end in blocks:
        block = np.asarray(ids[start:end])
        hits = np.flatnonzero(np.isin(block, targets))
        for cluster in np.unique(block[hits]).tolist():
            where = hits[block[hits] == cluster]
            low = seen[cluster]
            take = ranks[cluster][(ranks[cluster] >= low) & (ranks[cluster] < low + where.size)]
            rows[cluster].extend((start + where[take - low]).tolist())
            seen[cluster] = low + where.size
    return rows
