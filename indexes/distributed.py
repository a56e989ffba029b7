"""Everything that crosses ranks: the process group, its small collectives, and the clustering reductions.

The process group (under ``torchrun``) is set up here and nowhere else: :func:`process_group` (or
:func:`init` / :func:`teardown`) joins the group that torchrun's environment describes, choosing the backend
from where this rank's tensors live (NCCL only for CUDA tensors, gloo otherwise) and the CUDA device from
``LOCAL_RANK``. Without torchrun (``WORLD_SIZE`` unset or 1) it does nothing and every collective below is the
identity, so one code path serves one process and many ranks. Every stage (embed, cluster, train) uses
:func:`rank`, :func:`world_size`, :func:`barrier`, :func:`all_true`, :func:`min_over_ranks` and
:func:`max_over_ranks` on the default group; torch is imported only once a group exists.

The clustering algorithms talk to a :class:`Reducer`, never to ``torch.distributed`` directly
(:class:`LocalReducer` in one process, :class:`TorchReducer` on many ranks). What crosses ranks is always
small and independent of the number of rows: k x d sums and k counts per k-means iteration, one (k, d) buffer
for the initial centroids, and a few counts per group while selecting the training sample
(:func:`kth_smallest`).

The trainer's collectives are here too: :func:`data_parallel` wraps a replicated module in torch's
DistributedDataParallel (bucketed gradient all-reduce overlapped with the backward pass), :func:`new_group`
makes a group of its own for one kind of traffic, and two differentiable collectives serve model-parallel
layers: :func:`exchange_rows` (an all-to-all of rows whose backward pass returns every row's gradient to its
sender) and :func:`sum_over_ranks` (an all-reduce whose backward pass all-reduces the gradient), with
:func:`all_gather_counts` for the row counts an exchange needs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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

    def barrier(self) -> None:
        """Wait until every rank of the group gets here."""
        ...


class LocalReducer:
    """The reducer of a single process: every reduction returns its input."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` unchanged (there is no other rank)."""
        return np.asarray(array)

    def barrier(self) -> None:
        """Return at once (there is no other rank)."""


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

    def barrier(self) -> None:
        """``torch.distributed.barrier`` over the group."""
        if self._world_size > 1:
            self._dist.barrier(group=self._group)


# ------------------------------------------------------------------------------------------ process group


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where this process runs: its rank among ``world_size`` and the device its tensors live on."""

    rank: int = 0
    """This process's rank (0 without torchrun)."""
    world_size: int = 1
    """Number of ranks (1 without torchrun)."""
    local_rank: int = 0
    """Rank on this machine (``LOCAL_RANK``), which picks the CUDA device."""
    device: str = "cpu"
    """``cpu`` or ``cuda:N``: where the collectives' tensors (and the caller's) live."""
    backend: str | None = None
    """``gloo`` or ``nccl`` when a process group is joined, else None."""


# True when init() created the default group (then teardown() destroys it); a group set up by the caller,
# e.g. a test, is left to it.
_owned = False


def launched_world_size() -> int:
    """``WORLD_SIZE`` from torchrun's environment (1 when it is not set)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _dist() -> Any:
    """``torch.distributed`` when torch is loaded and a default group exists, else None (no torch import)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _resolve(device: str, local_rank: int, ranks: int) -> str:
    """``cpu`` or ``cuda:N`` for the requested ``device`` (``auto``: CUDA when available); several ranks on
    CUDA use the device of their ``LOCAL_RANK``."""
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if ranks > 1:
        return f"cuda:{local_rank}"
    return device if device.startswith("cuda:") else f"cuda:{torch.cuda.current_device()}"


