"""Ingest end to end: folder/tar/YFCC sources, bad input, s3://, multi-node, SIGKILL resume (download mode:
test_download.py)."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from dataengine.errors import InputUnusableError, OutputExistsError
from dataengine.fs import Location
from dataengine.ingest import IngestConfig, merge, run_ingest
from dataengine.yfcc import FIELDS_25


def _jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_folder(root, num_per_class: int = 12, classes=("cat", "dog", "owl")) -> None:
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(num_per_class):
            (root / name / f"{i:03d}.jpg").write_bytes(_jpeg(100 * c + i))


def yfcc_line(photo_id: int, row: int = 0, **fields: str) -> str:
    values = {name: "" for name in FIELDS_25}
    values.update(line_number=str(row), photo_id=str(photo_id), photo_hash="ab" * 16, user_nsid="123@N00",
                  user_nickname="some+one", date_taken="2010-05-01+10:00:00.0", date_uploaded="1273000000",
                  device="NIKON+D90", title="t", user_tags="a,b+c", extension_original="jpg", marker="0",
                  download_url=f"http://farm1.staticflickr.com/1/{photo_id}_s.jpg")
    values.update(fields)
    return "\t".join(values[name] for name in FIELDS_25)


def read_back(out: str, storage_options=None, scratch=None) -> list[tuple[str, bytes, dict]]:
    """Every sample of an ingest, in manifest order, read with webdataset (remote shards copied locally)."""
    location = Location(out, storage_options)
    manifest = location.read_json("manifest.json")
    urls = []
    for shard in manifest["shards"]:
        if location.local:
            urls.append(location.path(shard["name"]))
        else:
            urls.append(os.path.join(scratch, os.path.basename(shard["name"])))
            with open(urls[-1], "wb") as handle:
                handle.write(location.read_bytes(shard["name"]))
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [(s["__key__"], s["jpg"], json.loads(s["json"])) for s in dataset]


def ingest_files(out) -> dict[str, bytes]:
    """Every output file's bytes (what resume must reproduce exactly)."""
    files = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, out)
            if not rel.startswith(".tmp"):
                files[rel] = open(path, "rb").read()
    return files


def test_folder_source_labels_shards_and_metadata_alignment(tmp_path):
    make_folder(tmp_path / "imgs")
    result = run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), shard_size=10,
                                     workers=2))
    assert result.counts["ok"] == 36 and result.num_shards == 4 and result.num_samples == 36
    samples = read_back(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    assert [s[0] for s in samples] == [row["key"] for row in table]
    assert sorted({s[2]["label"] for s in samples}) == ["cat", "dog", "owl"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [10, 10, 10, 6]
    for row in table:  # offsets give random access to each JPEG inside its tar
        with open(tmp_path / "out" / manifest["shards"][row["shard"]]["name"], "rb") as handle:
            handle.seek(row["offset"])
            assert Image.open(io.BytesIO(handle.read(row["size"]))).size == (row["width"], row["height"])
    assert [row["position"] for row in table[:11]] == list(range(10)) + [0]


def test_tar_source_equals_folder_source(tmp_path):
    make_folder(tmp_path / "imgs" / "train", num_per_class=5)
    with tarfile.open(tmp_path / "imgs.tar", "w") as archive:
        archive.add(tmp_path / "imgs" / "train", arcname="train")
    run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "a"), workers=0))
    run_ingest(IngestConfig(images=str(tmp_path / "imgs.tar"), out=str(tmp_path / "b"), workers=0))
    assert read_back(str(tmp_path / "a")) == read_back(str(tmp_path / "b"))


def test_the_spool_file_is_new_and_never_followed_through_a_symlink(tmp_path):
    """The spool of a streamed tar is created, not opened: a symlink planted at its name is refused and the
    file it points at stays as it was."""
    from dataengine.ingest.order import ingest_order
    from dataengine.sources import Row

    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    spool = tmp_path / "spool"
    spool.symlink_to(target)
    rows = iter([Row(index=0, path="cat/a.jpg", data=b"jpeg bytes")])
    with pytest.raises(FileExistsError):
        list(ingest_order(rows, shuffle=True, seed=0, spool_path=str(spool)))
    assert target.read_text() == "keep me"

