"""Metrics over a feature store: its metadata as label codes, and the one streaming pass that scores
clusterings of its rows.

:class:`StoreLabels` bridges a feature store's metadata columns (written by ``dataengine embed``) and the
encoders of :mod:`dataengine.metrics.labels`. :func:`evaluate_store` reads clusterings and labels block by
block into a :class:`~dataengine.metrics.stream.ClusteringEvaluator`; the report and the trainer's NMI
monitor both score clusterings through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dataengine.metrics.labels import (
    KIND_DEVICE, KIND_GPS, KIND_HASHTAG, KIND_LABEL, KIND_USER, METADATA_KINDS, TagVocabulary, categorical_codes,
    count_tags, device_labels, gps_cell_bounds, gps_cells, least_frequent_tags,
)
from dataengine.metrics.stream import ClusteringEvaluator

if TYPE_CHECKING:
    from dataengine.store import FeatureStore

# Store metadata column behind each categorical kind (GPS uses the lat and lon columns).
_CATEGORICAL_COLUMNS = {KIND_USER: "user", KIND_DEVICE: "device", KIND_LABEL: "label"}


class StoreLabels:
    """Label codes (-1 = missing) of every metadata kind a feature store holds, for any block of rows.

    The store keeps categorical columns as codes into a sorted vocabulary; the metrics encoders are applied
    once to that vocabulary (devices normalised, empty strings missing), so each block is one array lookup.
    Hashtags need the global tag distribution first: call :meth:`count_tags` before reading blocks.
    """

    def __init__(self, store: FeatureStore, gps_cell_deg: float = 1.0) -> None:
        self._group = store.group
        self._arrays: dict[str, Any] = {}  # opened once: on object storage each lookup is a request
        self._gps_cell_deg = gps_cell_deg
        columns = store.attrs.get("metadata_columns", {})
        self._categorical: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind, column in _CATEGORICAL_COLUMNS.items():
            if columns.get(column) == "categorical":
                encode = device_labels if kind == KIND_DEVICE else categorical_codes
                codes, vocabulary = encode(store.read_array(f"metadata/{column}/vocab").tolist())
                self._categorical[kind] = (np.append(codes, -1), vocabulary)  # code -1 indexes the final -1
        self._has_gps = columns.get("lat") == "float" and columns.get("lon") == "float"
        self._tag_names: Any = None
        if columns.get("tags") == "ragged":
            import pyarrow as pa

            self._tag_names = pa.array(store.read_array("metadata/tags/vocab").tolist(), pa.string())
        self.tag_vocabulary: TagVocabulary | None = None

    @property
    def kinds(self) -> list[str]:
        """Kinds present, in :data:`~dataengine.metrics.METADATA_KINDS` order."""
        present = set(self._categorical) | ({KIND_GPS} if self._has_gps else set())
        present |= {KIND_HASHTAG} if self._tag_names is not None else set()
        return [kind for kind in METADATA_KINDS if kind in present]

    def tags(self, start: int, end: int) -> Any:
        """The tags of rows ``[start, end)`` as a pyarrow list<string> array."""
        import pyarrow as pa

        offsets = np.asarray(self._array("metadata/tags/offsets")[start:end + 1], dtype=np.int64)
        codes = np.asarray(self._array("metadata/tags/codes")[int(offsets[0]):int(offsets[-1])])
        values = self._tag_names.take(pa.array(codes, type=pa.int32(), mask=codes < 0))
        return pa.LargeListArray.from_arrays(pa.array(offsets - offsets[0]), values)

    def count_tags(self, blocks: Sequence[tuple[int, int]], progress: Callable[[int], None] | None = None) -> None:
        """First pass: the global tag counts behind the least-frequent-tag rule."""
        if self._tag_names is None:
            return

        def tag_blocks() -> Iterator[Any]:
            for start, end in blocks:
                yield self.tags(start, end)
                if progress:
                    progress(end - start)

        self.tag_vocabulary = count_tags(tag_blocks())

    def block(self, start: int, end: int) -> dict[str, np.ndarray]:
        """Label codes of every kind for rows ``[start, end)``."""
        labels: dict[str, np.ndarray] = {}
        if self._tag_names is not None:
            if self.tag_vocabulary is None:
                raise RuntimeError("call count_tags over every block before reading hashtag labels")
            labels[KIND_HASHTAG] = least_frequent_tags(self.tags(start, end), self.tag_vocabulary)
        for kind, (mapping, _) in self._categorical.items():
            labels[kind] = mapping[np.asarray(self._array(f"metadata/{_CATEGORICAL_COLUMNS[kind]}/codes")[start:end])]
        if self._has_gps:
            lat, lon = self._array("metadata/lat")[start:end], self._array("metadata/lon")[start:end]
            labels[KIND_GPS] = gps_cells(lat, lon, self._gps_cell_deg)
        return {kind: labels[kind] for kind in self.kinds}

    def _array(self, path: str) -> Any:
        if path not in self._arrays:
            self._arrays[path] = self._group[path]
        return self._arrays[path]

    def describe(self, kind: str, code: int) -> str:
        """Readable value of a label code (a GPS cell as its latitude/longitude bounds)."""
        if code < 0:
            return "-"
        if kind == KIND_GPS:
            lat0, lon0, lat1, lon1 = gps_cell_bounds(code, self._gps_cell_deg)
            return f"lat {lat0:g}..{lat1:g}, lon {lon0:g}..{lon1:g}"
        if kind == KIND_HASHTAG:
            return str(self.tag_vocabulary.tags[code])
        return str(self._categorical[kind][1][code])


def row_blocks(num_rows: int, block_rows: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(num_rows)`` in blocks of ``block_rows``."""
    return [(start, min(start + block_rows, num_rows)) for start in range(0, num_rows, block_rows)]


def evaluate_store(labels: StoreLabels, clusterings: Mapping[str, Any], blocks: Sequence[tuple[int, int]], *,
                   compare: Sequence[tuple[str, str]] = (), scored: Sequence[str] | None = None,
                   progress: Callable[[int], None] | None = None) -> ClusteringEvaluator:
    """Score clusterings of a store's rows against its metadata in one streaming pass (after the tag pass).

    Memory is one block of rows plus the sparse tables, whatever the number of rows.

    Args:
        labels: the store's label codes.
        clusterings: name -> cluster ids of every row (a zarr array, or anything sliceable), read per block.
        blocks: ``(start, end)`` row blocks covering the store (see :func:`row_blocks`).
        compare: pairs of names whose mutual NMI is wanted.
        scored: the names scored against the metadata kinds (``None``: all).
        progress: called with the rows of each block read (the tag pass included).

    Returns:
        The evaluator, for its NMI, pair NMI, sizes and profiles.
    """
    num_rows = blocks[-1][1] if blocks else 0
    for name, ids in clusterings.items():
        if ids.shape[0] != num_rows:
            raise ValueError(f"clustering {name!r} has {ids.shape[0]} ids for {num_rows} rows")
    if labels.tag_vocabulary is None:
        labels.count_tags(blocks, progress)
    evaluator = ClusteringEvaluator(list(clusterings), labels.kinds, compare=compare, scored=scored)
    for start, end in blocks:
        evaluator.update({name: np.asarray(ids[start:end]) for name, ids in clusterings.items()},
                         labels.block(start, end))
        if progress:
            progress(end - start)
    return evaluator
