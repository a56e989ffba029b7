"""Ingest's workers on a Ray cluster (``distributor="ray"``): each block of input rows is one Ray task.

A task runs the very function a local worker process runs (:func:`dataengine.ingest.pipeline.process_block`:
fetch or download, decode, resize, re-encode, build the tar members) on whichever cluster node has a free
CPU, and returns the block's samples. The calling process keeps at most ``ahead`` tasks submitted and not
yet consumed, takes their results *in input order* and alone writes the shards, exactly as with local
workers: deduplication, shard boundaries, ledger and resume are the same code, so the output is byte-identical
to a run with ``distributor="multiprocessing"`` (tested).

A task whose worker process or node dies is re-run by Ray (``max_retries``, system failures only): blocks
have no side effect, so a re-run gives the same result. An exception raised by the task itself (an I/O error
of the storage) is not retried: it stops the run, which a re-run resumes like any other stop.

Ray is imported only here, only when this distributor is chosen (``pip install 'dataengine[ray]'``).
``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` or started on this machine by ``ray start``, and
otherwise starts a local one; a process that called ``ray.init`` itself (a notebook, a test) keeps its own.
The rows' inputs must be readable from every node: URLs, object storage, or a shared filesystem.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from dataengine.errors import DataEngineError
from dataengine.ingest.config import IngestConfig
from dataengine.sources import Row

logger = logging.getLogger(__name__)

TASK_RETRIES = 3
"""Re-runs of a block whose worker process or node died."""

_task: Any = None  # the remote function, made once per process


class DistributedTaskError(DataEngineError):
    """A Ray task failed for good (its worker died more than :data:`TASK_RETRIES` times, or Ray is gone)."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DataEngineError("--distributor ray needs Ray: pip install 'dataengine[ray]'") from None
    return ray


def _remote_block(config: IngestConfig, rows: list[Row]) -> list[tuple]:
    """The Ray task: a block's samples (the worker is set up for ``config`` on its first block)."""
    from dataengine.ingest import pipeline

    pipeline.init_for(config)
    return pipeline.process_block(rows)


def ray_results(config: IngestConfig, blocks: Iterable[list[Row]], ahead: int | None = None
                ) -> Iterator[list[tuple]]:
    """Run every block as a Ray task; yield each block's sample fields in input order.

    Args:
        config: the ingest (sent once to the object store).
        blocks: the work items, in input order.
        ahead: tasks submitted and not yet consumed (default: 4 per CPU of the cluster).

    Raises:
        DistributedTaskError: a task failed for good.
    """
    global _task
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, log_to_driver=False)
    if _task is None:
        _task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(_remote_block)
    if ahead is None:
        ahead = max(1, 4 * int(ray.cluster_resources().get("CPU", 1)))
    logger.info("ingest on Ray: %s CPUs, %d blocks in flight", ray.cluster_resources().get("CPU"), ahead)
    config_ref = ray.put(config)
    pending: collections.deque = collections.deque()
    iterator = iter(blocks)
    try:
        while True:
            while len(pending) < ahead:
                block = next(iterator, None)
                if block is None:
                    break
                pending.append(_task.remote(config_ref, block))
            if not pending:
                return
            try:
                yield ray.get(pending.popleft())
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.RaySystemError, ray.exceptions.ObjectLostError) as exc:
                raise DistributedTaskError(f"a Ray ingest task failed after {TASK_RETRIES} retries: "
                                           f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
            except ray.exceptions.RayTaskError as exc:  # the task's own exception: raised as itself
                raise exc.as_instanceof_cause() from None
    finally:
        for ref in pending:  # an early stop: the rest is not needed
            ray.cancel(ref, force=True)
