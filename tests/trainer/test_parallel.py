"""Sharded sub-class heads and synchronised BatchNorm over 1, 2 and 3 gloo ranks against one process computing
the whole batch literally; the shard plan; shard checkpoints read back under another number of ranks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.checkpoint import load_sub_heads, save_sub_heads
from trainer.run_folder import RunFolder
from trainer.losses import GRAD_MEANS, SubClassHeads
from trainer.parallel import HeadShards, SyncBatchNorm, sub_class_loss

COUNTS = [3, 1, 7, 2, 5, 5, 4, 6]  # k_s of 8 super-classes, uneven on purpose
DIM, BATCH, SEED = 5, 8, 3


def _batches(world: int, case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``world * BATCH`` rows: features, super-classes and local sub-classes. ``one_owner``: every row in the first
    two super-classes, so that the other ranks receive no row at all."""
    generator = torch.Generator().manual_seed(11)
    rows = world * BATCH
    features = torch.randn(rows, DIM, generator=generator)
    supers = torch.randint(0, 2 if case == "one_owner" else len(COUNTS), (rows,), generator=generator)
    subs = (torch.rand(rows, generator=generator) * torch.tensor(COUNTS)[supers]).long()
    return features, supers, subs


def _reference(world: int, case: str, grad_mean: str) -> dict[str, torch.Tensor]:
    """One process, the whole head, one row at a time: each rank's features' gradient is that of its own batch
    mean; each ``W_s``'s is the mean over every rank's rows (``batch``) or over the rows of ``s``
    (``superclass``); the stats of each rank's rows."""
    features, supers, subs = _batches(world, case)
    features.requires_grad_(True)
    heads = SubClassHeads(DIM, COUNTS, seed=SEED)
    offsets = np.concatenate([[0], np.cumsum(COUNTS)])
    sizes = torch.bincount(supers, minlength=len(COUNTS))
    losses, head_loss, correct = [], features.new_zeros(()), []
    for n in range(len(features)):
        s = int(supers[n])
        logits = F.linear(features[n:n + 1], heads.sub_weight[offsets[s]:offsets[s + 1]],
                          heads.sub_bias[offsets[s]:offsets[s + 1]])
        ce = F.cross_entropy(logits, subs[n:n + 1])
        losses.append(ce)
        head_loss = head_loss + ce / (len(features) if grad_mean == "batch" else int(sizes[s]))
        correct.append(float(logits.argmax() == subs[n]))
    rank_loss = sum(torch.stack(losses[r * BATCH:(r + 1) * BATCH]).mean() for r in range(world))
    (features_grad,) = torch.autograd.grad(rank_loss, features, retain_graph=True)
    weight_grad, bias_grad = torch.autograd.grad(head_loss, [heads.sub_weight, heads.sub_bias])
    ce = torch.stack(losses).detach().view(world, BATCH)
    return {"features_grad": features_grad, "weight_grad": weight_grad, "bias_grad": bias_grad,
            "loss_sub": ce.mean(1), "sub_acc": torch.tensor(correct).view(world, BATCH).mean(1)}


def _sharded(rank: int, world: int, case: str, grad_mean: str) -> dict[str, torch.Tensor]:
    """This rank's view of the sharded computation (every rank calls it in the same order)."""
    features, supers, subs = _batches(world, case)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    shards = HeadShards.plan(COUNTS, world)
    first, stop = shards.owned(rank)
    heads = SubClassHeads(DIM, COUNTS, first=first, stop=stop, seed=SEED)
    rows = features[mine].clone().requires_grad_(True)
    loss, stats = sub_class_loss(heads, shards, rows, supers[mine], subs[mine], grad_mean)
    loss.backward()
    zeros = torch.zeros_like(heads.sub_weight), torch.zeros_like(heads.sub_bias)
    return {"features_grad": rows.grad, "loss_sub": stats["loss_sub"].detach(), "sub_acc": stats["sub_acc"],
            "weight_grad": heads.sub_weight.grad if heads.sub_weight.grad is not None else zeros[0],
            "bias_grad": heads.sub_bias.grad if heads.sub_bias.grad is not None else zeros[1],
            "first": first, "stop": stop}


CASES = [(case, grad_mean) for case in ("mixed", "one_owner") for grad_mean in GRAD_MEANS]


