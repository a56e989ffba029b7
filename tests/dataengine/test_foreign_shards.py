"""Webdataset shards that ingest did not write: webdataset.ShardWriter's and img2dataset's output layouts, named
by brace patterns, lists or folders, local or s3://; the shard index, row alignment, embed/report/train on them;
ingest of a webdataset tar keeping its keys and sidecars."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset
from PIL import Image

from dataengine import foreign_shards
from dataengine.embed import EmbedConfig, run_embed
from dataengine.shards import load_shard_set
from dataengine.store import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = dict(model="small", image_size=32, resize_size=32, batch_size=4, chunk_rows=4, workers=0, num_threads=1,
             dtype="float32")


def _image(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Shard indexes go to a folder of the test, never to the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_shardwriter(folder) -> list[dict]:
    """Ten samples in shards of four with webdataset.ShardWriter: .jpg/.json/.txt/.cls sidecars; sample 3 is
    a PNG, sample 5 has no .json, sample 6's .json is a list, sample 8 has no image."""
    os.makedirs(folder, exist_ok=True)
    samples = []
    for i in range(10):
        sample = {"__key__": f"img{i:03d}", "txt": f"a photo number {i}", "cls": str(i % 3)}
        if i == 3:
            sample["png"] = _image(i, "PNG")
        elif i != 8:
            sample["jpg"] = _image(i)
        if i == 6:
            sample["json"] = json.dumps([1, 2]).encode()
        elif i != 5:
            sample["json"] = {"url": f"http://example.com/{i}.jpg", "caption": f"caption {i}", "width": 48,
                              "height": 40, "score": 0.5 + i, "tags": ["a", f"t{i}"], "nested": {"n": i},
                              "lat": "north" if i == 7 else 10.0 + i}
        samples.append(sample)
    with webdataset.ShardWriter(os.path.join(str(folder), "part-%05d.tar"), maxcount=4, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return samples


I2D_FIELDS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
              "original_height", "exif", "sha256")


def write_img2dataset_layout(folder, num_shards: int = 2, per_shard: int = 5) -> list[str]:
    """img2dataset's documented webdataset output: ``{shard:05d}.tar`` holding ``<key>.jpg``, ``<key>.txt``
    (the caption) and ``<key>.json`` (url, caption, key, status, error_message, width, height, original_width,
    original_height, exif, sha256 and the --save_additional_columns), samples in download-completion order,
    beside ``{shard:05d}.parquet`` (every input row, failures included) and ``{shard:05d}_stats.json``.
    Returns the keys in tar order."""
    import hashlib

    import pyarrow as pa

    os.makedirs(folder, exist_ok=True)
    order = []
    for shard in range(num_shards):
        rows = []
        with webdataset.TarWriter(os.path.join(str(folder), f"{shard:05d}.tar")) as sink:
            for i in (3, 0, 4, 1, 2)[:per_shard]:  # completion order, not input order
                key = f"{shard:05d}{i:04d}"
                image = _image(100 * shard + i, size=(32, 32))
                meta = {"url": f"http://127.0.0.1/{key}.jpg", "caption": f"caption of {key}", "key": key,
                        "status": "success", "error_message": None, "width": 32, "height": 32,
                        "original_width": 64, "original_height": 60 + i, "exif": "{}",
                        "sha256": hashlib.sha256(image).hexdigest(), "tag": f"t{i % 2}"}
                sink.write({"__key__": key, "jpg": image, "txt": meta["caption"], "json": meta})
                rows.append(meta)
                order.append(key)
        failed = {name: None for name in I2D_FIELDS} | {"url": "http://127.0.0.1/x.jpg", "status":
                                                       "failed_to_download", "key": f"{shard:05d}9999",
                                                       "tag": "t9", "error_message": "HTTP Error 404"}
        pq.write_table(pa.Table.from_pylist(rows + [failed]), os.path.join(str(folder), f"{shard:05d}.parquet"))
        with open(os.path.join(str(folder), f"{shard:05d}_stats.json"), "w") as handle:
            json.dump({"count": per_shard + 1, "successes": per_shard, "failed_to_download": 1}, handle)
    return order


