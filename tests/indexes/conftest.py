"""Fixtures for the algorithm tests: one thread per runtime (parallelism is not what these tests check)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """torch, faiss and BLAS on one thread for this module, restored afterwards."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    from indexes.threads import set_num_threads

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    with threadpool_limits(limits=1, user_api="blas"):
        set_num_threads(1)
        yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture()
def blobs():
    """``blobs(n, d, centers, seed)``: float32 rows around random centres (well-separated clusters)."""

    def make(n: int = 2000, d: int = 16, centers: int = 10, seed: int = 0, spread: float = 4.0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        means = rng.standard_normal((centers, d)) * spread
        return (means[rng.integers(0, centers, n)] + rng.standard_normal((n, d))).astype(np.float32)

    return make