def test_folder_and_tar_inputs_are_written_in_a_seeded_permutation_recorded_in_the_manifest(tmp_path):
    """A class-sorted folder is written permuted by default (the same bytes for the same seed, another order
    for another seed), in input order with --no-shuffle; a streamed tar (.tar.gz, its bytes spooled) gives the
    same permutation as the folder it was made from."""
    make_folder(tmp_path / "imgs", num_per_class=8)
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as archive:
        for name in ("cat", "dog", "owl"):
            archive.add(tmp_path / "imgs" / name, arcname=name)

    def ingest(out, images="imgs", **options):
        run_ingest(IngestConfig(images=str(tmp_path / images), out=str(tmp_path / out), shard_size=10,
                                workers=0, **options))
        return [sample[2]["label"] for sample in read_back(str(tmp_path / out))]

    in_order = ingest("plain", shuffle=False)
    assert in_order == sorted(in_order)
    labels = ingest("a")
    assert sorted(labels) == in_order and labels != in_order
    assert max(len(set(labels[i:i + 10])) for i in range(0, 24, 10)) == 3  # every shard mixes the classes
    ingest("b")
    assert ingest_files(tmp_path / "a") == ingest_files(tmp_path / "b")
    other = ingest("c", seed=1)
    assert sorted(other) == in_order and other != labels
    assert ingest("tar", images="imgs.tar.gz") == labels
    assert [s[0] for s in read_back(str(tmp_path / "tar"))] == [s[0] for s in read_back(str(tmp_path / "a"))]
    assert not os.path.exists(tmp_path / "tar" / ".tmp")  # the spool went with the run's private scratch
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["config"]["shuffle"] is True and manifest["config"]["seed"] == 1
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["config"]["shuffle"] is False
    command = [sys.executable, "-m", "dataengine", "--quiet", "ingest", "--images", str(tmp_path / "imgs"),
               "--shard-size", "10", "--workers", "0"]
    subprocess.run([*command, "--out", str(tmp_path / "cli"), "--no-shuffle"], check=True, capture_output=True)
    subprocess.run([*command, "--out", str(tmp_path / "cli-1"), "--seed", "1"], check=True, capture_output=True)
    assert [s[2]["label"] for s in read_back(str(tmp_path / "cli"))] == in_order
    assert [s[2]["label"] for s in read_back(str(tmp_path / "cli-1"))] == other


def test_yfcc_metadata_keeps_its_order_unless_shuffle_is_asked():
    assert not IngestConfig(yfcc="m.tsv", images="root", out="o").shuffled
    assert IngestConfig(yfcc="m.tsv", images="root", out="o", shuffle=True).shuffled
    assert IngestConfig(images="folder", out="o").shuffled
    assert IngestConfig(images="folder", out="o", seed=3).output_config()["seed"] == 3
    assert IngestConfig(images="folder", out="o", shuffle=False, seed=3).output_config()["seed"] == 0
    with pytest.raises(ValueError, match="seed"):
        IngestConfig(images="folder", out="o", seed=-1)


def test_an_ingest_recorded_before_the_order_option_resumes_as_unshuffled(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=3)
    config = IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), workers=0, shuffle=False)
    run_ingest(config)
    recorded = json.loads((tmp_path / "out" / "ingest_config.json").read_text())
    del recorded["shuffle"], recorded["seed"]
    (tmp_path / "out" / "ingest_config.json").write_text(json.dumps(recorded))
    assert run_ingest(config).resumed_shards == 1
    with pytest.raises(OutputExistsError):
        run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), workers=0))


