"""``run_embed``: every rank embeds its own blocks of the store; rank 0 creates the store and marks it
complete (see :mod:`dataengine.embed`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from dataengine.embed.blocks import Assembler, BlockWriter
from dataengine.embed.config import EmbedConfig, EmbedResult
from dataengine.embed.decode import BatchGrid, DecodeDataset, make_loader, pending_ranges, plan_pieces, rows_per_piece
from dataengine.embed.model import EmbedModel, build_model, checked_forward
from dataengine.embed.output import finalize, layout_of, output_config, prepare_store, resolve_config
from dataengine.errors import OutputExistsError
from dataengine.locks import check_output_path, locked_output
from dataengine.shards import ShardSet, load_shard_set
from dataengine.store import FeatureStore, StoreLayout, inspect_existing, open_store
from indexes import distributed
from indexes.data import shard_bounds

logger = logging.getLogger(__name__)


def run_embed(config: EmbedConfig, progress: Callable[[int], None] | None = None) -> EmbedResult:
    """Embed every sample of ``config.shards`` into the feature store ``config.out``, resuming any earlier run.

    Under ``torch.distributed`` (joined by the caller: the CLI under ``torchrun`` uses
    :func:`indexes.distributed.process_group`) every rank calls this; rank 0 creates the store, each rank
    embeds its own blocks, rank 0 marks the store complete.

    Args:
        config: what to embed and how.
        progress: called with the number of rows of each block just written.

    Raises:
        IncompleteOutputError: the ingest output has no manifest.
        OutputExistsError: ``out`` holds another store (and not ``overwrite``).
        OutputUnusableError: ``out`` is a file, lies under a file, or is not writable.
        OutputLockedError: another run is writing ``out``.
        WeightsMismatchError: the weights do not fit the model.
    """
    start = time.perf_counter()
    check_output_path(config.out)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    rank, world_size = distributed.rank(), distributed.world_size()
    shard_set = load_shard_set(config.shards, config.storage_options)
    model = build_model(config)
    with locked_output(config.out, config.storage_options, rank=rank,
                       all_true=distributed.all_true if world_size > 1 else None):
        return _embed(config, shard_set, model, rank, world_size, start, progress)


def _embed(config: EmbedConfig, shard_set: ShardSet, model: EmbedModel, rank: int, world_size: int, start: float,
           progress: Callable[[int], None] | None) -> EmbedResult:
    store, wanted = _open_or_create(config, shard_set, model, rank)
    layout = layout_of(store.attrs)
    if store.complete:
        logger.info("%s is already complete (%d rows); nothing to do", config.out, layout.num_rows)
        return _result(config, store, layout, wanted, start, rank, world_size, 0, 0, layout.num_blocks)
    records = store.block_records()
    mine = range(*shard_bounds(layout.num_blocks, rank, world_size))
    pending = [b for b in mine if records[b] is None]
    if len(pending) < len(mine):
        logger.info("rank %d: resuming, %d of %d blocks already done", rank, len(mine) - len(pending), len(mine))
    computed_rows = _embed_and_finalize(config, shard_set, store, layout, model, wanted["batch_size"], pending,
                                        rank, progress)
    resumed = len(mine) - len(pending)
    return _result(config, store, layout, wanted, start, rank, world_size, len(pending), computed_rows, resumed)


def _embed_and_finalize(config: EmbedConfig, shard_set: ShardSet, store: FeatureStore, layout: StoreLayout,
                        model: EmbedModel, batch_size: int, blocks: list[int], rank: int,
                        progress: Callable[[int], None] | None) -> int:
    """Embed this rank's pending blocks; once every rank is done, rank 0 marks the store complete. A failure on
    any rank raises on every rank (none waits for a dead one); finished blocks are kept for the re-run."""
    error, computed_rows = None, 0
    try:
        computed_rows = _embed_blocks(config, shard_set, store, layout, model, batch_size, blocks, progress)
    except Exception as exc:  # re-raised below, once the other ranks know
        error = exc
    if not distributed.all_true(error is None):
        if error is not None:
            raise error
        raise RuntimeError("another rank failed (see its log); re-run to resume: finished blocks are kept")
    if rank == 0:
        finalize(store)
    distributed.barrier()  # the others return once the store is marked complete
    return computed_rows


def _open_or_create(config: EmbedConfig, shard_set: ShardSet, model: EmbedModel,
                    rank: int) -> tuple[FeatureStore, dict[str, Any]]:
    """Rank 0 creates or checks the store while the others wait; then every rank opens it and checks that the
    recorded configuration is its own (automatic fields excepted: rank 0's values are taken)."""
    ok, error = True, None
    if rank == 0:
        try:
            recorded = inspect_existing(config.out, config.storage_options)
            prepare_store(config, shard_set, model, resolve_config(config, model, recorded), recorded)
        except Exception as exc:  # re-raised below, after telling the other ranks not to wait
            ok, error = False, exc
    if not distributed.all_true(ok):
        if error is not None:
            raise error
        raise RuntimeError("rank 0 could not prepare the feature store; see its log")
    store = open_store(config.out, config.storage_options, mode="r+", allow_incomplete=True)
    recorded = store.attrs["config"]
    mine = output_config(config, model, config.batch_size or recorded["batch_size"],
                          config.chunk_rows or recorded["chunk_rows"])
    if mine != recorded:
        raise OutputExistsError(f"{config.out}: rank {rank} resolved another configuration than rank 0 "
                                f"({mine} vs {recorded})")
    return store, recorded


def _embed_blocks(config: EmbedConfig, shard_set: ShardSet, store: FeatureStore, layout: StoreLayout,
                  model: EmbedModel, batch_size: int, blocks: list[int],
                  progress: Callable[[int], None] | None) -> int:
    """Decode, forward and write ``blocks``; returns the number of rows written."""
    if not blocks:
        return 0
    grid = BatchGrid(layout.rows_per_block, batch_size, layout.num_rows)
    ranges = pending_ranges(layout, blocks)
    total = sum(end - start for start, end in ranges)
    keys = store.keys
    pieces = plan_pieces(shard_set, lambda s, e: [str(k) for k in keys[s:e]], ranges,
                         rows_per_piece(total, config.workers, batch_size))
    dataset = DecodeDataset(pieces, grid, config.resolved_resize_size, config.image_size, config.storage_options)
    loader = make_loader(dataset, config.workers, pin_memory=model.device.type == "cuda")
    assembler = Assembler(layout, grid, model.dim)
    writer = BlockWriter(store, layout, progress)
    try:
        for item in loader:
            batch = assembler.add(item)
            if batch is None:
                continue
            rows, images, failures = batch
            block = assembler.put(rows.numpy(), checked_forward(model, images), failures)
            if block is not None:
                writer.submit(block)
    except BaseException:
        writer.close(check=False)  # let the blocks already computed land; the run's own error wins
        raise
    writer.close(check=True)
    if assembler.blocks or assembler.batches:
        raise RuntimeError(f"internal error: {len(assembler.blocks)} blocks left incomplete")
    return writer.rows


def _result(config: EmbedConfig, store: FeatureStore, layout: StoreLayout, wanted: dict[str, Any], start: float,
            rank: int, world_size: int, computed_blocks: int, computed_rows: int, resumed: int) -> EmbedResult:
    # Reopen: rank 0 may have marked the store complete since this process read its attributes.
    attrs = open_store(config.out, config.storage_options, allow_incomplete=True).attrs
    seconds = time.perf_counter() - start
    return EmbedResult(out=config.out, num_rows=layout.num_rows, dim=layout.dim, num_blocks=layout.num_blocks,
                       computed_blocks=computed_blocks, resumed_blocks=resumed, computed_rows=computed_rows,
                       num_invalid=int(attrs.get("num_invalid", 0)), seconds=seconds,
                       images_per_second=computed_rows / max(seconds, 1e-9), rank=rank, world_size=world_size,
                       complete=bool(attrs.get("complete")), batch_size=wanted["batch_size"])