# ------------------------------------------------------------------------------------------ the index


def test_shardwriter_shards_index_with_webdataset_sample_semantics(tmp_path):
    samples = write_shardwriter(tmp_path / "wds")
    spec = str(tmp_path / "wds" / "part-{00000..00002}.tar")
    shard_set = load_shard_set(spec)
    assert shard_set.num_samples == 10 and [s.num_samples for s in shard_set.shards] == [4, 4, 2]
    assert shard_set.url == spec and shard_set.manifest["source"] == "webdataset"
    # Row r is the r-th sample of webdataset's own reader, and offset/size locate its image bytes.
    reference = list(webdataset.WebDataset(shard_set.urls(), shardshuffle=False, empty_check=False))
    rows = pq.read_table(shard_set.metadata_url).to_pylist()
    assert [row["key"] for row in rows] == [s["__key__"] for s in reference] == [s["__key__"] for s in samples]
    for row, sample in zip(rows, samples):
        image = sample.get("jpg", sample.get("png"))
        if image is None:
            assert (row["offset"], row["size"]) == (-1, 0)
            continue
        with open(shard_set.shards[row["shard"]].url, "rb") as handle:
            handle.seek(row["offset"])
            assert handle.read(row["size"]) == image
    first = rows[0]
    assert (first["url"], first["caption"], first["width"], first["height"]) == ("http://example.com/0.jpg",
                                                                                  "caption 0", 48, 40)
    assert first["tags"] == ["a", "t0"] and first["lat"] == 10.0 and first["score"] == 0.5
    assert json.loads(first["nested"]) == {"n": 0} and first["txt"] == "a photo number 0"
    assert [row["label"] for row in rows] == [str(i % 3) for i in range(10)]  # from .cls
    assert rows[5]["url"] is None and rows[5]["txt"] == "a photo number 5"  # no .json: nulls
    assert "holds a list" in rows[6]["sidecar_error"]
    assert rows[7]["lat"] is None and rows[7]["sidecar_lat"] == "north"  # a value of another type is kept aside
    # The same shards named as a folder or as a '::' list: the same content digest, the same rows.
    listed = load_shard_set("::".join(shard_set.urls()))
    folder = load_shard_set(str(tmp_path / "wds"))
    assert listed.digest == folder.digest == shard_set.digest
    assert pq.read_table(folder.metadata_url).equals(pq.read_table(shard_set.metadata_url))


def test_the_index_is_built_once_and_rebuilt_when_a_shard_changes(tmp_path, monkeypatch):
    write_shardwriter(tmp_path / "wds")
    spec = str(tmp_path / "wds" / "part-{00000..00002}.tar")
    first = load_shard_set(spec)

    def refuse(*args, **kwargs):
        raise AssertionError("indexed again")

    with monkeypatch.context() as patch:
        patch.setattr(foreign_shards, "index_shard", refuse)
        assert load_shard_set(spec).digest == first.digest
    shutil.copy(tmp_path / "wds" / "part-00000.tar", tmp_path / "wds" / "part-00002.tar")
    changed = load_shard_set(spec)
    assert changed.num_samples == 12 and changed.digest != first.digest
    assert changed.metadata_url != first.metadata_url


