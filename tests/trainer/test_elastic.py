"""Elastic resume: an epoch checkpointed with N ranks continues with M ranks (1 <-> 2 <-> 3), its input
neither repeated nor skipped; the pieces' arithmetic; a 1-rank run resumed by 2 gloo ranks."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from dataengine.ingest import IngestConfig, run_ingest
from dataengine.shards import load_shard_set
from dataengine.synth import SynthConfig, generate_corpus
from trainer.augment import CropConfig
from trainer.config import TrainConfig
from trainer.data import EpochPlan, ShardStream
from trainer.elastic import Piece, PieceCounter, StreamLayout, deal, resume_layout, slot_pieces
from trainer.step import epoch_loader

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BATCH = 4


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_corpus(str(root / "corpus"), SynthConfig(num_images=150, seed=3, anomalies=False,
                                                      min_image_size=20, max_image_size=28))
    run_ingest(IngestConfig(yfcc=str(root / "corpus" / "metadata.tsv"), images=str(root / "corpus" / "images"),
                            out=str(root / "ingest"), shard_size=10, workers=0))
    return load_shard_set(str(root / "ingest"))


def test_pieces_split_deal_and_advance():
    pieces = (Piece(0, 5), Piece(1, 7))
    dealt = deal(pieces, 3)  # 2 pieces, 3 slots: each split in 3, every slot gets one part of each
    assert dealt == (Piece(0, 5, 3), Piece(0, 6, 3), Piece(0, 7, 3), Piece(1, 7, 3), Piece(1, 8, 3), Piece(1, 9, 3))
    assert [[p for _, p in slot_pieces(dealt, slot, 3)] for slot in range(3)] == [
        [Piece(0, 5, 3), Piece(1, 7, 3)], [Piece(0, 6, 3), Piece(1, 8, 3)], [Piece(0, 7, 3), Piece(1, 9, 3)]]
    assert deal(dealt, 2) == dealt and deal(pieces, 1) == pieces  # a multiple of the slots: nothing split
    assert Piece(0, 6, 3).advanced(2) == Piece(0, 12, 3)
    assert [i for i in range(20) if Piece(0, 6, 3).takes(i)] == [6, 9, 12, 15, 18]
    # Two ranks, one worker each, 3 steps of 4: each source gave 12 items; one rank continues both.
    layout = resume_layout(StreamLayout(world_size=2, workers=1, planned=40), 3, 4, 1)
    assert (layout.pieces, layout.consumed) == ((Piece(0, 12), Piece(1, 12)), 24)
    same = StreamLayout(world_size=2, workers=1, planned=40)
    assert resume_layout(same, 3, 4, 2) is same
    counter = PieceCounter(layout)
    counter.add(torch.tensor([0, 0, 1, 0]))
    later = counter.layout_now(lambda counts: counts * 2)  # as if two ranks had counted the same
    assert (later.pieces, later.consumed) == ((Piece(0, 18), Piece(1, 14)), 32)
    assert StreamLayout.from_json(json.loads(json.dumps(later.to_json()))) == later


def _config(workers: int) -> TrainConfig:
    return TrainConfig.from_flat(dict(shards="unused", out="unused", mode="rotnet",
                                      image_size=16, batch_size=BATCH, buffer_size=8, workers=workers))


class _Rank:
    """One rank's loader over its share of an epoch, the DataLoader's worker round-robin replayed in-process."""

    def __init__(self, shard_set, config: TrainConfig, plan: EpochPlan, monkeypatch) -> None:
        self.loader, self.steps = epoch_loader(config, shard_set, None, CropConfig(size=16), plan)
        workers = max(config.data.workers, 1)
        stream = self.loader.dataset
        self.workers = []
        for worker in range(workers):
            monkeypatch.setattr(ShardStream, "_worker", lambda self, w=worker: (w, workers))
            self.workers.append(iter(list(stream)))

    def batch(self, index: int) -> list:
        items = [next(self.workers[index % len(self.workers)]) for _ in range(BATCH)]
        return items


def _run_epoch(shard_set, workers: int, segments: list[tuple[int, int | None]], monkeypatch) -> list[tuple]:
    """Epoch 1 over successive sessions ``(ranks, steps per rank or None: to the end)``, each resumed from the
    previous one's checkpointed layout as the trainer does; every item consumed, in order."""
    config = _config(workers)
    stored, step, consumed = None, 0, []
    for world_size, session_steps in segments:
        layout = None if stored is None else resume_layout(stored, step, BATCH, world_size)
        ranks = [_Rank(shard_set, config, EpochPlan(1, rank, world_size, step, layout), monkeypatch)
                 for rank in range(world_size)]
        limit = min(rank.steps for rank in ranks)  # min_over_ranks in a real run
        layout = layout or StreamLayout(world_size=world_size, workers=max(workers, 1),
                                        planned=limit * world_size * BATCH)
        counters = [PieceCounter(layout) for _ in ranks]
        end = limit if session_steps is None else step + session_steps
        assert end <= limit, "the session was to stop inside the epoch"
        for index in range(step, end):
            for rank, counter in zip(ranks, counters):
                batch = rank.batch(index - step)
                consumed.extend(batch)
                if layout.pieces is not None:
                    counter.add([item[2] for item in batch])
        step = end
        stored = counters[0].layout_now(lambda counts: sum(c.counts for c in counters))
    return consumed, stored


