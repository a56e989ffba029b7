"""The training loop on a tiny synthetic ingest: every mode, metrics, checkpoints, SIGKILL resume, 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer.config import TrainConfig
from trainer.loop import run_train


@pytest.fixture()
def shards(train_shards) -> str:
    return train_shards


def _config(shards: str, out, **kwargs) -> TrainConfig:
    values = dict(shards=shards, out=str(out), mode="deepercluster", arch="small", image_size=32, epochs=2,
                  reassign_every=1, levels=(2, 3), pca_dim=16, kmeans_iterations=3, batch_size=16, workers=0,
                  buffer_size=64, num_threads=1, checkpoint_every=3)
    values.update(kwargs)
    return TrainConfig.from_flat(values)


def test_deepercluster_logs_metrics_and_writes_an_embeddable_checkpoint(shards, tmp_path):
    result = run_train(_config(shards, tmp_path / "run"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1] and result.epochs == 2
    for key in ("loss", "loss_super", "loss_sub", "rotation_acc", "cluster_acc", "samples_per_second"):
        assert key in lines[0]
    assert set(lines[0]["clustering"]["nmi"]) >= {"user", "device", "gps", "hashtag"}
    assert "nmi_previous" in lines[1]["clustering"]
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["arch"] == "small" and state["sobel"] is True and state["epoch"] == 2
    from dataengine.models import load_checkpoint

    load_checkpoint(result.checkpoint)  # what `dataengine embed --checkpoint RUN` reads


@pytest.mark.parametrize("mode, levels", [("rotnet", (2, 3)), ("deepcluster", (5,)), ("clusterfit", (5,))])
def test_other_modes_train(shards, tmp_path, mode, levels):
    init = None
    if mode == "clusterfit":
        init = run_train(_config(shards, tmp_path / "rot", mode="rotnet", epochs=1)).checkpoint
    result = run_train(_config(shards, tmp_path / mode, mode=mode, levels=levels, epochs=1, features_from=init))
    record = json.loads((tmp_path / mode / "metrics.jsonl").read_text().splitlines()[-1])
    assert result.steps > 0 and record["steps"] > 0
    assert ("rotation_acc" in record) == (mode == "rotnet") and ("clustering" in record) == (mode != "rotnet")


def test_bad_configs_are_refused(shards, tmp_path):
    with pytest.raises(ValueError, match="two levels"):
        _config(shards, tmp_path, levels=(4,))
    with pytest.raises(ValueError, match="features-from"):
        _config(shards, tmp_path, mode="clusterfit", levels=(4,))


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_the_run_and_counts_across_resumes(shards, tmp_path, clock):
    # Through the CLI, each run in its own process: the CPU clock counts every thread of the process, and
    # pytest's process carries the threads of earlier tests (servers, thread pools).
    command = [sys.executable, "-m", "dataengine", "--quiet", "train", shards, "--out", str(tmp_path / clock),
               "--mode", "rotnet", "--arch", "small", "--image-size", "32", "--epochs", "500", "--batch-size", "16",
               "--workers", "0", "--threads", "1", "--checkpoint-every", "3", "--time-budget", "2",
               "--budget-clock", clock, "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = json.loads(_run_ok(command, env).splitlines()[-1])
    state = torch.load(first["checkpoint"], weights_only=True)
    assert 0 < first["epochs"] < 500 and state["elapsed"] >= 2.0, (first, state["elapsed"])
    again = json.loads(_run_ok(command, env).splitlines()[-1])  # the budget is spent: a resume trains no further
    assert (again["epochs"], again["steps"]) == (first["epochs"], first["steps"])
    with pytest.raises(ValueError, match="budget_clock"):
        _config(shards, tmp_path, budget_clock="gpu")


def test_cpu_clock_counts_live_and_finished_child_processes():
    from trainer.budget import CpuClock

    process_tree_cpu_seconds = CpuClock()
    before = process_tree_cpu_seconds()
    burn = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\nsys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE)
    deadline = time.time() + 60
    while process_tree_cpu_seconds() - before < 1.0 and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the child must still be alive: its CPU time came from /proc"
    assert process_tree_cpu_seconds() - before >= 1.0
    child.stdin.close()
    child.wait()
    assert process_tree_cpu_seconds() - before >= 1.0


def _train_cmd(shards: str, out) -> list[str]:
    return [sys.executable, "-m", "dataengine", "--quiet", "train", shards, "--out", str(out), "--arch", "small",
            "--image-size", "32", "--epochs", "2", "--reassign-every", "1", "--levels", "2,3", "--pca", "16",
            "--batch-size", "16", "--workers", "1", "--checkpoint-every", "2", "--threads", "1", "--json"]


def _run_ok(cmd: list[str], env: dict[str, str]) -> str:
    """Run a command that must succeed; its stdout (its stderr is shown if it fails)."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def _weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {**state["backbone"], **{f"head.{k}": v for k, v in state["head"].items()}}


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(shards, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    _run_ok(_train_cmd(shards, tmp_path / "ref"), env)
    proc = subprocess.Popen(_train_cmd(shards, tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["total_steps"] >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] < 2, "the kill should land before the run ends"
    _run_ok(_train_cmd(shards, tmp_path / "cut"), env)
    reference, resumed = _weights(tmp_path / "ref" / "checkpoint.pt"), _weights(checkpoint)
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def _rank_main(rank: int, world_size: int, port: int, config: TrainConfig) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        run_train(config)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_train_in_step(shards, tmp_path, free_port):
    config = _config(shards, tmp_path / "ddp", epochs=1)
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port, config), nprocs=2, join=True)
    record = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["steps"] > 0 and "clustering" in record
    assert torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def _flat_v1(config: TrainConfig) -> str:
    """The configuration as a version-1 checkpoint stored it: one flat mapping, storage options left out."""
    nested = config.to_dict()
    flat = {key: nested.pop(key) for key in ("out", "mode", "seed")}
    for section in nested.values():
        flat.update(section)
    return json.dumps(flat)