def _sync_bn_case(rank: int, world: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(world * 4, 3, 5, 5, generator=generator) * 3 + 1
    weights = torch.randn(world * 4, 3, 5, 5, generator=generator)
    layer = SyncBatchNorm(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    rows = inputs[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    output = layer(rows)
    (output * weights[rank * 4:(rank + 1) * 4]).sum().backward()
    return {"output": output.detach(), "input_grad": rows.grad, "weight_grad": layer.weight.grad,
            "running_mean": layer.running_mean, "running_var": layer.running_var}


def _results(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    results = {f"{case}/{grad_mean}": _sharded(rank, world, case, grad_mean) for case, grad_mean in CASES}
    return results | {"sync_bn": _sync_bn_case(rank, world)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_results(rank, world), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda world: f"{world}-ranks")
def ranks(request, tmp_path_factory, spawn_ranks):
    """The sharded computations of every rank of a ``world``-rank group (one rank: in this process, no group)."""
    import socket

    world = request.param
    if world == 1:
        return world, [_results(0, 1)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path_factory.mktemp(f"world{world}")
    spawn_ranks(_worker, world, port, str(out), timeout=240)
    return world, [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def test_sharded_sub_heads_equal_one_process_with_the_whole_head(ranks):
    """Each rank's features' gradient and stats are those of its batch with the whole head; the heads' gradients,
    put together from their owners, are those of the whole batch; no row is lost when only one rank owns them."""
    world, results = ranks
    for case, grad_mean in CASES:
        _check_case(world, results, case, grad_mean)


def _check_case(world: int, results: list[dict], case: str, grad_mean: str) -> None:
    expected = _reference(world, case, grad_mean)
    offsets = np.concatenate([[0], np.cumsum(COUNTS)])
    weight_grad = torch.cat([r[f"{case}/{grad_mean}"]["weight_grad"] for r in results])
    bias_grad = torch.cat([r[f"{case}/{grad_mean}"]["bias_grad"] for r in results])
    assert [r[f"{case}/{grad_mean}"]["first"] for r in results] == list(HeadShards.plan(COUNTS, world).bounds[:-1])
    torch.testing.assert_close(weight_grad, expected["weight_grad"])
    torch.testing.assert_close(bias_grad, expected["bias_grad"])
    for rank, result in enumerate(results):
        got = result[f"{case}/{grad_mean}"]
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        torch.testing.assert_close(got["features_grad"], expected["features_grad"][rows])
        torch.testing.assert_close(got["loss_sub"], expected["loss_sub"][rank])
        torch.testing.assert_close(got["sub_acc"], expected["sub_acc"][rank])
        held = slice(offsets[got["first"]], offsets[got["stop"]])
        assert got["weight_grad"].shape == expected["weight_grad"][held].shape  # only its own rows
    if grad_mean == "superclass":  # a super-class's head learns from the mean of its rows, not of the batch
        assert not torch.allclose(expected["weight_grad"], _reference(world, case, "batch")["weight_grad"])


def test_synchronised_batchnorm_equals_batchnorm_over_the_whole_batch(ranks):
    world, results = ranks  # one rank: SyncBatchNorm must be plain BatchNorm
    generator = torch.Generator().manual_seed(5)
    inputs = (torch.randn(world * 4, 3, 5, 5, generator=generator) * 3 + 1).requires_grad_(True)
    weights = torch.randn(world * 4, 3, 5, 5, generator=generator)
    layer = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    output = layer(inputs)
    (output * weights).sum().backward()
    for rank, result in enumerate(results):
        got = result["sync_bn"]
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(got["output"], output.detach()[rows])
        torch.testing.assert_close(got["input_grad"], inputs.grad[rows])
        # DDP averages the ranks' parameter gradients: their mean is the whole batch's gradient over world.
        torch.testing.assert_close(got["running_mean"], layer.running_mean)
        torch.testing.assert_close(got["running_var"], layer.running_var)
    mean_grad = torch.stack([r["sync_bn"]["weight_grad"] for r in results]).mean(0)
    torch.testing.assert_close(mean_grad * world, layer.weight.grad)


def test_the_shard_plan_balances_rows_and_covers_every_super_class():
    assert HeadShards.plan(COUNTS, 1).bounds == (0, 8)
    for world in (2, 3, 4, 8):
        shards = HeadShards.plan(COUNTS, world)
        assert shards.bounds[0] == 0 and shards.bounds[-1] == len(COUNTS)
        assert all(a <= b for a, b in zip(shards.bounds, shards.bounds[1:]))
        loads = [sum(COUNTS[slice(*shards.owned(rank))]) for rank in range(world)]
        assert max(loads) <= sum(COUNTS) / world + max(COUNTS), (world, loads)
        assert shards.owners().tolist() == [r for r in range(world) for _ in range(*shards.owned(r))]
    many = HeadShards.plan([4] * 4, 16)  # more ranks than super-classes: some hold none
    assert sum(b - a for a, b in zip(many.bounds, many.bounds[1:])) == 4 and many.bounds[-1] == 4


def test_a_shard_holds_exactly_the_rows_of_the_whole_head():
    whole = SubClassHeads(DIM, COUNTS, seed=SEED)
    offsets = np.concatenate([[0], np.cumsum(COUNTS)])
    for first, stop in [(0, 3), (2, 5), (5, 8), (4, 4)]:
        shard = SubClassHeads(DIM, COUNTS, first=first, stop=stop, seed=SEED)
        assert torch.equal(shard.sub_weight, whole.sub_weight[offsets[first]:offsets[stop]])
        assert shard.owned_counts == COUNTS[first:stop]
    assert not torch.equal(SubClassHeads(DIM, COUNTS, seed=SEED + 1).sub_weight, whole.sub_weight)


def test_shard_checkpoints_are_read_back_under_another_number_of_ranks(tmp_path):
    """Shards written by 3 ranks give every rank of 1, 2 or 4 its own rows of weights and momentum."""
    whole = SubClassHeads(DIM, COUNTS, seed=SEED)
    momentum = torch.randn_like(whole.sub_weight)
    offsets = np.concatenate([[0], np.cumsum(COUNTS)])
    written = HeadShards.plan(COUNTS, 3)
    for rank in range(3):
        first, stop = written.owned(rank)
        rows = slice(offsets[first], offsets[stop])
        save_sub_heads(RunFolder(str(tmp_path)), "00000007", rank, {
            "first": first, "stop": stop, "weight": whole.sub_weight.detach()[rows],
            "bias": whole.sub_bias.detach()[rows], "momentum_weight": momentum[rows], "momentum_bias": None})
    reference = {"tag": "00000007", "bounds": list(written.bounds), "sub_counts": COUNTS}
    for world in (1, 2, 4):
        shards = HeadShards.plan(COUNTS, world)
        for rank in range(world):
            first, stop = shards.owned(rank)
            got = load_sub_heads(RunFolder(str(tmp_path)), reference, first, stop)
            rows = slice(offsets[first], offsets[stop])
            assert torch.equal(got["weight"], whole.sub_weight.detach()[rows])
            assert torch.equal(got["momentum_weight"], momentum[rows]) and got["momentum_bias"] is None