def test_corrupt_duplicate_and_unsupported_images_are_recorded(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=4, classes=("x",))
    good = (tmp_path / "imgs" / "x" / "000.jpg").read_bytes()
    (tmp_path / "imgs" / "x" / "dup.jpg").write_bytes(good)
    (tmp_path / "imgs" / "x" / "empty.jpg").write_bytes(b"")
    (tmp_path / "imgs" / "x" / "text.jpg").write_bytes(b"not an image")
    (tmp_path / "imgs" / "x" / "trunc.jpg").write_bytes(_jpeg(7, (300, 300))[:900])
    (tmp_path / "imgs" / "x" / "notes.txt").write_text("ignored: no image extension")
    result = run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), workers=0))
    assert result.counts["ok"] == 4 and result.counts["duplicate"] == 1 and result.counts["corrupt"] == 3
    ledger = [json.loads(line) for line in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 8 and [e["row"] for e in ledger] == list(range(8))
    errors = {e["status"]: e["error"] for e in ledger if e["status"] != "ok"}
    assert "same bytes as" in errors["duplicate"]
    kept = run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "keep"), workers=0,
                                   keep_duplicates=True))
    assert kept.counts["ok"] == 5 and kept.counts["duplicate"] == 0


def test_yfcc_metadata_with_images_root(tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(12):
        lines.append(yfcc_line(1000 + i, i))
        if i != 3:  # photo 1003 has no file: missing
            (tmp_path / "img" / f"{1000 + i}.jpg").write_bytes(_jpeg(i))
    lines.append(yfcc_line(2000, 12, marker="1"))  # a video
    lines.append("only\tthree\tfields")  # bad metadata
    lines.append(yfcc_line(1001, 14))  # the same photo id again
    (tmp_path / "img" / "2000.jpg").write_bytes(_jpeg(99))
    (tmp_path / "meta.tsv").write_text("\n".join(lines) + "\n")
    result = run_ingest(IngestConfig(yfcc=str(tmp_path / "meta.tsv"), images=str(tmp_path / "img"),
                                     out=str(tmp_path / "out"), shard_size=5, workers=1))
    assert result.counts == {"ok": 11, "missing": 1, "corrupt": 0, "duplicate": 0, "video": 1,
                             "bad_metadata": 2, "download_failed": 0, "filtered": 0}
    samples = read_back(str(tmp_path / "out"))
    assert [s[0] for s in samples] == [str(1000 + i) for i in range(12) if i != 3]
    meta = samples[0][2]
    assert meta["tags"] == ["a", "b c"] and meta["user"] == "123@N00" and meta["device"] == "NIKON D90"
    assert meta["lat"] is None and meta["date_taken"] == "2010-05-01 10:00:00" and meta["sha256"]


def test_rerun_of_a_complete_ingest_is_a_no_op_and_config_changes_are_refused(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=3)
    config = IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), workers=0)
    run_ingest(config)
    before = ingest_files(tmp_path / "out")
    again = run_ingest(config)
    assert again.resumed_shards == again.num_shards and ingest_files(tmp_path / "out") == before
    with pytest.raises(OutputExistsError):
        run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), workers=0, quality=50))
    redone = run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), workers=0,
                                     quality=50, overwrite=True))
    assert redone.counts["ok"] == 9


def test_unusable_input_fails_clearly(tmp_path):
    (tmp_path / "meta.tsv").write_text("bad\tline\n")
    with pytest.raises(InputUnusableError):
        run_ingest(IngestConfig(yfcc=str(tmp_path / "meta.tsv"), images=str(tmp_path), out=str(tmp_path / "o"),
                                workers=0))
    with pytest.raises(ValueError, match="shard_size"):
        IngestConfig(images="x", out="y", shard_size=0)


def test_multi_node_parts_merge_into_one_manifest(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=10)
    single = run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "one"), workers=0,
                                     shard_size=4, split_rows=5))
    for rank in (1, 0):
        result = run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "two"), workers=0,
                                         shard_size=4, split_rows=5, num_nodes=2, node_rank=rank))
        assert result.complete == (rank == 0)
    manifest = merge(str(tmp_path / "two"))
    assert manifest["counts"] == single.counts and manifest["num_samples"] == 30
    keys_one = sorted(s[0] for s in read_back(str(tmp_path / "one")))
    keys_two = [s[0] for s in read_back(str(tmp_path / "two"))]
    assert sorted(keys_two) == keys_one and len(set(keys_two)) == 30
    assert manifest["shards"][0]["name"].startswith("shards/shard-r000-")


