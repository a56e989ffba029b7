"""What other tools read without dataengine: the Parquet export (pyarrow, duckdb SQL), the FAISS indices of a
clustering (plain faiss on the raw bytes), the feature store (plain zarr, aligned with metadata.parquet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from dataengine.errors import OutputExistsError
from dataengine.export import ExportConfig, run_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> dict[str, str]:
    """A synthetic YFCC-like ingest, its small-convnet store, clustered as ``k`` (2 x 3) and ``flat`` (4)."""
    from dataengine.cluster import ClusterConfig, run_cluster
    from dataengine.embed import EmbedConfig, run_embed
    from dataengine.ingest import IngestConfig, run_ingest
    from dataengine.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("interop")
    generate_corpus(str(root / "synth"), SynthConfig(num_images=60, num_classes=4, seed=5))
    run_ingest(IngestConfig(yfcc=str(root / "synth" / "metadata.tsv"), images=str(root / "synth" / "images"),
                            out=str(root / "ingest"), shard_size=16, workers=0))
    store = str(root / "store.zarr")
    run_embed(EmbedConfig(shards=str(root / "ingest"), out=store, model="small", image_size=32, resize_size=36,
                          batch_size=8, chunk_rows=8, workers=0, num_threads=1))
    run_cluster(ClusterConfig(store=store, name="k", levels=(2, 3), pca_dim=8, num_iterations=3, num_threads=1))
    run_cluster(ClusterConfig(store=store, name="flat", levels=(4,), pca_dim=8, num_iterations=3,
                              neighbor_index=False, num_threads=1))
    return {"ingest": str(root / "ingest"), "store": store}


# ------------------------------------------------------------------------------------------ export


def test_export_reads_back_with_pyarrow(clustered, tmp_path):
    store = zarr.open_group(clustered["store"], mode="r")
    metadata = pq.read_table(os.path.join(clustered["ingest"], "metadata.parquet"))
    n = metadata.num_rows
    out = str(tmp_path / "plain.parquet")
    result = run_export(ExportConfig(store=clustered["store"], out=out, clusterings=("k",), block_rows=16))
    table = pq.read_table(out)
    assert result.num_rows == table.num_rows == n and pq.ParquetFile(out).metadata.num_row_groups == -(-n // 16)
    assert table.column_names == ["row", "key", "valid", *json.loads(json.dumps(list(
        store.attrs["metadata_columns"]))), "level0", "level1"]
    assert table["row"].to_pylist() == list(range(n)) and table["key"].to_pylist() == metadata["key"].to_pylist()
    assert table["valid"].to_pylist() == store["valid"][:].tolist()
    for level in (0, 1):
        assert table[f"level{level}"].to_pylist() == store[f"clusterings/k/level{level}"][:].tolist()
    for name in ("user", "device", "tags", "lat", "lon"):  # the store's metadata = the ingest's, row by row
        expected = metadata[name].to_pylist()
        if name == "tags":
            expected = [t or [] for t in expected]
        assert table[name].to_pylist() == expected, name
    recorded = json.loads(pq.ParquetFile(out).schema_arrow.metadata[b"dataengine"])
    assert recorded["config"]["clusterings"] == ["k"] and recorded["clusterings"]["k"]["levels"] == [2, 3]

    full = str(tmp_path / "full.parquet")
    run_export(ExportConfig(store=clustered["store"], out=full, clusterings=("k", "flat"), features=True,
                            source_metadata=True))
    table = pq.read_table(full)
    assert table.schema.field("features").type == pa.list_(pa.float32(), store["features"].shape[1])
    np.testing.assert_array_equal(np.stack(table["features"].to_numpy(zero_copy_only=False)),
                                  store["features"][:].astype(np.float32))
    assert table["flat_level0"].to_pylist() == store["clusterings/flat/level0"][:].tolist()
    assert table["k_level1"].to_pylist() == store["clusterings/k/level1"][:].tolist()
    for name in metadata.column_names:  # every column of the source, row-aligned
        assert table[name].to_pylist() == metadata[name].to_pylist(), name


def test_export_answers_duckdb_sql(clustered, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    store = zarr.open_group(clustered["store"], mode="r")
    out = str(tmp_path / "x.parquet")
    run_export(ExportConfig(store=clustered["store"], out=out, clusterings=("k",), features=True, block_rows=8))
    sql = duckdb.connect()
    level1 = store["clusterings/k/level1"][:]
    counts = sql.execute("SELECT level1, count(*) FROM read_parquet(?) GROUP BY level1 ORDER BY level1",
                         [out]).fetchall()
    assert counts == [(int(c), int((level1 == c).sum())) for c in np.unique(level1)]
    features = store["features"][:].astype(np.float32)
    dim, mean0 = sql.execute("SELECT max(len(features)), avg(features[1]) FROM read_parquet(?)", [out]).fetchone()
    assert dim == features.shape[1] and mean0 == pytest.approx(float(features[:, 0].mean()), rel=1e-5)
    users = np.asarray(store["metadata/user/vocab"][:])[store["metadata/user/codes"][:]]
    top = sql.execute("SELECT \"user\", count(*) AS n FROM read_parquet(?) GROUP BY \"user\" "
                      "ORDER BY n DESC, \"user\" LIMIT 1", [out]).fetchone()
    values, tallies = np.unique(users, return_counts=True)
    assert top[1] == tallies.max() and top[0] == sorted(values[tallies == tallies.max()])[0]
    tags = sql.execute("SELECT count(*) FROM (SELECT unnest(tags) FROM read_parquet(?))", [out]).fetchone()[0]
    assert tags == store["metadata/tags/codes"].shape[0]
    keys = sql.execute("SELECT key FROM read_parquet(?) WHERE level0 = 1 ORDER BY row", [out]).fetchall()
    assert [k for (k,) in keys] == np.asarray(store["keys"][:])[store["clusterings/k/level0"][:] == 1].tolist()


def test_export_is_skipped_when_done_and_refused_over_another(clustered, tmp_path):
    from typer.testing import CliRunner

    from dataengine.app import app

    out = str(tmp_path / "x.parquet")
    args = ["--quiet", "export", clustered["store"], "--out", out, "--clustering", "k", "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["skipped"] is False and summary["columns"][-2:] == ["level0", "level1"]
    mtime = os.stat(out).st_mtime_ns
    again = json.loads(CliRunner().invoke(app, args).stdout.strip().splitlines()[-1])
    assert again["skipped"] is True and os.stat(out).st_mtime_ns == mtime
    with pytest.raises(OutputExistsError, match="holds another export"):
        run_export(ExportConfig(store=clustered["store"], out=out, clusterings=("flat",)))
    run_export(ExportConfig(store=clustered["store"], out=out, clusterings=("flat",), overwrite=True))
    assert pq.read_table(out).column_names[-1] == "level0"
    bad = CliRunner().invoke(app, ["export", clustered["store"], "--out", out, "--clustering", "nope"])
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.exit_code == 2 and len(errors) == 1 and "no complete clustering 'nope'" in errors[0]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def test_export_to_s3(clustered, tmp_path, s3_bucket, s3_server):
    import s3fs

    remote = f"{s3_bucket}/exports/x.parquet"
    run_export(ExportConfig(store=clustered["store"], out=remote, clusterings=("k",), features=True,
                            storage_options=s3_server))
    run_export(ExportConfig(store=clustered["store"], out=str(tmp_path / "x.parquet"), clusterings=("k",),
                            features=True))
    with s3fs.S3FileSystem(**s3_server).open(remote[5:], "rb") as handle:
        assert pq.read_table(handle).equals(pq.read_table(tmp_path / "x.parquet"))


BOUNDED = """
import json, sys, tracemalloc
import numpy as np, pyarrow as pa
from dataengine.export import ExportConfig, run_export
tracemalloc.start()
run_export(ExportConfig(store=sys.argv[1], out=sys.argv[2] + ".warm.parquet", features=True, block_rows=10))
base = tracemalloc.get_traced_memory()[0]  # lazy imports done: what follows is the export's own memory
tracemalloc.reset_peak()
run_export(ExportConfig(store=sys.argv[1], out=sys.argv[2], features=True, block_rows=int(sys.argv[3])))
print(json.dumps({"numpy_peak": tracemalloc.get_traced_memory()[1] - base,
                  "arrow_peak": pa.default_memory_pool().max_memory()}))
"""


def test_export_streams_in_blocks_with_bounded_memory(tmp_path):
    """20,000 rows x 256 float32 (20 MB of features) exported in blocks of 500 rows: the peak memory of the
    export (numpy arrays, traced; Arrow's pool) is a few blocks, far below the whole table (measured: about
    2.5 MB each)."""
    from dataengine.store import StoreLayout, create_store, write_keys_and_metadata

    rows, dim, block = 20_000, 256, 500
    layout = StoreLayout(num_rows=rows, dim=dim, dtype="float32", chunk_rows=500)
    store = create_store(str(tmp_path / "big.zarr"), None, layout, {"num_rows": rows, "dim": dim})
    rng = np.random.default_rng(0)
    for index in range(layout.num_blocks):
        start, end = layout.block_rows(index)
        store.write_block(index, start, rng.standard_normal((end - start, dim), dtype=np.float32),
                          np.ones(end - start, bool), {"block": index})
    users = [f"user{i % 97}" for i in range(rows)]
    columns = write_keys_and_metadata(store, pa.table({"key": [f"k{i}" for i in range(rows)], "user": users,
                                                       "lat": rng.standard_normal(rows)}))
    store.write_attrs("", {"metadata_columns": columns, "complete": True, "state": "complete"})
    out = str(tmp_path / "big.parquet")
    process = subprocess.run([sys.executable, "-c", BOUNDED, str(tmp_path / "big.zarr"), out, str(block)],
                             capture_output=True, text=True, check=True)
    peaks = json.loads(process.stdout.strip().splitlines()[-1])
    whole = rows * dim * 4
    assert peaks["numpy_peak"] < whole / 5 and peaks["arrow_peak"] < whole / 5, (peaks, whole)
    table = pq.read_table(out)
    assert table.num_rows == rows and table["user"].to_pylist() == users
    np.testing.assert_array_equal(np.stack(table["features"].to_numpy(zero_copy_only=False)[-3:]),
                                  zarr.open_group(str(tmp_path / "big.zarr"), mode="r")["features"][-3:])


# ------------------------------------------------------------------------------------------ faiss, zarr


def _whiten(group, name: str, features: np.ndarray) -> np.ndarray:
    """The clustering's PCA-whitening from its stored arrays, written out with numpy (no dataengine code)."""
    mean, components = group[f"clusterings/{name}/pca_mean"][:], group[f"clusterings/{name}/pca_components"][:]
    eigenvalues = group[f"clusterings/{name}/pca_eigenvalues"][:]
    epsilon, normalize, _total_variance, whiten = group[f"clusterings/{name}/pca_params"][:]
    scale = 1.0 / np.sqrt(eigenvalues + epsilon * max(float(eigenvalues.max()), 0.0)) if whiten else 1.0
    out = ((features - mean) @ components.T * scale).astype(np.float32)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def test_faiss_indices_load_in_plain_faiss(clustered):
    import faiss

    group = zarr.open_group(clustered["store"], mode="r")
    centroid_index = faiss.deserialize_index(np.asarray(group["clusterings/k/centroid_index"][:], dtype=np.uint8))
    leaves = group["clusterings/k/level1_centroids"][:].astype(np.float32)
    assert centroid_index.ntotal == len(leaves)
    _, ids = centroid_index.search(leaves, 1)
    assert ids[:, 0].tolist() == list(range(len(leaves)))  # ids are the leaf cluster ids
    neighbor_index = faiss.deserialize_index(np.asarray(group["clusterings/k/neighbor_index"][:], dtype=np.uint8))
    valid = np.flatnonzero(group["valid"][:])
    whitened = _whiten(group, "k", group["features"][:].astype(np.float64))
    assert neighbor_index.ntotal == len(valid) and neighbor_index.d == whitened.shape[1]
    distances, found = neighbor_index.search(whitened[valid], 1)
    assert found[:, 0].tolist() == valid.tolist() and np.allclose(distances[:, 0], 0, atol=1e-4)


def test_store_opens_in_plain_zarr_aligned_with_metadata_parquet(clustered):
    group = zarr.open_group(clustered["store"], mode="r")
    metadata = pq.read_table(os.path.join(clustered["ingest"], "metadata.parquet")).to_pydict()
    n = len(metadata["key"])
    assert group.attrs["format"] == "dataengine.features" and group.attrs["complete"] is True
    assert group["features"].shape == (n, group.attrs["dim"]) and group["valid"].shape == (n,)
    assert np.asarray(group["keys"][:]).tolist() == metadata["key"]
    for name in ("user", "device"):
        vocab, codes = np.asarray(group[f"metadata/{name}/vocab"][:]), group[f"metadata/{name}/codes"][:]
        assert [vocab[c] if c >= 0 else None for c in codes] == metadata[name], name
    vocab, codes, offsets = (group[f"metadata/tags/{part}"][:] for part in ("vocab", "codes", "offsets"))
    assert [list(np.asarray(vocab)[codes[offsets[r]:offsets[r + 1]]]) for r in range(n)] == \
        [t or [] for t in metadata["tags"]]
    lat = group["metadata/lat"][:]
    assert [None if np.isnan(v) else v for v in lat.tolist()] == metadata["lat"]
    for name in ("k", "flat"):
        assert group[f"clusterings/{name}"].attrs["complete"] is True
        assert group[f"clusterings/{name}/level0"].shape == (n,)
