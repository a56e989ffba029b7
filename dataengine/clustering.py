"""The on-disk clustering: one typed reader (:class:`Clustering`) and writer (:class:`ClusteringWriter`) of a
named clustering stored inside a feature store.

This module is the only one that spells the layout; the cluster stage (:mod:`dataengine.cluster`) writes
through :class:`ClusteringWriter`, and ``assign``, ``neighbors``, the report and the trainer read through
:class:`Clustering`::

    clusterings/NAME/level0            (N,) int32 super-cluster of every row (-1: row invalid at embedding)
    clusterings/NAME/level1            (N,) int32 global sub-cluster id (and so on for deeper levels)
    clusterings/NAME/levelL_parents    (K_L,) int32 parent cluster (at level L-1) of each level-L cluster
    clusterings/NAME/levelL_centroids  (K_L, D) float32 centroids in the whitened space
    clusterings/NAME/levelL_sizes, levelL_group_offsets, levelL_objective_history, levelL_empty_splits, ...
    clusterings/NAME/pca_mean, pca_components, pca_eigenvalues, pca_params (epsilon, normalize, total variance, whiten)
    clusterings/NAME/centroid_index    uint8 bytes of a FAISS index over the leaf centroids (ids = leaf ids)
    clusterings/NAME/neighbor_index    uint8 bytes of a FAISS index over all whitened rows (ids = rows)
    attrs: format, version, config (resolved; ``config.levels`` gives the number of levels), levels (statistics
           per level), summary, assigned_from (rows assigned with another store's clustering), and
           "complete": true, written last and only once every valid row has a cluster at every level

A clustering assigned from another store (``dataengine assign``) holds the ``levelL`` arrays and attributes
only. Rows are those of the feature store; ``-1`` marks a row without a cluster, which a complete clustering
allows only for rows the embedding marked invalid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from dataengine.errors import IncompleteOutputError

if TYPE_CHECKING:
    from dataengine.store import FeatureStore

logger = logging.getLogger(__name__)

FORMAT = "dataengine.clustering"
VERSION = 1
_ROOT = "clusterings"
_CENTROID_INDEX = "centroid_index"
_NEIGHBOR_INDEX = "neighbor_index"
INDEX_CHUNK_BYTES = 1 << 22
"""Chunk of the stored neighbour index: written and read a chunk at a time."""


def layout_path(name: str, *parts: str) -> str:
    """Path inside the store of clustering ``name`` or of one of its arrays (``parts``, e.g. ``"level0"``), for
    readers that use zarr alone."""
    return "/".join((_ROOT, name, *parts))


def _level_path(name: str, level: int, array: str | None = None) -> str:
    return layout_path(name, f"level{level}" if array is None else f"level{level}_{array}")


def clustering_names(store: FeatureStore, *, complete: bool = True) -> list[str]:
    """Names of the clusterings in ``store`` (only complete ones unless ``complete=False``), sorted."""
    if not store.has(_ROOT):
        return []
    names = sorted(store.group[_ROOT].group_keys())
    if complete:
        names = [name for name in names if store.read_attrs(layout_path(name)).get("complete")]
    return names


def clustering_attrs(store: FeatureStore, name: str) -> dict[str, Any] | None:
    """Attributes of clustering ``name`` whether complete or not; ``None`` when there is none."""
    return store.read_attrs(layout_path(name)) if store.has(layout_path(name)) else None


def open_clustering(store: FeatureStore, name: str) -> Clustering:
    """The complete clustering ``name`` of ``store``.

    Raises:
        KeyError: no complete clustering of that name (the message lists those present).
    """
    attrs = clustering_attrs(store, name)
    if not attrs or not attrs.get("complete"):
        raise KeyError(f"no complete clustering {name!r} in {store.url}; present: "
                       f"{clustering_names(store, complete=False)}")
    return Clustering(store, name, attrs)


def latest_clustering(store: FeatureStore) -> str:
    """Name of the last complete clustering in the store, by name order (epoch names sort in time order)."""
    done = clustering_names(store)
    if not done:
        raise KeyError(f"{store.url} has no complete clustering; run `dataengine cluster` first")
    return done[-1]


class Clustering:
    """A complete clustering of a feature store, read array by array (nothing is loaded up front).

    Use :func:`open_clustering` to get one.
    """

    def __init__(self, store: FeatureStore, name: str, attrs: dict[str, Any]) -> None:
        self.store = store
        self.name = name
        self.attrs = attrs
        levels = attrs.get("config", {}).get("levels")
        if not levels:
            raise ValueError(f"clustering {name!r} in {store.url} records no config.levels; it was not written "
                             "by `dataengine cluster` or `assign`")
        self.num_levels = len(levels)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved configuration it was made with."""
        return self.attrs["config"]

    @property
    def levels(self) -> list[int]:
        """``[0, 1, ..., num_levels - 1]``."""
        return list(range(self.num_levels))

    @property
    def leaf_level(self) -> int:
        """The finest level."""
        return self.num_levels - 1

    @property
    def summary(self) -> dict[str, Any]:
        """The summary the cluster stage recorded (empty for an assigned clustering)."""
        return self.attrs.get("summary", {})

    @property
    def assigned_from(self) -> dict[str, Any] | None:
        """``{"store", "name"}`` of the clustering the rows were assigned with, for an assigned clustering."""
        return self.attrs.get("assigned_from")

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"clustering {self.name!r} has levels {self.levels}; level {level} is not among them")

    def assignment_array(self, level: int) -> Any:
        """The ``(N,)`` zarr array of cluster ids at ``level``, for reading in blocks.

        Raises:
            ValueError: no such level, or an array that is not one id per row of the store.
        """
        self._check_level(level)
        path = _level_path(self.name, level)
        if not self.store.has(path):
            raise ValueError(f"clustering {self.name!r} in {self.store.url} lacks its level-{level} assignments")
        array = self.store.group[path]
        if array.shape != (self.store.num_rows,):
            raise ValueError(f"{path} has shape {array.shape}; expected ({self.store.num_rows},)")
        return array

    def assignments(self, level: int) -> np.ndarray:
        """Cluster id of every row at ``level`` (int32, -1 = none)."""
        return np.asarray(self.assignment_array(level)[...])

    def _level_array(self, level: int, array: str) -> np.ndarray:
        self._check_level(level)
        path = _level_path(self.name, level, array)
        if not self.store.has(path):
            raise KeyError(f"clustering {self.name!r} has no {array} at level {level} (an assigned clustering "
                           "keeps the assignments only)")
        return self.store.read_array(path)

    def parents(self, level: int) -> np.ndarray:
        """Parent (at ``level - 1``) of each cluster of ``level``."""
        return self._level_array(level, "parents")

    def sizes(self, level: int) -> np.ndarray:
        """Rows of each cluster of ``level``."""
        return self._level_array(level, "sizes")

    def centroids(self, level: int) -> np.ndarray:
        """``(K, D)`` centroids of ``level`` in the whitened space."""
        return self._level_array(level, "centroids")

    def group_offsets(self, level: int) -> np.ndarray:
        """Children of parent ``p`` are the clusters ``offsets[p]:offsets[p + 1]`` of ``level``."""
        return self._level_array(level, "group_offsets")

    def num_clusters(self, level: int) -> int | None:
        """Clusters at ``level``, empty ones included, when recorded (None otherwise)."""
        self._check_level(level)
        counts = self.summary.get("num_clusters") or []
        if level < len(counts):
            return int(counts[level])
        path = _level_path(self.name, level, "sizes")
        return int(self.store.group[path].shape[0]) if self.store.has(path) else None

    @property
    def has_pca(self) -> bool:
        """True when the whitening is stored (an assigned clustering keeps the assignments only)."""
        return self.store.has(layout_path(self.name, "pca_mean"))

    def pca(self) -> Any:
        """The :class:`indexes.pca.PCAWhitening` fitted on the rows."""
        from indexes.pca import PCAWhitening

        names = ("mean", "components", "eigenvalues", "params")
        return PCAWhitening.from_arrays({n: self.store.read_array(layout_path(self.name, f"pca_{n}")) for n in names})

    def centroid_index(self) -> Any:
        """The FAISS index over the leaf centroids, checked against the leaf level (ids = leaf cluster ids)."""
        from indexes.faiss_index import index_from_bytes

        leaf = self.centroids(self.leaf_level)
        return index_from_bytes(self.store.read_array(layout_path(self.name, _CENTROID_INDEX)).tobytes(),
                                dim=leaf.shape[1], num_vectors=leaf.shape[0],
                                what=f"centroid index of clustering {self.name!r}")

    @property
    def has_neighbor_index(self) -> bool:
        """True when the clustering was built with a neighbour index over its rows."""
        return self.store.has(layout_path(self.name, _NEIGHBOR_INDEX))

    def why_no_neighbor_index(self) -> str:
        """Why the clustering has no neighbour index, from what it recorded, with what to do about it."""
        again = f"re-run `dataengine cluster --name {self.name} --overwrite` in one process (not under torchrun)"
        if self.assigned_from:
            source = self.assigned_from
            return (f"its rows were assigned with clustering {source.get('name')!r} of {source.get('store')}; "
                    "query that store, or cluster this one")
        if not self.attrs.get("config", {}).get("neighbor_index", True):
            return f"it was built with --no-neighbor-index; {again}"
        ranks = int(self.summary.get("ranks", 1))
        if ranks > 1:
            return f"it was clustered on {ranks} ranks (torchrun), which build none; {again}"
        return f"the clustering recorded none; {again}"

    def neighbor_index(self, dim: int) -> Any:
        """The FAISS index over every whitened row (ids = rows), checked to hold ``dim``-d rows of the store.

        Raises:
            KeyError: it was built without one.
            ValueError: the stored index is not an index of this store's rows.
        """
        from indexes.faiss_index import index_from_pieces

        if not self.has_neighbor_index:
            raise KeyError(f"clustering {self.name!r} has no neighbour index: {self.why_no_neighbor_index()}")
        path = layout_path(self.name, _NEIGHBOR_INDEX)
        plan = self.store.read_attrs(path)  # an index planned before the table was counted: faiss's default
        array = self.store.group[path]
        return index_from_pieces(_chunk_reader(array), array.shape[0], dim=dim, num_vectors=self.store.num_rows,
                                 what=f"neighbour index of clustering {self.name!r}",
                                 precomputed_table=plan.get("precomputed_table_bytes", 1) > 0)


