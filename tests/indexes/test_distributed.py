"""The process group and its collectives over 2 gloo processes; distributed k-means equals the single-process
run."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexes.data import ArrayDataset
from indexes import distributed
from indexes.distributed import LocalReducer, kth_smallest
from indexes.hierarchical import HierarchicalKMeansConfig, fit_hierarchical_kmeans
from indexes.kmeans import KMeansConfig, fit_kmeans
from indexes.pca import PCAConfig, fit_pca_whitening

WORLD_SIZE = 2


def _data() -> np.ndarray:
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((12, 16)).astype(np.float32) * 3
    rows = centers[rng.integers(0, 12, 3001)] + rng.standard_normal((3001, 16)).astype(np.float32)
    return rows.astype(np.float32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FLAT = KMeansConfig(num_clusters=20, seed=3, max_points_per_centroid=100, num_threads=1)
HIER = HierarchicalKMeansConfig(levels=(3, 5), seed=5, max_points_per_centroid=60, balanced=True, num_threads=1)
PCA = PCAConfig(num_components=8)


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: cluster its shard with a TorchReducer and save what it got."""
    import torch
    import torch.distributed as dist

    from indexes.distributed import TorchReducer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        reducer = TorchReducer()
        shard = ArrayDataset(_data(), block_rows=500).shard(rank, WORLD_SIZE)
        flat = fit_kmeans(shard, FLAT, reducer=reducer)
        hier = fit_hierarchical_kmeans(shard, HIER, reducer=reducer)
        pca = fit_pca_whitening(shard, PCA, reducer=reducer)
        keys = [np.sort(np.random.default_rng(rank).choice(2**60, 50, replace=False).astype(np.uint64))]
        kth = kth_smallest(keys, np.array([37]), reducer)
        np.savez(
            os.path.join(out_dir, f"rank{rank}.npz"),
            flat_assignments=flat.assignments, flat_centroids=flat.centroids, flat_sizes=flat.sizes,
            flat_history=flat.objective_history, flat_objective=flat.objective,
            leaf=hier.leaf_assignments, top=hier.levels[0].assignments,
            leaf_centroids=hier.levels[1].centroids, leaf_offsets=hier.levels[1].group_offsets,
            pca_components=pca.components, kth=kth, keys=keys[0],
        )
    finally:
        dist.destroy_process_group()


def _spawn(worker, args: tuple) -> None:
    """Run ``worker(rank, *args)`` in WORLD_SIZE spawned processes and wait for all of them (at most 180 s)."""
    import torch.multiprocessing as mp

    # Spawned children import this module by name: make sure its root is on the path they inherit,
    # whichever way pytest was started.
    root = str(Path(__file__).resolve().parents[len(__name__.split(".")) - 1])
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        context = mp.spawn(worker, args=args, nprocs=WORLD_SIZE, join=False)
    finally:
        if added:
            sys.path.remove(root)
    deadline = time.monotonic() + 180
    # join() returns False whenever one process ends while another still runs: wait until all are done.
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not finish within 180 s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2 ranks once and load their outputs."""
    out_dir = tmp_path_factory.mktemp("dist")
    _spawn(_worker, (_free_port(), str(out_dir)))
    return [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(WORLD_SIZE)]


def test_flat_kmeans_equals_single_process(ranks):
    single = fit_kmeans(ArrayDataset(_data(), block_rows=500), FLAT)
    joined = np.concatenate([r["flat_assignments"] for r in ranks])
    np.testing.assert_array_equal(joined, single.assignments)
    for r in ranks:
        np.testing.assert_allclose(r["flat_centroids"], single.centroids, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(r["flat_sizes"], single.sizes)
        # float32 distances may round differently with the row's position in a GEMM block
        np.testing.assert_allclose(r["flat_history"], single.objective_history, rtol=1e-6)
        assert r["flat_objective"] == pytest.approx(single.objective, rel=1e-6)


def test_hierarchical_kmeans_equals_single_process(ranks):
    single = fit_hierarchical_kmeans(ArrayDataset(_data(), block_rows=500), HIER)
    np.testing.assert_array_equal(np.concatenate([r["top"] for r in ranks]), single.levels[0].assignments)
    np.testing.assert_array_equal(np.concatenate([r["leaf"] for r in ranks]), single.leaf_assignments)
    for r in ranks:
        np.testing.assert_array_equal(r["leaf_offsets"], single.levels[1].group_offsets)
        np.testing.assert_allclose(r["leaf_centroids"], single.levels[1].centroids, rtol=0, atol=1e-6)


def test_pca_equals_single_process(ranks):
    single = fit_pca_whitening(ArrayDataset(_data()), PCA)
    for r in ranks:
        np.testing.assert_allclose(r["pca_components"], single.components, atol=1e-9)


def test_kth_smallest_bisection_matches_sort(ranks):
    both = np.sort(np.concatenate([r["keys"] for r in ranks]))
    for r in ranks:
        assert int(r["kth"][0]) == int(both[36])
    local = kth_smallest([both], np.array([37]), LocalReducer())
    assert int(local[0]) == int(both[36])


# ------------------------------------------------------------------------------------------ process group


def _group_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank launched as torchrun would (environment only): join, use every collective, leave."""
    import json

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    with distributed.process_group("auto") as placement:  # no CUDA here: auto means the CPU, so gloo
        # Differentiable collectives: a sum whose backward sums the gradients, an all-to-all whose backward
        # returns each row's gradient to its sender.
        value = torch.full((3,), float(rank + 1), requires_grad=True)
        total = distributed.sum_over_ranks(value)
        (total * (rank + 1)).sum().backward()
        rows = (torch.arange(3.0) + 10 * rank).requires_grad_(True)
        send = [1, 2] if rank == 0 else [2, 1]  # rank 0 keeps 1 row, sends 2; rank 1 sends 2, keeps 1
        received = distributed.exchange_rows(rows, send, [1, 2] if rank == 0 else [2, 1])
        (received * (10 ** rank)).sum().backward()
        before_barrier = time.monotonic()
        if rank == 1:
            time.sleep(1.0)
        distributed.barrier()
        seen = {
            "placement": [placement.rank, placement.world_size, placement.local_rank, placement.device,
                          placement.backend],
            "rank": distributed.rank(), "world_size": distributed.world_size(),
            "waited": time.monotonic() - before_barrier,
            "all_true_everywhere": distributed.all_true(True),
            "all_true_one_false": distributed.all_true(rank == 0),
            "min": distributed.min_over_ranks(2.5 + rank), "max": distributed.max_over_ranks(-1.0 - rank),
            "sum": distributed.reducer().all_reduce_sum(np.array([rank + 1, 7], dtype=np.int64)).tolist(),
            "sum_over_ranks": total.tolist(), "sum_grad": value.grad.tolist(),
            "received": received.tolist(), "exchange_grad": rows.grad.tolist(),
        }
        distributed.reducer().barrier()
    seen["left"] = not torch.distributed.is_initialized() and distributed.world_size() == 1
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(seen, handle)


