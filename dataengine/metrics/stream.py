"""One pass over a stream of row blocks scoring named clusterings against metadata kinds, and the
in-memory conveniences built on it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from dataengine.metrics.contingency import DEFAULT_BLOCK_ROWS, Contingency, _as_codes, _SparseCounts
from dataengine.metrics.nmi import DEFAULT_AVERAGE_METHOD, NMIResult
from dataengine.metrics.profiles import ClusterFlagConfig, ClusterProfiles, SizeStats, _flags, size_stats

logger = logging.getLogger(__name__)


def consecutive_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """``[(names[0], names[1]), (names[1], names[2]), ...]``: the pairs compared across epochs."""
    return list(zip(names, names[1:]))


class ClusteringEvaluator:
    """One pass over blocks of rows scoring named clusterings against metadata kinds.

    For every (clustering, kind) it keeps a :class:`Contingency`, for every compared pair of clusterings
    another, and for every clustering its sizes. Feed it the blocks of a store in any order; then read
    :meth:`nmi`, :meth:`pair_nmi`, :meth:`profiles` and :meth:`size_stats`.

    Example::

        evaluator = ClusteringEvaluator(["epoch-1", "epoch-2"], ["user", "gps"],
                                        compare=consecutive_pairs(["epoch-1", "epoch-2"]))
        for clusters, labels in blocks:  # dicts of equal-length code arrays
            evaluator.update(clusters, labels)
        evaluator.nmi()["epoch-2"]["gps"].nmi
    """

    def __init__(self, clusterings: Sequence[str], kinds: Sequence[str], *,
                 compare: Sequence[tuple[str, str]] = (), scored: Sequence[str] | None = None,
                 block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        """Args:
        clusterings: Names of the clusterings given to :meth:`update` (levels, epochs...).
        kinds: Names of the metadata kinds given to :meth:`update` (see :data:`METADATA_KINDS`).
        compare: Pairs of clustering names whose mutual NMI is wanted.
        scored: The clusterings scored against the kinds (:meth:`nmi`, :meth:`profiles`); ``None``: all. The
            others only take part in ``compare`` and :meth:`sizes`.
        block_rows: Rows counted per sort (see :class:`Contingency`).
        """
        self._clusterings, self._kinds = list(clusterings), list(kinds)
        self._scored = self._clusterings if scored is None else list(scored)
        for what, names in (("clusterings", self._clusterings), ("kinds", self._kinds), ("scored", self._scored)):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        unknown = {name for pair in compare for name in pair} | set(self._scored)
        unknown -= set(self._clusterings)
        if unknown:
            raise ValueError(f"compare and scored name clusterings not in {self._clusterings}: {sorted(unknown)}")
        self._tables = {(name, kind): Contingency(block_rows=block_rows)
                        for name in self._scored for kind in self._kinds}
        self._pairs = {tuple(pair): Contingency(block_rows=block_rows) for pair in compare}
        self._sizes = {c: _SparseCounts() for c in self._clusterings}
        self._rows = 0

    @property
    def rows(self) -> int:
        """Rows seen so far."""
        return self._rows

    def update(self, clusters: Mapping[str, object], labels: Mapping[str, object]) -> None:
        """Count one block: cluster ids per clustering name and label codes per kind, all of one length."""
        cluster_codes = self._codes(clusters, self._clusterings, "clusterings")
        label_codes = self._codes(labels, self._kinds, "kinds")
        lengths = {codes.size for codes in [*cluster_codes.values(), *label_codes.values()]}
        if len(lengths) > 1:
            raise ValueError(f"arrays of one block differ in length: {sorted(lengths)}")
        for (name, kind), table in self._tables.items():
            table._update_codes(cluster_codes[name], label_codes[kind])
        for (first, second), table in self._pairs.items():
            table._update_codes(cluster_codes[first], cluster_codes[second])
        for name, counter in self._sizes.items():
            codes = cluster_codes[name]
            counter.add_keys(codes[codes >= 0].astype(np.int64, copy=False))
        self._rows += lengths.pop() if lengths else 0

    @staticmethod
    def _codes(arrays: Mapping[str, object], names: list[str], what: str) -> dict[str, np.ndarray]:
        if set(arrays) != set(names):
            raise ValueError(f"expected {what} {names}, got {sorted(arrays)}")
        return {name: _as_codes(arrays[name], f"{what}[{name!r}]") for name in names}

    def nmi(self, *, chance_seed: int | None = 0,
            average_method: str = DEFAULT_AVERAGE_METHOD) -> dict[str, dict[str, NMIResult]]:
        """``result[clustering][kind]``: NMI, chance level (None skips it), AMI and coverage."""
        results: dict[str, dict[str, NMIResult]] = {name: {} for name in self._scored}
        for (name, kind), table in self._tables.items():
            results[name][kind] = table.result(chance_seed=chance_seed, average_method=average_method)
            if table.rows_used == 0:
                logger.info("no row has both a %s cluster and %s metadata: NMI is undefined", name, kind)
        return results

    def pair_nmi(self, *, chance_seed: int | None = None,
                 average_method: str = DEFAULT_AVERAGE_METHOD) -> dict[tuple[str, str], NMIResult]:
        """NMI between each compared pair of clusterings (on rows assigned in both)."""
        return {pair: table.result(chance_seed=chance_seed, average_method=average_method)
                for pair, table in self._pairs.items()}

    def sizes(self, clustering: str) -> tuple[np.ndarray, np.ndarray]:
        """``(cluster_ids, sizes)`` of the non-empty clusters of one clustering."""
        return self._sizes[clustering].table()

    def size_stats(self, clustering: str, num_clusters: int | None = None) -> SizeStats:
        """:func:`size_stats` of one clustering (``num_clusters`` counts the empty clusters in)."""
        return size_stats(self.sizes(clustering)[1], num_clusters)

    def profiles(self, clustering: str, config: ClusterFlagConfig | None = None) -> ClusterProfiles:
        """Per-cluster sizes, purity per kind and flags of one clustering."""
        config = config or ClusterFlagConfig()
        cluster_ids, sizes = self.sizes(clustering)
        purity = {kind: self._tables[clustering, kind].purity().aligned(cluster_ids) for kind in self._kinds}
        return ClusterProfiles(cluster_ids=cluster_ids, sizes=sizes, purity=purity,
                               **_flags(sizes, purity, config))


def metadata_nmi(clusters: object, labels_by_kind: Mapping[str, object], *,
                 chance_seed: int | None = 0) -> dict[str, NMIResult]:
    """NMI of one clustering against each metadata kind, with chance level and coverage.

    Args:
        clusters: Cluster id per row (-1 = unassigned).
        labels_by_kind: Label codes per row for each kind (-1 = missing), e.g. from :func:`hashtag_labels`.
        chance_seed: Seed of the permutation giving the chance level; None skips it.
    """
    evaluator = ClusteringEvaluator(["clusters"], list(labels_by_kind))
    evaluator.update({"clusters": clusters}, labels_by_kind)
    return evaluator.nmi(chance_seed=chance_seed)["clusters"]


def nmi_sequence(clusterings: Mapping[str, object], labels_by_kind: Mapping[str, object], *,
                 chance_seed: int | None = 0) -> dict[str, dict[str, NMIResult]]:
    """NMI of each named clustering (e.g. per epoch, in order) against each metadata kind."""
    evaluator = ClusteringEvaluator(list(clusterings), list(labels_by_kind))
    evaluator.update(clusterings, labels_by_kind)
    return evaluator.nmi(chance_seed=chance_seed)


def consecutive_nmi(clusterings: Mapping[str, object], *,
                    chance_seed: int | None = None) -> list[tuple[str, str, NMIResult]]:
    """NMI between consecutive clusterings in mapping order (DeeperCluster's NMI t-1 / t curve)."""
    names = list(clusterings)
    evaluator = ClusteringEvaluator(names, [], compare=consecutive_pairs(names))
    evaluator.update(clusterings, {})
    return [(a, b, result) for (a, b), result in evaluator.pair_nmi(chance_seed=chance_seed).items()]


def cluster_profiles(clusters: object, labels_by_kind: Mapping[str, object],
                     config: ClusterFlagConfig | None = None) -> ClusterProfiles:
    """Per-cluster size, purity per kind and flags of one in-memory clustering."""
    evaluator = ClusteringEvaluator(["clusters"], list(labels_by_kind))
    evaluator.update({"clusters": clusters}, labels_by_kind)
    return evaluator.profiles("clusters", config)
