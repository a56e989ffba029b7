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
from dataengine.clustering import ClusteringWriter, layout_path, open_clustering
from dataengine.embed import EmbedConfig, run_embed
from dataengine.errors import IncompleteOutputError, OutputExistsError
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
    command = [sys.executable, "-m", "dataengine", "--quiet", "cluster", store_url, "--clustering", "cli",
               "--levels", "3,4", "--pca", "16", "--niter", "5", "--threads", "1", "--json"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["name"] == "cli" and summary["levels"] == [3, 4] and summary["num_clusters"] == [3, 12]
    assert summary["num_leaf_clusters"] == 12 and set(summary["nmi"]) >= {"user", "hashtag", "gps", "device"}
    assert all(0 <= r["chance_nmi"] <= r["nmi"] + 0.2 for r in summary["nmi"].values())
    human = " ".join(done.stderr.split())  # the headline figures without --json too
    assert "12 leaf clusters" in human and "chance NMI" in human and "hashtag" in human
    assert len(summary["objective"]) == 2 and len(summary["empty_splits"]) == 2
    group = zarr.open_group(store_url, mode="r")
    level0, level1 = group[layout_path("cli", "level0")][:], group[layout_path("cli", "level1")][:]
    parents = group[layout_path("cli", "level1_parents")][:]
    assert level0.shape == level1.shape == (group["features"].shape[0],)
    assert set(np.unique(level0)) <= {0, 1, 2} and np.array_equal(parents[level1], level0)
    assert group[layout_path("cli")].attrs["complete"] is True
    again = subprocess.run(command, check=True, capture_output=True, text=True)  # same options: nothing to do
    assert "already complete" in " ".join(again.stderr.split())  # rich wraps lines at the terminal width
    assert json.loads(again.stdout.splitlines()[-1])["already_complete"]
    other = subprocess.run([*command, "--seed", "3"], capture_output=True, text=True)
    assert other.returncode != 0 and "another configuration (differs in seed)" in " ".join(other.stderr.split())
    assert open_clustering(open_store(store_url), "cli").config["seed"] == 0  # untouched


def test_same_seed_same_ids_and_overwrite(store_url):
    first = run_cluster(_config(store_url, "a"))
    again = run_cluster(_config(store_url, "a", num_threads=2))  # threads do not change the clustering
    assert again.already_complete and again.num_clusters == first.num_clusters and not first.already_complete
    with pytest.raises(OutputExistsError, match=r"another configuration \(differs in levels, num_iterations\)"):
        run_cluster(_config(store_url, "a", levels=(2, 2), num_iterations=3))
    run_cluster(_config(store_url, "a", overwrite=True))
    run_cluster(_config(store_url, "b"))
    store = open_store(store_url)
    for level in range(2):
        assert np.array_equal(open_clustering(store, "a").assignments(level),
                              open_clustering(store, "b").assignments(level))
    assert first.num_clusters == [3, 12]


def test_saved_index_assigns_rows_like_the_clustering(store_url, tmp_path):
    run_cluster(_config(store_url, "idx", overwrite=True))
    store = open_store(store_url)
    level0, level1 = assign_rows(store, "idx", store.features[:])
    stored = open_clustering(store, "idx").assignments(1)
    assert np.array_equal(level1, stored)  # flat index + the hierarchy: the clustering's own assignment
    assert np.array_equal(level0, open_clustering(store, "idx").parents(1)[level1])
    found = neighbors_of_key(store_url, str(store.keys[5]), 4, "idx")
    assert found["neighbors"][0]["row"] == 5 and len(found["neighbors"]) == 4


def test_neighbors_of_a_key_a_source_path_or_an_image_file_on_stdout(store_url, tmp_path):
    import shutil

    run_cluster(_config(store_url, "nn", overwrite=True))
    store = open_store(store_url)
    key = str(store.keys[7])
    images = os.path.join(os.path.dirname(store_url), "corpus", "images")
    command = [sys.executable, "-m", "dataengine", "neighbors", store_url, "--clustering", "nn", "-k", "3"]
    table = subprocess.run([*command, key], check=True, capture_output=True, text=True).stdout.splitlines()
    assert table[0].startswith(f"# 3 nearest images of key {key}") and table[1].split()[-1] == "path"
    assert table[2].split()[4] == key and table[2].split()[5] == f"{images}/{key}.jpg"  # itself, with its path
    by_path = json.loads(subprocess.run([*command, f"{images}/{key}.jpg", "--json"], check=True, capture_output=True,
                                        text=True).stdout.splitlines()[-1])
    assert by_path["query_kind"] == "source" and by_path["query_row"] == 7 and by_path["neighbors"][0]["row"] == 7
    shutil.copy(f"{images}/{key}.jpg", tmp_path / "query.jpg")  # not an ingested path: embedded with the model
    by_image = json.loads(subprocess.run([*command, str(tmp_path / "query.jpg"), "--json"], check=True,
                                         capture_output=True, text=True).stdout.splitlines()[-1])
    assert by_image["query_kind"] == "image" and by_image["query_row"] is None
    assert by_image["neighbors"][0]["key"] == key  # the ingest re-encoded it: near, not at distance 0
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    for query, message in ((str(tmp_path / "junk.jpg"), "not an image that can be decoded"),
                           ("no-such-thing", "no key of the store")):
        bad = subprocess.run([*command, query], capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_assign_another_store(store_url, tmp_path):
    import shutil

    run_cluster(_config(store_url, "src", overwrite=True))
    other = str(tmp_path / "other")
    shutil.copytree(store_url, other)
    sizes = assign_store(store_url, "src", other)
    assert [len(s) for s in sizes] == [3, 12] and int(sizes[0].sum()) == open_store(other).num_rows
    assigned, source = open_clustering(open_store(other), "src"), open_clustering(open_store(store_url), "src")
    assert assigned.assigned_from == {"store": store_url, "name": "src"} and assigned.num_clusters(1) == 12
    assert np.array_equal(assigned.assignments(1), source.assignments(1)) and not assigned.has_pca
    with pytest.raises(OutputExistsError, match="its rows were assigned with another store's clustering"):
        run_cluster(_config(other, "src"))  # same options, but not this store's own clustering



def _rank_main(rank: int, world_size: int, port: int, config: ClusterConfig) -> None:
    import torch.distributed as dist

    from indexes.distributed import TorchReducer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        run_cluster(config, reducer=TorchReducer())
        open_clustering(open_store(config.store), config.name)  # complete on every rank once run_cluster returns
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_clustering(store_url, free_port):
    run_cluster(_config(store_url, "single", overwrite=True, neighbor_index=False))
    config = _config(store_url, "dist", overwrite=True)  # asks for a neighbour index, which ranks do not build
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port, config), nprocs=2, join=True)
    store = open_store(store_url)
    for level in range(2):
        assert np.array_equal(open_clustering(store, "single").assignments(level),
                              open_clustering(store, "dist").assignments(level))
    assert open_clustering(store, "dist").attrs["complete"]
    key = str(store.keys[0])
    with pytest.raises(KeyError, match="clustered on 2 ranks") as ranks:  # not "built with --no-neighbor-index"
        neighbors_of_key(store_url, key, 3, "dist")
    assert "--no-neighbor-index" not in str(ranks.value)
    with pytest.raises(KeyError, match="built with --no-neighbor-index"):
        neighbors_of_key(store_url, key, 3, "single")


