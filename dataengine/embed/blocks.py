"""From decoded batches to written blocks: the assembler collects rows into fixed-composition batches and
batch features into blocks; the writer stores finished blocks on a background thread."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dataengine.embed.decode import BatchGrid
from dataengine.store import FeatureStore, StoreLayout

logger = logging.getLogger(__name__)


@dataclass
class Block:
    start: int
    features: np.ndarray
    valid: np.ndarray
    failures: list[dict[str, Any]] = field(default_factory=list)
    remaining: int = 0


class Assembler:
    """Collects decoded rows into fixed-composition batches, and batch features into blocks."""

    def __init__(self, layout: StoreLayout, grid: BatchGrid, dim: int) -> None:
        self.layout = layout
        self.grid = grid
        self.dim = dim
        self.batches: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.blocks: dict[int, Block] = {}

    def add(self, item: dict[str, Any]) -> tuple[Any, Any, list[dict[str, Any]]] | None:
        """Add a decoded item; returns ``(rows, images, failures)`` once its batch is complete."""
        batch = self.grid.batch_of(int(item["rows"][0]))
        parts = self.batches.setdefault(batch, [])
        parts.append(item)
        start, end = self.grid.batch_rows(batch)
        if sum(len(p["rows"]) for p in parts) < end - start:
            return None
        del self.batches[batch]
        if len(parts) == 1:
            return parts[0]["rows"], parts[0]["images"], parts[0]["failures"]
        rows = torch.cat([p["rows"] for p in parts])
        order = torch.argsort(rows)
        images = torch.cat([p["images"] for p in parts])[order]
        return rows[order], images, [f for p in parts for f in p["failures"]]

    def put(self, rows: np.ndarray, features: np.ndarray, failures: list[dict[str, Any]]) -> Block | None:
        """Store a batch's features; returns the block once all its rows are in."""
        index = int(rows[0]) // self.layout.rows_per_block
        block = self.blocks.get(index)
        if block is None:
            start, end = self.layout.block_rows(index)
            block = Block(start, np.zeros((end - start, self.dim), self.layout.dtype), np.ones(end - start, bool),
                           remaining=end - start)
            self.blocks[index] = block
        local = rows - block.start
        block.features[local] = features
        for failure in failures:
            block.valid[failure["row"] - block.start] = False
            block.features[failure["row"] - block.start] = 0
        block.failures.extend(failures)
        block.remaining -= len(rows)
        if block.remaining:
            return None
        return self.blocks.pop(index)


class BlockWriter:
    """Writes finished blocks on one background thread, so that the forward loop does not wait for compression
    and storage (on a GPU that wait would idle the device). At most ``max_pending`` blocks are in flight, and
    a failed write raises at the next :meth:`submit` or at :meth:`close`."""

    def __init__(self, store: FeatureStore, layout: StoreLayout, progress: Callable[[int], None] | None,
                 max_pending: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.layout = layout
        self.progress = progress
        self.max_pending = max_pending
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embed-writer")
        self.pending: collections.deque = collections.deque()
        self.rows = 0

    def submit(self, block: Block) -> None:
        while len(self.pending) >= self.max_pending:
            self._finish_oldest()
        self.pending.append((self.pool.submit(_write_block, self.store, self.layout, block), len(block.valid)))

    def _finish_oldest(self) -> None:
        future, rows = self.pending.popleft()
        future.result()
        self.rows += rows
        if self.progress:
            self.progress(rows)

    def close(self, check: bool) -> None:
        """Wait for every pending write; with ``check``, raise the first failure."""
        try:
            while check and self.pending:
                self._finish_oldest()
        finally:
            self.pool.shutdown(wait=True)


def _write_block(store: FeatureStore, layout: StoreLayout, block: Block) -> None:
    index = block.start // layout.rows_per_block
    failures = sorted(block.failures, key=lambda f: f["row"])
    record = {"block": index, "rows": [block.start, block.start + len(block.valid)], "invalid": failures}
    store.write_block(index, block.start, block.features, block.valid, record)
    for failure in failures:
        logger.warning("row %d (%s): %s", failure["row"], failure["key"], failure["error"])
