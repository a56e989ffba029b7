"""Near-duplicates by SemDeDup's rule (Abbas et al., 2023): within a cluster, a row is a near-duplicate when
some *earlier* row of the same cluster is more similar to it than a threshold; the earlier one is kept.

:func:`earlier_neighbors` gives, for every row of one cluster (rows in their order), its most similar earlier
row and the cosine similarity: exact, from blocks of the Gram matrix (``O(n^2 d)`` per cluster of ``n`` rows,
memory ``block_rows x n``). The threshold is applied by the caller, so that one pass serves any threshold and
the similarity of every row can be reported.
"""

from __future__ import annotations

import numpy as np


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit l2 norm (all-zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def earlier_neighbors(vectors: np.ndarray, block_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the most similar earlier row by cosine similarity.

    Args:
        vectors: ``(n, d)`` rows of one cluster, in the order that decides which of two copies is kept.
        block_rows: rows compared per Gram block (memory ``block_rows x n`` float32).

    Returns:
        ``(neighbors, similarities)``: ``(n,)`` int64 index of the most similar row ``j < i`` (the earliest one
        on ties), ``-1`` for row 0; ``(n,)`` float32 cosine similarity to it, NaN for row 0.
    """
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    unit = normalize_rows(vectors)
    n = len(unit)
    neighbors = np.full(n, -1, dtype=np.int64)
    similarities = np.full(n, np.nan, dtype=np.float32)
    for start in range(1, n, block_rows):
        end = min(n, start + block_rows)
        gram = unit[start:end] @ unit[:end].T  # rows start..end-1 against every row before end
        gram[np.arange(end - start)[:, None] <= np.arange(end)[None, :] - start] = -np.inf  # only j < i
        best = np.argmax(gram, axis=1)  # the first maximum: the earliest of equally similar rows
        neighbors[start:end] = best
        similarities[start:end] = gram[np.arange(end - start), best]
    return neighbors, similarities
