"""Cluster quality against metadata: NMI with chance levels, per-cluster purity and size statistics.

DeeperCluster (section 5.3) judges a clustering of YFCC100M by its normalised mutual information (NMI)
with partitions given by the metadata: hashtags, users, GPS position, capture device and, where one
exists, a class label. This module holds the pure computations behind that report; reading stores and
rendering HTML live elsewhere.

* **Label encoding.** Each metadata kind becomes an int64 code array with ``-1`` for a missing value:
  :func:`hashtag_labels` (least frequent tag, two-pass streamable through :func:`count_tags` and
  :func:`least_frequent_tags`), :func:`gps_cells`, :func:`device_labels` and :func:`categorical_codes`
  (users, class labels). :class:`CategoricalEncoder` keeps codes consistent across blocks.
* **NMI.** :class:`Contingency` accumulates a sparse (cluster, label) count table over row blocks, in time
  linear in rows and memory proportional to the number of non-empty pairs. Its NMI is sklearn's quantity
  with sklearn's conventions (arithmetic mean of the entropies, natural log, special cases), so it equals
  ``sklearn.metrics.normalized_mutual_info_score`` on the rows where both codes are present. Beside each
  NMI goes a chance level: the NMI of a seeded random permutation of the cluster assignments.
* **One pass over a store.** :class:`ClusteringEvaluator` updates, per block of rows, one table per
  (clustering, metadata kind), per pair of compared clusterings and the cluster sizes; it then yields NMI
  results, per-cluster profiles (purity, dominant value, landmark / single-user / device flags) and size
  statistics. :func:`metadata_nmi`, :func:`nmi_sequence`, :func:`consecutive_nmi`,
  :func:`cluster_profiles` and :func:`nmi_score` wrap it for in-memory arrays.

Codes are non-negative integers below ``2**31`` (cluster ids and label codes alike); negative ``-1``
marks a missing value. A pair is stored as the int64 key ``cluster << 32 | label``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

KIND_HASHTAG = "hashtag"
KIND_USER = "user"
KIND_GPS = "gps"
KIND_DEVICE = "device"
KIND_LABEL = "label"
METADATA_KINDS = (KIND_HASHTAG, KIND_USER, KIND_GPS, KIND_DEVICE, KIND_LABEL)

MAX_CODE = 2**31 - 1
"""Largest accepted cluster id or label code (a pair key packs both into one int64)."""
DEFAULT_BLOCK_ROWS = 1 << 24
"""Rows counted per sort: the per-block temporaries take about 40 bytes a row (~650 MB)."""
AVERAGE_METHODS = ("arithmetic", "geometric", "min", "max")

_LABEL_BITS = 32
_LABEL_MASK = (1 << _LABEL_BITS) - 1
_MIN_COMPACT_PAIRS = 1 << 20
_NO_RANK = np.iinfo(np.int64).max


# --------------------------------------------------------------------------------------------------
# Label encoding
# --------------------------------------------------------------------------------------------------


def _as_string_array(values: object) -> pa.Array:
    """A pyarrow string array from a pyarrow (chunked) array, numpy array or sequence (None = null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(values if isinstance(values, np.ndarray) else list(values), type=pa.string())
    if pa.types.is_large_string(values.type) or pa.types.is_dictionary(values.type):
        values = values.cast(pa.string())
    if not pa.types.is_string(values.type):
        raise TypeError(f"expected string values, got Arrow type {values.type}")
    return values


def normalize_device(device: str) -> str:
    """Canonical form of a capture device string: whitespace trimmed and collapsed, then casefolded.

    ``"  Canon   EOS 5D "`` and ``"canon eos 5d"`` become the same device; an all-whitespace string
    becomes ``""`` (which the encoders treat as missing).
    """
    return " ".join(device.split()).casefold()


class CategoricalEncoder:
    """Stable int64 codes for string values, consistent across the blocks of a stream.

    Codes are given in order of first appearance (after normalisation); null and empty strings get
    ``-1``. The Python work per block is proportional to the number of distinct values in the block,
    not to its rows (pyarrow's ``dictionary_encode`` does the per-row hashing).
    """

    def __init__(self, normalize: Callable[[str], str] | None = None) -> None:
        """Args:
        normalize: Applied to each distinct value before coding (e.g. :func:`normalize_device`).
        """
        self._normalize = normalize
        self._index: dict[str, int] = {}

    def encode(self, values: object) -> np.ndarray:
        """Codes of one block of values (pyarrow array, numpy array or sequence of str/None)."""
        encoded = pc.dictionary_encode(_as_string_array(values))
        local = [self._code(value) for value in encoded.dictionary.to_pylist()]
        # The trailing -1 doubles as the code of null indices, which are filled with -1 below.
        mapping = np.array(local + [-1], dtype=np.int64)
        indices = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
        return mapping[indices]

    def _code(self, value: str) -> int:
        if self._normalize is not None:
            value = self._normalize(value)
        if not value:
            return -1
        return self._index.setdefault(value, len(self._index))

    @property
    def vocabulary(self) -> np.ndarray:
        """Object array of the values seen so far; ``vocabulary[code]`` is the value of ``code``."""
        return np.array(list(self._index), dtype=object)


def categorical_codes(values: object) -> tuple[np.ndarray, np.ndarray]:
    """Codes of a categorical column (user NSID, class label); null and empty strings are missing.

    Returns:
        ``(codes, vocabulary)``: int64 codes (``-1`` missing) in first-appearance order and the object
        array of values they index.
    """
    encoder = CategoricalEncoder()
    codes = encoder.encode(values)
    return codes, encoder.vocabulary


def device_labels(values: object) -> tuple[np.ndarray, np.ndarray]:
    """Codes of capture devices after :func:`normalize_device`; null, empty or blank strings are missing.

    Returns:
        ``(codes, vocabulary)`` as in :func:`categorical_codes`, the vocabulary holding normalised names.
    """
    encoder = CategoricalEncoder(normalize_device)
    codes = encoder.encode(values)
    return codes, encoder.vocabulary


def gps_grid_shape(cell_deg: float = 1.0) -> tuple[int, int]:
    """``(num_rows, num_cols)`` of the latitude/longitude grid with cells of ``cell_deg`` degrees."""
    if not (isinstance(cell_deg, (int, float)) and 0 < cell_deg <= 180):
        raise ValueError(f"cell_deg must be in (0, 180] degrees, got {cell_deg!r}")
    return math.ceil(180 / cell_deg), math.ceil(360 / cell_deg)


def gps_cells(lat: object, lon: object, cell_deg: float = 1.0) -> np.ndarray:
    """Grid cell codes of geotagged rows; rows without a valid position get ``-1``.

    The scheme: a regular latitude/longitude grid with ``num_rows = ceil(180 / cell_deg)`` rows and
    ``num_cols = ceil(360 / cell_deg)`` columns, ``row = floor((lat + 90) / cell_deg)``,
    ``col = floor((lon + 180) / cell_deg)`` and ``cell = row * num_cols + col``. Cells are closed on the
    south/west side; the north pole (lat 90) and the antimeridian at lon 180 fall into the last row or
    column (as does the remainder when ``cell_deg`` does not divide 180 or 360). Missing (null/NaN) and
    out-of-range positions (``|lat| > 90``, ``|lon| > 180``) are missing, never clamped. Cells are equal
    in degrees, not in area: they shrink towards the poles.

    Args:
        lat: Latitudes in degrees (numpy/pyarrow array or sequence, None/NaN = missing).
        lon: Longitudes in degrees, same length.
        cell_deg: Cell side in degrees.
    """
    num_rows, num_cols = gps_grid_shape(cell_deg)
    lat_arr, lon_arr = _as_float(lat), _as_float(lon)
    if lat_arr.shape != lon_arr.shape:
        raise ValueError(f"lat and lon differ in length: {lat_arr.shape} vs {lon_arr.shape}")
    valid = (np.abs(lat_arr) <= 90) & (np.abs(lon_arr) <= 180)  # False for NaN
    row = np.minimum(np.floor((lat_arr[valid] + 90) / cell_deg).astype(np.int64), num_rows - 1)
    col = np.minimum(np.floor((lon_arr[valid] + 180) / cell_deg).astype(np.int64), num_cols - 1)
    codes = np.full(lat_arr.shape, -1, dtype=np.int64)
    codes[valid] = row * num_cols + col
    return codes


def gps_cell_bounds(cell: int, cell_deg: float = 1.0) -> tuple[float, float, float, float]:
    """``(lat_min, lon_min, lat_max, lon_max)`` of a cell code of :func:`gps_cells` (for display)."""
    num_rows, num_cols = gps_grid_shape(cell_deg)
    if not 0 <= cell < num_rows * num_cols:
        raise ValueError(f"cell {cell} is outside the {num_rows}x{num_cols} grid of {cell_deg} degrees")
    row, col = divmod(int(cell), num_cols)
    lat0, lon0 = row * cell_deg - 90, col * cell_deg - 180
    return lat0, lon0, min(lat0 + cell_deg, 90.0), min(lon0 + cell_deg, 180.0)


def _as_float(values: object) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.fill_null(values.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class TagVocabulary:
    """Tags ordered by rarity: ascending global count, ties broken by the lexicographically smallest tag.

    The code of a tag is its rank in this order, so the least frequent tag of a photo is simply the one
    with the smallest code.
    """

    tags: pa.Array
    """String array of distinct tags; ``tags[code]`` is the tag of ``code``."""
    counts: np.ndarray
    """int64 global number of occurrences of each tag, ascending."""

    @property
    def values(self) -> np.ndarray:
        """The tags as an object array (``values[code]``)."""
        return self.tags.to_numpy(zero_copy_only=False)


def _as_list_array(tags: object) -> pa.Array:
    """A pyarrow list<string> array from a (chunked) ListArray or a sequence of tag lists (None = null)."""
    if isinstance(tags, pa.ChunkedArray):
        tags = tags.combine_chunks()
    if not isinstance(tags, pa.Array):
        tags = pa.array(tags if isinstance(tags, np.ndarray) else list(tags), type=pa.list_(pa.string()))
    if not (pa.types.is_list(tags.type) or pa.types.is_large_list(tags.type)):
        raise TypeError(f"expected a list array of tags, got Arrow type {tags.type}")
    if not pa.types.is_string(tags.type.value_type):
        tags = tags.cast(pa.list_(pa.string()))
    return tags


def _tag_values(tags: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The tag values referenced by a (possibly sliced) list array and its offsets rebased onto them."""
    offsets = np.asarray(tags.offsets, dtype=np.int64)
    values = tags.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return values, offsets - offsets[0]


def _present_tags(values: pa.Array) -> pa.Array:
    return values.filter(pc.and_(pc.is_valid(values), pc.not_equal(values, "")))


def count_tags(tag_blocks: Iterable[object]) -> TagVocabulary:
    """First pass of the least-frequent-tag rule: global tag counts over blocks of rows.

    Each block is a list<string> array (as read from ``metadata.parquet``) or a sequence of tag lists.
    Null and empty tags are ignored. A tag repeated within one photo counts each time (ingest keeps
    Flickr's per-photo tags, which rarely repeat).
    """
    partial: list[pa.Table] = []
    for block in tag_blocks:
        values, _ = _tag_values(_as_list_array(block))
        counted = pc.value_counts(_present_tags(values))
        partial.append(pa.table({"tag": counted.field("values"), "count": counted.field("counts")}))
        if len(partial) >= 16:  # keep the number of partial tables (and their memory) bounded
            partial = [_sum_tag_counts(partial)]
    if not partial:
        return TagVocabulary(tags=pa.array([], pa.string()), counts=np.zeros(0, np.int64))
    totals = _sum_tag_counts(partial)
    order = pc.sort_indices(totals, sort_keys=[("count", "ascending"), ("tag", "ascending")])
    totals = totals.take(order)
    tags = totals.column("tag").combine_chunks()
    counts = totals.column("count").to_numpy().astype(np.int64)
    logger.debug("counted %d distinct tags, %d occurrences", len(tags), int(counts.sum()))
    return TagVocabulary(tags=tags, counts=counts)


def _sum_tag_counts(tables: list[pa.Table]) -> pa.Table:
    summed = pa.concat_tables(tables).group_by("tag").aggregate([("count", "sum")])
    return summed.rename_columns(["tag", "count"])


def least_frequent_tags(tags: object, vocabulary: TagVocabulary) -> np.ndarray:
    """Second pass: each row's least frequent tag as its code in ``vocabulary`` (-1 without tags).

    Rows whose list is null or empty, or holds only tags absent from ``vocabulary``, are missing.
    """
    tags = _as_list_array(tags)
    values, offsets = _tag_values(tags)
    ranks = pc.fill_null(pc.index_in(values, value_set=vocabulary.tags), -1)
    ranks = ranks.to_numpy(zero_copy_only=False).astype(np.int64)
    ranks[ranks < 0] = _NO_RANK
    codes = np.full(len(tags), _NO_RANK, dtype=np.int64)
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    if nonempty.size:
        # Consecutive non-empty rows are contiguous in ``values``: one reduceat gives every row's min rank.
        codes[nonempty] = np.minimum.reduceat(ranks, offsets[nonempty])
    codes[codes == _NO_RANK] = -1
    if tags.null_count:
        codes[tags.is_null().to_numpy(zero_copy_only=False)] = -1
    return codes


def hashtag_labels(tags_per_row: object) -> tuple[np.ndarray, np.ndarray]:
    """Hashtag label of each row: its least frequent tag in the global tag distribution.

    DeeperCluster's rule: a photo with several tags takes the one with the smallest global count; ties
    go to the lexicographically smallest tag (by Unicode code point). Photos without tags are missing.

    Args:
        tags_per_row: list<string> pyarrow array (as read from ``metadata.parquet``) or a sequence of
            tag lists, one per row.

    Returns:
        ``(codes, vocabulary)``: int64 codes (``-1`` missing) and the object array of tags they index,
        ordered by rarity (see :class:`TagVocabulary`).
    """
    tags = _as_list_array(tags_per_row)
    vocabulary = count_tags([tags])
    return least_frequent_tags(tags, vocabulary), vocabulary.values


# --------------------------------------------------------------------------------------------------
# Sparse counting
# --------------------------------------------------------------------------------------------------


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


def _sum_xlogx(values: np.ndarray) -> float:
    """``sum(x * log(x))`` of positive counts, pairwise-summed in float64."""
    as_float = values.astype(np.float64)
    terms = np.log(as_float)
    terms *= as_float
    return float(terms.sum())


def _mutual_info(cells_xlogx: float, cluster_xlogx: float, label_xlogx: float, rows: int) -> float:
    """Mutual information (nats) from ``sum x log x`` of the non-empty cells and of both marginals.

    ``MI = sum n_ij/N log(N n_ij / (a_i b_j)) = log N + (sum n log n - sum a log a - sum b log b) / N``:
    the same quantity as sklearn's ``mutual_info_score`` without any per-cell lookup of the marginals.
    Its rounding error is a few ulps of ``log N`` (as for sklearn's per-cell form); a result within that
    error of 0 is 0, so independent partitions score exactly 0 as they do in sklearn.
    """
    log_rows = math.log(rows)
    mutual_info = log_rows + (cells_xlogx - cluster_xlogx - label_xlogx) / rows
    if mutual_info < 16 * np.finfo(np.float64).eps * (log_rows + 1):
        return 0.0
    return mutual_info


def _entropy(sums: np.ndarray) -> float:
    """Entropy (nats) of a partition from its non-zero class sizes, as sklearn computes it."""
    if sums.size <= 1:
        return 0.0
    sizes = sums.astype(np.float64)
    total = sizes.sum()
    return float(-np.sum((sizes / total) * (np.log(sizes) - math.log(total))))


def _generalized_average(u: float, v: float, method: str) -> float:
    if method == "arithmetic":
        return (u + v) / 2
    if method == "geometric":
        return math.sqrt(u * v)
    if method == "min":
        return min(u, v)
    return max(u, v)


# --------------------------------------------------------------------------------------------------
# NMI
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NMIResult:
    """NMI of a clustering against one partition, with its chance level and coverage."""

    nmi: float
    """NMI on the rows where both codes are present (NaN when there are none)."""
    chance_nmi: float
    """NMI of a seeded random permutation of the cluster assignments on the same rows (NaN if skipped)."""
    mutual_info: float
    """Mutual information in nats."""
    rows_used: int
    """Rows where both the cluster and the label are present."""
    rows_total: int
    """All rows seen."""
    num_clusters: int
    """Distinct clusters among the rows used."""
    num_labels: int
    """Distinct labels among the rows used."""

    @property
    def coverage(self) -> float:
        """``rows_used / rows_total`` (NaN for no rows)."""
        return self.rows_used / self.rows_total if self.rows_total else math.nan

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready fields, coverage included; NaN (undefined or skipped) becomes None."""
        fields = {**asdict(self), "coverage": self.coverage}
        return {name: None if isinstance(value, float) and math.isnan(value) else value
                for name, value in fields.items()}


@dataclass(frozen=True)
class _Summary:
    rows: int
    num_clusters: int
    num_labels: int
    mutual_info: float
    cluster_entropy: float
    label_entropy: float
    cluster_xlogx: float
    label_xlogx: float

    def nmi(self, mutual_info: float, average_method: str) -> float:
        """sklearn's NMI conventions around ``mutual_info`` of a table with these marginals."""
        if self.rows == 0:
            return math.nan
        if self.num_clusters == self.num_labels == 1:
            return 1.0
        if mutual_info == 0:
            return 0.0
        normalizer = _generalized_average(self.label_entropy, self.cluster_entropy, average_method)
        return float(mutual_info / normalizer)


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

    def nmi(self, average_method: str = "arithmetic") -> float:
        """Normalised mutual information, equal to sklearn's ``normalized_mutual_info_score``.

        Same conventions as sklearn: 1.0 when both partitions have a single class, 0.0 when only one
        does or when the mutual information is 0. Deliberate difference: NaN (not sklearn's 1.0) when no
        row has both codes, since there is nothing to compare.

        Args:
            average_method: Mean of the two entropies used as normaliser: ``"arithmetic"`` (sklearn's
                default and DeeperCluster's), ``"geometric"``, ``"min"`` or ``"max"``.
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
            return _Summary(0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
        cluster_sums = _group_sums(keys >> _LABEL_BITS, counts)
        label_sums = _group_sums(keys & _LABEL_MASK, counts)
        rows = int(counts.sum())
        cluster_xlogx, label_xlogx = _sum_xlogx(cluster_sums), _sum_xlogx(label_sums)
        if cluster_sums.size == 1 or label_sums.size == 1:
            mutual_info = 0.0  # sklearn: a single class carries no information
        else:
            mutual_info = _mutual_info(_sum_xlogx(counts), cluster_xlogx, label_xlogx, rows)
        return _Summary(rows, cluster_sums.size, label_sums.size, mutual_info,
                        _entropy(cluster_sums), _entropy(label_sums), cluster_xlogx, label_xlogx)

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

    def chance_nmi(self, seed: int = 0, average_method: str = "arithmetic") -> float:
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

    def result(self, *, chance_seed: int | None = 0, average_method: str = "arithmetic") -> NMIResult:
        """NMI, chance level (skipped when ``chance_seed`` is None), mutual information and coverage."""
        summary = self._summarize()
        chance = math.nan if chance_seed is None else self.chance_nmi(chance_seed, average_method)
        return NMIResult(
            nmi=self.nmi(average_method), chance_nmi=chance, mutual_info=summary.mutual_info,
            rows_used=self._rows_used, rows_total=self._rows_total,
            num_clusters=summary.num_clusters, num_labels=summary.num_labels,
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


def nmi_score(labels_a: object, labels_b: object, *, average_method: str = "arithmetic") -> float:
    """NMI of two code arrays on the rows where both are present (-1 = missing).

    Equals ``sklearn.metrics.normalized_mutual_info_score`` on those rows (NaN if there are none); see
    :meth:`Contingency.nmi`. Symmetric in its arguments.
    """
    table = Contingency()
    table.update(labels_a, labels_b)
    return table.nmi(average_method)


# --------------------------------------------------------------------------------------------------
# Per-cluster profiles and size statistics
# --------------------------------------------------------------------------------------------------


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


@dataclass(frozen=True, kw_only=True)
class ClusterFlagConfig:
    """Thresholds of the cluster flags of :class:`ClusterProfiles` (purities are shares in [0, 1])."""

    min_size: int = 20
    """Clusters with fewer rows are never flagged: the purity of a handful of rows says little."""
    min_labelled: int = 10
    """A kind's purity counts only in clusters where at least this many rows have that metadata."""
    landmark_gps_purity: float = 0.5
    """Landmark: at least this share of the geotagged rows lies in one GPS cell..."""
    landmark_max_user_purity: float = 0.5
    """...while no user holds this share or more of the rows with a user..."""
    landmark_min_users: int = 5
    """...and at least this many distinct users contribute (many users at one place)."""
    single_user_purity: float = 0.9
    """Single-user: one user holds at least this share of the rows with a user."""
    device_purity: float = 0.8
    """Device cluster (e.g. scanners): one device holds this share of the rows with a device, and the
    cluster is not single-user (one user's camera says nothing about the content)."""

    def __post_init__(self) -> None:
        for name in ("min_size", "min_labelled", "landmark_min_users"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        shares = ("landmark_gps_purity", "landmark_max_user_purity", "single_user_purity", "device_purity")
        for name in shares:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a share of rows and must be in [0, 1], got {value}")


@dataclass(frozen=True, kw_only=True)
class ClusterProfiles:
    """Per-cluster size, purity per metadata kind and flags; arrays aligned on ``cluster_ids``."""

    cluster_ids: np.ndarray
    """Non-empty clusters, ascending."""
    sizes: np.ndarray
    """Rows per cluster, with or without metadata."""
    purity: dict[str, PurityTable] = field(default_factory=dict)
    """Per metadata kind: composition aligned on ``cluster_ids``."""
    landmark: np.ndarray
    """GPS-pure but not user-pure: many users at one place (DeeperCluster's tourist landmarks)."""
    single_user: np.ndarray
    """Dominated by one user."""
    device: np.ndarray
    """Dominated by one capture device without being single-user."""


def _flags(sizes: np.ndarray, purity: Mapping[str, PurityTable],
           config: ClusterFlagConfig) -> dict[str, np.ndarray]:
    """Landmark, single-user and device flags; a flag needing an absent kind is all False."""
    never = np.zeros(sizes.size, dtype=bool)
    big = sizes >= config.min_size

    def known(kind: str) -> np.ndarray:
        table = purity.get(kind)
        return never if table is None else table.labelled >= max(config.min_labelled, 1)

    def pure(kind: str, threshold: float) -> np.ndarray:
        table = purity.get(kind)
        return never if table is None else known(kind) & (table.purity >= threshold)

    single_user = big & pure(KIND_USER, config.single_user_purity)
    landmark = never
    if KIND_USER in purity:
        users = purity[KIND_USER]
        many_users = (users.purity < config.landmark_max_user_purity) & (
            users.num_values >= config.landmark_min_users)
        landmark = big & pure(KIND_GPS, config.landmark_gps_purity) & known(KIND_USER) & many_users
    device = big & pure(KIND_DEVICE, config.device_purity) & ~single_user
    return {"landmark": landmark, "single_user": single_user, "device": device}


@dataclass(frozen=True, kw_only=True)
class SizeStats:
    """Distribution of cluster sizes."""

    num_clusters: int
    """Clusters counted, empty ones included when the caller gave ``num_clusters``."""
    num_empty: int
    """Clusters without rows."""
    min: int
    """Smallest size."""
    median: float
    """Median size."""
    max: int
    """Largest size."""
    entropy: float
    """Entropy (nats) of the distribution of rows over clusters."""
    normalized_entropy: float
    """``entropy / log(num_clusters)``: 1 for equal sizes (NaN for a single cluster)."""
    gini: float
    """Gini coefficient of the sizes: 0 for equal sizes, towards 1 when few clusters hold all rows."""


def size_stats(sizes: object, num_clusters: int | None = None) -> SizeStats:
    """Min, median, max, entropy and Gini coefficient of cluster sizes.

    Args:
        sizes: Rows per (non-empty) cluster.
        num_clusters: Total number of clusters, when known (k of k-means): the missing ones count as
            empty clusters of size 0.
    """
    values = np.asarray(sizes, dtype=np.int64)
    if values.ndim != 1 or (values < 0).any():
        raise ValueError("sizes must be a 1-D array of non-negative counts")
    if num_clusters is not None:
        if num_clusters < values.size:
            raise ValueError(f"num_clusters={num_clusters} is below the {values.size} sizes given")
        values = np.concatenate([values, np.zeros(num_clusters - values.size, np.int64)])
    if not values.size:
        raise ValueError("size_stats needs at least one cluster")
    total = int(values.sum())
    nonzero = values[values > 0].astype(np.float64)
    entropy = float(-np.sum(nonzero / total * np.log(nonzero / total))) if total else 0.0
    ordered = np.sort(values).astype(np.float64)
    ranks = np.arange(1, values.size + 1)
    gini = 0.0
    if total:
        gini = float(2 * np.sum(ranks * ordered) / (values.size * total) - (values.size + 1) / values.size)
    return SizeStats(
        num_clusters=int(values.size), num_empty=int(np.sum(values == 0)), min=int(ordered[0]),
        median=float(np.median(values)), max=int(ordered[-1]), entropy=entropy,
        normalized_entropy=entropy / math.log(values.size) if values.size > 1 else math.nan, gini=gini,
    )


# --------------------------------------------------------------------------------------------------
# One pass over a stream of blocks
# --------------------------------------------------------------------------------------------------


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
                 compare: Sequence[tuple[str, str]] = (), block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        """Args:
        clusterings: Names of the clusterings given to :meth:`update` (levels, epochs...).
        kinds: Names of the metadata kinds given to :meth:`update` (see :data:`METADATA_KINDS`).
        compare: Pairs of clustering names whose mutual NMI is wanted.
        block_rows: Rows counted per sort (see :class:`Contingency`).
        """
        self._clusterings, self._kinds = list(clusterings), list(kinds)
        for what, names in (("clusterings", self._clusterings), ("kinds", self._kinds)):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        unknown = {name for pair in compare for name in pair} - set(self._clusterings)
        if unknown:
            raise ValueError(f"compare names clusterings not in {self._clusterings}: {sorted(unknown)}")
        self._tables = {(name, kind): Contingency(block_rows=block_rows)
                        for name in self._clusterings for kind in self._kinds}
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
            average_method: str = "arithmetic") -> dict[str, dict[str, NMIResult]]:
        """``result[clustering][kind]``: NMI, chance level (None skips it) and coverage."""
        results: dict[str, dict[str, NMIResult]] = {name: {} for name in self._clusterings}
        for (name, kind), table in self._tables.items():
            results[name][kind] = table.result(chance_seed=chance_seed, average_method=average_method)
            if table.rows_used == 0:
                logger.info("no row has both a %s cluster and %s metadata: NMI is undefined", name, kind)
        return results

    def pair_nmi(self, *, chance_seed: int | None = None,
                 average_method: str = "arithmetic") -> dict[tuple[str, str], NMIResult]:
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


# --------------------------------------------------------------------------------------------------
# In-memory conveniences
# --------------------------------------------------------------------------------------------------


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
