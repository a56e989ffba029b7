"""The trainer over 2 gloo ranks (DDP backbone and head, synchronised BatchNorm, sharded sub-class heads, a shard
checkpoint and a resume in between) reaches the weights of one process training on the same rows as one batch.

BatchNorm is why ``sync_bn`` is on: with each rank's own batch statistics the 2-rank network is another function
than the 1-process one (normalised by 2 statistics of B rows instead of 1 of 2B rows): without it the weights
differ by 3e-4 after one step and 2e-2 after 20 (measured with this test's setup). torch 2.14's
``SyncBatchNorm`` refuses CPU tensors; the trainer's own (:class:`trainer.parallel.SyncBatchNorm`) makes the
computations the same up to float rounding (1e-8 after one step).

The learning rate is 0.01: the rounding differences of the two summation orders grow with the training dynamics,
and on these 8-row batches of random pixels at 0.05 they reach 1e-2 in 20 steps (from 1e-8 after one step,
growing smoothly, the same with or without the resume); at 0.01 they stay below 1e-6.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.labels import Labels
from trainer.rotation import rotate_batch

BATCH, STEPS, SIZE = 4, 20, 16
COUNTS = np.array([3, 2])  # level-2 clusters under each of 2 level-1 clusters: 8 super-classes


def _config(shards: str, out: str, batch: int) -> TrainConfig:
    return TrainConfig.from_flat(dict(shards=shards, out=out, mode="deepercluster", arch="small", image_size=SIZE,
                                      levels=(2, 5), batch_size=batch, workers=0, num_threads=1, device="cpu",
                                      sync_bn=True, sub_head_grad_mean="superclass", lr=0.01))


def _planted(rows: int) -> tuple[Labels, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels of ``rows`` rows, their images already rotated, and their super- and sub-class targets."""
    generator = torch.Generator().manual_seed(4)
    parents = np.arange(rows) % 2
    local = (np.arange(rows) // 2) % COUNTS[parents]
    labels = Labels("planted", parents * 3 + local, parents, local, COUNTS, int(COUNTS.sum()))
    rotations = torch.randint(0, 4, (rows,), generator=generator)
    images = rotate_batch(torch.randint(0, 256, (rows, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8),
                          rotations)
    return labels, images, torch.from_numpy(parents) * 4 + rotations, torch.from_numpy(local)


def _train(trainer, steps: range, rows_of_step) -> None:
    _, images, supers, subs = _planted(2 * BATCH * STEPS)
    for step in steps:
        rows = rows_of_step(step)
        trainer.train_step(images[rows], (supers[rows], subs[rows]))


def _state(trainer) -> dict[str, torch.Tensor]:
    network = trainer.network
    heads = network.sub_heads
    return {**{f"backbone.{k}": v for k, v in network.backbone.state_dict().items()},
            **{f"head.{k}": v for k, v in network.head.state_dict().items()},
            "sub_weight": heads.sub_weight.detach(), "sub_bias": heads.sub_bias.detach(),
            "first": torch.tensor(heads.first), "stop": torch.tensor(heads.stop)}


def _rank_main(rank: int, world: int, port: int, shards: str, out: str) -> None:
    import torch.distributed as dist

    from trainer.loop import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        labels = _planted(2 * BATCH * STEPS)[0]
        config = _config(shards, out, BATCH)
        mine = lambda step: slice(2 * BATCH * step + rank * BATCH, 2 * BATCH * step + (rank + 1) * BATCH)  # noqa: E731
        trainer = Trainer(config)
        trainer.labels = labels
        trainer._set_heads(labels, 0)
        _train(trainer, range(STEPS // 2), mine)
        trainer.save()  # every rank writes its shard of the sub-class heads, rank 0 the checkpoint
        resumed = Trainer(config)
        resumed.reclusterer.labels_of = lambda name: labels  # the planted clustering is not on disk
        assert resumed._resume()
        _train(resumed, range(STEPS // 2, STEPS), mine)
        torch.save(_state(resumed), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_of_batch_b_reach_the_weights_of_one_process_with_batch_2b(train_shards, tmp_path, free_port,
                                                                             spawn_ranks, one_torch_thread):
    from trainer.loop import Trainer

    spawn_ranks(_rank_main, 2, free_port, train_shards, str(tmp_path / "ranks"), timeout=400)
    ranks = [torch.load(tmp_path / "ranks" / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert sorted(os.listdir(tmp_path / "ranks" / "sub_heads" / "00000001")) == ["rank0.pt", "rank1.pt"]

    labels = _planted(2 * BATCH * STEPS)[0]
    single = Trainer(_config(train_shards, str(tmp_path / "one"), 2 * BATCH))
    single._set_heads(labels, 0)
    initial = {name: tensor.clone() for name, tensor in _state(single).items()}
    _train(single, range(STEPS), lambda step: slice(2 * BATCH * step, 2 * BATCH * (step + 1)))
    expected = _state(single)

    for name, tensor in ranks[0].items():  # the replicated parts: identical on both ranks, parameters and buffers
        if name.startswith(("backbone.", "head.")):
            assert torch.equal(tensor, ranks[1][name]), name
            torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=1e-5, atol=1e-5, msg=name)
    moved = [name for name in expected if name.startswith("backbone.body") and name.endswith("weight")
             and not torch.equal(expected[name], initial[name])]
    assert len(moved) >= 8, "every conv and BatchNorm weight trains"
    # Each rank holds its own super-classes' sub-class heads; together they are the one process's.
    assert (int(ranks[0]["first"]), int(ranks[0]["stop"]), int(ranks[1]["first"]), int(ranks[1]["stop"])) == (
        0, 3, 3, 8)  # k_s = 3, 3, 3, 3, 2, 2, 2, 2: 9 and 11 rows
    for name in ("sub_weight", "sub_bias"):
        torch.testing.assert_close(torch.cat([ranks[0][name], ranks[1][name]]), expected[name], rtol=1e-5,
                                   atol=1e-5, msg=name)
