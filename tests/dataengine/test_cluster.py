"""The cluster stage on a real (tiny) feature store: layout, determinism, assign, neighbours, 2 ranks, s3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from dataengine.cluster import ClusterConfig, assign_rows, assign_store, neighbors_of_key, run_cluster
from dataengine.embed import EmbedConfig, run_embed
from dataengine.errors import OutputExistsError
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.store import open_store
from dataengine.synth import SynthConfig, generate_corpus


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cluster")
    generate_corpus(str(root / "corpus"), SynthConfig(num_images=240, seed=5, anomalies=False))
    run_ingest(IngestConfig(yfcc=str(root / "corpus" / "metadata.tsv"), images=str(root / "corpus" / "images"),
                            out=str(root / "ingest"), workers=0))
    run_embed(EmbedConfig(shards=str(root / "ingest"), out=str(root / "store"), model="small", image_size=32,
                          workers=0, chunk_rows=32, batch_size=32))
    return str(root / "store")


def _config(store_url: str, name: str, **kwargs) -> ClusterConfig:
    values = dict(store=store_url, name=name, levels=(3, 4), pca_dim=16, num_iterations=5, seed=1, num_threads=1)
    values.update(kwargs)
    return ClusterConfig(**values)


def test_cli_contract_and_layout_readable_with_zarr_alone(store_url):
    command = [sys.executable, "-m", "dataengine", "--quiet", "cluster", store_url, "--name", "cli",
               "--levels", "3,4", "--pca", "16", "--niter", "5", "--threads", "1", "--json"]
    summary = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    assert summary["name"] == "cli" and summary["levels"] == [3, 4] and summary["num_clusters"] == [3, 12]
    assert len(summary["objective"]) == 2 and len(summary["empty_splits"]) == 2
    group = zarr.open_group(store_url, mode="r")
    level0, level1 = group["clusterings/cli/level0"][:], group["clusterings/cli/level1"][:]
    parents = group["clusterings/cli/level1_parents"][:]
    assert level0.shape == level1.shape == (group["features"].shape[0],)
    assert set(np.unique(level0)) <= {0, 1, 2} and np.array_equal(parents[level1], level0)
    assert group["clusterings/cli"].attrs["complete"] is True
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_same_seed_same_ids_and_overwrite(store_url):
    first = run_cluster(_config(store_url, "a"))
    with pytest.raises(OutputExistsError):
        run_cluster(_config(store_url, "a"))
    run_cluster(_config(store_url, "a", overwrite=True))
    run_cluster(_config(store_url, "b"))
    store = open_store(store_url)
    for level in range(2):
        assert np.array_equal(store.read_array(f"clusterings/a/level{level}"),
                              store.read_array(f"clusterings/b/level{level}"))
    assert first.num_clusters == [3, 12]


def test_saved_index_assigns_rows_like_the_clustering(store_url, tmp_path):
    run_cluster(_config(store_url, "idx", overwrite=True))
    store = open_store(store_url)
    level0, level1 = assign_rows(store, "idx", store.features[:])
    stored = store.read_array("clusterings/idx/level1")
    assert np.array_equal(level1, stored)  # flat index + the hierarchy: the clustering's own assignment
    assert np.array_equal(level0, store.read_array("clusterings/idx/level1_parents")[level1])
    found = neighbors_of_key(store_url, str(store.keys[5]), 4, "idx")
    assert found["neighbors"][0]["row"] == 5 and len(found["neighbors"]) == 4


def test_assign_another_store(store_url, tmp_path):
    import shutil

    run_cluster(_config(store_url, "src", overwrite=True))
    other = str(tmp_path / "other")
    shutil.copytree(store_url, other)
    sizes = assign_store(store_url, "src", other)
    assert [len(s) for s in sizes] == [3, 12] and int(sizes[0].sum()) == open_store(other).num_rows



def _rank_main(rank: int, world_size: int, port: int, config: ClusterConfig) -> None:
    import torch.distributed as dist

    from indexes.distributed import TorchReducer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        run_cluster(config, reducer=TorchReducer())
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_clustering(store_url, free_port):
    run_cluster(_config(store_url, "single", overwrite=True, neighbor_index=False))
    config = _config(store_url, "dist", overwrite=True, neighbor_index=False)
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port, config), nprocs=2, join=True)
    store = open_store(store_url)
    for level in range(2):
        assert np.array_equal(store.read_array(f"clusterings/single/level{level}"),
                              store.read_array(f"clusterings/dist/level{level}"))
    assert store.read_attrs("clusterings/dist")["complete"]


def test_store_on_s3(store_url, s3_server, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(store_url, f"{s3_bucket}/store", recursive=True)
    url = f"{s3_bucket}/store"
    result = run_cluster(_config(url, "s3", storage_options=s3_server))
    store = open_store(url, s3_server)
    assert store.read_array("clusterings/s3/level1").shape == (store.num_rows,)
    assert result.num_clusters == [3, 12]
    local = run_cluster(_config(store_url, "s3", overwrite=True))
    assert np.array_equal(open_store(store_url).read_array("clusterings/s3/level1"),
                          store.read_array("clusterings/s3/level1"))
    assert local.objective == pytest.approx(result.objective)


def test_bad_options_are_refused(store_url):
    with pytest.raises(ValueError, match="pca_dim"):
        run_cluster(_config(store_url, "big", pca_dim=10_000))
    with pytest.raises(ValueError, match="levels"):
        _config(store_url, "x", levels=(0,))
