"""Ingest at scale: the metadata-only mode, and per-row memory that stays bounded as the row count grows."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataengine.errors import InputUnusableError
from dataengine.fs import Location
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.ingest.pipeline import MetadataBlock
from dataengine.ingest.resume import ResumeState
from dataengine.ingest.seen import KeySet
from dataengine.ingest.writer import ShardWriter
from dataengine.metadata_table import rows_to_table
from tests.dataengine.test_ingest import ingest_files, yfcc_line


def _metadata(tmp_path, lines):
    (tmp_path / "meta.tsv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "meta.tsv")


def test_the_merged_metadata_is_compressed_like_its_parts(tmp_path):
    # It was written with pyarrow's default (snappy) while its parts are zstd: 467 MB merged from 279 MB of
    # parts at 10M rows.
    lines = [yfcc_line(1000 + i, i) for i in range(400)]
    out = tmp_path / "out"
    run_ingest(IngestConfig(yfcc=_metadata(tmp_path, lines), metadata_only=True, out=str(out), shard_size=100,
                            workers=0))
    merged = pq.ParquetFile(out / "metadata.parquet").metadata
    codecs = {merged.row_group(g).column(c).compression for g in range(merged.num_row_groups)
              for c in range(merged.num_columns)}
    assert codecs == {"ZSTD"}


@pytest.mark.parametrize("workers", [0, 2])
def test_metadata_only_blocks_cut_into_parts_keep_every_first_photo_id_once_in_input_order(tmp_path, workers):
    # Blocks of 1,024 rows come back as one table each; parts of 700 rows end inside blocks, and photo ids
    # come again within a block, in a later block and in a later part.
    rng = random.Random(0)
    lines, expected, statuses = [], [], []
    for row in range(3000):
        photo_id = 10_000 + row
        if row % 97 == 5:
            photo_id = 10_000 + rng.randrange(row)  # seen before (a row < this one, maybe bad itself)
        if row % 211 == 7:
            lines.append("bad\tline")
            statuses.append("bad_metadata")
            continue
        lines.append(yfcc_line(photo_id, row))
        if str(photo_id) in expected:
            statuses.append("bad_metadata")
        else:
            expected.append(str(photo_id))
            statuses.append("ok")
    out = tmp_path / "out"
    result = run_ingest(IngestConfig(yfcc=_metadata(tmp_path, lines), metadata_only=True, out=str(out),
                                     shard_size=700, workers=workers))
    assert result.counts["ok"] == len(expected) and result.counts["bad_metadata"] == 3000 - len(expected)
    assert pq.read_table(out / "metadata.parquet")["key"].to_pylist() == expected
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert [entry["status"] for entry in ledger] == statuses and [e["row"] for e in ledger] == list(range(3000))
    sizes = [json.loads(path.read_text())["num_samples"] for path in sorted((out / "stats").glob("*.json"))]
    assert sizes == [700] * (len(expected) // 700) + [len(expected) % 700]
    parts = [pq.read_table(path)["key"].to_pylist() for path in sorted((out / "meta").glob("*.parquet"))]
    assert [key for part in parts for key in part] == expected


def test_metadata_only_ingest_writes_every_valid_line_and_no_shard(tmp_path):
    lines = [yfcc_line(1000 + i, i) for i in range(12)]
    lines += [yfcc_line(2000, 12, marker="1"), "only\tthree\tfields", yfcc_line(1001, 14)]
    config = IngestConfig(yfcc=_metadata(tmp_path, lines), metadata_only=True, out=str(tmp_path / "out"),
                          shard_size=5, workers=1)
    result = run_ingest(config)
    assert {status: n for status, n in result.counts.items() if n} == {"ok": 12, "video": 1, "bad_metadata": 2}
    assert result.num_shards == 0 and not (tmp_path / "out" / "shards").exists()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metadata_rows"] == 12 and manifest["config"]["metadata_only"] is True
    table = pq.read_table(tmp_path / "out" / "metadata.parquet")
    assert table["key"].to_pylist() == [str(1000 + i) for i in range(12)]
    assert set(table["shard"].to_pylist()) == {-1} and set(table["offset"].to_pylist()) == {-1}
    assert table["user"][0].as_py() == "123@N00" and table["tags"][0].as_py() == ["a", "b c"]
    ledger = [json.loads(line) for line in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert [e["row"] for e in ledger] == list(range(15)) and ledger[14]["status"] == "bad_metadata"
    assert "appears again" in ledger[14]["error"] and all(e["shard"] is None for e in ledger)


def test_metadata_only_resume_reloads_the_seen_photo_ids_and_gives_identical_output(tmp_path):
    lines = [yfcc_line(5000 + i, i) for i in range(20)] + [yfcc_line(5002, 20)]  # a repeat in the last part
    config = IngestConfig(yfcc=_metadata(tmp_path, lines), metadata_only=True, out=str(tmp_path / "out"),
                          shard_size=4, workers=0)
    run_ingest(config)
    whole = ingest_files(tmp_path / "out")
    out = tmp_path / "out"
    for name in ("manifest.json", "metadata.parquet", "ledger.jsonl"):
        (out / name).unlink()
    for name in sorted(p.name for p in (out / "stats").iterdir())[2:]:  # as if killed after two parts
        (out / "stats" / name).unlink()
    (out / "nodes" / "node-000.json").unlink()
    resumed = run_ingest(config)
    assert resumed.counts["bad_metadata"] == 1 and ingest_files(out) == whole


def test_metadata_only_needs_metadata_and_no_images(tmp_path):
    with pytest.raises(ValueError, match="metadata_only"):
        IngestConfig(yfcc="m.tsv", images="img", metadata_only=True, out="o")
    with pytest.raises(ValueError, match="metadata_only"):
        IngestConfig(images="img", metadata_only=True, out="o")
    with pytest.raises(InputUnusableError, match="no valid photo line"):
        run_ingest(IngestConfig(yfcc=_metadata(tmp_path, ["bad\tline"]), metadata_only=True,
                                out=str(tmp_path / "o"), workers=0))


@pytest.mark.parametrize("max_bits, run_cap", [(22, 1 << 24), (4, 40)], ids=["default", "tiny-table-and-runs"])
def test_key_set_matches_a_python_set_for_every_kind_of_key(max_bits, run_cap):
    rng = random.Random(3)
    oracle: set[str] = set()
    keys = KeySet(max_bits=max_bits, run_cap=run_cap)  # tiny: the table spills into runs that get merged
    for _ in range(40):
        block = []
        for _ in range(rng.randrange(1, 300)):
            kind = rng.randrange(4)
            if kind == 0:
                block.append(str(rng.randrange(0, 3000)))  # decimal photo ids, many repeats
            elif kind == 1:
                block.append(f"{rng.getrandbits(64):016x}" if rng.random() < 0.5 else f"{rng.randrange(50):016x}")
            elif kind == 2:
                block.append(rng.choice(["0012", "-5", "abc", "x" * 20, str(2**64 - 1), "18446744073709551615",
                                         "ffffffffffffffff", "fffffffffffffffe"]))  # the free-slot marker
            else:
                block.append(str(rng.randrange(2**63, 2**64)))
        expected = np.array([k in oracle for k in block])
        assert (keys.contains_many(block) == expected).all()
        keys.add_many(block)
        oracle.update(block)
        assert len(keys) == len(oracle)
    assert all(k in keys for k in oracle) and "999999" not in keys


def test_the_key_set_holds_8_bytes_an_id_at_its_peak_not_a_doubling_hash_table():
    """Peak memory while 3M ids go in, in bytes per id: ~8 plus a bounded table and merge buffer. A hash table
    grown by doubling peaked at 24-36 (old and new table at once); at 99M ids that was 3.6 GB."""
    from dataengine.ingest.seen import _IntSet

    ids = np.random.default_rng(0).integers(1, 10**18, 3_000_000, dtype=np.uint64)
    ids = np.unique(ids)
    ids = ids[np.random.default_rng(1).permutation(len(ids))]
    integers = _IntSet(max_bits=16, run_cap=1 << 19)  # the defaults scaled down 64x with the row count
    gc.collect()
    tracemalloc.start()
    try:
        for block in np.array_split(ids, 300):
            integers.add(block[~integers.contains(block)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert integers.size == len(ids) and integers.contains(ids).all()
    assert not integers.contains(np.arange(10**18, 10**18 + 1000, dtype=np.uint64)).any()
    assert integers.nbytes / len(ids) < 8.3
    assert peak / len(ids) < 12, f"{peak / len(ids):.1f} bytes per id at the peak"


def _block(start: int, count: int) -> MetadataBlock:
    rows = list(range(start, start + count))
    keys = [str(10_000_000_000 + r) for r in rows]
    table = rows_to_table([{"key": key, "photo_id": int(key), "shard": -1} for key in keys])
    return MetadataBlock(rows, keys, ["ok"] * count, [None] * count, table)


def test_the_writer_keeps_a_few_bytes_per_photo_id_not_a_string(tmp_path):
    """Per-row state of a metadata-only ingest grows by < 32 bytes a row (a set of id strings: ~100)."""
    config = IngestConfig(yfcc="m.tsv", metadata_only=True, out=str(tmp_path), shard_size=5000, workers=0)
    writer = ShardWriter(Location(str(tmp_path)), config, ResumeState())
    block, rows = 1000, 0
    gc.collect()
    tracemalloc.start()
    try:
        while rows < 2_000:
            writer.add_block(_block(rows, block))
            rows += block
        writer.close_shard()
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        while rows < 22_000:
            writer.add_block(_block(rows, block))
            rows += block
        writer.close_shard()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert len(writer.seen_keys) == 22_000
    assert grown / 20_000 < 32, f"{grown / 20_000:.1f} bytes per row"


def test_metadata_only_from_the_command_line(tmp_path):
    import subprocess
    import sys

    lines = [yfcc_line(7000 + i, i) for i in range(5)] + ["bad"]
    done = subprocess.run([sys.executable, "-m", "dataengine", "ingest", "--yfcc", _metadata(tmp_path, lines),
                           "--metadata-only", "--out", str(tmp_path / "out"), "--workers", "0", "--json"],
                          capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["counts"]["ok"] == 5 and summary["counts"]["bad_metadata"] == 1 and summary["num_shards"] == 0
    assert pq.read_table(tmp_path / "out" / "metadata.parquet").num_rows == 5
