"""The order in which ingest writes its input rows: input order, or a seeded permutation of it.

An image folder or tar is usually sorted by class (``cat/0001.jpg``, ``cat/0002.jpg``, ..., ``dog/...``), so
shards written in input order hold one class each, and a training stream that reads a few shards at a time
sees batches of few classes (cluster targets follow the class: clustering methods suffer most). DeepCluster and
DeeperCluster shuffle the whole epoch; a streamed dataset can only do that cheaply if its shards are already
mixed. :func:`ingest_order` therefore writes a seeded permutation of the rows.

The permutation sorts the rows by a 64-bit hash of ``(seed, input index)`` (:func:`indexes.data.row_keys`, a
bijection, so no ties): it depends on the seed and the number of rows only, not on the numpy version, and
every node of a multi-node ingest computes the same one. Rows are renumbered in the new order, so resume
(which continues after the last done shard's input position) and the node split work unchanged.

Every row is listed before the first is processed. Rows of a folder, a local ``.tar`` and YFCC metadata
lines cost their name or line in memory. Rows whose bytes arrive with the listing (a ``.tar.gz``, a tar on
object storage: read front to back) are first copied into a local spool file, read back by offset by the
workers: the permutation then needs free local disk for the archive's image bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import numpy as np

from dataengine.fs import create_private
from dataengine.sources import Row
from indexes.data import row_keys, stream_seed

logger = logging.getLogger(__name__)

_TAG_ORDER = 31


def permutation(num_rows: int, seed: int) -> np.ndarray:
    """``order[i]`` = input index of the row written at position ``i`` (a seeded permutation of ``num_rows``)."""
    keys = row_keys(np.arange(num_rows, dtype=np.int64).astype(np.uint64), stream_seed(seed, _TAG_ORDER))
    return np.argsort(keys, kind="stable")


def ingest_order(rows: Iterator[Row], shuffle: bool, seed: int, spool_path: str) -> Iterator[Row]:
    """``rows`` in the order ingest writes them: unchanged, or (``shuffle``) their seeded permutation,
    renumbered ``0, 1, ...`` in that order.

    Args:
        rows: the input rows in input order (:func:`dataengine.sources.iter_rows`).
        shuffle: permute them.
        seed: seed of the permutation.
        spool_path: local file that receives the bytes of rows listed with their bytes (streamed tars); it is
            created only when such rows exist (a new file: an existing name, even a symlink, is refused), and the
            caller removes it after the run.
    """
    if not shuffle:
        yield from rows
        return
    listed = _list_rows(rows, spool_path)
    order = permutation(len(listed), seed)
    logger.info("ingest order: a seeded permutation (seed %d) of %d input rows", seed, len(listed))
    for position, index in enumerate(order.tolist()):
        yield dataclasses.replace(listed[index], index=position)


def _list_rows(rows: Iterator[Row], spool_path: str) -> list[Row]:
    """Every row, in input order; bytes that came with a row are moved to the spool file (offset, size)."""
    listed: list[Row] = []
    spool = None
    try:
        for row in rows:
            if row.data is not None:
                if spool is None:
                    os.makedirs(os.path.dirname(spool_path) or ".", exist_ok=True)
                    spool = create_private(spool_path)  # a new file, never through a symlink (closed in finally)
                offset = spool.tell()
                spool.write(row.data)
                row = dataclasses.replace(row, data=None, offset=offset, size=len(row.data),
                                          member_file=spool_path)
            listed.append(row)
    finally:
        if spool is not None:
            spool.close()
    if spool is not None:
        logger.info("spooled the image bytes of a streamed tar to %s (%d bytes) to write them permuted",
                    spool_path, os.path.getsize(spool_path))
    return listed
