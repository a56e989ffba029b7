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

# Run in a forkserver child that has the trainer imported already (a fresh interpreter spends ~20 s importing
# torch on a busy machine); ``exec`` of source text needs nothing importable from this test module.
CHILD = """
import json, os, shutil
from trainer.config import TrainConfig
from trainer.loop import run_train
values, point, nth, snapshot = json.loads(ARGS)
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


def _train(values: dict, point: str = "", nth: int = 0, snapshot: str = "") -> int:
    """Exit code of a training run in a fresh process: 0, or 137 when it died at the ``nth`` ``point``; with
    ``snapshot``, the run copies its folder there at that point instead and goes on."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    child = context.Process(target=exec, args=(CHILD, {"ARGS": json.dumps([values, point, nth, snapshot])}))
    child.start()
    child.join(timeout=600)
    assert child.exitcode in (0, 137), f"exit code {child.exitcode} (its traceback is in the captured stderr)"
    return child.exitcode


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    return value


def _outcome(out) -> dict:
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        metrics = [_without_timing(json.loads(line)) for line in handle]
    return {"weights": {**state["backbone"], **{f"head.{k}": v for k, v in state["head"].items()}},
            "metrics": metrics, "files": sorted(os.listdir(out)),
            "stores": sorted(os.listdir(os.path.join(out, "features")))}


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
    shutil.rmtree(values["out"])
    shutil.copytree(snapshot, values["out"])
    assert _train(values, point, nth) == 137, f"the run was to die at {point} #{nth}"
    assert _train(values) == 0
    got = _outcome(values["out"])
    assert got["metrics"] == expected["metrics"]
    assert (got["files"], got["stores"]) == (expected["files"], expected["stores"])
    assert got["weights"].keys() == expected["weights"].keys()
    for name, tensor in expected["weights"].items():
        assert torch.equal(tensor, got["weights"][name]), name
