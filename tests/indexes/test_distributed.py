"""Distributed k-means over 2 gloo processes equals the single-process run."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexes.data import ArrayDataset
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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2 ranks once and load their outputs."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("dist")
    # Spawned children import this module by name: make sure its root is on the path they inherit,
    # whichever way pytest was started.
    root = str(Path(__file__).resolve().parents[len(__name__.split(".")) - 1])
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        context = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False)
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