# ------------------------------------------------------------------------------------------ object storage


def test_input_and_output_on_s3(tmp_path, s3_server, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    make_folder(tmp_path / "imgs", num_per_class=4)
    fs.put(str(tmp_path / "imgs"), f"{s3_bucket}/imgs", recursive=True)
    lines = [yfcc_line(i, i) for i in range(6)]
    for i in range(6):
        fs.pipe(f"{s3_bucket}/photos/{i}.jpg", _jpeg(i))
    fs.pipe(f"{s3_bucket}/meta.tsv.gz", gzip.compress(("\n".join(lines) + "\n").encode()))
    local = run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "local"), workers=0))
    remote = run_ingest(IngestConfig(images=f"{s3_bucket}/imgs", out=f"{s3_bucket}/out", workers=1,
                                     storage_options=s3_server, shard_size=5))
    assert remote.counts == local.counts and fs.exists(f"{s3_bucket}/out/manifest.json")
    assert [s[1] for s in read_back(f"{s3_bucket}/out", s3_server, str(tmp_path))] == [s[1] for s in read_back(str(tmp_path / "local"))]
    yf = run_ingest(IngestConfig(yfcc=f"{s3_bucket}/meta.tsv.gz", images=f"{s3_bucket}/photos",
                                 out=f"{s3_bucket}/yfcc-out", workers=0, storage_options=s3_server))
    assert yf.counts["ok"] == 6


# ------------------------------------------------------------------------------------------ SIGKILL resume


def _ingest_cmd(images, out):
    return [sys.executable, "-m", "dataengine", "--quiet", "ingest", "--images", str(images), "--out",
            str(out), "--shard-size", "7", "--workers", "1"]


def test_resume_after_sigkill_gives_identical_output(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=40, classes=("a", "b", "c"))
    (tmp_path / "imgs" / "a" / "zz-dup.jpg").write_bytes((tmp_path / "imgs" / "b" / "000.jpg").read_bytes())
    (tmp_path / "imgs" / "c" / "bad.jpg").write_bytes(b"junk")
    subprocess.run(_ingest_cmd(tmp_path / "imgs", tmp_path / "ref"), check=True)
    reference = ingest_files(tmp_path / "ref")
    rng = random.Random(0)
    interrupted = 0
    for trial in range(4):
        out = tmp_path / f"run{trial}"
        for _ in range(1 + trial % 2):  # one or two kills before completing
            proc = subprocess.Popen(_ingest_cmd(tmp_path / "imgs", out))
            target = rng.randint(1, 12)
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None:
                done = len(os.listdir(out / "stats")) if (out / "stats").exists() else 0
                if done >= target:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            interrupted += not (out / "manifest.json").exists()
        subprocess.run(_ingest_cmd(tmp_path / "imgs", out), check=True)
        assert ingest_files(out) == reference, f"trial {trial} differs from the uninterrupted run"
    assert interrupted >= 3, "the kills should land before the run completes"


# ------------------------------------------------------------------------------------------ synthetic corpus


def test_synth_corpus_round_trips_through_ingest(tmp_path):
    from dataengine import yfcc
    from dataengine.synth import SynthConfig, generate_corpus

    summary = generate_corpus(str(tmp_path / "corpus"), SynthConfig(num_images=300, seed=3))
    result = run_ingest(IngestConfig(yfcc=str(tmp_path / "corpus" / "metadata.tsv"),
                                     images=str(tmp_path / "corpus" / "images"), out=str(tmp_path / "out"),
                                     shard_size=64, workers=2))
    assert result.counts == {status: summary.expected_counts.get(status, 0) for status in result.counts}
    records = {r.photo_id: r for r in yfcc.iter_records(str(tmp_path / "corpus" / "metadata.tsv"))}
    samples = read_back(str(tmp_path / "out"))
    assert len(samples) == result.counts["ok"]
    fields = ("user", "nickname", "date_taken", "date_uploaded", "device", "title", "tags", "machine_tags",
              "lat", "lon", "accuracy", "license", "download_url", "marker")
    for key, _, meta in samples:
        record = records[int(key)].to_dict()
        assert {f: meta[f] for f in fields} == {f: record[f] for f in fields}
    table = pq.read_table(tmp_path / "out" / "metadata.parquet")
    assert table["key"].to_pylist() == [s[0] for s in samples]
    assert table["tags"].to_pylist() == [s[2]["tags"] for s in samples]


