"""Sparse (cluster, label) contingency tables accumulated over blocks of rows, and per-cluster purity.

:class:`Contingency` counts pairs in time linear in rows and memory proportional to the number of non-empty
pairs. Its NMI is sklearn's quantity with sklearn's conventions, so it equals
``sklearn.metrics.normalized_mutual_info_score`` (with the same ``average_method``; the default here is the
papers' geometric mean) on the rows where both codes are present; beside it go a chance level, the NMI of a
seeded random permutation of the cluster assignments, and the adjusted mutual information from the marginals.

Codes are non-negative integers below ``2**31`` (cluster ids and label codes alike); negative ``-1`` marks a
missing value. A pair is stored as the int64 key ``cluster << 32 | label``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dataengine.metrics.nmi import (
    AVERAGE_METHODS, DEFAULT_AVERAGE_METHOD, NMIResult, _entropy, _mutual_info, _Summary, _sum_xlogx,
)

logger = logging.getLogger(__name__)

MAX_CODE = 2**31 - 1
"""Largest accepted cluster id or label code (a pair key packs both into one int64)."""
DEFAULT_BLOCK_ROWS = 1 << 20
"""Rows counted per sort: the per-block temporaries take about 40 bytes a row (~40 MB; at 2^24 rows they took
650 MB once a store passed 16M rows, beside the chance level's 4 bytes a row)."""

_LABEL_BITS = 32
_LABEL_MASK = (1 << _LABEL_BITS) - 1
_MIN_COMPACT_PAIRS = 1 << 20


def _as_codes(values: object, name: str) -> np.ndarray:
    """Validate a 1-D integer code array: values in ``[-1, MAX_CODE]``, -1 meaning missing."""
    codes = np.asarray(values)
    if codes.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer codes, got dtype {codes.dtype}; encode labels first")
    if codes.size:
        low, high = int(codes.min()), int(codes.max())
        if low < -1 or high > MAX_CODE:
            raise ValueError(
                f"{name} codes must lie in [-1, {MAX_CODE}] (-1 = missing), got [{low}, {high}]; "
                "re-encode them with categorical_codes"
            )
    return codes


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted non-empty array."""
    change = np.empty(sorted_values.size, dtype=bool)
    change[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


def _count_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct int64 keys (sorted) and their counts; bincount when the key range is dense, else sort.

    ``keys`` must be a scratch array: it is sorted in place.
    """
    low, high = int(keys.min()), int(keys.max())
    if high - low < 2 * keys.size:
        dense = np.bincount(keys - low)
        present = np.flatnonzero(dense)
        return present + low, dense[present].astype(np.int64)
    keys.sort()
    starts = _run_starts(keys)
    counts = np.diff(starts, append=keys.size)
    return keys[starts], counts.astype(np.int64, copy=False)


class _SparseCounts:
    """Counts of int64 keys, kept as sorted distinct keys with counts.

    Block results wait in a pending list and are merged once they outgrow the merged table, so each
    distinct key is merged O(log blocks) times and memory stays proportional to the distinct keys.
    """

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add_keys(self, keys: np.ndarray) -> None:
        if keys.size:
            self.add_counts(*_count_keys(keys))

    def add_counts(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add a table of sorted distinct keys and counts."""
        if not keys.size:
            return
        self._pending.append((keys, counts))
        self._pending_size += keys.size
        if self._pending_size > max(self._keys.size, _MIN_COMPACT_PAIRS):
            self._compact()

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct keys and their int64 counts."""
        self._compact()
        return self._keys, self._counts

    def _compact(self) -> None:
        if not self._pending:
            return
        parts = ([(self._keys, self._counts)] if self._keys.size else []) + self._pending
        self._pending, self._pending_size = [], 0
        if len(parts) == 1:
            self._keys, self._counts = parts[0]
            return
        all_keys = np.concatenate([keys for keys, _ in parts])
        # The parts are sorted runs: a stable sort (timsort) merges them in about linear time.
        order = np.argsort(all_keys, kind="stable")
        all_keys = all_keys[order]
        all_counts = np.concatenate([counts for _, counts in parts])[order]
        del order
        starts = _run_starts(all_keys)
        self._keys, self._counts = all_keys[starts], np.add.reduceat(all_counts, starts)
        logger.debug("merged %d partial tables into %d distinct keys", len(parts), starts.size)


def _group_sums(codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Total count of each distinct code (non-zero sums only): one side's marginal of the table."""
    high = int(codes.max())
    if high < 4 * codes.size + (1 << 20):  # compact codes: a dense bincount
        sums = np.bincount(codes, weights=counts, minlength=high + 1)  # float64: exact below 2**53
        return sums[sums > 0].astype(np.int64)
    distinct = np.unique(codes)
    sums = np.bincount(np.searchsorted(distinct, codes), weights=counts, minlength=distinct.size)
    return sums.astype(np.int64)


class Contingency:
    """Sparse contingency table of (cluster, label) codes, accumulated over blocks of rows.

    Rows where either code is -1 are skipped and only counted towards the total (for coverage). Time is
    linear in rows (one sort per block of at most ``block_rows``) and memory proportional to the number
    of distinct (cluster, label) pairs. Tables from several workers combine with :meth:`merge`.
    """

    def __init__(self, *, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        """Args:
        block_rows: Rows counted per sort; larger is a little faster and needs ~40 bytes a row more.
        """
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self._block_rows = block_rows
        self._pairs = _SparseCounts()
        self._rows_total = 0
        self._rows_used = 0
        self._summary: _Summary | None = None

    @property
    def rows_total(self) -> int:
        """All rows seen by :meth:`update`."""
        return self._rows_total

    @property
    def rows_used(self) -> int:
        """Rows with both codes present."""
        return self._rows_used

    def update(self, clusters: object, labels: object) -> None:
        """Count one block of rows: cluster ids and label codes of the same length, -1 = missing."""
        self._update_codes(_as_codes(clusters, "clusters"), _as_codes(labels, "labels"))

    def _update_codes(self, clusters: np.ndarray, labels: np.ndarray) -> None:
        if clusters.shape != labels.shape:
            raise ValueError(f"clusters and labels differ in length: {clusters.size} vs {labels.size}")
        self._summary = None
        self._rows_total += clusters.size
        for start in range(0, clusters.size, self._block_rows):
            block_c = clusters[start:start + self._block_rows]
            block_l = labels[start:start + self._block_rows]
            present = (block_c >= 0) & (block_l >= 0)
            if not present.all():
                block_c, block_l = block_c[present], block_l[present]
            self._rows_used += block_c.size
            if block_c.size:
                keys = block_c.astype(np.int64)  # a copy: shifted and or-ed in place
                keys <<= _LABEL_BITS
                keys |= block_l
                self._pairs.add_keys(keys)

    def merge(self, other: Contingency) -> None:
        """Add the counts of another table (e.g. from another worker's share of the rows)."""
        self._summary = None
        self._rows_total += other._rows_total
        self._rows_used += other._rows_used
        self._pairs.add_counts(*other._pairs.table())

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The non-empty cells: ``(clusters, labels, counts)`` sorted by cluster then label."""
        keys, counts = self._pairs.table()
        return keys >> _LABEL_BITS, keys & _LABEL_MASK, counts

    def nmi(self, average_method: str = DEFAULT_AVERAGE_METHOD) -> float:
        """Normalised mutual information, equal to sklearn's ``normalized_mutual_info_score``.

        Same conventions as sklearn: 1.0 when both partitions have a single class, 0.0 when only one
        does or when the mutual information is 0. Deliberate difference: NaN (not sklearn's 1.0) when no
        row has both codes, since there is nothing to compare.

        Args:
            average_method: Mean of the two entropies used as normaliser: ``"geometric"`` (DeepCluster's
                and DeeperCluster's definition, the default), ``"arithmetic"`` (sklearn's default), ``"min"``
                or ``"max"``.
        """
        if average_method not in AVERAGE_METHODS:
            raise ValueError(f"average_method must be one of {AVERAGE_METHODS}, got {average_method!r}")
        summary = self._summarize()
        return summary.nmi(summary.mutual_info, average_method)

    def mutual_info(self) -> float:
        """Mutual information (nats) of the counted rows, as sklearn's ``mutual_info_score``."""
        return self._summarize().mutual_info

    def _summarize(self) -> _Summary:
        if self._summary is None:
            self._summary = self._compute_summary()
        return self._summary

    def _compute_summary(self) -> _Summary:
        keys, counts = self._pairs.table()
        if not keys.size:
            empty = np.zeros(0, np.int64)
            return _Summary(0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, empty, empty)
        cluster_sums = _group_sums(keys >> _LABEL_BITS, counts)
        label_sums = _group_sums(keys & _LABEL_MASK, counts)
        rows = int(counts.sum())
        cluster_xlogx, label_xlogx = _sum_xlogx(cluster_sums), _sum_xlogx(label_sums)
        if cluster_sums.size == 1 or label_sums.size == 1:
            mutual_info = 0.0  # sklearn: a single class carries no information
        else:
            mutual_info = _mutual_info(_sum_xlogx(counts), cluster_xlogx, label_xlogx, rows)
        return _Summary(rows, cluster_sums.size, label_sums.size, mutual_info,
                        _entropy(cluster_sums), _entropy(label_sums), cluster_xlogx, label_xlogx,
                        cluster_sums, label_sums, int(keys.size))

    def _permuted_blocks(self, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Blocks of (cluster, label) rows of a random clustering with the same cluster sizes.

        The rows used are laid out cluster by cluster (cells in table order) and their labels shuffled
        with ``numpy.random.default_rng(seed).shuffle``: pairing the shuffled labels with the unchanged
        cluster sequence is, in distribution, a uniform random permutation of the cluster assignments
        among the rows that have a label (rows without one play no part). Blocks end on cluster
        boundaries, so no cell is split between blocks. Holds 4 bytes per used row.
        """
        clusters, labels, counts = self.table()
        shuffled = np.repeat(labels.astype(np.int32), counts)
        np.random.default_rng(seed).shuffle(shuffled)
        starts = _run_starts(clusters)
        cluster_ids, sizes = clusters[starts], np.add.reduceat(counts, starts)
        ends = np.cumsum(sizes)
        first, row = 0, 0
        while first < cluster_ids.size:
            # Clusters ending within block_rows of ``row``; at least one, however large it is.
            last = max(int(np.searchsorted(ends, row + self._block_rows, side="right")), first + 1)
            stop = int(ends[last - 1])
            yield np.repeat(cluster_ids[first:last], sizes[first:last]), shuffled[row:stop]
            first, row = last, stop

    def permuted(self, seed: int) -> Contingency:
        """The table of a random clustering with the same cluster sizes on the same rows.

        See :meth:`chance_nmi` for the permutation; this materialises its whole table (inspection, tests).
        """
        result = Contingency(block_rows=self._block_rows)
        for clusters, labels in self._permuted_blocks(seed):
            result._update_codes(clusters, labels)
        result._rows_total = self._rows_total
        return result

    def chance_nmi(self, seed: int = 0, average_method: str = DEFAULT_AVERAGE_METHOD) -> float:
        """NMI of a random clustering with the same cluster sizes: the chance level beside :meth:`nmi`.

        The labels of the rows used are shuffled with ``numpy.random.default_rng(seed).shuffle`` and
        paired with the unchanged cluster sequence (cluster by cluster, in table order): in
        distribution, a uniform random permutation of the cluster assignments among the rows that have
        a label. Both marginals, hence both entropies, are unchanged, so only the cells' ``sum n log n``
        is recounted, block by block: the memory is 4 bytes per used row plus one block's temporaries,
        never the random table itself.
        """
        if average_method not in AVERAGE_METHODS:
            raise ValueError(f"average_method must be one of {AVERAGE_METHODS}, got {average_method!r}")
        summary = self._summarize()
        if summary.rows == 0 or summary.num_clusters == 1 or summary.num_labels == 1:
            return summary.nmi(0.0, average_method)  # a permutation changes nothing here
        cells_xlogx = 0.0
        for clusters, labels in self._permuted_blocks(seed):
            keys = clusters
            keys <<= _LABEL_BITS
            keys |= labels
            cells_xlogx += _sum_xlogx(_count_keys(keys)[1])
        mutual_info = _mutual_info(cells_xlogx, summary.cluster_xlogx, summary.label_xlogx, summary.rows)
        return summary.nmi(mutual_info, average_method)

    def ami(self, average_method: str = DEFAULT_AVERAGE_METHOD) -> float:
        """Adjusted mutual information, equal to sklearn's ``adjusted_mutual_info_score`` (same
        ``average_method``) on the rows where both codes are present (NaN if there are none). The expected
        mutual information comes from the two marginals alone (:mod:`dataengine.metrics.expected`)."""
        if average_method not in AVERAGE_METHODS:
            raise ValueError(f"average_method must be one of {AVERAGE_METHODS}, got {average_method!r}")
        summary = self._summarize()
        return summary.ami(summary.expected_mutual_info(), average_method)

    def result(self, *, chance_seed: int | None = 0, average_method: str = DEFAULT_AVERAGE_METHOD,
               adjusted: bool = True) -> NMIResult:
        """NMI (by ``average_method``, and both the geometric and the arithmetic one), chance level (skipped
        when ``chance_seed`` is None), mutual information, adjusted mutual information (skipped when not
        ``adjusted``), the noise of an NMI at chance, and coverage."""
        if average_method not in AVERAGE_METHODS:
            raise ValueError(f"average_method must be one of {AVERAGE_METHODS}, got {average_method!r}")
        summary = self._summarize()
        chance = math.nan if chance_seed is None else self.chance_nmi(chance_seed, average_method)
        expected = summary.expected_mutual_info() if adjusted and summary.rows else math.nan
        return NMIResult(
            nmi=self.nmi(average_method), chance_nmi=chance, mutual_info=summary.mutual_info,
            rows_used=self._rows_used, rows_total=self._rows_total,
            num_clusters=summary.num_clusters, num_labels=summary.num_labels, average_method=average_method,
            nmi_geometric=self.nmi("geometric"), nmi_arithmetic=self.nmi("arithmetic"),
            expected_mutual_info=expected,
            ami=summary.ami(expected, average_method) if adjusted else math.nan,
            noise=summary.noise(average_method),
        )

    def purity(self) -> PurityTable:
        """Per-cluster labelled rows, distinct labels, dominant label and purity (clusters with labels)."""
        clusters, labels, counts = self.table()
        if not counts.size:
            empty = np.zeros(0, np.int64)
            return PurityTable(cluster_ids=empty, labelled=empty, num_values=empty, dominant=empty,
                               dominant_count=empty, purity=np.zeros(0))
        starts = _run_starts(clusters)
        lengths = np.diff(np.append(starts, clusters.size))
        best = np.maximum.reduceat(counts, starts)
        run_of_cell = np.repeat(np.arange(starts.size), lengths)
        # Cells are sorted by label within a cluster, so the first maximal cell has the smallest label.
        maximal = np.flatnonzero(counts == best[run_of_cell])
        first_maximal = maximal[_run_starts(run_of_cell[maximal])]
        labelled = np.add.reduceat(counts, starts)
        return PurityTable(
            cluster_ids=clusters[starts], labelled=labelled, num_values=lengths.astype(np.int64),
            dominant=labels[first_maximal], dominant_count=best, purity=best / labelled,
        )


def nmi_score(labels_a: object, labels_b: object, *, average_method: str = DEFAULT_AVERAGE_METHOD) -> float:
    """NMI of two code arrays on the rows where both are present (-1 = missing).

    Equals ``sklearn.metrics.normalized_mutual_info_score`` on those rows (NaN if there are none); see
    :meth:`Contingency.nmi`. Symmetric in its arguments.
    """
    table = Contingency()
    table.update(labels_a, labels_b)
    return table.nmi(average_method)


@dataclass(frozen=True, kw_only=True)
class PurityTable:
    """Per-cluster composition for one metadata kind; arrays aligned on ``cluster_ids`` (ascending)."""

    cluster_ids: np.ndarray
    """Cluster ids."""
    labelled: np.ndarray
    """Rows of the cluster that have this metadata."""
    num_values: np.ndarray
    """Distinct values among them."""
    dominant: np.ndarray
    """Most frequent value's code (ties: smallest code); -1 when no row has the metadata."""
    dominant_count: np.ndarray
    """Rows holding the dominant value."""
    purity: np.ndarray
    """``dominant_count / labelled``: share of the dominant value (NaN when nothing is labelled)."""

    def aligned(self, cluster_ids: np.ndarray) -> PurityTable:
        """The same table on other (sorted) cluster ids; clusters without labelled rows get 0/-1/NaN."""
        where = np.searchsorted(cluster_ids, self.cluster_ids)
        found = where < cluster_ids.size
        if not (found.all() and np.array_equal(cluster_ids[where[found]], self.cluster_ids)):
            raise ValueError("cluster_ids must contain every cluster of the purity table")

        def spread(values: np.ndarray, fill: float) -> np.ndarray:
            out = np.full(cluster_ids.size, fill, dtype=values.dtype)
            out[where] = values
            return out

        return PurityTable(
            cluster_ids=cluster_ids, labelled=spread(self.labelled, 0), num_values=spread(self.num_values, 0),
            dominant=spread(self.dominant, -1), dominant_count=spread(self.dominant_count, 0),
            purity=spread(self.purity, math.nan),
        )


def cluster_purity(clusters: object, labels: object) -> PurityTable:
    """Per-cluster purity of one metadata kind from in-memory code arrays (-1 = missing)."""
    table = Contingency()
    table.update(clusters, labels)
    return table.purity()
