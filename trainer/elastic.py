"""Elastic resume: an epoch checkpointed with N ranks continues with M ranks, no sample repeated or skipped.

An epoch's input is made of *sources*, one per (rank, DataLoader worker) of the layout the epoch started with:
source ``r * W + w`` is what worker ``w`` of rank ``r`` streams, a sequence of items fixed by ``(seed, epoch, r,
w)`` alone (which rows, how many copies of each, in which order, and the crop of each: :mod:`trainer.data`).
Nothing about it depends on the ranks that read it, which is what makes the position in an epoch portable
(mosaicml-streaming's elastic determinism rests on the same idea, with its canonical nodes).

* Same number of ranks as the checkpoint: every source continues where its rank's batches stopped
  (:attr:`~trainer.data.EpochPlan.skip_batches`), bit-identical to an uninterrupted run.
* Another number of ranks: what is left of the epoch is cut into *pieces* (:class:`Piece`: the items ``start,
  start + step, start + 2 step, ...`` of one source), split so that their number is a multiple of the new
  number of (rank, worker) slots and dealt to them round-robin (:func:`deal`); a slot reads its pieces one item
  of each in turn. Every item carries its piece's number to the training loop, which counts what each piece
  gave (:class:`PieceCounter`). A piece is read in order by one slot only, so what it gave is a prefix of it:
  at a checkpoint the counts are summed over the ranks and every piece is stored advanced past what it gave.
  A later resume (with any number of ranks) deals those pieces again.

The epoch consumes the samples the uninterrupted run would have (its ``planned`` count, up to less than one
global batch): the steps left after an elastic resume are what is planned and not yet consumed, divided by the
new global batch, and never more than every rank can expect from its pieces (with the same 4-sigma margin as an
epoch's start). Costs: a source split into ``k`` pieces is read (not decoded) by ``k`` slots for the rest of
that epoch; the epoch's following ones are laid out for the new ranks from their start.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Items ``start, start + step, ...`` of source ``source`` (numbered from the epoch's start)."""

    source: int
    start: int
    step: int = 1

    def advanced(self, count: int) -> Piece:
        """The piece without its first ``count`` items."""
        return Piece(self.source, self.start + count * self.step, self.step)

    def split(self, parts: int) -> list[Piece]:
        """The piece as ``parts`` pieces taking its items in turn."""
        return [Piece(self.source, self.start + j * self.step, self.step * parts) for j in range(parts)]

    def takes(self, index: int) -> bool:
        """Whether item ``index`` of the source belongs to the piece."""
        return index >= self.start and (index - self.start) % self.step == 0

    def expected_left(self, source_items: float) -> float:
        """Items expected in the piece when its source is expected to hold ``source_items``."""
        return max(0.0, source_items - self.start) / self.step


@dataclass(frozen=True)
class StreamLayout:
    """Where an epoch's input stands, as a checkpoint records it."""

    world_size: int
    """Ranks the epoch started with (they define its sources)."""
    workers: int
    """Sources per rank: the DataLoader workers (1 without worker processes)."""
    planned: int
    """Samples the epoch consumes over all ranks (its starting layout's steps x ranks x batch size)."""
    consumed: int = 0
    """Samples consumed so far over all ranks (kept up to date where ``pieces`` is set)."""
    pieces: tuple[Piece, ...] | None = None
    """What is left of every source since an elastic resume, in dealing order; ``None`` while the epoch runs on
    the ranks it started with (every source continues after its rank's batches)."""

    def __post_init__(self) -> None:
        if min(self.world_size, self.workers) < 1 or min(self.planned, self.consumed) < 0:
            raise ValueError(f"invalid stream layout {self}")

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["pieces"] = None if self.pieces is None else [[p.source, p.start, p.step] for p in self.pieces]
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> StreamLayout:
        pieces = values.get("pieces")
        return cls(**{**values, "pieces": None if pieces is None else tuple(Piece(*p) for p in pieces)})


def source_items_taken(source: int, workers: int, steps: int, batch_size: int) -> int:
    """Items source ``source`` gave to its rank's first ``steps`` batches (the DataLoader takes batch ``b`` from
    worker ``b % workers``)."""
    worker = source % workers
    return max(0, -(-(steps - worker) // workers)) * batch_size


def resume_layout(layout: StreamLayout, steps: int, batch_size: int, world_size: int) -> StreamLayout:
    """The layout with which ``world_size`` ranks continue an epoch checkpointed after ``steps`` steps per rank.

    Unchanged while the ranks are those of the epoch's start; else the pieces left, dealt to the new slots."""
    if layout.pieces is None and world_size == layout.world_size:
        return layout
    pieces, consumed = layout.pieces, layout.consumed
    if pieces is None:
        sources = layout.world_size * layout.workers
        pieces = tuple(Piece(v, source_items_taken(v, layout.workers, steps, batch_size)) for v in range(sources))
        consumed = layout.world_size * steps * batch_size
    return replace(layout, consumed=consumed, pieces=deal(pieces, world_size * layout.workers))


def deal(pieces: tuple[Piece, ...], slots: int) -> tuple[Piece, ...]:
    """``pieces`` split (each into the same number of parts, as few as possible) into a multiple of ``slots``
    pieces; slot ``u`` reads ``result[u::slots]``. A piece's parts are consecutive, so they go to different
    slots."""
    parts = math.lcm(len(pieces), slots) // len(pieces)
    if parts == 1:
        return tuple(pieces)
    return tuple(part for piece in pieces for part in piece.split(parts))


def slot_pieces(pieces: tuple[Piece, ...], slot: int, slots: int) -> list[tuple[int, Piece]]:
    """``(number, piece)`` of the pieces slot ``slot`` of ``slots`` reads."""
    return [(index, pieces[index]) for index in range(slot, len(pieces), slots)]


class PieceCounter:
    """Items each piece gave to this rank's batches since the layout was dealt."""

    def __init__(self, layout: StreamLayout) -> None:
        self.layout = layout
        self.counts = np.zeros(len(layout.pieces or ()), dtype=np.int64)

    def add(self, pieces: Any) -> None:
        """Count a batch's piece numbers (a tensor or array)."""
        self.counts += np.bincount(np.asarray(pieces), minlength=len(self.counts))

    def layout_now(self, all_reduce_sum) -> StreamLayout:
        """The layout advanced by every rank's counts (``all_reduce_sum``: a sum over the ranks; every rank must
        call this together)."""
        if self.layout.pieces is None:
            return self.layout
        total = np.asarray(all_reduce_sum(self.counts.copy()), dtype=np.int64)
        pieces = tuple(piece.advanced(int(count)) for piece, count in zip(self.layout.pieces, total))
        return replace(self.layout, pieces=pieces, consumed=self.layout.consumed + int(total.sum()))