def test_ranks_indexing_at_once_publish_one_index(tmp_path):
    """Three processes (ranks of one machine) index the same shards at the same time: one index, the same for
    all, no scratch folder left."""
    write_shardwriter(tmp_path / "wds")
    spec = str(tmp_path / "wds" / "part-{00000..00002}.tar")
    code = ("import sys; from dataengine.shards import load_shard_set; s = load_shard_set(sys.argv[1]); "
            "print(s.digest, s.metadata_url)")
    processes = [subprocess.Popen([sys.executable, "-c", code, spec], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]
    outputs = {process.communicate(timeout=300)[0].strip() for process in processes}
    assert all(process.returncode == 0 for process in processes) and len(outputs) == 1
    root = tmp_path / "cache" / "dataengine" / "shard-index"
    here = load_shard_set(spec)
    assert len(os.listdir(root)) == 1 and outputs == {f"{here.digest} {here.metadata_url}"}


def test_bad_names_fail_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from dataengine.app import app

    write_shardwriter(tmp_path / "wds")
    with pytest.raises(FileNotFoundError, match="shard not found: .*part-00003.tar"):
        load_shard_set(str(tmp_path / "wds" / "part-{00000..00003}.tar"))
    with pytest.raises(ValueError, match="listed twice"):
        one = str(tmp_path / "wds" / "part-00000.tar")
        load_shard_set(f"{one}::{one}")
    with pytest.raises(ValueError, match="only uncompressed .tar"):
        load_shard_set(str(tmp_path / "wds" / "part-{00000..00001}.tar.gz::x.tar"))
    with pytest.raises(ValueError, match="only uncompressed .tar"):  # not taken for a folder without manifest
        load_shard_set(str(tmp_path / "wds" / "part-{00000..00001}.tar.gz"))
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "wds" / "part-{00000..00009}.tar"), "--out",
                                      str(tmp_path / "s.zarr"), "--model", "small"])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "shard not found" in lines[0], result.output


def test_a_damaged_shard_keeps_the_samples_before_the_damage(tmp_path):
    write_shardwriter(tmp_path / "wds")
    path = tmp_path / "wds" / "part-00001.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmember("img006.jpg").offset_data + 50
    with open(path, "r+b") as handle:
        handle.truncate(cut)
    shard_set = load_shard_set(str(tmp_path / "wds" / "part-{00000..00002}.tar"))
    # img004, img005 and the interrupted img006 (webdataset yields the sample it was reading), as the stream does.
    assert [s.num_samples for s in shard_set.shards] == [4, 3, 2]
    assert "part-00001.tar" in shard_set.manifest["errors"][0]["url"]
    result = run_embed(EmbedConfig(shards=str(tmp_path / "wds" / "part-{00000..00002}.tar"),
                                   out=str(tmp_path / "s.zarr"), **SMALL))
    store = open_store(str(tmp_path / "s.zarr"))
    assert result.num_rows == 9 and np.flatnonzero(~store.valid).tolist() == [6, 7]  # img006 cut, img008 no image


