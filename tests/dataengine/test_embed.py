"""Embed end to end: row alignment, features vs a direct forward, SIGKILL resume, 2 gloo ranks, s3://, bad samples."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from PIL import Image

from dataengine.embed import EmbedConfig, run_embed
from dataengine.errors import IncompleteOutputError, OutputExistsError
from dataengine.metadata_table import rows_to_parquet_bytes
from dataengine.store import open_store

# Tiny and fast: the small convnet on 32-pixel crops, batches of 4, blocks of 8 rows, one thread.
SMALL = dict(model="small", image_size=32, resize_size=36, batch_size=4, chunk_rows=8, workers=0, num_threads=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> str:
    """A synthetic YFCC-like corpus ingested into shards of 10 samples (users, tags, GPS, devices)."""
    from dataengine.ingest import IngestConfig, run_ingest
    from dataengine.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(str(root / "synth"), SynthConfig(num_images=48, num_classes=4, seed=3))
    run_ingest(IngestConfig(yfcc=str(root / "synth" / "metadata.tsv"), images=str(root / "synth" / "images"),
                            out=str(root / "ingest"), shard_size=10, workers=0))
    return str(root / "ingest")


def store_files(path) -> dict[str, bytes]:
    """Every file of a local store (what identical stores must share byte for byte)."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as handle:
                files[os.path.relpath(full, path)] = handle.read()
    return files


# ------------------------------------------------------------------------------------------ alignment


def test_rows_align_with_metadata_parquet(ingested, tmp_path):
    result = run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "s.zarr"), **SMALL))
    table = pq.read_table(os.path.join(ingested, "metadata.parquet")).to_pydict()
    n = len(table["key"])
    assert (result.num_rows, result.dim, result.num_blocks, result.computed_blocks) == (n, 256, -(-n // 8), -(-n // 8))
    store = open_store(str(tmp_path / "s.zarr"))
    assert list(store.keys[:]) == table["key"] and store.valid.all() and store.complete
    assert {"user", "device", "tags", "lat", "lon"} <= set(store.metadata_names)
    assert store.metadata("user").values() == table["user"]
    assert store.metadata("device").values() == table["device"]
    assert store.metadata("tags").lists() == [t or [] for t in table["tags"]]
    lat = store.metadata("lat")
    assert [None if np.isnan(v) else v for v in lat.tolist()] == table["lat"]
    features = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["features"]  # zarr alone reads it
    assert features.shape == (n, 256) and features.dtype == np.float16 and features.chunks == (8, 256)
    assert np.isfinite(features[:]).all() and (np.abs(features[:]).sum(axis=1) > 0).all()
    attrs = store.attrs
    assert attrs["layer"] == "flatten" and attrs["model"]["arch"] == "small" and attrs["num_invalid"] == 0
    assert attrs["preprocessing"]["resize_shorter_side"] == 36 and attrs["preprocessing"]["center_crop"] == 32
    with open(os.path.join(ingested, "manifest.json"), "rb") as handle:
        assert attrs["source"]["digest"] == hashlib.sha256(handle.read()).hexdigest()


def test_features_equal_a_direct_model_forward(ingested, tmp_path):
    """The stored row r is the model applied to row r's JPEG, located through metadata.parquet's offsets and
    preprocessed with torchvision's own transforms (an independent reading of both the data and the crop)."""
    import torchvision.transforms as T

    from dataengine.models import FeatureExtractor, build_backbone

    config = EmbedConfig(shards=ingested, out=str(tmp_path / "s.zarr"), model="resnet18", image_size=32,
                         resize_size=40, batch_size=8, chunk_rows=16, workers=2, dtype="float32", seed=5)
    run_embed(config)
    stored = open_store(config.out).features[:]
    with open(os.path.join(ingested, "manifest.json")) as handle:
        manifest = json.load(handle)
    rows = pq.read_table(os.path.join(ingested, "metadata.parquet")).to_pylist()
    transform = T.Compose([T.Resize(40), T.CenterCrop(32), T.PILToTensor()])
    images = []
    for row in rows:
        with open(os.path.join(ingested, manifest["shards"][row["shard"]]["name"]), "rb") as handle:
            handle.seek(row["offset"])
            images.append(transform(Image.open(io.BytesIO(handle.read(row["size"]))).convert("RGB")))
    torch.manual_seed(5)
    extractor = FeatureExtractor(build_backbone("resnet18")[0]).eval()
    with torch.inference_mode():
        expected = extractor(torch.stack(images)).numpy()
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ CLI + resume


def test_cli_contract(tmp_path):
    """The documented command on a folder written by `dataengine ingest`; --json's last line; zarr alone reads."""
    from typer.testing import CliRunner

    from dataengine.app import app
    from dataengine.ingest import IngestConfig, run_ingest

    for i in range(6):
        os.makedirs(tmp_path / "imgs" / f"c{i % 2}", exist_ok=True)
        (tmp_path / "imgs" / f"c{i % 2}" / f"{i}.jpg").write_bytes(_jpeg(i))
    run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "ingest"), workers=0))
    store = str(tmp_path / "features.zarr")
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "ingest"), "--out", store, "--model", "resnet18",
                                      "--image-size", "224", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["out"] == store and summary["num_rows"] == 6 and summary["dim"] == 512
    features = zarr.open_group(store, mode="r")["features"]
    assert features.shape == (6, 512) and features.dtype == np.float16
    assert sorted(open_store(store).metadata("label").values()) == ["c0", "c0", "c0", "c1", "c1", "c1"]
    bad = CliRunner().invoke(app, ["embed", str(tmp_path / "ingest"), "--out", store, "--dtype", "float64"])
    assert bad.exit_code == 2 and "dtype" in bad.output