# ------------------------------------------------------------------------------------------ worker transport


def _noise_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


# Every file of an ingest output but its scratch folder, for scripts run in a fresh interpreter.
_FILES = """
import os

def files(out):
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), out)
            if not rel.startswith(".tmp"):
                found[rel] = open(os.path.join(folder, name), "rb").read()
    return found
"""

_ARENA_CHECK = _FILES + """
import os, sys, threading
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.ingest.pipeline import blocks_of, ordered_results
from dataengine.sources import iter_rows

root = sys.argv[1]
assert threading.active_count() == 1  # fork, hence the shared arena
outputs = {}
for workers in (0, 2):
    config = IngestConfig(images=f"{root}/imgs", out=f"{root}/w{workers}", workers=workers, shard_size=9,
                          block_rows=2, image_size=2048)
    result = run_ingest(config)
    assert result.counts["ok"] == 40 and result.counts["duplicate"] == 1 and result.counts["corrupt"] == 1
    outputs[workers] = files(f"{root}/w{workers}")
assert outputs[0] == outputs[2], "the pool's output differs from the in-process run's"
kinds, kept = {}, None
for samples in ordered_results(config, blocks_of(iter_rows(None, config.images, {}), config.block_rows)):
    if isinstance(kept, memoryview):  # a view kept past its block is released, not reading a reused slot
        try:
            bytes(kept)
        except ValueError:
            kept = False
        else:
            raise AssertionError("a member view outlived its block")
    for sample in samples:
        if sample.status == "ok":
            kinds.setdefault(sample.metadata["source"].startswith("b/big"), set()).add(type(sample.member))
            if kept is None and isinstance(sample.member, memoryview):
                assert bytes(sample.member[257:262]) == b"ustar"
                kept = sample.member
assert kinds == {True: {bytes}, False: {memoryview}}, kinds  # both ways were taken
assert kept is False
print("ok")
"""