def backend_for(device: str) -> str:
    """The process-group backend for tensors on ``device``: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init(device: str = "cpu") -> Placement:
    """Join the process group described by torchrun's environment, once per process.

    Args:
        device: where this rank's tensors will live: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when
            available). Under several ranks a CUDA device is the one of ``LOCAL_RANK`` (made current).

    Returns:
        this process's placement. Without torchrun (``WORLD_SIZE`` <= 1) nothing is joined. A group that
        already exists (set up by the caller) is used as it is.
    """
    global _owned
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    ranks = launched_world_size()
    dist = _dist()
    if dist is not None:
        backend = dist.get_backend()
        resolved = _resolve(device, local_rank, dist.get_world_size())
        return Placement(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                         device=resolved, backend=backend)
    resolved = _resolve(device, local_rank, ranks)
    if ranks <= 1:
        return Placement(device=resolved)
    import torch
    import torch.distributed as dist

    if resolved.startswith("cuda"):
        torch.cuda.set_device(torch.device(resolved))
    backend = backend_for(resolved)
    dist.init_process_group(backend=backend)
    _owned = True
    logger.debug("rank %d of %d joined the process group (%s, %s)", dist.get_rank(), dist.get_world_size(),
                 backend, resolved)
    return Placement(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                     device=resolved, backend=backend)


def teardown() -> None:
    """Leave the process group :func:`init` joined (a caller's own group is left alone)."""
    global _owned
    dist = _dist()
    if dist is not None and _owned:
        dist.destroy_process_group()
    _owned = False


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[Placement]:
    """:func:`init` on entry, :func:`teardown` on exit (also when the body raises)."""
    placement = init(device)
    try:
        yield placement
    finally:
        teardown()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    """Number of ranks in the default group (1 without one)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def _collective(value: Any, dtype: str, op: str) -> Any:
    """All-reduce one scalar of ``torch.<dtype>`` over the default group with ``op`` (MIN or MAX); None
    without a group (or with one rank)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return None
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=getattr(torch, dtype), device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.item()


def barrier() -> None:
    """Wait until every rank gets here (a no-op without a group)."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def all_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank; every rank must call it (it is also a barrier)."""
    reduced = _collective(1 if flag else 0, "int32", "MIN")
    return bool(flag) if reduced is None else bool(reduced)


def min_over_ranks(value: float) -> float:
    """The smallest ``value`` over the ranks (float64), returned on every rank."""
    reduced = _collective(float(value), "float64", "MIN")
    return float(value) if reduced is None else float(reduced)


def max_over_ranks(value: float) -> float:
    """The largest ``value`` over the ranks (float64), returned on every rank."""
    reduced = _collective(float(value), "float64", "MAX")
    return float(value) if reduced is None else float(reduced)


def new_group() -> Any:
    """A new process group over every rank (collective: every rank calls it, in the same order), so that one
    kind of traffic never interleaves with another's on the default group (e.g. the sub-class heads' exchange
    during the backward pass and DDP's bucketed all-reduces); None without a group."""
    dist = _dist()
    return dist.new_group() if dist is not None and dist.get_world_size() > 1 else None


def data_parallel(module: Any, device: str, group: Any = None) -> Any:
    """``module`` wrapped in :class:`torch.nn.parallel.DistributedDataParallel` over ``group`` (default: the
    default group): its gradients are averaged over the ranks in buckets, overlapped with the backward pass.
    ``module`` itself without a group or with one rank (so one process runs exactly the plain module).

    ``device`` is where the module lives (``cpu`` or ``cuda:N``); DDP broadcasts rank 0's parameters and
    buffers at construction, so every rank starts from the same state.
    """
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    return DistributedDataParallel(module, device_ids=device_ids, process_group=group)


def group_size(group: Any = None) -> int:
    """Number of ranks in ``group`` (the default group when None; 1 without a group)."""
    dist = _dist()
    return dist.get_world_size(group) if dist is not None else 1


def group_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group when None; 0 without a group)."""
    dist = _dist()
    return dist.get_rank(group) if dist is not None else 0


def all_gather_counts(counts: Any, group: Any = None) -> Any:
    """The (world, n) int64 matrix whose row r is rank r's ``counts`` (an (n,) int64 tensor on the device the
    group's backend uses); ``counts[None]`` without a group."""
    import torch

    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return counts.unsqueeze(0)
    gathered = torch.empty(dist.get_world_size(group) * counts.numel(), dtype=counts.dtype, device=counts.device)
    dist.all_gather_single(gathered, counts.contiguous(), group=group)
    return gathered.view(-1, counts.numel())


def _exchange(tensor: Any, send: list[int], receive: list[int], group: Any) -> Any:
    import torch

    out = torch.empty((sum(receive), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _dist().all_to_all_single(out, tensor.contiguous(), output_split_sizes=receive, input_split_sizes=send,
                              group=group)
    return out


def _all_reduce_copy(tensor: Any, group: Any) -> Any:
    import torch

    total = tensor.clone(memory_format=torch.contiguous_format)
    _dist().all_reduce(total, group=group)
    return total


@functools.cache
def _differentiable() -> tuple[type, type]:
    """The autograd functions of :func:`exchange_rows` and :func:`sum_over_ranks` (made once torch is loaded)."""
    import torch

    class Exchange(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, rows: Any, send: list[int], receive: list[int], group: Any) -> Any:
            ctx.split, ctx.group = (send, receive), group
            return _exchange(rows, send, receive, group)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None, None]:
            send, receive = ctx.split
            return _exchange(grad, receive, send, ctx.group), None, None, None

    class Sum(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, value: Any, group: Any) -> Any:
            ctx.group = group
            return _all_reduce_copy(value, group)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None]:
            return _all_reduce_copy(grad, ctx.group), None

    return Exchange, Sum


def exchange_rows(tensor: Any, send: list[int], receive: list[int], group: Any = None) -> Any:
    """All-to-all of rows: the first ``send[0]`` rows of ``tensor`` go to rank 0, the next ``send[1]`` to rank 1,
    ...; returns the rows received, ``receive[0]`` from rank 0 first. Differentiable: the backward pass sends
    each row's gradient back to the rank the row came from (the same exchange, reversed). ``tensor`` itself
    without a group.
    """
    if group_size(group) == 1:
        return tensor
    return _differentiable()[0].apply(tensor, list(send), list(receive), group)


def sum_over_ranks(tensor: Any, group: Any = None) -> Any:
    """The sum of ``tensor`` over the ranks of ``group``, differentiable (the gradient of every rank's input is
    the sum of the gradients of every rank's output, as for a sum computed in one process); ``tensor`` itself
    without a group."""
    if group_size(group) == 1:
        return tensor
    return _differentiable()[1].apply(tensor, group)


def reducer() -> "Reducer":
    """The :class:`Reducer` of the default group: a :class:`TorchReducer` over several ranks, else local."""
    return TorchReducer() if world_size() > 1 else LocalReducer()


# ------------------------------------------------------------------------------------ clustering reductions


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