# The small convnet at 128 pixels: slow enough per block to be killed mid-run, and its subprocess does not
# import torchvision (seconds of start-up).
RESUME = dict(model="small", image_size=128, resize_size=128, batch_size=4, chunk_rows=8, num_threads=1)


def _embed_cmd(shards, out):
    return [sys.executable, "-m", "dataengine", "--quiet", "embed", shards, "--out", str(out), "--model",
            "small", "--image-size", "128", "--resize-size", "128", "--batch-size", "4", "--chunk-rows", "4",
            "--threads", "1", "--workers", "1", "--json"]


def _records(progress) -> int:
    """Finished block records (a kill mid-write can leave zarr's ``*.partial`` temporary beside them)."""
    return len([n for n in os.listdir(progress) if not n.endswith(".partial")]) if progress.exists() else 0


def _kill_after_blocks(shards: str, out, blocks: int) -> int:
    """Start `dataengine embed`, SIGKILL it once ``blocks`` block records exist; returns the records then."""
    proc = subprocess.Popen(_embed_cmd(shards, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if _records(progress) >= blocks:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _records(progress)


def test_resume_after_sigkill_gives_the_store_of_an_uninterrupted_run(ingested, tmp_path):
    reference = run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "ref"), workers=0,
                                      **dict(RESUME, chunk_rows=4)))
    assert reference.num_blocks >= 10
    for attempt in range(3):  # on a starved machine the run may end before the kill lands: try again
        out = tmp_path / f"resumed{attempt}"
        done_before = _kill_after_blocks(ingested, out, 2)
        if 1 <= done_before < reference.num_blocks:
            break
    assert 1 <= done_before < reference.num_blocks, "the kill should land after some blocks and before the end"
    assert not open_store(str(out), allow_incomplete=True).complete

    resumed = subprocess.run(_embed_cmd(ingested, out), check=True, capture_output=True, text=True)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_blocks"] >= done_before
    assert summary["computed_blocks"] == reference.num_blocks - summary["resumed_blocks"] > 0
    assert store_files(out) == store_files(tmp_path / "ref"), "the resumed store differs from an uninterrupted run"


# ------------------------------------------------------------------------------------------ distributed



def _rank_main(rank: int, world_size: int, port: int, config: EmbedConfig, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = run_embed(config)
        with open(os.path.join(results, f"rank{rank}.json"), "w") as handle:
            json.dump(result.to_dict(), handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world_size", "chunks_per_shard"), [(2, 1), (3, 2)])
def test_gloo_ranks_write_the_same_store_as_one_process(ingested, tmp_path, free_port, world_size, chunks_per_shard):
    """Ranks own whole blocks (one features shard, one valid chunk, one progress entry each), whatever the
    number of ranks and however the chunks differ between arrays: the store is byte-identical."""
    import torch.multiprocessing as mp

    single = EmbedConfig(shards=ingested, out=str(tmp_path / "one.zarr"), chunks_per_shard=chunks_per_shard, **SMALL)
    run_embed(single)
    double = EmbedConfig(shards=ingested, out=str(tmp_path / "two.zarr"), chunks_per_shard=chunks_per_shard, **SMALL)
    mp.spawn(_rank_main, args=(world_size, free_port, double, str(tmp_path)), nprocs=world_size, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert all(r["complete"] and r["world_size"] == world_size for r in results)
    blocks = [r["computed_blocks"] for r in results]
    assert sum(blocks) == results[0]["num_blocks"] and min(blocks) >= 1  # disjoint shares, both did work
    assert store_files(tmp_path / "two.zarr") == store_files(tmp_path / "one.zarr")


@pytest.mark.slow
def test_torchrun_cli_with_two_gloo_ranks(ingested, tmp_path):
    """The CLI joins the process group itself under torchrun; only rank 0 prints the summary."""
    run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "one.zarr"), **SMALL))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "dataengine", "--quiet", "embed", ingested, "--out", str(tmp_path / "two.zarr"), "--model",
               "small", "--image-size", "32", "--resize-size", "36", "--batch-size", "4", "--chunk-rows", "8",
               "--workers", "0", "--threads", "1", "--json"]
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2 and summaries[0]["complete"]
    assert store_files(tmp_path / "two.zarr") == store_files(tmp_path / "one.zarr")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_channels_last_features_are_close_to_cpu(ingested, tmp_path):
    config = dict(model="resnet18", image_size=64, batch_size=16, chunk_rows=32, workers=2, dtype="float32")
    run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "cpu.zarr"), device="cpu", **config))
    gpu = run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "gpu.zarr"), device="cuda", **config))
    store = open_store(str(tmp_path / "gpu.zarr"))
    assert store.attrs["config"]["precision"] == "bfloat16" and store.attrs["config"]["channels_last"]
    a, b = store.features[:], open_store(str(tmp_path / "cpu.zarr")).features[:]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert gpu.complete and cosine.min() > 0.98


# ------------------------------------------------------------------------------------------ object storage


def test_shards_and_store_on_s3(ingested, tmp_path, s3_server, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(ingested, f"{s3_bucket}/ingest", recursive=True)
    local = run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "local.zarr"), **SMALL))
    remote_config = EmbedConfig(shards=f"{s3_bucket}/ingest", out=f"{s3_bucket}/features.zarr",
                                storage_options=s3_server, **dict(SMALL, workers=1))
    remote = run_embed(remote_config)
    assert remote.complete and remote.num_rows == local.num_rows
    group = zarr.open_group(f"{s3_bucket}/features.zarr", mode="r", storage_options=s3_server)
    expected = open_store(str(tmp_path / "local.zarr"))
    np.testing.assert_array_equal(group["features"][:], expected.features[:])
    assert list(group["keys"][:]) == list(expected.keys[:])
    again = run_embed(remote_config)
    assert again.resumed_blocks == again.num_blocks and again.computed_blocks == 0


