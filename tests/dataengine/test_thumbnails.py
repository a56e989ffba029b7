"""Random access to sample JPEGs in ingest shards (local and s3://), per-sample failures, 3x3 grids."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataengine.ingest import IngestConfig, run_ingest
from dataengine.synth import SynthConfig, generate_corpus
from dataengine.thumbnails import PLACEHOLDER_RGB, ShardImageReader, make_grid, square_thumbnail

SYNTH = SynthConfig(num_images=40, num_classes=4, seed=5, anomalies=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("thumbs")
    generate_corpus(str(root / "synth"), SYNTH)
    return str(root / "synth")


def ingest_to(corpus: str, out: str, storage_options=None) -> str:
    run_ingest(IngestConfig(yfcc=os.path.join(corpus, "metadata.tsv"), images=os.path.join(corpus, "images"),
                            out=out, shard_size=12, workers=0, storage_options=storage_options or {}))
    return out


@pytest.fixture(scope="module")
def ingested(corpus, tmp_path_factory) -> str:
    return ingest_to(corpus, str(tmp_path_factory.mktemp("ingest") / "out"))


def tar_members(ingest: str) -> dict[str, bytes]:
    """key -> JPEG bytes of every sample, read by scanning the tars (the reference)."""
    manifest = json.load(open(os.path.join(ingest, "manifest.json")))
    found = {}
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(ingest, shard["name"])) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    found[member.name[:-4]] = tar.extractfile(member).read()
    return found


class RecordingFS:
    """Wraps an fsspec filesystem and records every ranged read."""

    def __init__(self, fs):
        self.fs, self.ranges = fs, []

    def cat_ranges(self, paths, starts, ends, **kwargs):
        self.ranges += list(zip(paths, starts, ends))
        return self.fs.cat_ranges(paths, starts, ends, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_every_row_reads_its_own_jpeg_with_one_ranged_read(ingested):
    keys = pq.read_table(os.path.join(ingested, "metadata.parquet"), columns=["key"]).column("key").to_pylist()
    reference = tar_members(ingested)
    rows = np.random.default_rng(0).permutation(len(keys)).tolist()  # any order, across shards
    with ShardImageReader(ingested) as reader:
        assert reader.num_rows == len(keys) and reader.shard_set.num_samples == len(keys)
        reader.fs = RecordingFS(reader.fs)
        data = reader.read(rows)
        locations = reader.locate(rows)
    assert [loc.key for loc in locations] == [keys[r] for r in rows]
    assert data == [reference[keys[r]] for r in rows]
    # One request per image, exactly the member's bytes: no shard is scanned.
    assert reader.fs.ranges == [(loc.path, loc.offset, loc.offset + loc.size) for loc in locations]
    assert all(Image.open(io.BytesIO(d)).format == "JPEG" for d in data)


def test_lookup_by_key_and_bad_rows(ingested):
    keys = pq.read_table(os.path.join(ingested, "metadata.parquet"), columns=["key"]).column("key").to_pylist()
    with ShardImageReader(ingested) as reader:
        assert reader.rows_of_keys([keys[7], keys[0]]) == [7, 0]
        assert reader.read_by_key([keys[30]]) == reader.read([30])
        with pytest.raises(KeyError, match="nope"):
            reader.rows_of_keys(["nope"])
        with pytest.raises(IndexError):
            reader.locate([len(keys)])
        with pytest.raises(IndexError):
            reader.locate([-1])
        assert reader.read([]) == []


def test_thumbnails_record_per_sample_failures(ingested, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(ingested, broken)
    with ShardImageReader(broken) as reader:
        good, garbled, truncated = reader.locate([0, 13, reader.num_rows - 1])
    with open(os.path.join(broken, "shards", os.path.basename(garbled.path)), "r+b") as handle:
        handle.seek(garbled.offset)
        handle.write(b"\0" * garbled.size)  # the member's bytes no longer decode
    with open(os.path.join(broken, "shards", os.path.basename(truncated.path)), "r+b") as handle:
        handle.truncate(truncated.offset + truncated.size // 2)  # the last image is cut
    with ShardImageReader(broken) as reader:
        images, failures = reader.thumbnails([0, 13, reader.num_rows - 1, 1], tile=24,
                                             expected_keys=[good.key, garbled.key, truncated.key, "other"])
    assert images[0].size == (24, 24) and images[1] is None and images[2] is None and images[3] is None
    errors = {f.row: f.error for f in failures}
    assert sorted(errors) == [1, 13, truncated.row]
    assert errors[13].startswith("undecodable JPEG") and errors[truncated.row].startswith("short read")
    assert errors[1].startswith("key mismatch")


def test_missing_shard_is_an_error_not_a_grey_tile(ingested, tmp_path):
    gone = str(tmp_path / "gone")
    shutil.copytree(ingested, gone)
    with ShardImageReader(gone) as reader:
        victim = reader.locate([0])[0]
        os.remove(os.path.join(gone, "shards", os.path.basename(victim.path)))
        with pytest.raises(OSError):
            reader.thumbnails([0], tile=8)


def test_random_access_on_s3(corpus, ingested, s3_server, s3_bucket):
    remote = ingest_to(corpus, f"{s3_bucket}/ingest", s3_server)
    keys = pq.read_table(os.path.join(ingested, "metadata.parquet"), columns=["key"]).column("key").to_pylist()
    reference = tar_members(ingested)
    rows = [len(keys) - 1, 0, 17, 5]
    with ShardImageReader(remote, s3_server) as reader:
        reader.fs = RecordingFS(reader.fs)
        data = reader.read(rows)
        images, failures = reader.thumbnails(rows, tile=16)
        assert reader.rows_of_keys([keys[17]]) == [17]
    assert data == [reference[keys[r]] for r in rows] and not failures
    assert all(path.startswith(s3_bucket.removeprefix("s3://") + "/ingest/shards/") for path, _, _ in reader.fs.ranges)
    assert all(end - start < 64 << 10 for _, start, end in reader.fs.ranges)  # member-sized ranges, not shards
    assert [image.size for image in images] == [(16, 16)] * 4


def test_grid_layout_and_placeholders():
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    tile = square_thumbnail(red, 10)
    assert tile.size == (10, 10) and tile.getpixel((5, 5)) == (255, 0, 0)
    grid = make_grid([tile, None, tile, tile], tile=10, columns=3)
    assert grid.size == (3 * 10 + 2 * 2, 2 * 10 + 2)
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((12 + 5, 5)) == PLACEHOLDER_RGB
    assert grid.getpixel((11, 5)) == (255, 255, 255)  # the gap
    assert grid.getpixel((5, 12 + 5)) == (255, 0, 0) and grid.getpixel((12 + 5, 12 + 5)) == (255, 255, 255)
    with pytest.raises(ValueError):
        make_grid([tile], tile=0)