@pytest.mark.parametrize("workers, segments", [(0, [(1, 5), (2, 3), (3, None)]), (0, [(3, 2), (2, 2), (1, None)]),
                                               (2, [(2, 3), (3, None)])])
def test_an_epoch_resumed_with_other_ranks_neither_repeats_nor_skips_input(shard_set, workers, segments,
                                                                          monkeypatch):
    """Every row once (no balancing): the elastic epoch takes no row twice, consumes what the uninterrupted run
    plans (to less than a global batch), and every row it takes is cropped as the uninterrupted run crops it."""
    (first, _), *_ = segments
    reference, _ = _run_epoch(shard_set, workers, [(first, None)], monkeypatch)
    elastic, layout = _run_epoch(shard_set, workers, segments, monkeypatch)
    rows = [int(item[1]) for item in elastic]
    assert len(rows) == len(set(rows)), "a row was taken twice"
    assert len(reference) - len(elastic) < segments[-1][0] * BATCH
    assert len(elastic) <= len(reference) == layout.planned
    crops = {int(row): image for image, row in reference}
    shared = [item for item in elastic if int(item[1]) in crops]
    assert len(shared) > len(elastic) // 2
    assert all(torch.equal(item[0], crops[int(item[1])]) for item in shared)


def test_an_epoch_resumed_with_the_same_ranks_is_the_uninterrupted_one(shard_set, monkeypatch):
    reference, _ = _run_epoch(shard_set, 0, [(2, None)], monkeypatch)
    resumed, layout = _run_epoch(shard_set, 0, [(2, 3), (2, None)], monkeypatch)
    assert layout.pieces is None
    assert [int(r) for _, r in resumed] == [int(r) for _, r in reference]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, reference))


def _rank_main(rank: int, world_size: int, port: int, values: dict) -> None:
    import torch.distributed as dist

    from trainer.loop import run_train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        run_train(TrainConfig.from_flat(values))
    finally:
        dist.destroy_process_group()



def test_a_one_rank_run_stopped_mid_epoch_is_finished_by_two_gloo_ranks(train_shards, tmp_path, free_port):
    """The checkpoint of a 1-rank run records its epoch's layout; 2 ranks continue the epoch on its pieces, for
    the steps planned and left, and the run ends like any other."""
    from trainer.loop import run_train

    values = dict(shards=train_shards, out=str(tmp_path / "run"), mode="rotnet", arch="small", image_size=32,
                  epochs=1, batch_size=8, buffer_size=32, workers=0, num_threads=1, checkpoint_every=3)
    steps = itertools.count(1)

    def stop_at_7(_count: int) -> None:  # the checkpoint of step 6 is on disk
        if next(steps) == 7:
            raise InterruptedError

    with pytest.raises(InterruptedError):
        run_train(TrainConfig.from_flat(values), progress=stop_at_7)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    layout = StreamLayout.from_json(json.loads(state["epoch_progress"])["stream"])
    assert (state["step"], layout.world_size, layout.pieces) == (6, 1, None)
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port, values), nprocs=2, join=True)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    left = (layout.planned - 6 * 8) // (2 * 8)
    assert record["steps"] == 6 + left and left >= 1
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["total_steps"]) == (1, 0, 6 + left)
    assert np.isfinite(record["loss"])