# ------------------------------------------------------------------------------------------ bad samples


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_ingest_folder(root, shards: list[list[tuple[str, bytes | None]]]) -> None:
    """An ingest-format folder written by hand: tar shards (``<key>.jpg`` unless None, ``<key>.json``),
    ``metadata.parquet`` and ``manifest.json`` (listing every sample, as a clean ingest would)."""
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    rows, entries = [], []
    for index, samples in enumerate(shards):
        name = f"shards/shard-{index:06d}.tar"
        with tarfile.open(os.path.join(root, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for position, (key, data) in enumerate(samples):
                meta = {"key": key, "label": f"class{position % 2}", "user": f"{index}@N00"}
                members = ([(f"{key}.jpg", data)] if data is not None else []) + \
                    [(f"{key}.json", json.dumps(meta).encode())]
                for member, payload in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                rows.append(dict(meta, shard=index, position=position))
        entries.append({"name": name, "num_samples": len(samples), "bytes": 0, "sha256": ""})
    with open(os.path.join(root, "metadata.parquet"), "wb") as handle:
        handle.write(rows_to_parquet_bytes(rows))
    manifest = {"format": "dataengine.shards", "version": 1, "config": {}, "shards": entries,
                "num_samples": len(rows), "num_shards": len(entries), "counts": {"ok": len(rows)}}
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


def test_corrupt_and_missing_samples_are_recorded_and_the_run_continues(tmp_path):
    good = {f"k{i:02d}": _jpeg(i) for i in range(15)}
    broken = dict(good, k01=good["k01"][:200], k07=None)  # truncated JPEG; a sample without its .jpg member
    keys = sorted(good)
    layout = [keys[0:5], keys[5:10], keys[10:15]]
    write_ingest_folder(tmp_path / "clean", [[(k, good[k]) for k in shard] for shard in layout])
    write_ingest_folder(tmp_path / "broken", [[(k, broken[k]) for k in shard] for shard in layout])
    # Cut the last shard inside k13.jpg's data: k13 and k14 never come out of the stream.
    last = tmp_path / "broken" / "shards" / "shard-000002.tar"
    with tarfile.open(last) as tar:
        cut = tar.getmember("k13.jpg").offset_data + 100
    with open(last, "r+b") as handle:
        handle.truncate(cut)
    config = dict(SMALL, workers=2)
    run_embed(EmbedConfig(shards=str(tmp_path / "clean"), out=str(tmp_path / "clean.zarr"), **config))
    result = run_embed(EmbedConfig(shards=str(tmp_path / "broken"), out=str(tmp_path / "broken.zarr"), **config))
    assert result.complete and result.num_invalid == 4
    store = open_store(str(tmp_path / "broken.zarr"))
    invalid = [1, 7, 13, 14]
    assert np.flatnonzero(~store.valid).tolist() == invalid
    failures = {f["row"]: f for f in store.attrs["failures"]}
    assert sorted(failures) == invalid and failures[1]["key"] == "k01"
    assert "no image member" in failures[7]["error"] and "not found in shards/shard-000002.tar" in failures[13]["error"]
    features, clean = store.features[:], open_store(str(tmp_path / "clean.zarr")).features[:]
    assert not features[invalid].any()
    ok = [r for r in range(15) if r not in invalid]
    np.testing.assert_array_equal(features[ok], clean[ok])  # same batches, same results: alignment kept
    os.remove(tmp_path / "clean" / "shards" / "shard-000001.tar")  # an I/O error is not a bad sample: it stops
    with pytest.raises(FileNotFoundError):
        run_embed(EmbedConfig(shards=str(tmp_path / "clean"), out=str(tmp_path / "io.zarr"), **config))
    assert not open_store(str(tmp_path / "io.zarr"), allow_incomplete=True).complete


# ------------------------------------------------------------------------------------------ config


def test_a_checkpoint_is_identified_by_its_weights_not_its_file(ingested, tmp_path):
    """A trainer checkpoint re-saved with the same backbone but other state (optimizer, epoch, metrics) embeds
    the same features: its store resumes; other weights are another configuration."""
    from dataengine.models import build_backbone

    torch.manual_seed(0)
    backbone, _ = build_backbone("small", True)
    checkpoint = str(tmp_path / "checkpoint.pt")
    torch.save({"arch": "small", "sobel": True, "backbone": backbone.state_dict(), "epoch": 1}, checkpoint)
    config = dict(SMALL, model=None)
    out = str(tmp_path / "s.zarr")
    first = run_embed(EmbedConfig(shards=ingested, out=out, checkpoint=checkpoint, **config))
    torch.save({"arch": "small", "sobel": True, "backbone": backbone.state_dict(), "epoch": 2}, checkpoint)
    again = run_embed(EmbedConfig(shards=ingested, out=out, checkpoint=checkpoint, **config))
    assert again.resumed_blocks == again.num_blocks == first.num_blocks
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)
    torch.save({"arch": "small", "sobel": True, "backbone": backbone.state_dict(), "epoch": 2}, checkpoint)
    with pytest.raises(OutputExistsError, match="another configuration"):
        run_embed(EmbedConfig(shards=ingested, out=out, checkpoint=checkpoint, **config))


def test_rerun_mismatch_overwrite_sharding_and_validation(ingested, tmp_path):
    out = str(tmp_path / "s.zarr")
    first = run_embed(EmbedConfig(shards=ingested, out=out, **SMALL))
    before, features = store_files(out), open_store(out).features[:]
    again = run_embed(EmbedConfig(shards=ingested, out=out, **SMALL))
    assert again.resumed_blocks == again.num_blocks == first.num_blocks and store_files(out) == before
    with pytest.raises(OutputExistsError, match="another configuration"):
        run_embed(EmbedConfig(shards=ingested, out=out, **dict(SMALL, seed=1)))
    redone = run_embed(EmbedConfig(shards=ingested, out=out, overwrite=True, **dict(SMALL, seed=1)))
    assert redone.computed_blocks == redone.num_blocks and store_files(out) != before
    # The sharding codec packs 2 chunks per object; blocks are then 16 rows, batches unchanged.
    sharded = run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "sh.zarr"), chunks_per_shard=2, **SMALL))
    assert sharded.num_blocks == -(-first.num_rows // 16)
    np.testing.assert_array_equal(open_store(str(tmp_path / "sh.zarr")).features[:], features)
    with pytest.raises(ValueError, match="dtype"):
        EmbedConfig(shards=ingested, out=out, dtype="float64")
    with pytest.raises(ValueError, match="resize_size"):
        EmbedConfig(shards=ingested, out=out, image_size=64, resize_size=32)
    with pytest.raises(IncompleteOutputError, match="manifest"):
        run_embed(EmbedConfig(shards=str(tmp_path), out=str(tmp_path / "x.zarr"), **SMALL))
