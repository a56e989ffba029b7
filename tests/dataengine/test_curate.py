"""`dataengine curate`: counts per cluster for each strategy, seeds, the ledger, an output that webdataset and
`embed` read, resume, and near-duplicate removal measured on planted near-duplicates."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dataengine.cluster import ClusterConfig, run_cluster
from dataengine.clustering import open_clustering
from dataengine.curate import (
    STATUSES, CurateConfig, choose_threshold, clustering_similarities, dedup_scores, run_curate,
)
from dataengine.embed import EmbedConfig, run_embed
from dataengine.errors import OutputExistsError
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.store import open_store
from dataengine.synth import SynthConfig, generate_corpus, read_near_duplicates

NUM_IMAGES, NUM_NEAR_DUPLICATES = 400, 50


def build_pipeline(root, seed: int) -> dict:
    """synth (with planted near-duplicates) -> ingest -> embed (small convnet) -> cluster 3 x 4."""
    torch.set_num_threads(1)
    generate_corpus(str(root / "corpus"), SynthConfig(num_images=NUM_IMAGES, seed=seed,
                                                      num_near_duplicates=NUM_NEAR_DUPLICATES))
    run_ingest(IngestConfig(yfcc=str(root / "corpus" / "metadata.tsv"), images=str(root / "corpus" / "images"),
                            out=str(root / "ingest"), workers=0, shard_size=100))
    run_embed(EmbedConfig(shards=str(root / "ingest"), out=str(root / "store"), model="small", image_size=32,
                          workers=0, chunk_rows=64, batch_size=64, seed=seed))
    run_cluster(ClusterConfig(store=str(root / "store"), name="c", levels=(3, 4), pca_dim=32, num_iterations=5,
                              seed=seed, num_threads=1))
    return {"root": root, "store": str(root / "store"), "ingest": str(root / "ingest"),
            "near_duplicates": read_near_duplicates(str(root / "corpus" / "near_duplicates.tsv"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return build_pipeline(tmp_path_factory.mktemp("curate"), seed=7)


def curate(corpus, out, **kwargs):
    values = dict(store=corpus["store"], clustering="c", out=str(out))
    values.update(kwargs)
    return run_curate(CurateConfig(**values))


def ledger_of(out) -> list[dict]:
    with open(os.path.join(out, "ledger.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def leaf_ids(corpus) -> np.ndarray:
    return open_clustering(open_store(corpus["store"]), "c").assignments(1).astype(np.int64)


def kept_per_cluster(ledger: list[dict], num_clusters: int) -> np.ndarray:
    return np.bincount([e["cluster"] for e in ledger if e["status"] == "selected"], minlength=num_clusters)


def test_balanced_total_spreads_rows_evenly_over_leaf_clusters(corpus, tmp_path):
    result = curate(corpus, tmp_path / "out", total=60, seed=1)
    ledger = ledger_of(tmp_path / "out")
    sizes = np.bincount(leaf_ids(corpus), minlength=12)
    kept = kept_per_cluster(ledger, 12)
    assert result.num_selected == kept.sum() == 60 and result.level == 1 and result.num_clusters == 12
    cut = kept < sizes  # clusters not taken whole all keep t or t + 1 rows, and no whole one keeps more
    assert cut.any() and kept[cut].max() - kept[cut].min() <= 1 and kept.max() <= kept[cut].min() + 1
    assert (kept <= sizes).all()


def test_balanced_per_cluster_and_level(corpus, tmp_path):
    curate(corpus, tmp_path / "leaf", per_cluster=5)
    sizes = np.bincount(leaf_ids(corpus), minlength=12)
    assert kept_per_cluster(ledger_of(tmp_path / "leaf"), 12).tolist() == np.minimum(sizes, 5).tolist()
    result = curate(corpus, tmp_path / "top", per_cluster=30, level=0)
    assert result.level == 0 and result.num_clusters == 3
    assert kept_per_cluster(ledger_of(tmp_path / "top"), 3).tolist() == [30, 30, 30]


def test_hierarchical_is_balanced_at_both_levels(corpus, tmp_path):
    curate(corpus, tmp_path / "out", strategy="hierarchical", total=90, seed=2)
    ledger = ledger_of(tmp_path / "out")
    store = open_store(corpus["store"])
    parents = open_clustering(store, "c").parents(1)
    leaf_sizes = np.bincount(leaf_ids(corpus), minlength=12)
    kept = kept_per_cluster(ledger, 12)
    top_kept = np.bincount(parents, weights=kept, minlength=3)
    top_sizes = np.bincount(parents, weights=leaf_sizes, minlength=3)
    assert top_kept.sum() == 90 and (top_kept == np.minimum(top_sizes, 30)).all()  # 3 super-clusters x 30
    for parent in range(3):
        children = parents == parent
        quota, cut = kept[children], kept[children] < leaf_sizes[children]
        assert not cut.any() or quota[cut].max() - quota[cut].min() <= 1 and quota.max() <= quota[cut].min() + 1


def test_random_draws_uniformly_and_seeds_decide(corpus, tmp_path):
    first = curate(corpus, tmp_path / "a", strategy="random", total=80, seed=3)
    again = curate(corpus, tmp_path / "b", strategy="random", total=80, seed=3)
    other = curate(corpus, tmp_path / "c", strategy="random", total=80, seed=4)
    assert first.num_selected == 80

    def digests(out):
        return [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]

    assert digests(tmp_path / "a") == digests(tmp_path / "b")  # same seed: byte-identical shards
    chosen = {e["id"] for e in ledger_of(tmp_path / "a") if e["status"] == "selected"}
    assert chosen != {e["id"] for e in ledger_of(tmp_path / "c") if e["status"] == "selected"}
    assert other.num_selected == 80


def test_ledger_lists_every_source_row_and_agrees_with_the_output(corpus, tmp_path):
    result = curate(corpus, tmp_path / "out", total=70, dedup_threshold=0.95, shard_size=30)
    out = tmp_path / "out"
    ledger = ledger_of(out)
    source = pq.read_table(os.path.join(corpus["ingest"], "metadata.parquet"))
    assert [e["row"] for e in ledger] == list(range(source.num_rows))
    assert [e["id"] for e in ledger] == source.column("key").to_pylist()
    counts = {s: sum(e["status"] == s for e in ledger) for s in STATUSES}
    manifest = json.loads((out / "manifest.json").read_text())
    assert counts == manifest["counts"] == result.counts and counts["near_duplicate"] > 0
    assert manifest["num_samples"] == counts["selected"] == 70 and manifest["num_shards"] == 3
    selected = [e for e in ledger if e["status"] == "selected"]
    metadata = pq.read_table(out / "metadata.parquet")
    assert metadata.column("key").to_pylist() == [e["id"] for e in selected]  # source order kept
    assert [f"shards/shard-{s:06d}.tar" for s in metadata.column("shard").to_pylist()] == [e["shard"] for e in selected]
    keys = {e["id"] for e in ledger}
    for entry in ledger:
        if entry["status"] == "near_duplicate":
            assert entry["duplicate_of"] in keys and entry["similarity"] > 0.95 and "cosine" in entry["reason"]
            assert ledger[int(entry["reason"].split("row ")[1].split()[0])]["id"] == entry["duplicate_of"]
        else:
            assert entry["duplicate_of"] is None
        assert entry["status"] != "not_selected" or entry["reason"]


def test_output_is_read_by_webdataset_with_offsets_into_the_tars(corpus, tmp_path):
    import webdataset as wds

    curate(corpus, tmp_path / "out", per_cluster=4, shard_size=16)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    metadata = pq.read_table(out / "metadata.parquet").to_pylist()
    assert [s["__key__"] for s in samples] == [m["key"] for m in metadata]
    for sample, meta in zip(samples, metadata):
        assert json.loads(sample["json"])["photo_id"] == meta["photo_id"]
        with open(out / f"shards/shard-{meta['shard']:06d}.tar", "rb") as handle:
            handle.seek(meta["offset"])
            assert handle.read(meta["size"]) == sample["jpg"]


def test_output_is_embedded_to_the_source_features(corpus, tmp_path):
    curate(corpus, tmp_path / "out", total=50, seed=5)
    selected = [e["row"] for e in ledger_of(tmp_path / "out") if e["status"] == "selected"]
    run_embed(EmbedConfig(shards=str(tmp_path / "out"), out=str(tmp_path / "store"), model="small", image_size=32,
                          workers=0, batch_size=64, seed=7))
    curated, source = open_store(str(tmp_path / "store")), open_store(corpus["store"])
    assert curated.num_rows == 50
    np.testing.assert_array_equal(curated.keys[:], source.keys[:][selected])
    np.testing.assert_allclose(curated.features[:], source.features[:][selected], atol=1e-3)


def test_resume_reloads_the_selection_and_finishes_identically(corpus, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    curate(corpus, whole, total=90, shard_size=20, dedup_threshold=0.95)
    partial = tmp_path / "partial"
    curate(corpus, partial, total=90, shard_size=20, dedup_threshold=0.95)
    for name in ("manifest.json", "metadata.parquet", "curate.json", "stats/shard-000002.json",
                 "stats/shard-000003.json", "stats/shard-000004.json", "shards/shard-000004.tar"):
        os.remove(partial / name)  # as if killed while writing shard 2
    import dataengine.curate.run as run_module

    def recompute(*args, **kwargs):
        raise AssertionError("the saved selection must be reloaded, not recomputed")

    monkeypatch.setattr(run_module, "compute_selection", recompute)
    result = curate(corpus, partial, total=90, shard_size=20, dedup_threshold=0.95)
    assert result.resumed_shards == 2 and result.num_shards == 5

    def files(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts}

    assert files(partial) == files(whole)


def test_another_config_is_refused_unless_overwrite(corpus, tmp_path):
    curate(corpus, tmp_path / "out", total=40)
    with pytest.raises(OutputExistsError, match="another configuration"):
        curate(corpus, tmp_path / "out", total=41)
    assert curate(corpus, tmp_path / "out", total=41, overwrite=True).num_selected == 41
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a curation"):
        curate(corpus, tmp_path / "other", total=40)


def test_summary_puts_the_subset_beside_the_original(corpus, tmp_path):
    result = curate(corpus, tmp_path / "out", per_cluster=8)
    sizes = result.report["sizes"]
    assert sizes["original"]["gini"] > sizes["curated"]["gini"]  # balancing flattens the size distribution
    assert sizes["curated"]["max"] <= 8
    nmi = result.report["nmi"]
    assert set(nmi["original"]) == set(nmi["curated"]) >= {"user", "hashtag", "gps", "device"}
    assert nmi["curated"]["user"]["rows_used"] == result.num_selected
    csv_rows = (tmp_path / "out" / "cluster_sizes.csv").read_text().splitlines()
    assert csv_rows[0] == "cluster,rows,near_duplicates,kept" and len(csv_rows) == 13
    assert sum(int(line.split(",")[3]) for line in csv_rows[1:]) == result.num_selected


def test_cli_prints_tables_and_a_json_line_and_one_line_errors(corpus, tmp_path):
    base = [sys.executable, "-m", "dataengine", "curate", corpus["store"], "--clustering", "c"]
    done = subprocess.run(base + ["--out", str(tmp_path / "out"), "--total", "30", "--json"], capture_output=True,
                          text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["num_selected"] == 30 and "original" in done.stderr and "NMI user" in done.stderr
    for extra, message in ((["--strategy", "random", "--per-cluster", "3"], "random strategy ignores clusters"),
                           (["--total", "3", "--level", "2"], "level 2 is not among them")):
        failed = subprocess.run(base + ["--out", str(tmp_path / "bad")] + extra, capture_output=True, text=True)
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr
    missing = subprocess.run(base[:-1] + ["nope", "--out", str(tmp_path / "bad"), "--total", "3"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no complete clustering 'nope'" in missing.stderr


@pytest.mark.parametrize("values, message", [
    ({}, "nothing to curate"), ({"total": 3, "per_cluster": 3}, "not both"), ({"total": 0}, "total must be >= 1"),
    ({"total": 3, "dedup_threshold": 1.5}, "dedup_threshold"), ({"total": 3, "strategy": "best"}, "strategy"),
    ({"total": 3, "dedup_space": "pixels"}, "dedup_space"), ({"total": 3, "shard_size": 0}, "shard_size"),
])
def test_config_names_the_bad_value(values, message):
    with pytest.raises(ValueError, match=message):
        CurateConfig(store="s", clustering="c", out="o", **values)


def planted_rows(corpus, keys) -> np.ndarray:
    return np.array([int(k) in corpus["near_duplicates"] for k in keys])


def test_near_duplicates_found_with_a_threshold_chosen_on_another_corpus(corpus, tmp_path_factory, tmp_path):
    validation = build_pipeline(tmp_path_factory.mktemp("validation"), seed=8)
    store = open_store(validation["store"])
    _, _, similarities = clustering_similarities(store, "c")
    threshold = choose_threshold(similarities, planted_rows(validation, store.keys[:]))
    result = curate(corpus, tmp_path / "out", dedup_threshold=threshold)
    ledger = ledger_of(tmp_path / "out")
    dropped = np.array([e["status"] == "near_duplicate" for e in ledger])
    scores = dedup_scores(dropped, planted_rows(corpus, [e["id"] for e in ledger]))
    assert scores.planted == NUM_NEAR_DUPLICATES and result.counts["near_duplicate"] == scores.dropped
    base_rate = NUM_NEAR_DUPLICATES / len(ledger)  # the precision of dropping rows at random
    assert scores.precision >= max(0.5, 3 * base_rate) and scores.recall >= 0.5, scores.to_dict()
    assert result.counts["selected"] == len(ledger) - scores.dropped  # dedup only: every other row kept


def test_curated_set_on_object_storage(corpus, s3_server, s3_bucket):
    from dataengine.shards import load_shard_set, register_fsspec_opener, sample_stream

    out = f"{s3_bucket}/curated"
    result = run_curate(CurateConfig(store=corpus["store"], clustering="c", out=out, per_cluster=2, shard_size=10,
                                     storage_options=s3_server))
    shard_set = load_shard_set(out, s3_server)
    assert shard_set.num_samples == result.num_selected and len(shard_set.shards) == result.num_shards
    register_fsspec_opener(s3_server)
    keys = [sample["__key__"] for sample in sample_stream(shard_set.urls())]
    selected = [e["id"] for e in map(json.loads, remote_ledger(out, s3_server).splitlines())
                if e["status"] == "selected"]
    assert keys == selected
    again = run_curate(CurateConfig(store=corpus["store"], clustering="c", out=out, per_cluster=2, shard_size=10,
                                    storage_options=s3_server))
    assert again.resumed_shards == result.num_shards  # complete: nothing redone


def remote_ledger(url: str, options: dict) -> str:
    from dataengine.fs import Location

    return Location(url, options).read_bytes("ledger.jsonl").decode()


def test_rows_without_features_are_never_kept(corpus, tmp_path):
    import shutil

    import zarr

    store = tmp_path / "store"
    shutil.copytree(corpus["store"], store)
    zarr.open_group(str(store), mode="r+")["valid"][:7] = False  # as if their images failed to decode
    result = run_curate(CurateConfig(store=str(store), clustering="c", out=str(tmp_path / "out"), per_cluster=1000,
                                     shards=corpus["ingest"], dedup_threshold=0.95))
    ledger = ledger_of(tmp_path / "out")
    assert [e["status"] for e in ledger[:7]] == ["invalid"] * 7 and result.counts["invalid"] == 7
    assert all(e["cluster"] is None and e["similarity"] is None for e in ledger[:7])
    assert result.num_selected == len(ledger) - 7 - result.counts["near_duplicate"]


def test_sidecars_of_an_ingested_webdataset_are_kept(tmp_path):
    """An ingest of a webdataset tar keeps each sample's sidecars (.txt here); a curation copies them too."""
    import io
    import tarfile

    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "source.tar", "w") as tar:
        for i in range(24):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image, "JPEG")
            for extension, data in (("jpg", image.getvalue()), ("json", b'{"caption": "c"}'),
                                    ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"sample{i:03d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    run_ingest(IngestConfig(images=str(tmp_path / "source.tar"), out=str(tmp_path / "ingest"), workers=0))
    run_embed(EmbedConfig(shards=str(tmp_path / "ingest"), out=str(tmp_path / "store"), model="small", image_size=32,
                          workers=0, batch_size=32))
    run_cluster(ClusterConfig(store=str(tmp_path / "store"), name="c", levels=(2, 2), pca_dim=8, num_iterations=3,
                              num_threads=1))
    result = run_curate(CurateConfig(store=str(tmp_path / "store"), clustering="c", out=str(tmp_path / "out"),
                                     total=10))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    samples = list(wds.WebDataset([str(tmp_path / "out" / s["name"]) for s in manifest["shards"]],
                                  shardshuffle=False))
    assert len(samples) == result.num_selected == 10
    assert all(s["txt"].decode() == f"caption {int(s['__key__'][6:])}" for s in samples)