class _Stop(Exception):
    pass


def _stop_after(steps: int):
    done = [0]

    def progress(_count: int) -> None:
        done[0] += 1
        if done[0] == steps:
            raise _Stop

    return progress


def test_a_run_folder_with_a_flat_version_1_configuration_resumes(shards, tmp_path):
    config = _config(shards, tmp_path / "run", mode="rotnet", epochs=2)
    reference = run_train(_config(shards, tmp_path / "ref", mode="rotnet", epochs=2))
    with pytest.raises(_Stop):
        run_train(config, progress=_stop_after(4))  # the checkpoint of step 3 is on disk
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["step"], state["version"]) == (0, 3, 2)
    torch.save(dict(state, version=1, config=_flat_v1(config)), path)
    resumed = run_train(config)
    expected, got = _weights(reference.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert torch.load(path, weights_only=True)["version"] == 2


@pytest.mark.parametrize("change, match", [
    (dict(version=1, config=json.dumps({"shards": "x", "out": "y", "learning_rate": 0.1})),
     "stored configuration \\(checkpoint version 1, one flat mapping\\) cannot be read.*learning_rate"),
    (dict(version=3), "version 3; this trainer reads versions 1 and 2"),
    (dict(format="something.else"), "is not a trainer checkpoint"),
])
def test_an_unreadable_checkpoint_is_refused_with_what_is_wrong(shards, tmp_path, change, match):
    config = _config(shards, tmp_path / "run", mode="rotnet", epochs=1)
    with pytest.raises(_Stop):
        run_train(config, progress=_stop_after(4))
    path = tmp_path / "run" / "checkpoint.pt"
    torch.save(dict(torch.load(path, weights_only=True), **change), path)
    with pytest.raises(ValueError, match=match):
        run_train(config)