def test_the_process_group_and_its_collectives_over_two_gloo_ranks(tmp_path):
    import json

    _spawn(_group_worker, (_free_port(), str(tmp_path)))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for rank, got in enumerate(seen):
        assert got["placement"] == [rank, 2, rank, "cpu", "gloo"]
        assert (got["rank"], got["world_size"]) == (rank, 2)
        assert got["waited"] >= 0.9  # rank 0 waited at the barrier for rank 1's second of sleep
        assert got["all_true_everywhere"] is True and got["all_true_one_false"] is False
        assert (got["min"], got["max"]) == (2.5, -1.0)
        assert got["sum"] == [3, 14]
        assert got["sum_over_ranks"] == [3.0, 3.0, 3.0] and got["sum_grad"] == [3.0, 3.0, 3.0]
        assert got["left"]
    assert seen[0]["received"] == [0.0, 10.0, 11.0] and seen[1]["received"] == [1.0, 2.0, 12.0]
    # Rank 0's row 0 stayed (gradient 1), its rows 1-2 went to rank 1 (gradient 10); rank 1's rows 0-1 went to
    # rank 0 (gradient 1), its row 2 stayed (gradient 10).
    assert seen[0]["exchange_grad"] == [1.0, 10.0, 10.0] and seen[1]["exchange_grad"] == [1.0, 1.0, 10.0]


def test_one_process_without_torchrun_is_a_group_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group("cpu") as placement:
        assert placement == distributed.Placement()
        assert (distributed.rank(), distributed.world_size()) == (0, 1)
        distributed.barrier()
        assert distributed.all_true(True) and not distributed.all_true(False)
        assert distributed.min_over_ranks(3) == 3.0 and distributed.max_over_ranks(-2) == -2.0
        assert isinstance(distributed.reducer(), LocalReducer)


def test_the_backend_follows_the_device():
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda:1") == "nccl"
    with pytest.raises(ValueError, match="device must be"):
        distributed.init("tpu")


def _callers_group_worker(rank: int, port: int, out_dir: str) -> None:
    """A group set up by the caller is used by init() and survives teardown()."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    with distributed.process_group("cpu") as placement:
        assert (placement.rank, placement.world_size, placement.backend) == (rank, 2, "gloo")
    assert dist.is_initialized()
    assert distributed.max_over_ranks(rank) == 1.0
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.ok").touch()


def test_a_callers_own_group_is_used_and_left_alone(tmp_path):
    _spawn(_callers_group_worker, (_free_port(), str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


def _uses_torch_distributed(source: str) -> bool:
    """Whether ``source`` imports ``torch.distributed`` or reaches it as ``torch.distributed.X``."""
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (
                (node.module or "").startswith("torch.distributed")
                or (node.module == "torch" and any(a.name == "distributed" for a in node.names))):
            return True
        if (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
                and node.value.id == "torch"):
            return True
    return False


def test_the_checker_sees_every_way_to_reach_torch_distributed():
    for source in ("import torch.distributed as dist", "from torch.distributed import barrier",
                   "from torch import distributed", "import torch\ntorch.distributed.barrier()"):
        assert _uses_torch_distributed(source), source
    assert not _uses_torch_distributed('"""Under ``torch.distributed``."""\nimport torch\nfrom torch import nn')


def test_exactly_one_place_sets_up_a_process_group():
    """Only this module talks to torch.distributed; every stage goes through it."""
    root = Path(__file__).resolve().parents[2]
    users = sorted(str(path.relative_to(root)) for package in ("dataengine", "indexes", "trainer")
                   for path in (root / package).rglob("*.py")
                   if _uses_torch_distributed(path.read_text(encoding="utf-8")))
    assert users == ["indexes/distributed.py"]