def test_leaf_clusters_counted_and_tiny_clusters_warned(tmp_path, caplog):
    from dataengine.cluster import size_warnings

    assert size_warnings((4, 8), 320) == [] and size_warnings((4,), 40) == [] and len(size_warnings((4,), 39)) == 1
    assert [w[:40] for w in size_warnings((4, 8), 319)] == ["level 1 asks for 32 clusters of 319 rows"]
    assert len(size_warnings((40, 2), 100)) == 2
    store = synthetic_store(str(tmp_path / "s"), 60, 16)
    result = run_cluster(ClusterConfig(store=store, name="c", levels=(2, 4), pca_dim=None, num_threads=1,
                                       neighbor_index=False))
    assert result.num_leaf_clusters == 8 == result.to_dict()["num_leaf_clusters"]
    assert result.warnings == size_warnings((2, 4), 60) and "level 1 asks for 8 clusters" in caplog.text
    again = run_cluster(ClusterConfig(store=store, name="c", levels=(2, 4), pca_dim=None, num_threads=1,
                                      neighbor_index=False))
    assert again.already_complete and again.num_leaf_clusters == 8 and again.warnings == result.warnings


def synthetic_store(path: str, num_rows: int, chunk_rows: int, invalid: tuple[int, ...] = (), dim: int = 8) -> str:
    """A complete feature store of blob features (no images): quick, any row count and chunking."""
    from dataengine.store import StoreLayout, create_store

    layout = StoreLayout(num_rows=num_rows, dim=dim, dtype="float32", chunk_rows=chunk_rows)
    store = create_store(path, None, layout, {"num_rows": num_rows, "dim": dim})
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 5, (6, dim))
    store.group["features"][:] = (centers[rng.integers(0, 6, num_rows)] + rng.normal(0, 1, (num_rows, dim)))
    valid = np.ones(num_rows, bool)
    valid[list(invalid)] = False
    store.group["valid"][:] = valid
    store.write_array("keys", np.array([f"k{row}" for row in range(num_rows)], dtype=object))
    store.write_attrs("", {"state": "complete", "complete": True, "num_invalid": len(invalid)})
    return path


