"""One place to set the thread counts of the three OpenMP/BLAS runtimes this package drives.

numpy's BLAS (OpenBLAS), torch's intra-op pool and faiss's OpenMP each keep their own worker threads.
Left alone they oversubscribe the cores: a BLAS thread busy-waiting after a GEMM competes with a torch
reduction for the same core. :func:`set_num_threads` sets all three to the same count, and
:func:`single_threaded_kernels` lets the k-means assignment run its own pool of single-threaded GEMMs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def default_num_threads() -> int:
    """Number of cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not every platform has sched_getaffinity
        return max(1, os.cpu_count() or 1)


def set_num_threads(num_threads: int | None = None) -> int:
    """Set torch, faiss and BLAS to the same number of threads.

    Args:
        num_threads: threads per runtime; ``None`` uses :func:`default_num_threads`.

    Returns:
        The number of threads set.
    """
    if num_threads is None:
        num_threads = default_num_threads()
    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads} must be >= 1")
    import faiss
    import torch

    torch.set_num_threads(num_threads)
    faiss.omp_set_num_threads(num_threads)
    limiter = _threadpoolctl()
    if limiter is not None:
        limiter.threadpool_limits(limits=num_threads, user_api="blas")
    logger.debug("torch, faiss and BLAS set to %d threads", num_threads)
    return num_threads


def blas_limits_available() -> bool:
    """Whether BLAS thread counts can be changed at run time (needs the ``threadpoolctl`` package)."""
    return _threadpoolctl() is not None


_depth = threading.local()


@contextlib.contextmanager
def single_threaded_kernels() -> Iterator[None]:
    """Within the block BLAS and torch CPU ops run on the calling thread only.

    The k-means assignment runs its own pool of threads; a multi-threaded GEMM or torch op inside each
    of them would oversubscribe the cores. BLAS is limited through ``threadpoolctl`` (left alone when it
    is not installed); torch's intra-op thread count is restored on exit. Nested uses cost nothing.
    """
    if getattr(_depth, "value", 0):
        yield
        return
    import torch

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _depth.value = 1
    limiter = _threadpoolctl()
    try:
        if limiter is None:
            yield
        else:
            with limiter.threadpool_limits(limits=1, user_api="blas"):
                yield
    finally:
        _depth.value = 0
        torch.set_num_threads(torch_threads)


@contextlib.contextmanager
def faiss_threads(num_threads: int) -> Iterator[None]:
    """Within the block faiss's OpenMP runs ``num_threads`` threads; its previous count is restored on exit."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl
