"""The Zarr v3 feature store: layout, typed metadata, generic arrays for later stages, blocks, sharding."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pytest
import zarr

from dataengine.errors import IncompleteOutputError, OutputExistsError
from dataengine.store import (
    CategoricalColumn,
    RaggedColumn,
    StoreLayout,
    create_store,
    inspect_existing,
    open_store,
    remove_partial_writes,
    write_keys_and_metadata,
)


def _table() -> pa.Table:
    return pa.table({
        "key": pa.array(["10", "11", "12", "13", "14"]),
        "user": pa.array(["u2", None, "u1", "u2", "é"]),
        "device": pa.array([None] * 5, pa.string()),  # null everywhere: not written
        "label": pa.array(["cat", "dog", "cat", None, "dog"]),
        "tags": pa.array([["a", "b c"], [], None, ["b c"], ["z", "a", "a"]], pa.list_(pa.string())),
        "lat": pa.array([1.5, None, -3.25, None, 0.0], pa.float64()),
        "lon": pa.array([None] * 5, pa.float64()),
    })


def _new_store(path, num_rows=5, dim=3, chunk_rows=2, chunks_per_shard=1):
    layout = StoreLayout(num_rows=num_rows, dim=dim, dtype="float16", chunk_rows=chunk_rows,
                         chunks_per_shard=chunks_per_shard)
    return create_store(str(path), None, layout, {"num_rows": num_rows}), layout


def test_keys_and_typed_metadata_round_trip(tmp_path):
    store, _ = _new_store(tmp_path / "s.zarr")
    columns = write_keys_and_metadata(store, _table())
    assert columns == {"user": "categorical", "label": "categorical", "tags": "ragged", "lat": "float"}
    store.write_attrs("", {"metadata_columns": columns, "complete": True})
    store = open_store(str(tmp_path / "s.zarr"))
    assert list(store.keys[:]) == ["10", "11", "12", "13", "14"]
    user = store.metadata("user")
    assert isinstance(user, CategoricalColumn) and list(user.vocab) == ["u1", "u2", "é"]
    assert user.codes.dtype == np.int32 and user.codes.tolist() == [1, -1, 0, 1, 2]
    assert user.values() == ["u2", None, "u1", "u2", "é"]
    assert store.metadata("label").values() == ["cat", "dog", "cat", None, "dog"]
    tags = store.metadata("tags")
    assert isinstance(tags, RaggedColumn) and tags.offsets.tolist() == [0, 2, 2, 2, 3, 6]
    assert tags.lists() == [["a", "b c"], [], [], ["b c"], ["z", "a", "a"]] and tags.row(4) == ["z", "a", "a"]
    lat = store.metadata("lat")
    assert lat.dtype == np.float64 and np.isnan(lat[[1, 3]]).all() and lat[[0, 2, 4]].tolist() == [1.5, -3.25, 0.0]
    with pytest.raises(KeyError, match="device"):
        store.metadata("device")


def test_generic_arrays_and_attributes_for_later_stages(tmp_path):
    store, _ = _new_store(tmp_path / "s.zarr")
    assignments = np.arange(5, dtype=np.int64) % 2
    store.write_array("results/k2/assignments", assignments, attrs={"k": 2})
    store.write_array("results/k2/centroids", np.ones((2, 3), np.float32), chunks=(1, 3))
    store.write_array("results/k2/names", np.array(["a", "b"], dtype=object))
    store.write_attrs("results/k2", {"method": "kmeans", "levels": [2]})
    assert store.has("results/k2/assignments") and not store.has("results/k3")
    np.testing.assert_array_equal(store.read_array("results/k2/assignments"), assignments)
    assert store.read_array("results/k2/centroids").shape == (2, 3)
    assert list(store.read_array("results/k2/names")) == ["a", "b"]
    assert store.read_attrs("results/k2") == {"method": "kmeans", "levels": [2]}
    assert store.read_attrs("results/k2/assignments") == {"k": 2}
    store.write_array("results/k2/assignments", np.zeros(5, np.int32))  # replaced, new dtype
    assert store.read_array("results/k2/assignments").dtype == np.int32
    # Plain zarr sees the same hierarchy.
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["results/k2/centroids"].chunks == (1, 3)


def test_blocks_records_and_zarr_only_reading(tmp_path):
    store, layout = _new_store(tmp_path / "s.zarr", num_rows=5, chunk_rows=2)
    assert layout.num_blocks == 3 and layout.block_rows(2) == (4, 5)
    assert store.block_records() == [None, None, None]
    store.write_block(2, 4, np.full((1, 3), 7, np.float16), np.array([True]), {"rows": [4, 5], "invalid": []})
    store.write_block(0, 0, np.ones((2, 3), np.float16), np.array([True, False]),
                      {"rows": [0, 2], "invalid": [{"row": 1}]})
    assert store.block_records() == [{"rows": [0, 2], "invalid": [{"row": 1}]}, None,
                                     {"rows": [4, 5], "invalid": []}]
    with pytest.raises(IncompleteOutputError, match="not complete"):
        open_store(str(tmp_path / "s.zarr"))
    partial = open_store(str(tmp_path / "s.zarr"), allow_incomplete=True)
    assert partial.num_rows == 5 and partial.dim == 3 and partial.valid.tolist() == [True, False, False, False, True]
    features = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["features"]
    assert features.dtype == np.float16 and features.chunks == (2, 3)
    np.testing.assert_array_equal(features[:], [[1] * 3, [1] * 3, [0] * 3, [0] * 3, [7] * 3])


def test_sharding_codec_packs_chunks_into_one_object_per_block(tmp_path):
    store, layout = _new_store(tmp_path / "s.zarr", num_rows=10, dim=4, chunk_rows=2, chunks_per_shard=3)
    assert layout.rows_per_block == 6 and layout.num_blocks == 2
    data = np.arange(40, dtype=np.float16).reshape(10, 4)
    for block in range(layout.num_blocks):
        start, end = layout.block_rows(block)
        store.write_block(block, start, data[start:end], np.ones(end - start, bool), {})
    chunk_files = os.listdir(tmp_path / "s.zarr" / "features" / "c")
    assert sorted(chunk_files) == ["0", "1"]  # one object per block, not one per chunk
    features = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["features"]
    assert features.chunks == (2, 4) and features.shards == (6, 4)
    np.testing.assert_array_equal(features[:], data)


def test_existing_outputs_and_partial_writes(tmp_path):
    assert inspect_existing(str(tmp_path / "absent")) is None
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a feature store"):
        inspect_existing(str(tmp_path / "foreign"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something"
    with pytest.raises(OutputExistsError):
        inspect_existing(str(tmp_path / "other.zarr"))
    _new_store(tmp_path / "s.zarr")
    assert inspect_existing(str(tmp_path / "s.zarr"))["state"] == "initializing"
    leftover = tmp_path / "s.zarr" / "features" / "c" / f"0.{'ab' * 16}.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a chunk")
    assert remove_partial_writes(str(tmp_path / "s.zarr")) == 1 and not leftover.exists()


def test_a_kill_at_any_point_of_a_store_creation_leaves_a_store_a_rerun_recreates(tmp_path, monkeypatch):
    # Killed inside the first root write: only zarr's temporary is there, which counts as nothing.
    (tmp_path / "fresh.zarr").mkdir()
    (tmp_path / "fresh.zarr" / f"zarr.json.{'cd' * 16}.partial").write_text("{")
    assert inspect_existing(str(tmp_path / "fresh.zarr")) is None
    # The root is written once with its attributes: no moment where it exists without the format.
    _new_store(tmp_path / "s.zarr")
    assert inspect_existing(str(tmp_path / "s.zarr"))["format"]
    # Replacing a complete store, killed while its arrays are deleted: the root already says initializing.
    store, _ = _new_store(tmp_path / "s.zarr")
    store.write_attrs("", {"state": "complete", "complete": True})
    from fsspec.implementations.local import LocalFileSystem

    rm = LocalFileSystem.rm
    calls = []

    def killed_on_the_second_delete(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return rm(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "rm", killed_on_the_second_delete)
    with pytest.raises(KeyboardInterrupt):
        _new_store(tmp_path / "s.zarr")
    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    left = inspect_existing(str(tmp_path / "s.zarr"))
    assert left["state"] == "initializing" and left["complete"] is False
    _new_store(tmp_path / "s.zarr")
    assert sorted(os.listdir(tmp_path / "s.zarr")) == ["features", "progress", "valid", "zarr.json"]


def test_default_chunks_of_generic_arrays_are_megabytes():
    from dataengine.store import _default_chunks

    chunks = _default_chunks(np.zeros((1_000_000, 16), np.float32))
    assert chunks[1] == 16 and math.isclose(chunks[0] * 16 * 4, 4 << 20, rel_tol=0.01)
    assert _default_chunks(np.zeros((3, 2))) == (3, 2)


def _metadata_file(path, num_rows: int, row_group: int = 4096) -> str:
    """A metadata.parquet of ``num_rows`` rows with a bounded vocabulary (500 users, 300 tags)."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    with pq.ParquetWriter(str(path), pa.schema([("key", pa.string()), ("user", pa.string()),
                                                ("tags", pa.list_(pa.string())), ("lat", pa.float64())])) as out:
        for start in range(0, num_rows, row_group):
            n = min(row_group, num_rows - start)
            lengths = np.arange(n) % 4
            tags = pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
                                            pa.array(np.char.add("t", rng.integers(0, 300, lengths.sum()).astype(str))))
            out.write_table(pa.table({"key": pa.array((10**9 + start + np.arange(n)).astype(str)),
                                      "user": pa.array(np.char.add("u", rng.integers(0, 500, n).astype(str))),
                                      "tags": tags, "lat": rng.normal(size=n)}))
    return str(path)