def test_rows_are_samples_by_position_even_with_a_repeated_key(tmp_path):
    """Keys a, b, a in one shard: three rows; row 2 holds the third sample's features, not the first's."""
    images = [_image(1), _image(2), _image(3)]
    os.makedirs(tmp_path / "dup")
    with webdataset.TarWriter(str(tmp_path / "dup" / "0.tar")) as sink:
        for key, image in zip(("a", "b", "a"), images):
            sink.write({"__key__": key, "jpg": image, "txt": key})
    run_embed(EmbedConfig(shards=str(tmp_path / "dup" / "0.tar"), out=str(tmp_path / "s.zarr"), **SMALL))
    features = open_store(str(tmp_path / "s.zarr")).features[:]
    singles = []
    for i, image in enumerate(images):
        os.makedirs(tmp_path / f"one{i}")
        with webdataset.TarWriter(str(tmp_path / f"one{i}" / "0.tar")) as sink:
            sink.write({"__key__": "x", "jpg": image})
        run_embed(EmbedConfig(shards=str(tmp_path / f"one{i}" / "0.tar"), out=str(tmp_path / f"{i}.zarr"), **SMALL))
        singles.append(open_store(str(tmp_path / f"{i}.zarr")).features[0])
    np.testing.assert_allclose(features, np.stack(singles), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the stages


def test_img2dataset_layout_through_embed_cluster_report_and_train(tmp_path):
    from typer.testing import CliRunner

    import torchvision.transforms as T

    from dataengine.app import app
    from dataengine.models import FeatureExtractor, build_backbone

    order = write_img2dataset_layout(tmp_path / "i2d")
    store = str(tmp_path / "f.zarr")
    result = CliRunner().invoke(app, ["--quiet", "embed", str(tmp_path / "i2d"), "--out", store, "--model", "small",
                                      "--image-size", "32", "--resize-size", "32", "--workers", "1",
                                      "--dtype", "float32", "--json"])
    assert result.exit_code == 0, result.output
    opened = open_store(store)
    assert list(opened.keys[:]) == order and opened.valid.all()
    # Row alignment: row r is the model applied to the r-th sample's JPEG (read by webdataset itself).
    urls = [str(tmp_path / "i2d" / f"{s:05d}.tar") for s in range(2)]
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.PILToTensor()])
    crops = torch.stack([transform(image.convert("RGB")) for image, in
                         webdataset.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg")])
    torch.manual_seed(0)
    with torch.inference_mode():
        expected = FeatureExtractor(build_backbone("small")[0]).eval()(crops).numpy()
    np.testing.assert_allclose(opened.features[:], expected, rtol=1e-4, atol=1e-5)
    source = opened.attrs["source"]
    assert source["url"] == str(tmp_path / "i2d") and source["num_shards"] == 2
    metadata = pq.read_table(load_shard_set(source["url"]).metadata_url).to_pylist()
    assert [m["key"] for m in metadata] == order
    for row in metadata:
        assert row["status"] == "success" and row["caption"] == f"caption of {row['key']}" == row["txt"]
        assert row["url"].endswith(f"{row['key']}.jpg") and row["exif"] == "{}" and row["tag"] in ("t0", "t1")
        assert row["width"] == row["height"] == 32 and row["original_width"] == 64 and len(row["sha256"]) == 64
    # cluster, then report with photo grids read from the shards by offset
    from dataengine.cluster import ClusterConfig, run_cluster

    run_cluster(ClusterConfig(store=store, name="k2", levels=(2,), pca_dim=4, num_iterations=2,
                              neighbor_index=False))
    report = CliRunner().invoke(app, ["--quiet", "report", store, "--clustering", "k2", "--out",
                                      str(tmp_path / "report"), "--json"])
    assert report.exit_code == 0, report.output
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["thumbnail_failures"] == [] and written["selected"]
    assert "data:image/jpeg;base64" in (tmp_path / "report" / "index.html").read_text()  # photo grids drawn
    # an export carries img2dataset's columns beside the cluster ids
    from dataengine.export import ExportConfig, run_export

    run_export(ExportConfig(store=store, out=str(tmp_path / "x.parquet"), clusterings=("k2",), source_metadata=True))
    exported = pq.read_table(tmp_path / "x.parquet").to_pylist()
    assert [(r["key"], r["caption"], r["url"]) for r in exported] == [(m["key"], m["caption"], m["url"])
                                                                      for m in metadata]
    assert [r["level0"] for r in exported] == open_store(store).group["clusterings/k2/level0"][:].tolist()
    # train streams the same shards named by a brace pattern
    pattern = str(tmp_path / "i2d" / "{00000..00001}.tar")
    train = CliRunner().invoke(app, ["--quiet", "train", pattern, "--out", str(tmp_path / "run"), "--mode", "rotnet",
                                     "--arch", "small", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                                     "--workers", "0", "--threads", "1", "--json"])
    assert train.exit_code == 0, train.output
    assert json.loads(train.stdout.strip().splitlines()[-1])["steps"] > 0


def test_s3_shards_index_to_the_same_rows_and_features(tmp_path, s3_bucket, s3_server):
    import s3fs

    order = write_img2dataset_layout(tmp_path / "i2d")
    fs = s3fs.S3FileSystem(**s3_server)
    for shard in range(2):
        fs.put_file(str(tmp_path / "i2d" / f"{shard:05d}.tar"), f"{s3_bucket[5:]}/i2d/{shard:05d}.tar")
    remote = load_shard_set(f"{s3_bucket}/i2d/{{00000..00001}}.tar", s3_server)
    local = load_shard_set(str(tmp_path / "i2d" / "{00000..00001}.tar"))
    assert remote.digest == local.digest and remote.num_samples == len(order)
    drop = ["source"]
    assert pq.read_table(remote.metadata_url).drop(drop).equals(pq.read_table(local.metadata_url).drop(drop))
    run_embed(EmbedConfig(shards=f"{s3_bucket}/i2d/{{00000..00001}}.tar", out=f"{s3_bucket}/f.zarr",
                          storage_options=s3_server, **SMALL))
    run_embed(EmbedConfig(shards=str(tmp_path / "i2d" / "{00000..00001}.tar"), out=str(tmp_path / "f.zarr"), **SMALL))
    from_s3 = open_store(f"{s3_bucket}/f.zarr", s3_server)
    assert list(from_s3.keys[:]) == order
    np.testing.assert_array_equal(from_s3.features[:], open_store(str(tmp_path / "f.zarr")).features[:])


IMG2DATASET = os.environ.get("DATAENGINE_TEST_IMG2DATASET")


@pytest.mark.skipif(not IMG2DATASET, reason="set DATAENGINE_TEST_IMG2DATASET to an img2dataset executable (it "
                                            "needs its own environment: pip install img2dataset)")
def test_a_real_img2dataset_run(tmp_path, free_port):
    """img2dataset itself downloads synthetic JPEGs from a local HTTP server; embed reads its output folder."""
    (tmp_path / "www").mkdir()
    for i in range(8):
        (tmp_path / "www" / f"{i}.jpg").write_bytes(_image(i, size=(48, 64)))
    (tmp_path / "www" / "broken.jpg").write_bytes(b"not a jpeg")
    with open(tmp_path / "urls.csv", "w") as handle:
        handle.write("url,caption,tag\n")
        for name in [*(f"{i}.jpg" for i in range(8)), "missing.jpg", "broken.jpg"]:
            handle.write(f"http://127.0.0.1:{free_port}/{name},caption {name},t{len(name)}\n")
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(free_port), "--bind", "127.0.0.1"],
                              cwd=tmp_path / "www", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([IMG2DATASET, "--url_list", str(tmp_path / "urls.csv"), "--input_format", "csv",
                        "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["tag"]',
                        "--output_format", "webdataset", "--output_folder", str(tmp_path / "out"),
                        "--processes_count", "1", "--thread_count", "2", "--image_size", "32",
                        "--number_sample_per_shard", "4", "--enable_wandb", "False", "--distributor",
                        "multiprocessing"], check=True, capture_output=True, timeout=300,
                       env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    finally:
        server.terminate()
        server.wait()
    shard_set = load_shard_set(str(tmp_path / "out"))
    reference = list(webdataset.WebDataset(shard_set.urls(), shardshuffle=False, empty_check=False))
    assert shard_set.num_samples == len(reference) == 8  # the 404 and the undecodable file are not in the tars
    run_embed(EmbedConfig(shards=str(tmp_path / "out"), out=str(tmp_path / "f.zarr"), **SMALL))
    assert list(open_store(str(tmp_path / "f.zarr")).keys[:]) == [s["__key__"] for s in reference]
    rows = pq.read_table(shard_set.metadata_url).to_pylist()
    assert {r["status"] for r in rows} == {"success"} and all(r["caption"].startswith("caption ") for r in rows)
    assert all(r["tag"].startswith("t") and r["url"].startswith("http://127.0.0.1") for r in rows)


# ------------------------------------------------------------------------------------------ ingest


def test_ingest_of_a_webdataset_tar_keeps_keys_and_sidecars(tmp_path):
    from dataengine.ingest import IngestConfig, run_ingest

    order = write_img2dataset_layout(tmp_path / "i2d", num_shards=1)
    tar = str(tmp_path / "i2d" / "00000.tar")
    with tarfile.open(tar) as source, tarfile.open(tmp_path / "streamed.tar.gz", "w:gz") as packed:
        for member in source.getmembers():  # the same tar compressed: read by streaming, not by offset
            packed.addfile(member, source.extractfile(member))
    for name, images in (("local", tar), ("streamed", str(tmp_path / "streamed.tar.gz"))):
        out = tmp_path / name
        run_ingest(IngestConfig(images=images, out=str(out), workers=0))  # permuted by default
        rows = pq.read_table(out / "metadata.parquet").to_pylist()
        assert sorted(r["key"] for r in rows) == sorted(order)
        samples = list(webdataset.WebDataset(str(out / "shards" / "shard-000000.tar"), shardshuffle=False))
        assert [s["__key__"] for s in samples] == [r["key"] for r in rows]  # shards row-aligned with metadata
        run_ingest(IngestConfig(images=images, out=str(out) + "-in-order", workers=0, shuffle=False))
        in_order = pq.read_table(f"{out}-in-order/metadata.parquet").to_pylist()
        assert [r["key"] for r in in_order] == order
        for sample in samples:
            document = json.loads(sample["json"])
            assert sample["txt"].decode() == f"caption of {sample['__key__']}"  # the sidecar, byte for byte
            assert document["caption"] == sample["txt"].decode() and document["status"] == "success"
            assert document["url"].endswith(f"{sample['__key__']}.jpg") and document["tag"] in ("t0", "t1")
            assert document["source"] == f"{sample['__key__']}.jpg" and document["original_width"] == 64
    # Members over the read limit are never held: the sample says which (images by offset or streamed alike).
    for images in (tar, str(tmp_path / "streamed.tar.gz")):
        samples = list(foreign_shards.webdataset_tar_samples(images, None, max_bytes=200))
        assert [s.key for s in samples] == order and all(s.data is None for s in samples)
        assert all(s.error == f"over the 200 bytes read at most: {s.key}.jpg, {s.key}.json" for s in samples)
    # A plain tar of images (no sidecars) is still read as an image folder: hashed keys, folder labels.
    with tarfile.open(tmp_path / "plain.tar", "w") as plain:
        for i in range(2):
            data = _image(i)
            info = tarfile.TarInfo(f"cats/{i}.jpg")
            info.size = len(data)
            plain.addfile(info, io.BytesIO(data))
    run_ingest(IngestConfig(images=str(tmp_path / "plain.tar"), out=str(tmp_path / "plain"), workers=0))
    rows = pq.read_table(tmp_path / "plain" / "metadata.parquet").to_pylist()
    assert [r["label"] for r in rows] == ["cats", "cats"] and all(len(r["key"]) == 16 for r in rows)


def test_training_streams_png_and_image_less_samples(tmp_path):
    """The trainer's stream yields every sample: the PNG one decoded, the one without an image as a black
    stand-in (so that stream positions, which resumes count, stay those of the shards)."""
    from trainer.augment import CropConfig
    from trainer.data import EpochPlan, ShardStream
    from trainer.sampler import StreamConfig

    write_shardwriter(tmp_path / "wds")
    shard_set = load_shard_set(str(tmp_path / "wds" / "part-{00000..00002}.tar"))
    stream = ShardStream(list(shard_set.shards), None, StreamConfig(seed=0, buffer_size=4), CropConfig(size=16),
                         EpochPlan(epoch=0, rank=0, world_size=1), batch_size=2)
    images = {row: image for image, row in stream}
    assert sorted(images) == list(range(10))
    assert images[3].shape == (3, 16, 16) and images[3].float().std() > 10  # the PNG, decoded
    assert not images[8].any()  # no image member: black