@pytest.mark.parametrize(("world_size", "num_rows", "chunk_rows"), [(2, 245, 128), (3, 250, 16)])
def test_ranks_never_share_an_id_chunk_and_every_row_is_assigned(tmp_path, free_port, world_size, num_rows,
                                                                 chunk_rows):
    """Rank ranges that are not multiples of 4 feature chunks (2 ranks: 2 chunks of 128 rows, the second one
    partial; 3 ranks: 16 chunks, 6 per rank, ids chunked by 3): ids equal the single process's, no valid row
    is left at -1, and each rank's first row starts a chunk of every id array."""
    url = synthetic_store(str(tmp_path / "store"), num_rows, chunk_rows, invalid=(3,))
    run_cluster(_config(url, "single", levels=(2, 3), pca_dim=4, neighbor_index=False))
    config = _config(url, "dist", levels=(2, 3), pca_dim=4, neighbor_index=False)
    torch.multiprocessing.spawn(_rank_main, args=(world_size, free_port, config), nprocs=world_size, join=True)
    store = open_store(url)
    single, dist = open_clustering(store, "single"), open_clustering(store, "dist")
    per_rank = -(-(-(-num_rows // chunk_rows)) // world_size) * chunk_rows
    for level in range(2):
        ids = dist.assignments(level)
        assert np.array_equal(ids, single.assignments(level))
        assert ids[3] == -1 and (np.delete(ids, 3) >= 0).all()
        chunk = dist.assignment_array(level).chunks[0]
        assert all(start % chunk == 0 for start in range(0, num_rows, per_rank)), (chunk, per_rank)


def test_a_valid_row_without_a_cluster_is_never_marked_complete(tmp_path, monkeypatch):
    url = synthetic_store(str(tmp_path / "store"), 100, 32)
    original = ClusteringWriter.write_assignments

    def lose_the_last_row(self, level, start, ids):  # what two ranks sharing a chunk used to do
        original(self, level, start, np.asarray(ids)[:-1])

    monkeypatch.setattr(ClusteringWriter, "write_assignments", lose_the_last_row)
    with pytest.raises(IncompleteOutputError, match="1 valid rows have no cluster at level 0 .first: row 99."):
        run_cluster(_config(url, "lossy", levels=(2, 3), pca_dim=4, neighbor_index=False))
    with pytest.raises(KeyError, match="no complete clustering 'lossy'"):
        open_clustering(open_store(url), "lossy")
    monkeypatch.undo()
    run_cluster(_config(url, "lossy", levels=(2, 3), pca_dim=4, neighbor_index=False))  # a re-run recomputes it
    assert (open_clustering(open_store(url), "lossy").assignments(1) >= 0).all()


def test_id_arrays_refuse_writer_boundaries_inside_a_chunk(tmp_path):
    store = open_store(synthetic_store(str(tmp_path / "store"), 100, 32), mode="r+")
    writer = ClusteringWriter(store, "x")
    with pytest.raises(ValueError, match=r"boundaries \[48\] do not start chunks of 32 rows"):
        writer.create_assignments(0, 32, boundaries=[0, 48])
    writer.create_assignments(0, 16, boundaries=[0, 48, 100])


def _forged_ivf(rows: np.ndarray, ids: np.ndarray) -> bytes:
    import faiss

    from indexes.faiss_index import index_to_bytes

    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(rows.shape[1]), rows.shape[1], 1)
    index.train(rows)
    index.add_with_ids(rows, ids)
    return index_to_bytes(index)


def test_forged_faiss_indices_are_refused_in_one_line(tmp_path):
    """Ids outside the store (or negative other than faiss's -1), another index type, another size or
    dimension, or bytes that are no index: a ValueError naming the index, never an IndexError or a wrong row."""
    import faiss

    from indexes.faiss_index import index_to_bytes

    url = synthetic_store(str(tmp_path / "store"), 120, 32)
    run_cluster(_config(url, "c", levels=(2, 3), pca_dim=4))
    store = open_store(url, mode="r+")
    clustering = open_clustering(store, "c")
    rows = clustering.pca().apply(np.asarray(store.features[:], np.float32)).astype(np.float32)
    writer = ClusteringWriter(store, "c")
    flat_ip = faiss.IndexFlatIP(4)
    flat_ip.add(rows)
    short = faiss.IndexFlatL2(4)
    short.add(rows[:60])
    wide = faiss.IndexFlatL2(3)
    wide.add(rows[:, :3].copy())
    def forge(data: bytes) -> None:  # stored as the cluster stage stores an index: bytes in chunks
        store.write_array(layout_path("c", "neighbor_index"), np.frombuffer(data, dtype=np.uint8))

    forged = {
        r"returned id 1000007, outside \[0, 120\)": _forged_ivf(rows, np.arange(120) + 10**6),
        r"returned id -5, outside \[0, 120\)": _forged_ivf(rows, np.full(120, -5)),
        r"is an index of type IndexFlatIP, metric 0 \(not L2\)": index_to_bytes(flat_ip),
        "is an index of type IndexFlatL2, metric 0": b"IxF2" + bytes(64),
        "holds 60 vectors; expected 120": index_to_bytes(short),
        "holds 3-d vectors; expected 4-d": index_to_bytes(wide),
        "is not a readable FAISS index": b"forged index" * 8,
    }
    for message, data in forged.items():
        forge(data)
        with pytest.raises(ValueError, match=f"neighbour index of clustering 'c' {message}"):
            neighbors_of_key(url, "k7", 4, "c")
    forge(_forged_ivf(rows, np.arange(120)))
    assert [n["row"] for n in neighbors_of_key(url, "k7", 4, "c")["neighbors"]][0] == 7
    command = [sys.executable, "-m", "dataengine", "neighbors", url, "--key", "k7", "--clustering", "c"]
    forge(_forged_ivf(rows, np.full(120, -5)))
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "returned id -5" in bad.stderr
    leaf = clustering.centroids(1)
    writer.write_centroid_index(_forged_ivf(leaf, np.full(len(leaf), -7)))
    with pytest.raises(ValueError, match="centroid index of clustering 'c' returned id -7"):
        assign_rows(store, "c", store.features[:10])


def test_a_missing_store_is_refused_and_nothing_is_created(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(FileNotFoundError, match="no feature store"):
        run_cluster(_config(str(missing), "x"))
    command = [sys.executable, "-m", "dataengine", "cluster", str(missing), "--clustering", "x"]
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 2 and "no feature store" in bad.stderr
    url = synthetic_store(str(tmp_path / "store"), 64, 32)
    run_cluster(_config(url, "c", levels=(2,), pca_dim=4, neighbor_index=False))
    with pytest.raises(FileNotFoundError, match="no feature store"):
        assign_store(url, "c", str(missing))
    assert not missing.exists()


def test_store_on_s3(store_url, s3_server, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(store_url, f"{s3_bucket}/store", recursive=True)
    url = f"{s3_bucket}/store"
    result = run_cluster(_config(url, "s3", storage_options=s3_server))
    store = open_store(url, s3_server)
    assert open_clustering(store, "s3").assignments(1).shape == (store.num_rows,)
    assert result.num_clusters == [3, 12]
    local = run_cluster(_config(store_url, "s3", overwrite=True))
    assert np.array_equal(open_clustering(open_store(store_url), "s3").assignments(1),
                          open_clustering(store, "s3").assignments(1))
    assert local.objective == pytest.approx(result.objective)


def test_bad_options_are_refused(store_url):
    with pytest.raises(ValueError, match="pca_dim"):
        run_cluster(_config(store_url, "big", pca_dim=10_000))
    with pytest.raises(ValueError, match="levels"):
        _config(store_url, "x", levels=(0,))


def test_the_level0_kmeans_trains_on_every_row_by_default(tmp_path):
    """The default trains level 0 on every row (the paper clusters the whole dataset), not on 4 x 256; the
    levels below on 256 rows per centroid; a cap and explicit per-level samples are honoured and recorded."""
    url = synthetic_store(str(tmp_path / "store"), num_rows=3000, chunk_rows=500)

    def train_rows(name: str, **options) -> list[list[int]]:
        run_cluster(ClusterConfig(store=url, name=name, levels=(4, 3), pca_dim=8, num_iterations=2, seed=0,
                                  neighbor_index=False, num_threads=1, **options))
        return [level["num_train_rows"] for level in open_clustering(open_store(url), name).attrs["levels"]]

    by_default = train_rows("default")
    assert by_default[0] == [3000] and max(by_default[1]) == 3 * 256  # a group of over 768 rows: sampled
    assert train_rows("sampled", sample_per_centroid=(256, 100)) == [[1024], [300, 300, 300, 300]]
    assert train_rows("capped", max_sample_rows=2000)[0] == [2000]
    assert train_rows("flat", sample_per_centroid=16)[0] == [64]
    assert open_clustering(open_store(url), "default").config["sample_per_centroid"] == [0, 256]
    with pytest.raises(ValueError, match="sample_per_centroid"):
        ClusterConfig(store=url, name="x", sample_per_centroid=(-1,))


def test_without_whitening_the_kmeans_sees_the_features_as_they_are(tmp_path):
    """ClusterFit's clustering: no whitening nor l2-normalisation (and every dimension): the stored transform
    only centres and rotates, so the k-means runs on the features' own geometry."""
    url = synthetic_store(str(tmp_path / "store"), num_rows=400, chunk_rows=100)
    run_cluster(ClusterConfig(store=url, name="raw", levels=(5,), pca_dim=None, whiten=False, num_iterations=3,
                              neighbor_index=False, num_threads=1))
    clustering = open_clustering(open_store(url), "raw")
    pca = clustering.pca()
    assert not pca.whiten and not pca.normalize and clustering.config["whiten"] is False
    rows = open_store(url).features[:50].astype(np.float64)
    out = pca.apply(rows).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(out[:, None] - out[None], axis=-1),
                               np.linalg.norm(rows[:, None] - rows[None], axis=-1), rtol=1e-4, atol=1e-4)


def test_the_neighbour_index_is_written_and_read_a_chunk_at_a_time(tmp_path, monkeypatch):
    """At 96M rows the index is 3.8 GB: serialised whole before it was stored it took two more copies (faiss's
    array and its bytes), and read back whole two more again (the array, faiss's reader). Now it goes to and from
    the store a chunk at a time: the memory Python holds stays under two chunks, and the index is the same."""
    import tracemalloc

    import faiss

    from dataengine import clustering as clustering_module
    from indexes.faiss_index import index_to_bytes

    monkeypatch.setattr(clustering_module, "INDEX_CHUNK_BYTES", 1 << 18)
    url = synthetic_store(str(tmp_path / "store"), 20_000, 4096)
    run_cluster(_config(url, "c", levels=(2, 3), pca_dim=4, neighbor_index=False))
    store = open_store(url, mode="r+")
    index = faiss.IndexFlatL2(256)  # 20 MB
    index.add(np.random.default_rng(0).standard_normal((20_000, 256)).astype(np.float32))
    tracemalloc.start()
    ClusteringWriter(store, "c").write_neighbor_index(index, {"kind": "flat"})
    _, written_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    loaded = open_clustering(store, "c").neighbor_index(dim=256)
    _, read_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # a chunk, faiss's pieces of 1 MiB; whole, the bytes took 40 MB to write and 20 MB to read
    assert written_peak < 4 << 20 and read_peak < 4 << 20, (written_peak, read_peak)
    assert store.group[layout_path("c", "neighbor_index")].chunks == (1 << 18,)
    assert index_to_bytes(loaded) == index_to_bytes(index)
