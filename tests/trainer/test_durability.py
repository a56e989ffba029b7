"""A training run killed at any step of a re-clustering, a checkpoint write or an epoch's end resumes to the
uninterrupted run's weights, metrics.jsonl and run folder.

Each case runs the trainer in a child process that ``os._exit``s (no cleanup, no ``finally``: as a SIGKILL) at
a named milestone (:data:`trainer.loop.Milestone`), then resumes it in a fresh child process. The run has three
epochs and re-clusters at each, so the third re-clustering has a previous clustering and removes the first
one's feature store. Every case starts from a copy of the run folder the uninterrupted run had when its second
epoch was saved (taken by the reference run itself), so that only the third epoch is computed per case.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import pytest
import torch

from trainer.run_folder import RunFolder

# Run in a forkserver child that has the trainer imported already (a fresh interpreter spends ~20 s importing
# torch on a busy machine); ``exec`` of source text needs nothing importable from this test module.
CHILD = """
import json, os, shutil
import trainer.run_folder
from trainer.config import TrainConfig
from trainer.loop import run_train
values, point, nth, snapshot, part_bytes = json.loads(ARGS)
trainer.run_folder.UPLOAD_PART_BYTES = part_bytes or trainer.run_folder.UPLOAD_PART_BYTES
seen = []
def milestone(name):
    seen.append(name)
    if name == point and seen.count(name) == nth:
        if not snapshot:
            os._exit(137)
        shutil.copytree(values["out"], snapshot)
run_train(TrainConfig.from_flat(values), milestone=milestone)
"""
PRELOAD = ["torch", "torch._dynamo", "faiss", "trainer.loop", "trainer.monitor", "dataengine.embed",
           "dataengine.cluster"]
# (milestone, occurrence counted from the start of the third epoch)
POINTS = [("recluster.backbone_saved", 1), ("recluster.embed_block", 1), ("recluster.embedded", 1),
          ("recluster.clustered", 1), ("checkpoint.written", 1), ("recluster.checkpointed", 1),
          ("recluster.dropping", 1), ("checkpoint.written", 2), ("epoch.ending", 1), ("epoch.saved", 1)]
TIMING = ("samples_per_second", "seconds")


def _values(shards: str, out) -> dict:
    return dict(shards=shards, out=str(out), mode="deepercluster", arch="small", image_size=32, epochs=3,
                reassign_every=1, levels=[2, 3], pca_dim=16, kmeans_iterations=3, batch_size=16, workers=0,
                buffer_size=64, num_threads=1, checkpoint_every=3)


def _train(values: dict, point: str = "", nth: int = 0, snapshot: str = "", part_bytes: int = 0) -> int:
    """Exit code of a training run in a fresh process: 0, or 137 when it died at the ``nth`` ``point``; with
    ``snapshot``, the run copies its folder there at that point instead and goes on. ``part_bytes`` sets the
    part size of multipart uploads to object storage."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    args = json.dumps([values, point, nth, snapshot, part_bytes])
    child = context.Process(target=exec, args=(CHILD, {"ARGS": args}))
    child.start()
    child.join(timeout=600)
    assert child.exitcode in (0, 137), f"exit code {child.exitcode} (its traceback is in the captured stderr)"
    return child.exitcode


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    return value


def _outcome(out, storage_options: dict | None = None) -> dict:
    """The run folder's checkpointed weights, metrics without timings, files and feature stores (local or
    remote)."""
    folder = RunFolder(str(out), storage_options)
    state = folder.load("checkpoint.pt")
    metrics = [_without_timing(json.loads(line)) for line in folder.location.read_bytes("metrics.jsonl").splitlines()]
    return {"weights": {**state["backbone"], **{f"head.{k}": v for k, v in state["head"].items()}},
            "metrics": metrics, "files": folder.listdir(), "stores": folder.listdir("features")}