def test_shared_arena_and_pickled_members_give_identical_output(tmp_path):
    # Blocks of 2 rows with 2 workers: 20 blocks through 8 arena slots (each reused), and noise images whose
    # members (> 1 MiB) do not fit a slot and travel pickled; the output must equal the in-process run's.
    # In a fresh interpreter: threads left by other tests (s3fs, http server) would make the pool spawn.
    make_folder(tmp_path / "imgs", num_per_class=12, classes=("a", "b", "c"))
    for i in range(4):
        (tmp_path / "imgs" / "b" / f"big{i}.jpg").write_bytes(_noise_jpeg(i, (1600, 1100)))
    (tmp_path / "imgs" / "c" / "zz-dup.jpg").write_bytes((tmp_path / "imgs" / "a" / "003.jpg").read_bytes())
    (tmp_path / "imgs" / "c" / "zz-bad.jpg").write_bytes(b"junk")
    result = subprocess.run([sys.executable, "-c", _ARENA_CHECK, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


_DEAD_WORKER_CHECK = _FILES + """
import multiprocessing, os, signal, sys
import dataengine.ingest as ingest
from dataengine.ingest import pipeline
from dataengine.workers import WorkerDiedError

root = sys.argv[1]
original = pipeline.process_block

def dying(rows, slot=-1):  # the worker that gets row 20 is killed, once (an out-of-memory kill, say)
    if any(row.index == 20 for row in rows) and not os.path.exists(f"{root}/died"):
        open(f"{root}/died", "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return original(rows, slot)

def config(out):
    return ingest.IngestConfig(images=f"{root}/imgs", out=f"{root}/{out}", workers=2, shard_size=7, block_rows=2)

ingest.run_ingest(config("ref"))
pipeline.process_block = dying
try:
    ingest.run_ingest(config("out"))
except WorkerDiedError as exc:
    assert "SIGKILL" in str(exc), exc
else:
    raise AssertionError("the killed worker went unnoticed")
assert not multiprocessing.active_children()
assert os.path.exists(f"{root}/out/stats") and not os.path.exists(f"{root}/out/manifest.json")
result = ingest.run_ingest(config("out"))  # the same command again resumes
assert result.resumed_shards >= 1, result
assert files(f"{root}/out") == files(f"{root}/ref"), "the resumed output differs from an uninterrupted run"
print("ok")
"""


def test_a_killed_worker_stops_the_run_which_then_resumes_to_identical_output(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=12, classes=("a", "b", "c"))
    result = subprocess.run([sys.executable, "-c", _DEAD_WORKER_CHECK, str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ------------------------------------------------------------------------------------------ hostile metadata


def test_hostile_metadata_rows_get_a_status_and_never_stop_the_run(tmp_path):
    """Each of these rows alone used to stop the whole run (and every re-run) with a traceback."""
    root = tmp_path / "img"
    root.mkdir()
    rows = {  # photo id -> (fields, expected status)
        100: ({"extension_original": "jpg/x"}, "ok"),  # '100.jpg/x': not a directory
        101: ({"extension_original": "j" * 300}, "ok"),  # a name longer than NAME_MAX
        102: ({"extension_original": "", "download_url": "http://h/1/a%00b.jpg"}, "ok"),  # NUL in a file name
        103: ({"accuracy": "3000000000", "longitude": "1.5", "latitude": "2.5"}, "ok"),  # int32 overflow
        104: ({"date_uploaded": str(2**63)}, "ok"),  # int64 overflow
        105: ({"extension_original": "..", "download_url": "http://h/1/.."}, "ok"),
        106: ({"extension_original": "jpg\\..\\x"}, "ok"),
    }
    lines = [yfcc_line(photo_id, i, **fields) for i, (photo_id, (fields, _)) in enumerate(rows.items())]
    lines.append(yfcc_line(2**63, 90))  # the key itself does not fit int64
    lines.append(yfcc_line("+107", 91))  # not canonical: '107' would be another key for the same text
    for photo_id in rows:
        (root / f"{photo_id}.jpg").write_bytes(_jpeg(photo_id))
    (root / "107.jpg").write_bytes(_jpeg(107))
    (tmp_path / "meta.tsv").write_text("\n".join(lines) + "\n")
    config = IngestConfig(yfcc=str(tmp_path / "meta.tsv"), images=str(root), out=str(tmp_path / "out"), workers=0)
    result = run_ingest(config)
    assert result.counts["ok"] == len(rows) and result.counts["bad_metadata"] == 2, result.counts
    table = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    by_key = {row["key"]: row for row in table}
    assert by_key["103"]["accuracy"] is None and by_key["104"]["date_uploaded"] is None
    assert {row["source"] for row in table} == {f"{photo_id}.jpg" for photo_id in rows}
    assert run_ingest(config).counts == result.counts  # the re-run is a no-op, not a crash


# ------------------------------------------------------------------------------------------ bad inputs as a whole


def test_a_metadata_folder_or_a_broken_gz_is_one_named_error_and_creates_nothing(tmp_path):
    from dataengine.errors import InputCorruptError

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.jpg").write_bytes(_jpeg(1))
    lines = "\n".join(yfcc_line(i, i) for i in range(400)) + "\n"
    compressed = gzip.compress(lines.encode())
    (tmp_path / "cut.tsv.gz").write_bytes(compressed[: len(compressed) // 2])
    (tmp_path / "plain.tsv.gz").write_text(lines)  # not gzip at all
    (tmp_path / "meta.d").mkdir()
    cases = [("meta.d", InputUnusableError, "is a folder"), ("nope.tsv", InputUnusableError, "does not exist"),
             ("plain.tsv.gz", InputCorruptError, "Not a gzipped file")]
    for name, error, message in cases:
        out = tmp_path / f"out-{name}"
        with pytest.raises(error, match=message):
            run_ingest(IngestConfig(yfcc=str(tmp_path / name), images=str(tmp_path / "img"), out=str(out), workers=0))
        assert not out.exists(), f"{name}: a failed input check created {out}"
    with pytest.raises(InputCorruptError, match="cut.tsv.gz: truncated or corrupt compressed data"):
        run_ingest(IngestConfig(yfcc=str(tmp_path / "cut.tsv.gz"), images=str(tmp_path / "img"),
                                out=str(tmp_path / "out-cut"), workers=1))
    for name in ("meta.d", "cut.tsv.gz"):  # through the command: one line, no traceback
        result = subprocess.run([sys.executable, "-m", "dataengine", "ingest", "--yfcc", str(tmp_path / name),
                                 "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o2"), "--workers", "0"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr and name in result.stderr, result.stderr


def test_a_failed_command_does_not_make_the_corrected_one_refuse_the_output(tmp_path):
    from dataengine.errors import InputCorruptError

    make_folder(tmp_path / "imgs" / "train", num_per_class=2)
    with tarfile.open(tmp_path / "good.tar", "w") as archive:
        archive.add(tmp_path / "imgs" / "train", arcname="train")
    out = str(tmp_path / "x")
    with pytest.raises(InputUnusableError, match="nope.tar does not exist"):
        run_ingest(IngestConfig(images=str(tmp_path / "nope.tar"), out=out, workers=0))
    assert not os.path.exists(out)
    # An input that fails only once it is read (a corrupt first header) leaves a config but no work...
    (tmp_path / "bad.tar").write_bytes(b"\x01" * 1024)
    with pytest.raises(InputCorruptError):
        run_ingest(IngestConfig(images=str(tmp_path / "bad.tar"), out=out, workers=0))
    # ...which does not bind the corrected command either.
    assert run_ingest(IngestConfig(images=str(tmp_path / "good.tar"), out=out, workers=0)).counts["ok"] == 6
    # Done work still binds, and --overwrite with an input that does not exist destroys nothing.
    with pytest.raises(OutputExistsError):
        run_ingest(IngestConfig(images=str(tmp_path / "imgs"), out=out, workers=0))
    before = ingest_files(out)
    with pytest.raises(InputUnusableError):
        run_ingest(IngestConfig(images=str(tmp_path / "typo.tar"), out=out, workers=0, overwrite=True))
    assert ingest_files(out) == before


@pytest.mark.timeout(60)
def test_metadata_from_a_pipe_is_read_from_its_first_byte(tmp_path):
    """``--yfcc <(zcat meta.gz)`` gives a pipe: checking the input must not consume any of it."""
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
    fifo = tmp_path / "meta.pipe"
    os.mkfifo(fifo)
    text = "\n".join(yfcc_line(i, i) for i in range(3)) + "\n"
    writer = threading.Thread(target=lambda: fifo.write_text(text), daemon=True)
    writer.start()
    result = run_ingest(IngestConfig(yfcc=str(fifo), images=str(tmp_path / "img"), out=str(tmp_path / "out"),
                                     workers=0))
    writer.join(timeout=10)
    assert result.counts["ok"] == 3 and result.counts["bad_metadata"] == 0, result.counts


@pytest.mark.timeout(60)
def test_an_images_tar_from_a_pipe_is_streamed(tmp_path):
    make_folder(tmp_path / "imgs" / "train", num_per_class=2)
    with tarfile.open(tmp_path / "imgs.tar", "w") as archive:
        archive.add(tmp_path / "imgs" / "train", arcname="train")
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes((tmp_path / "imgs.tar").read_bytes()), daemon=True)
    writer.start()
    result = run_ingest(IngestConfig(images=str(fifo), out=str(tmp_path / "out"), workers=0))
    writer.join(timeout=10)
    reference = run_ingest(IngestConfig(images=str(tmp_path / "imgs.tar"), out=str(tmp_path / "ref"), workers=0))
    assert result.counts == reference.counts and result.counts["ok"] == 6
    assert read_back(str(tmp_path / "out")) == read_back(str(tmp_path / "ref"))