def _streamed_peak(tmp_path, num_rows: int) -> tuple[int, dict]:
    import tracemalloc

    import pyarrow.parquet as pq

    from dataengine.store import write_metadata_batches

    source = _metadata_file(tmp_path / f"m{num_rows}.parquet", num_rows)
    store, _ = _new_store(tmp_path / f"s{num_rows}.zarr", num_rows=num_rows, chunk_rows=4096)
    tracemalloc.start()
    try:
        columns = write_metadata_batches(store, lambda: pq.ParquetFile(source).iter_batches(batch_size=4096),
                                         num_rows, chunk_rows=4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    store.write_attrs("", {"metadata_columns": columns, "complete": True})
    return peak, columns


def test_metadata_is_streamed_into_the_store_in_bounded_memory(tmp_path):
    """Writing 4x the rows must not raise the peak: a whole-table write holds ~40 bytes a row (codes, floats,
    offsets) at once, 5 MB at 120,000 rows."""
    import pyarrow.parquet as pq

    small, _ = _streamed_peak(tmp_path, 30_000)
    large, columns = _streamed_peak(tmp_path, 120_000)
    assert large < 1.5 * small + (1 << 19) and large < 3 << 20, (small, large)
    assert columns == {"user": "categorical", "tags": "ragged", "lat": "float"}
    table = pq.read_table(tmp_path / "m120000.parquet")
    store = open_store(str(tmp_path / "s120000.zarr"))
    assert store.keys[-3:].tolist() == table["key"].to_pylist()[-3:]
    assert store.metadata("user").values()[::997] == table["user"].to_pylist()[::997]
    tags = store.metadata("tags")
    assert tags.offsets[-1] == sum(len(t) for t in table["tags"].to_pylist())
    assert [tags.row(r) for r in (0, 1, 2, 3, 119_999)] == [table["tags"][r].as_py() for r in (0, 1, 2, 3, 119_999)]
    assert np.array_equal(store.metadata("lat"), table["lat"].to_numpy())


def test_metadata_batches_hold_one_row_group_not_the_file_read_so_far(tmp_path):
    """1.5M rows in row groups of 50,000: Arrow memory while reading stays that of a row group. One reader over
    the whole file (``ParquetFile.iter_batches``) grew with the rows read: 25 bytes a row here, 60 with
    the ingest's columns (GBs at 96M rows)."""
    import pyarrow.parquet as pq

    from dataengine.store import metadata_batches

    num_rows = 1_500_000
    parquet = pq.ParquetFile(_metadata_file(tmp_path / "m.parquet", num_rows, row_group=50_000))
    before, peak, rows = pa.total_allocated_bytes(), 0, 0
    for batch in metadata_batches(parquet, ["key", "user", "tags", "lat"], batch_rows=1 << 16):
        peak, rows = max(peak, pa.total_allocated_bytes() - before), rows + batch.num_rows
    assert rows == num_rows
    assert peak < 12 * num_rows, f"{peak / num_rows:.1f} bytes a row"  # 4.9 measured: a row group and a batch


def test_the_vocabulary_is_hashed_once_not_once_a_batch(tmp_path, monkeypatch):
    """Users grow with the rows (a user per 20 photos): looking each batch up with pyarrow's
    ``index_in(value_set=vocabulary)`` rebuilt the vocabulary's hash table per batch, rows x users / batch work
    (19 of the store's 56 s at 10M rows, ~30 min at 96M). Values are now coded from a dict built once. A null
    item inside a list of tags is dropped (it was coded -1 and read back as the vocabulary's last tag)."""
    import pyarrow.compute as pc

    from dataengine.store import write_metadata_batches

    rows, batch_rows = 40_000, 1_000
    users = [f"u{i // 2}" for i in range(rows)]  # 20,000 users
    table = pa.table({"key": [str(i) for i in range(rows)], "user": users,
                      "tags": [[f"t{i % 7919}", None] if i % 3 else None for i in range(rows)]})
    hashed = []
    for name in ("index_in", "is_in"):
        original = getattr(pc, name)

        def counted(values, *args, original=original, **kwargs):
            value_set = kwargs.get("value_set", args[0] if args else None)
            hashed.append(len(value_set) if value_set is not None else 0)
            return original(values, *args, **kwargs)

        monkeypatch.setattr(pc, name, counted)
    store, _ = _new_store(tmp_path / "s.zarr", num_rows=rows, chunk_rows=4096)
    written = write_metadata_batches(store, lambda: iter(table.to_batches(batch_rows)), rows)
    assert written == {"user": "categorical", "tags": "ragged"}
    assert sum(hashed) <= 2 * rows, f"{sum(hashed)} vocabulary values hashed for {rows} rows"
    store.write_attrs("", {"metadata_columns": written, "complete": True})
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.metadata("user").values() == users
    tags = store.metadata("tags")
    assert [tags.row(r) for r in (0, 1, 2, 39_998, 39_999)] == [[], ["t1"], ["t2"], [f"t{39_998 % 7919}"], []]