def _same_run(got: dict, expected: dict) -> None:
    assert got["metrics"] == expected["metrics"]
    assert (got["files"], got["stores"]) == (expected["files"], expected["stores"])
    assert got["weights"].keys() == expected["weights"].keys()
    for name, tensor in expected["weights"].items():
        assert torch.equal(tensor, got["weights"][name]), name


@pytest.fixture(scope="module")
def reference(train_shards, tmp_path_factory):
    """``(values, snapshot folder, outcome)`` of the uninterrupted run; cases run in its folder again."""
    root = tmp_path_factory.mktemp("durability")
    values, snapshot = _values(train_shards, root / "run"), str(root / "after-epoch-1")
    assert _train(values, "epoch.saved", 2, snapshot) == 0
    outcome = _outcome(values["out"])
    assert len(outcome["metrics"]) == 3 and outcome["stores"] == ["epoch001", "epoch002"]
    return values, snapshot, outcome


@pytest.mark.parametrize("point, nth", POINTS)
def test_a_kill_at_any_step_resumes_to_the_uninterrupted_run(reference, point, nth):
    values, snapshot, expected = reference
    shutil.rmtree(values["out"], ignore_errors=True)
    shutil.copytree(snapshot, values["out"])
    assert _train(values, point, nth) == 137, f"the run was to die at {point} #{nth}"
    assert _train(values) == 0
    _same_run(_outcome(values["out"]), expected)


def test_a_run_folder_moved_elsewhere_resumes_there(reference, tmp_path):
    """The run folder is no part of the run's identity: a folder killed in the middle of an embedding, then
    moved, resumes at its new place to the uninterrupted run (its checkpoint and its half-made feature store
    are accepted there)."""
    values, snapshot, expected = reference
    shutil.rmtree(values["out"], ignore_errors=True)
    shutil.copytree(snapshot, values["out"])
    assert _train(values, "recluster.embed_block", 1) == 137
    moved = dict(values, out=str(tmp_path / "elsewhere" / "run"))
    shutil.move(values["out"], moved["out"])
    assert _train(moved) == 0
    _same_run(_outcome(moved["out"]), expected)


def _upload(folder: str, url: str, storage_options: dict) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            fs.put_file(os.path.join(root, name), f"{url}/{rel}")


def _multipart_uploads(url: str, storage_options: dict) -> list:
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    bucket, prefix, _ = fs.split_path(url)
    return fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/").get("Uploads", [])


def test_a_run_on_object_storage_killed_during_an_upload_resumes_to_the_local_run(reference, s3_bucket, s3_server,
                                                                                  monkeypatch):
    """``--out s3://...``: the run folder after two epochs (the local run's, uploaded) re-clusters on object
    storage, is killed between two parts of the multipart upload of its second checkpoint in the epoch, and
    resumed: the previous checkpoint (the re-clustering's) stays what is read, the resumed run aborts the
    incomplete upload, and the outcome is the local uninterrupted run's. (Every other milestone is the same
    code path as locally, tested above; one case against moto takes ~100 s on a busy machine.)"""
    values, snapshot, expected = reference
    remote = dict(values, out=f"{s3_bucket}/runs/a", storage_options=s3_server)
    _upload(snapshot, remote["out"], s3_server)
    # Parts far below S3's 5 MiB minimum, so that the small test checkpoint is uploaded in several.
    monkeypatch.setattr("moto.s3.models.S3_UPLOAD_PART_MIN_SIZE", 1)
    assert _train(remote, "checkpoint.uploading", 2, part_bytes=64 << 10) == 137
    assert len(_multipart_uploads(remote["out"], s3_server)) == 1
    state = RunFolder(remote["out"], s3_server).load("checkpoint.pt")
    assert (state["epoch"], state["step"], state["clustering"]) == (2, 0, "epoch002")
    assert _train(remote) == 0
    _same_run(_outcome(remote["out"], s3_server), expected)
    assert _multipart_uploads(remote["out"], s3_server) == []
