"""Label encoding: each metadata kind becomes an int64 code array with ``-1`` for a missing value.

:func:`hashtag_labels` (least frequent tag, two-pass streamable through :func:`count_tags` and
:func:`least_frequent_tags`), :func:`gps_cells`, :func:`device_labels` and :func:`categorical_codes` (users,
class labels). :class:`CategoricalEncoder` keeps codes consistent across blocks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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

_NO_RANK = np.iinfo(np.int64).max


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
