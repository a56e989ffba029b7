"""Decoding for embed: the fixed preprocessing, the plan of *pieces* (rows of one shard for one DataLoader
worker) and the dataset that decodes them into batches of the fixed :class:`BatchGrid`.

Preprocessing (fixed, no random op): decode to RGB, resize the shorter side to ``resize_size`` (bilinear,
PIL), center-crop ``image_size`` x ``image_size``: pixel for pixel what torchvision's ``Resize(resize_size)`` +
``CenterCrop(image_size)`` give on the PIL image.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data

from dataengine.shards import ShardSet, StreamErrors, image_member, register_fsspec_opener, sample_stream
from dataengine.store import StoreLayout

def describe_error(exc: BaseException) -> str:
    # Messages may embed object reprs ("<_io.BytesIO object at 0x7f...>"); drop them so records are reproducible.
    return f"{type(exc).__name__}: {re.sub(r' ?<[^<>]* at 0x[0-9a-f]+>', '', str(exc))}"


def load_image(data: bytes, resize_size: int, image_size: int) -> np.ndarray:
    """Decode an image, resize its shorter side to ``resize_size`` and center-crop ``image_size``.

    Returns:
        ``(3, image_size, image_size)`` uint8 array.

    Raises:
        Exception: whatever PIL raises for undecodable bytes (callers record it).
    """
    from PIL import Image

    # No JPEG draft (reduced-scale) decoding: it would be faster for large images, but then the result would
    # differ from torchvision's Resize + CenterCrop, which the trainer and users apply to the same images.
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        size = (resize_size, int(resize_size * height / width))
    else:
        size = (int(resize_size * width / height), resize_size)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


@dataclass(frozen=True)
class BatchGrid:
    """The fixed batch composition: batch ``k`` of block ``b`` = rows ``[b0 + k*B, min(b0 + (k+1)*B, b1))``."""

    rows_per_block: int
    batch_size: int
    num_rows: int

    def batch_of(self, row: int) -> tuple[int, int]:
        """``(block, k)`` of a global row."""
        block = row // self.rows_per_block
        return block, (row - block * self.rows_per_block) // self.batch_size

    def batch_rows(self, batch: tuple[int, int]) -> tuple[int, int]:
        """Global rows ``[start, end)`` of a batch."""
        start = batch[0] * self.rows_per_block + batch[1] * self.batch_size
        block_end = min((batch[0] + 1) * self.rows_per_block, self.num_rows)
        return start, min(start + self.batch_size, block_end)


@dataclass(frozen=True)
class Piece:
    """Consecutive rows of one shard for one worker to decode.

    Attributes:
        shard_url: the tar to stream.
        shard_name: its name relative to the ingest root (for records).
        first_row: global row of ``keys[0]``.
        keys: expected keys of rows ``first_row ...``, in order.
        first_position: position in the shard (its sample number) of ``first_row``.
    """

    shard_url: str
    shard_name: str
    first_row: int
    keys: tuple[str, ...]
    first_position: int = 0


def plan_pieces(shard_set: ShardSet, keys: Callable[[int, int], list[str]], ranges: list[tuple[int, int]],
                piece_rows: int) -> list[Piece]:
    """Cut global row ranges into pieces of at most ``piece_rows`` rows, never spanning two shards.

    Args:
        shard_set: the shards.
        keys: ``keys(start, end)`` gives the expected keys of rows ``[start, end)``.
        ranges: disjoint global row ranges to cover, in order.
        piece_rows: largest piece.
    """
    pieces = []
    for start, end in ranges:
        for shard, low, high in shard_set.overlapping(start, end):
            for piece_start in range(shard.first_row + low, shard.first_row + high, piece_rows):
                piece_end = min(piece_start + piece_rows, shard.first_row + high)
                pieces.append(Piece(shard.url, shard.name, piece_start, tuple(keys(piece_start, piece_end)),
                                    piece_start - shard.first_row))
    return pieces


def pending_ranges(layout: StoreLayout, blocks: list[int]) -> list[tuple[int, int]]:
    """Merge consecutive blocks into global row ranges."""
    ranges: list[tuple[int, int]] = []
    for block in blocks:
        start, end = layout.block_rows(block)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def rows_per_piece(total_rows: int, workers: int, batch_size: int) -> int:
    """Piece length giving every worker a few pieces (a worker skips, without decoding, the rows of its shard
    before its piece, so pieces are not made smaller than needed)."""
    if workers <= 1:
        return max(1, total_rows)
    target = max(1, 2 * max(1, workers))
    rows = max(batch_size, math.ceil(total_rows / target))
    return math.ceil(rows / batch_size) * batch_size


class DecodeDataset(torch.utils.data.IterableDataset):
    """Decoded pieces; DataLoader worker ``w`` of ``W`` takes pieces ``w, w + W, ...``.

    Items: ``{"rows": int64 (n,), "images": uint8 (n, 3, S, S), "failures": [...]}`` with all rows in one batch
    of the :class:`BatchGrid`; ``failures`` lists ``{"row", "key", "error"}`` of rows whose image is zeros.
    """

    def __init__(self, pieces: list[Piece], grid: BatchGrid, resize_size: int, image_size: int,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.pieces = pieces
        self.grid = grid
        self.resize_size = resize_size
        self.image_size = image_size
        self.storage_options = dict(storage_options or {})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        register_fsspec_opener(self.storage_options)
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(self.pieces), num_workers):
            yield from self._decode_piece(self.pieces[index])

    def _decode_piece(self, piece: Piece) -> Iterator[dict[str, Any]]:
        """Rows are samples by position (row = shard's first row + sample number), as ingest and the trainer
        count them; the key at that position must be the expected one (a shard that changed since its
        manifest or index was written gives failures, never features under another row)."""
        errors = StreamErrors()
        pending: list[tuple[int, np.ndarray | None, str | None]] = []
        end = piece.first_position + len(piece.keys)
        position = -1
        for position, sample in enumerate(sample_stream([piece.shard_url], handler=errors)):
            if position < piece.first_position:
                continue  # a sample of the shard before this piece
            if position >= end:
                break  # every row of the piece is in: skip the rest of the shard
            row = piece.first_row + position - piece.first_position
            if pending and self.grid.batch_of(row) != self.grid.batch_of(pending[0][0]):
                yield self._item(pending, piece)
                pending = []
            expected = piece.keys[row - piece.first_row]
            if sample["__key__"] != expected:
                pending.append((row, None, f"key mismatch at position {position} of {piece.shard_name}: "
                                           f"{sample['__key__']!r} instead of {expected!r}"))
            else:
                pending.append((row, *self._decode(sample)))
        if pending:
            yield self._item(pending, piece)
        seen = max(0, min(end, position + 1) - piece.first_position)
        yield from self._missing([piece.first_row + i for i in range(seen, len(piece.keys))], piece, errors)

    def _decode(self, sample: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
        data = image_member(sample)
        if data is None:
            return None, f"no image member for key {sample['__key__']} (members: {sorted(sample)})"
        try:
            return load_image(data, self.resize_size, self.image_size), None
        except Exception as exc:  # any decode failure is a per-sample failure: recorded by _item
            return None, describe_error(exc)

    def _missing(self, rows: list[int], piece: Piece, errors: StreamErrors) -> Iterator[dict[str, Any]]:
        """Rows never met in the stream (the shard is shorter, or ends at a tar error) become failures."""
        reason = f"not found in {piece.shard_name}" + (f" ({errors.errors[-1]})" if errors.errors else "")
        by_batch: dict[tuple[int, int], list[tuple[int, None, str]]] = {}
        for row in rows:
            by_batch.setdefault(self.grid.batch_of(row), []).append((row, None, reason))
        for rows in by_batch.values():
            yield self._item(rows, piece)

    def _item(self, pending: list[tuple[int, np.ndarray | None, str | None]], piece: Piece) -> dict[str, Any]:
        images = torch.zeros((len(pending), 3, self.image_size, self.image_size), dtype=torch.uint8)
        failures = []
        for i, (row, image, error) in enumerate(pending):
            if image is not None:
                images[i] = torch.from_numpy(image)
            else:
                failures.append({"row": row, "key": piece.keys[row - piece.first_row], "error": error})
        rows = torch.tensor([row for row, _, _ in pending], dtype=torch.int64)
        return {"rows": rows, "images": images, "failures": failures}


def make_loader(dataset: DecodeDataset, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The DataLoader over a :class:`DecodeDataset` (items are already batched by the dataset)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=4 if workers else None)
