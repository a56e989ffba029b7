"""Reductions across ranks for the clustering algorithms.

The algorithms talk to a :class:`Reducer`, never to ``torch.distributed`` directly, so one code path runs
in a single process (:class:`LocalReducer`, every reduction is the identity) and on many ranks
(:class:`TorchReducer`). What crosses ranks is always small and independent of the number of rows:
k x d sums and k counts per k-means iteration, one (k, d) buffer for the initial centroids, and a few
counts per group while selecting the training sample (:func:`kth_smallest`).
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

_UINT64_MAX = np.uint64(np.iinfo(np.uint64).max)


@runtime_checkable
class Reducer(Protocol):
    """Sum-reduction over the ranks that share one clustering."""

    @property
    def rank(self) -> int:
        """This process's rank in the group (0 in a single process)."""
        ...

    @property
    def world_size(self) -> int:
        """Number of ranks in the group (1 in a single process)."""
        ...

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``array`` over the ranks, returned on every rank (same shape and dtype)."""
        ...


class LocalReducer:
    """The reducer of a single process: every reduction returns its input."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` unchanged (there is no other rank)."""
        return np.asarray(array)


class TorchReducer:
    """A :class:`Reducer` over an initialised ``torch.distributed`` process group.

    Args:
        group: the process group; ``None`` means the default group.

    float64 and int64 arrays travel as such (gloo and NCCL both reduce them exactly as the dtype says);
    with the NCCL backend the buffers go through the current CUDA device.
    """

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("TorchReducer needs an initialised torch.distributed process group")
        self._dist = dist
        self._group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        self._on_cuda = dist.get_backend(group) == "nccl"

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the group."""
        return self._world_size

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum ``array`` over the ranks with ``torch.distributed.all_reduce``."""
        import torch

        array = np.ascontiguousarray(array)
        tensor = torch.from_numpy(array.copy())
        if self._on_cuda:
            tensor = tensor.cuda()
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self._group)
        return tensor.cpu().numpy().astype(array.dtype, copy=False)


def kth_smallest(sorted_keys: list[np.ndarray], ranks: np.ndarray, reducer: Reducer) -> np.ndarray:
    """The ``ranks[g]``-th smallest key (1-based) of each group over all ranks.

    Each group's keys are spread over the ranks and are distinct (see :func:`indexes.data.row_keys`).
    A single process reads the answer off its sorted keys; several ranks find it by bisection on the
    64-bit key space, all-reducing one count per group per step (64 steps), so no key leaves its rank.

    Args:
        sorted_keys: per group, this rank's keys (uint64) in increasing order.
        ranks: per group, the 1-based rank wanted, between 1 and the group's global key count.
        reducer: the ranks sharing the groups.

    Returns:
        uint64 array, one key per group.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    if reducer.world_size == 1:
        return np.array([keys[r - 1] for keys, r in zip(sorted_keys, ranks)], dtype=np.uint64)
    low = np.zeros(len(sorted_keys), dtype=np.uint64)  # invariant: count(key <= high) >= rank
    high = np.full(len(sorted_keys), _UINT64_MAX, dtype=np.uint64)
    for _ in range(64):
        mid = low + (high - low) // np.uint64(2)
        local = np.array(
            [np.searchsorted(keys, m, side="right") for keys, m in zip(sorted_keys, mid)], dtype=np.int64
        )
        enough = reducer.all_reduce_sum(local) >= ranks
        high = np.where(enough, mid, high)
        low = np.where(enough, low, mid + np.uint64(1))
    return high
