"""FAISS indices stored with a clustering: over its centroids and over its features.

* :func:`build_centroid_index` assigns new features to the clustering's centroids: exact (flat) for small
  k, HNSW or IVF (approximate, measured by :func:`recall_at_1`) for large k.
* :func:`build_neighbor_index` finds nearest neighbours among the clustered features; its type follows the
  number of rows and a memory budget (:func:`plan_neighbor_index`): flat, IVF-Flat or IVF-PQ.
* :func:`index_to_bytes` / :func:`index_from_bytes` turn an index into bytes and back
  (``faiss.serialize_index``); the caller stores the bytes next to the clustering. For a large index,
  :func:`write_index_to` / :func:`index_from_pieces` do the same a piece at a time, without a copy of its bytes.

Row ids in the neighbour index are local row indices (``0 .. data.num_rows - 1``), in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from indexes.assign import Assigner
from indexes.data import ArrayDataset, RowSource, block_bincount, prefetched
from indexes.distributed import LocalReducer
from indexes.sampling import smallest_key_sample
from indexes.threads import faiss_threads

logger = logging.getLogger(__name__)

_PQ_BITS = 8
_FAISS_MAX_PRECOMPUTED_TABLE = 1 << 31  # faiss's precomputed_table_max_bytes: above it, faiss never builds one
_MIN_TRAIN_PER_LIST = 39  # faiss warns below 39 training points per list / per PQ centroid
_MAX_TRAIN_ROWS = 131072


@dataclass(frozen=True, kw_only=True)
class CentroidIndexConfig:
    """Which index assigns new features to the centroids."""

    kind: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    """``"auto"``: flat up to ``max_flat_centroids`` centroids, HNSW above."""
    max_flat_centroids: int = 16384
    """Largest k for which ``"auto"`` picks the exact flat index."""
    hnsw_neighbors: int = 32
    """HNSW graph degree (M)."""
    hnsw_ef_construction: int = 80
    """HNSW beam width while building."""
    hnsw_ef_search: int = 128
    """HNSW beam width while searching (stored in the index)."""
    ivf_num_lists: int | None = None
    """IVF lists; ``None`` uses about ``4 * sqrt(k)``."""
    ivf_num_probes: int = 16
    """IVF lists visited per query (stored in the index)."""

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "flat", "hnsw", "ivf"):
            raise ValueError(f"kind={self.kind!r} must be 'auto', 'flat', 'hnsw' or 'ivf'")
        counts = ("max_flat_centroids", "hnsw_neighbors", "hnsw_ef_construction", "hnsw_ef_search", "ivf_num_probes")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.ivf_num_lists is not None and self.ivf_num_lists < 1:
            raise ValueError(f"ivf_num_lists={self.ivf_num_lists} must be >= 1 (or None)")


def build_centroid_index(centroids: np.ndarray, config: CentroidIndexConfig | None = None):
    """An L2 index over ``centroids`` whose ids are the cluster ids (row order of ``centroids``)."""
    import faiss

    config = config or CentroidIndexConfig()
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    k, dim = centroids.shape
    kind = config.kind if config.kind != "auto" else ("flat" if k <= config.max_flat_centroids else "hnsw")
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_neighbors)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    else:
        num_lists = config.ivf_num_lists or max(1, min(k // _MIN_TRAIN_PER_LIST, int(4 * math.sqrt(k))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, num_lists)
        index.train(centroids)
        index.nprobe = min(config.ivf_num_probes, num_lists)
    index.add(centroids)
    logger.info("centroid index: %s over %d centroids", kind, k)
    return index


def search_nearest(index, rows: np.ndarray, *, batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest indexed vector of every row: ``(ids int64, squared distances float32)``, in batches."""
    rows = np.asarray(rows)
    ids = np.empty(rows.shape[0], dtype=np.int64)
    sqdist = np.empty(rows.shape[0], dtype=np.float32)
    for start in range(0, rows.shape[0], batch_rows):
        part = np.ascontiguousarray(rows[start : start + batch_rows], dtype=np.float32)
        dist, found = index.search(part, 1)
        ids[start : start + part.shape[0]] = found[:, 0]
        sqdist[start : start + part.shape[0]] = dist[:, 0]
    return ids, sqdist


@dataclass(frozen=True, kw_only=True)
class NeighborIndexConfig:
    """How to index the features for nearest-neighbour search."""

    memory_budget_bytes: int
    """Largest size the index may have in memory (vectors or codes, ids, coarse centroids)."""
    kind: Literal["auto", "flat", "ivf_flat", "ivf_pq"] = "auto"
    """``"auto"``: flat up to ``max_flat_rows`` rows if it fits, else IVF-Flat if it fits, else IVF-PQ."""
    max_flat_rows: int = 100_000
    """Above this many rows ``"auto"`` avoids brute force (a query scans every row)."""
    num_lists: int | None = None
    """IVF lists; ``None`` uses about ``4 * sqrt(rows)``."""
    num_probes: int = 16
    """IVF lists visited per query (stored in the index)."""
    pq_bytes: int | None = None
    """IVF-PQ code size per vector (a divisor of the dimension); ``None``: the largest that fits the budget."""
    max_train_rows: int = _MAX_TRAIN_ROWS
    """Training sample for the IVF lists and PQ codebooks (drawn at random, seeded); raised to 39 rows per list
    when there are more lists than that covers (faiss's minimum: 1.5M rows, 0.4 GB of float32 at 96M rows)."""
    seed: int = 0
    """Seed of the training sample and of faiss's k-means."""

    def __post_init__(self) -> None:
        if self.memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes={self.memory_budget_bytes} must be >= 1")
        if self.kind not in ("auto", "flat", "ivf_flat", "ivf_pq"):
            raise ValueError(f"kind={self.kind!r} must be 'auto', 'flat', 'ivf_flat' or 'ivf_pq'")
        for name in ("max_flat_rows", "num_probes", "max_train_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("num_lists", "pq_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (or None)")


@dataclass(frozen=True)
class NeighborIndexPlan:
    """The index chosen for a number of rows and a budget."""

    kind: str
    num_lists: int
    pq_bytes: int
    estimated_bytes: int
    precomputed_table_bytes: int = 0
    """IVF-PQ: bytes of faiss's precomputed distance table (``num_lists x pq_bytes x 256`` float32, counted
    in ``estimated_bytes``; 1.3 GB at 96M rows of 32-byte codes); 0: searched without it, to fit the budget."""

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def plan_neighbor_index(num_rows: int, dim: int, config: NeighborIndexConfig) -> NeighborIndexPlan:
    """Pick the neighbour index type and its sizes; raises ``ValueError`` when nothing fits the budget."""
    num_lists = config.num_lists or max(1, min(num_rows // _MIN_TRAIN_PER_LIST, int(4 * math.sqrt(num_rows))))
    # Coarse centroids, and each row's list while the lists fill (see :func:`_add_to_lists`).
    coarse = num_lists * dim * 4 + num_rows * np.dtype(_list_id_type(num_lists)).itemsize
    flat = num_rows * dim * 4
    ivf_flat = num_rows * (dim * 4 + 8) + coarse
    budget = config.memory_budget_bytes
    kinds = [config.kind] if config.kind != "auto" else ["flat", "ivf_flat", "ivf_pq"]
    if "flat" in kinds and (config.kind == "flat" or num_rows <= config.max_flat_rows) and flat <= budget:
        return NeighborIndexPlan(kind="flat", num_lists=0, pq_bytes=0, estimated_bytes=flat)
    if "ivf_flat" in kinds and ivf_flat <= budget:
        return NeighborIndexPlan(kind="ivf_flat", num_lists=num_lists, pq_bytes=0, estimated_bytes=ivf_flat)
    if "ivf_pq" in kinds:
        for pq_bytes in _pq_sizes(dim, config.pq_bytes):
            size = num_rows * (pq_bytes + 8) + coarse + (1 << _PQ_BITS) * dim * 4
            # faiss precomputes a table per list (faster searches) unless told not to: only when it fits too.
            table = num_lists * pq_bytes * (1 << _PQ_BITS) * 4
            if size + table <= budget and table <= _FAISS_MAX_PRECOMPUTED_TABLE:
                return NeighborIndexPlan(kind="ivf_pq", num_lists=num_lists, pq_bytes=pq_bytes,
                                         estimated_bytes=size + table, precomputed_table_bytes=table)
            if size <= budget:
                return NeighborIndexPlan(kind="ivf_pq", num_lists=num_lists, pq_bytes=pq_bytes, estimated_bytes=size)
    raise ValueError(
        f"no {config.kind} index of {num_rows} x {dim} fits memory_budget_bytes={budget}; raise the budget"
    )


def build_neighbor_index(
    data: RowSource,
    config: NeighborIndexConfig,
    *,
    progress: Callable[[int], None] | None = None,
):
    """Index every row of ``data`` (ids = local row indices); returns ``(index, plan)``."""
    import faiss

    plan = plan_neighbor_index(data.num_rows, data.dim, config)
    if plan.kind == "flat":
        index = faiss.IndexFlatL2(data.dim)
    else:
        quantizer = faiss.IndexFlatL2(data.dim)
        if plan.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, data.dim, plan.num_lists)
        else:
            index = faiss.IndexIVFPQ(quantizer, data.dim, plan.num_lists, plan.pq_bytes, _PQ_BITS)
            if not plan.precomputed_table_bytes:
                index.use_precomputed_table = -1  # faiss's "never"; its default builds it below 2 GB
        _train_ivf(index, _training_rows(data, config, plan.num_lists), config.seed)
        index.nprobe = min(config.num_probes, plan.num_lists)
        _add_to_lists(index, data, progress)
        logger.info("neighbour index: %s", plan)
        return index, plan
    for _, rows in prefetched(data.iter_blocks()):
        index.add(rows)
        if progress is not None:
            progress(rows.shape[0])
    logger.info("neighbour index: %s", plan)
    return index, plan


def _list_id_type(num_lists: int) -> type:
    return np.uint16 if num_lists <= 1 << 16 else np.int32


def _train_ivf(index, rows: np.ndarray, seed: int) -> None:
    """Train an IVF index: its lists by this package's k-means, then its encoder (PQ) by faiss.

    faiss would place the lists with its own k-means, whose assignment is a flat search on faiss's OpenMP
    threads around a multi-threaded BLAS GEMM: on 2 cores their busy-waiting made it 2.3-3.5 times slower
    than one thread (39,192 lists, busy: 4,900-7,400 rows/s against 17,000). :func:`indexes.kmeans.fit_kmeans`
    assigns with one runtime owning the cores (:mod:`indexes.assign`); 10 Lloyd iterations, as faiss's.
    Its centroids trained, faiss skips the quantizer's training and only assigns the rows (one thread) to
    train the encoder on their residuals.
    """
    import faiss

    from indexes.kmeans import KMeansConfig, fit_kmeans

    lists = fit_kmeans(ArrayDataset(rows), KMeansConfig(num_clusters=index.nlist, num_iterations=10, seed=seed))
    index.quantizer.add(np.ascontiguousarray(lists.centroids, dtype=np.float32))
    with faiss_threads(1):
        index.train(rows)


def _add_to_lists(index, data: RowSource, progress: Callable[[int], None] | None) -> None:
    """Add every row to a trained IVF index with its lists reserved at their final sizes.

    Added block by block as they come, faiss's inverted lists grow by doubling and end holding 1.4-1.6 times
    their codes and ids (5.6 GB for the 3.8 GB of 96M rows of 32-byte codes). A first pass finds each row's
    list (kept in 2 bytes a row), the lists are reserved at their sizes, and the second pass encodes the rows
    into them with those lists (no second coarse search): one more read of the rows. The first pass assigns
    with :class:`indexes.assign.Assigner` (see :func:`_train_ivf` for why not faiss's flat search).
    """
    import faiss

    lists = np.empty(data.num_rows, dtype=_list_id_type(index.nlist))
    assigner = Assigner(index.quantizer.reconstruct_n(0, index.nlist))
    for start, rows in prefetched(data.iter_blocks()):
        lists[start:start + rows.shape[0]] = assigner.assign(rows)[0]
    invlists = faiss.downcast_InvertedLists(index.invlists)
    for number, size in enumerate(block_bincount(lists, index.nlist).tolist()):
        if size:  # a vector shrunk back to 0 keeps its capacity: the adds below fill it without moving
            invlists.resize(number, size)
            invlists.resize(number, 0)
    for start, rows in prefetched(data.iter_blocks()):
        assigned = lists[start:start + rows.shape[0]].astype(np.int64)
        index.add_core(rows.shape[0], faiss.swig_ptr(rows), None, faiss.swig_ptr(assigned))
        if progress is not None:
            progress(rows.shape[0])


def index_to_bytes(index) -> bytes:
    """Serialise a faiss index (GPU indices are copied to CPU first)."""
    import faiss

    return faiss.serialize_index(_on_cpu(index)).tobytes()


def write_index_to(index, sink: Callable[[bytes], None], *, piece_bytes: int = 1 << 22) -> int:
    """Serialise ``index`` as :func:`index_to_bytes` does, into ``sink`` in pieces of ``piece_bytes`` (the last
    shorter), and return the number of bytes written.

    Memory holds one piece: :func:`index_to_bytes` holds two copies of the index beside it (faiss's array and
    its bytes: 7.7 GB beside a 96M-row index of 3.8 GB).
    """
    import faiss

    if piece_bytes < 1:
        raise ValueError(f"piece_bytes={piece_bytes} must be >= 1")
    pending = bytearray()
    written = 0

    def take(data: bytes) -> None:
        nonlocal written
        pending.extend(data)
        written += len(data)
        while len(pending) >= piece_bytes:
            with memoryview(pending) as view:
                piece = bytes(view[:piece_bytes])
            del pending[:piece_bytes]
            sink(piece)

    faiss.write_index(_on_cpu(index), faiss.PyCallbackIOWriter(take, min(piece_bytes, 1 << 20)))
    if pending:
        sink(bytes(pending))
    return written


def serialized_size(index) -> int:
    """Bytes of :func:`index_to_bytes` of ``index``, counted without holding them."""
    import faiss

    counted = 0

    def count(data: bytes) -> None:
        nonlocal counted
        counted += len(data)

    faiss.write_index(_on_cpu(index), faiss.PyCallbackIOWriter(count, 1 << 20))
    return counted


def _on_cpu(index):
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


# The index types this module builds; any other type read back is refused.
_INDEX_TYPES = ("IndexFlatL2", "IndexHNSWFlat", "IndexIVFFlat", "IndexIVFPQ")


def index_from_bytes(buffer: bytes | np.ndarray, *, dim: int | None = None, num_vectors: int | None = None,
                     what: str = "index", precomputed_table: bool = True):
    """Inverse of :func:`index_to_bytes`, checked: one of the L2 index types built here, of ``dim``
    dimensions holding ``num_vectors`` vectors when given.

    ``precomputed_table=False`` reads an IVF-PQ index without the distance table faiss would otherwise
    recompute (its plan's ``precomputed_table_bytes`` is 0: the table did not fit the memory budget).

    Raises:
        ValueError: a one-line message naming ``what`` when the bytes are not such an index.
    """
    buffer = np.frombuffer(buffer, dtype=np.uint8)
    return index_from_pieces(lambda start, stop: buffer[start:stop].tobytes(), buffer.size, dim=dim,
                             num_vectors=num_vectors, what=what, precomputed_table=precomputed_table)


def index_from_pieces(read: Callable[[int, int], bytes], size: int, *, dim: int | None = None,
                      num_vectors: int | None = None, what: str = "index", precomputed_table: bool = True):
    """:func:`index_from_bytes` of the ``size`` bytes that ``read(start, stop)`` returns piece by piece.

    Memory holds the index and a piece, not the index's bytes beside it (:func:`write_index_to` wrote them).
    """
    import faiss

    position = 0

    def next_piece(wanted: int) -> bytes:
        nonlocal position
        stop = min(size, position + wanted)
        data = read(position, stop) if stop > position else b""
        position = stop
        return data

    try:
        reader = faiss.PyCallbackIOReader(next_piece, 1 << 20)
        index = faiss.read_index(reader, 0 if precomputed_table else faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
    except RuntimeError as exc:  # faiss reports any unreadable buffer as a RuntimeError
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} is not a readable FAISS index ({reason})") from None
    kind = type(index).__name__
    if kind not in _INDEX_TYPES or index.metric_type != faiss.METRIC_L2:
        metric = "L2" if index.metric_type == faiss.METRIC_L2 else f"metric {index.metric_type} (not L2)"
        raise ValueError(f"{what} is an index of type {kind}, {metric}; expected an L2 {', '.join(_INDEX_TYPES)}")
    if dim is not None and index.d != dim:
        raise ValueError(f"{what} holds {index.d}-d vectors; expected {dim}-d")
    if num_vectors is not None and index.ntotal != num_vectors:
        raise ValueError(f"{what} holds {index.ntotal} vectors; expected {num_vectors}")
    return index


def checked_ids(ids: np.ndarray, num_vectors: int, what: str = "index") -> np.ndarray:
    """Ids returned by a search, checked to lie in ``[0, num_vectors)`` or be -1 (faiss: fewer hits than asked).

    Raises:
        ValueError: an id outside that range (a forged or corrupt index), in one line naming ``what``.
    """
    ids = np.asarray(ids)
    bad = (ids < -1) | (ids >= num_vectors)
    if bad.any():
        raise ValueError(f"{what} returned id {int(ids[bad].flat[0])}, outside [0, {num_vectors}): the index is "
                         "corrupt or was not built over these vectors")
    return ids


def recall_at_1(found: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of queries whose returned id is the exact nearest one."""
    found, exact = np.asarray(found).reshape(-1), np.asarray(exact).reshape(-1)
    if found.shape != exact.shape:
        raise ValueError(f"found {found.shape} and exact {exact.shape} differ in length")
    return float(np.mean(found == exact)) if found.size else 1.0


def _pq_sizes(dim: int, requested: int | None) -> list[int]:
    if requested is not None:
        if dim % requested:
            raise ValueError(f"pq_bytes={requested} must divide the dimension {dim}")
        return [requested]
    return [m for m in range(dim, 0, -1) if dim % m == 0]


def ivf_training_rows(num_rows: int, num_lists: int, max_train_rows: int = _MAX_TRAIN_ROWS) -> int:
    """Rows an IVF index is trained on: ``max_train_rows``, raised to 39 a list (at 96M rows, 39,192 lists, the
    default alone gave 3 rows a list: faiss warned, and placed the lists on too few points), at most every row."""
    return min(num_rows, max(max_train_rows, _MIN_TRAIN_PER_LIST * num_lists))


def _training_rows(data: RowSource, config: NeighborIndexConfig, num_lists: int) -> np.ndarray:
    wanted = np.array([ivf_training_rows(data.num_rows, num_lists, config.max_train_rows)])
    sample = smallest_key_sample(None, data.num_rows, wanted, row_offset=data.row_offset, seed=config.seed,
                                 reducer=LocalReducer())
    return data.take(sample[0])
