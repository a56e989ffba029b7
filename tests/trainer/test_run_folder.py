"""The run folder, local and on object storage (moto): files replaced whole, read back, listed and removed;
leftovers of killed writers cleaned; the checkpoint's identity check; ``dataengine train --out s3://``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from trainer.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, config_json, read_checkpoint_state
from trainer.config import TrainConfig
from trainer.run_folder import RunFolder


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> RunFolder:
    if request.param == "local":
        return RunFolder(str(tmp_path / "run"))
    options = request.getfixturevalue("s3_server")
    return RunFolder(f"{request.getfixturevalue('s3_bucket')}/run", options)


def test_files_are_replaced_read_listed_and_removed(folder):
    folder.make()
    assert folder.load("checkpoint.pt") is None and folder.listdir() == []
    folder.save("checkpoint.pt", {"step": 1, "w": torch.arange(3)})
    folder.save("checkpoint.pt", {"step": 2, "w": torch.arange(4)})
    folder.write_text("metrics.jsonl", "{}\n")
    folder.write_text("features/epoch000/zarr.json", "{}")
    assert folder.load("checkpoint.pt")["step"] == 2
    assert folder.listdir() == ["checkpoint.pt", "features", "metrics.jsonl"]
    folder.remove_tree("features")
    folder.remove("metrics.jsonl")
    folder.remove("metrics.jsonl")  # absent: nothing to do
    assert folder.listdir() == ["checkpoint.pt"] and folder.listdir("features") == []


def test_a_cut_short_file_is_a_one_line_error(folder):
    folder.make()
    folder.save("checkpoint.pt", {"w": torch.zeros(1000)})
    data = folder.location.read_bytes("checkpoint.pt")
    folder.replace("checkpoint.pt", lambda handle: handle.write(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be read as a torch file \(RuntimeError"):
        folder.load("checkpoint.pt")


def test_a_killed_writers_leftovers_are_removed(folder):
    """Locally a temporary that was never renamed; on S3 a multipart upload never completed (invisible)."""
    folder.make()
    if folder.remote:
        fs = folder.location.fs
        bucket, key, _ = fs.split_path(folder.location.path("checkpoint.pt"))
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        assert not folder.exists("checkpoint.pt")
    else:
        with open(os.path.join(folder.url, ".checkpoint.pt.123.abcdef12.tmp"), "wb") as handle:
            handle.write(b"half")
    assert folder.remove_leftovers() == 1
    assert folder.remove_leftovers() == 0 and folder.listdir() == []


def test_a_remote_upload_leaves_no_local_scratch(s3_server, s3_bucket, tmp_path, monkeypatch):
    """The file is built in a private (0700) scratch folder under TMPDIR, removed once uploaded or failed."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    folder = RunFolder(f"{s3_bucket}/run", s3_server)

    def write(handle):
        scratch = os.path.dirname(handle.name)
        seen.append(oct(os.stat(scratch).st_mode & 0o777))
        handle.write(b"x" * 10)

    def fail(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    folder.replace("a.bin", write)
    with pytest.raises(OSError, match="No space left"):
        folder.replace("b.bin", fail)
    assert seen == ["0o700"] and os.listdir(tmp_path) == []
    assert folder.listdir() == ["a.bin"]


def _config(out: str, **change) -> TrainConfig:
    values = dict(shards="ingest", out=out, mode="rotnet", epochs=2)
    values.update(change)
    return TrainConfig.from_flat(values)


def test_the_run_folder_is_no_part_of_the_checkpoint_identity(tmp_path):
    """A run folder moved or copied elsewhere resumes there; any other option changed is refused, by name."""
    folder = RunFolder(str(tmp_path / "moved"))
    folder.make()
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
             "config": config_json(_config(str(tmp_path / "original")))}
    folder.save("checkpoint.pt", state)
    assert read_checkpoint_state(folder, _config(folder.url))["version"] == CHECKPOINT_VERSION
    with pytest.raises(ValueError, match=r"another configuration \(differs in epochs, lr\)"):
        read_checkpoint_state(folder, _config(folder.url, epochs=3, lr=0.1))


def test_train_cli_runs_on_object_storage(train_shards, s3_server, s3_bucket):
    """``dataengine train --out s3://...``: checkpoint and metrics land in the bucket, the summary names them."""
    out = f"{s3_bucket}/rot"
    command = [sys.executable, "-m", "dataengine", "train", train_shards, "--out", out, "--mode", "rotnet",
               "--arch", "small", "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0",
               "--threads", "1", "--storage-options", json.dumps(s3_server), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["checkpoint"] == f"{out}/checkpoint.pt" and summary["metrics"] == f"{out}/metrics.jsonl"
    folder = RunFolder(out, s3_server)
    assert folder.listdir() == ["checkpoint.pt", "metrics.jsonl"]
    assert folder.load("checkpoint.pt")["epoch"] == 1
    assert len(folder.location.read_bytes("metrics.jsonl").splitlines()) == 1
    from dataengine.models import load_checkpoint

    assert load_checkpoint(out, s3_server).arch == "small"  # what `dataengine embed --checkpoint s3://...` reads