def _chunk_reader(array: Any) -> Callable[[int, int], bytes]:
    """``read(start, stop)`` of a 1-d uint8 array, decoding each chunk once however the reads fall across it."""
    chunk = array.chunks[0]
    cached: list = [-1, b""]

    def read(start: int, stop: int) -> bytes:
        pieces = []
        while start < stop:
            number = start // chunk
            if cached[0] != number:
                cached[:] = [number, np.asarray(array[number * chunk:(number + 1) * chunk]).tobytes()]
            end = min(stop, (number + 1) * chunk)
            pieces.append(cached[1][start - number * chunk:end - number * chunk])
            start = end
        return b"".join(pieces)

    return read


class ClusteringWriter:
    """Writes clustering ``name`` into ``store`` (opened for writing); :meth:`finish` marks it complete, last.

    Several ranks may write assignments at once, each its own rows: the assignment arrays must then be
    chunked so that no chunk spans two ranks (see :meth:`create_assignments`).
    """

    def __init__(self, store: FeatureStore, name: str) -> None:
        self.store = store
        self.name = name

    def remove(self) -> None:
        """Delete whatever is stored under the name (complete or not)."""
        if self.store.has(layout_path(self.name)):
            del self.store.group[layout_path(self.name)]

    def create_assignments(self, level: int, chunk_rows: int, boundaries: list[int] | None = None) -> None:
        """Create the ``(N,)`` int32 id array of ``level``, filled with -1.

        Args:
            level: the level.
            chunk_rows: rows per chunk.
            boundaries: first rows of the ranges that different writers will fill; each must start a chunk
                (otherwise two writers would rewrite the same chunk, and the last one would win).
        """
        misaligned = [row for row in boundaries or [] if row % chunk_rows and row < self.store.num_rows]
        if misaligned:
            raise ValueError(f"writer boundaries {misaligned} do not start chunks of {chunk_rows} rows")
        self.store.group.create_array(_level_path(self.name, level), shape=(self.store.num_rows,), dtype="int32",
                                      chunks=(chunk_rows,), overwrite=True, fill_value=-1)

    def write_assignments(self, level: int, start: int, ids: np.ndarray) -> None:
        """Cluster ids of rows ``[start, start + len(ids))`` at ``level`` (the array exists)."""
        if len(ids):
            self.store.group[_level_path(self.name, level)][start:start + len(ids)] = np.asarray(ids, np.int32)

    def write_level(self, level: int, arrays: dict[str, np.ndarray]) -> None:
        """The per-cluster arrays of one level (``parents``, ``centroids``, ``sizes``, ...) by name."""
        for array, values in arrays.items():
            self.store.write_array(_level_path(self.name, level, array), np.asarray(values))

    def write_pca(self, arrays: dict[str, np.ndarray]) -> None:
        """The whitening (:meth:`indexes.pca.PCAWhitening.to_arrays`)."""
        for array, values in arrays.items():
            self.store.write_array(layout_path(self.name, f"pca_{array}"), np.asarray(values))

    def write_centroid_index(self, data: bytes) -> None:
        """Serialised FAISS index over the leaf centroids."""
        self.store.write_array(layout_path(self.name, _CENTROID_INDEX), np.frombuffer(data, dtype=np.uint8))

    def write_neighbor_index(self, index: Any, attrs: dict[str, Any]) -> None:
        """A FAISS index over every whitened row, with its plan as attributes.

        Serialised straight into the array's chunks: memory holds a chunk, not the index's bytes (two copies of
        them beside a 96M-row index of 3.8 GB, were they made whole first). Its size is counted first, by one
        more pass of faiss's writer that keeps nothing.
        """
        from indexes.faiss_index import serialized_size, write_index_to

        node = self.store.group.create_array(layout_path(self.name, _NEIGHBOR_INDEX), shape=(serialized_size(index),),
                                             dtype="uint8", chunks=(INDEX_CHUNK_BYTES,), overwrite=True,
                                             attributes=attrs)
        written = 0

        def put(piece: bytes) -> None:
            nonlocal written
            node[written:written + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            written += len(piece)

        write_index_to(index, put, piece_bytes=INDEX_CHUNK_BYTES)

    def check_assigned(self, num_levels: int, valid: np.ndarray, num_clusters: list[int] | None = None,
                       block_rows: int = 1 << 22) -> None:
        """Every valid row has a cluster id (below ``num_clusters[level]`` when given) at every level.

        Raises:
            IncompleteOutputError: naming the level, how many rows lack an id and the first of them.
        """
        for level in range(num_levels):
            array = self.store.group[_level_path(self.name, level)]
            missing, first, bad = 0, None, 0
            for start in range(0, len(valid), block_rows):
                ids = np.asarray(array[start:start + block_rows])
                holes = np.flatnonzero((ids < 0) & valid[start:start + len(ids)])
                missing += holes.size
                first = first if first is not None or not holes.size else start + int(holes[0])
                if num_clusters is not None:
                    bad += int(np.count_nonzero(ids >= num_clusters[level]))
            if missing or bad:
                raise IncompleteOutputError(
                    f"clustering {self.name!r} in {self.store.url}: {missing} valid rows have no cluster at level "
                    f"{level} (first: row {first}) and {bad} ids are out of range; not marking it complete")

    def finish(self, attrs: dict[str, Any]) -> None:
        """Write the attributes with ``complete: true`` (last: present = the clustering is usable).

        ``attrs`` must hold the resolved ``config`` with its ``levels``.
        """
        if not attrs.get("config", {}).get("levels"):
            raise ValueError("a clustering's attributes need config.levels")
        self.store.write_attrs(layout_path(self.name),
                               {**attrs, "format": FORMAT, "version": VERSION, "complete": True})
