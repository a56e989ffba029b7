"""The training loop on a tiny synthetic ingest: every mode, metrics, checkpoints, SIGKILL resume, 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
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
    from dataengine.clustering import open_clustering
    from dataengine.store import open_store

    clustering = open_clustering(open_store(str(tmp_path / "run" / "features" / "epoch001")), "epoch001")
    assert clustering.attrs["levels"][0]["num_train_rows"] == [160]  # level 0 on every row, not 2 x 256 at most
    assert clustering.config["sample_per_centroid"] == [0, 256]
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["arch"] == "small" and state["sobel"] is True and state["epoch"] == 2
    from dataengine.models import load_checkpoint

    load_checkpoint(result.checkpoint)  # what `dataengine embed --checkpoint RUN` reads


def test_each_epoch_announces_its_steps_before_taking_them(shards, tmp_path):
    starts, steps = [], []
    run_train(_config(shards, tmp_path / "run", mode="rotnet"), progress=steps.append,
              epoch_start=lambda epoch, total, done: starts.append((epoch, total, done, len(steps))))
    assert [(epoch, done) for epoch, _, done, _ in starts] == [(0, 0), (1, 0)] and set(steps) == {1}
    first, second = starts
    assert second[3] - first[3] == first[1] and len(steps) - second[3] == second[1]  # the announced totals


TIMING_FIELDS = {"samples_per_second"}
FIELDS = {"epoch", "loss", "steps", *TIMING_FIELDS}
MODE_FIELDS = {"rotnet": {"rotation_acc"}, "deepcluster": {"cluster_acc", "clustering", "clustering_name"},
               "clusterfit": {"cluster_acc", "clustering", "clustering_name"},
               "deepercluster": {"loss_super", "loss_sub", "super_acc", "sub_acc", "rotation_acc", "cluster_acc",
                                 "clustering", "clustering_name"}}


@pytest.mark.parametrize("mode, levels", [("rotnet", (2, 3)), ("deepcluster", (5,)), ("clusterfit", (5,))])
def test_other_modes_log_their_fields_and_checkpoint_their_head(shards, tmp_path, mode, levels):
    from dataengine.models import load_checkpoint, weights_digest
    from dataengine.store import open_store

    init = None
    if mode == "clusterfit":
        init = run_train(_config(shards, tmp_path / "rot", mode="rotnet", epochs=1)).checkpoint
    result = run_train(_config(shards, tmp_path / mode, mode=mode, levels=levels, epochs=1, features_from=init))
    (record,) = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert set(record) == FIELDS | MODE_FIELDS[mode]
    assert record["epoch"] == 0 and record["steps"] == result.steps > 0 and record["loss"] > 0
    assert all(0.0 <= record[key] <= 1.0 for key in record if key.endswith("_acc"))

    state = torch.load(result.checkpoint, weights_only=True)
    assert (state["mode"], state["epoch"], state["step"], state["total_steps"]) == (mode, 1, 0, result.steps)
    outputs = 4 if mode == "rotnet" else levels[0]  # rotations, or the flat clusters
    assert {k: tuple(v.shape) for k, v in state["head"].items()} == {"classifier.weight": (outputs, 256),
                                                                     "classifier.bias": (outputs,)}
    # SGD with momentum: a momentum buffer for every trained parameter (the Sobel layer's are fixed) and the head.
    from trainer.network import Network

    trained = sum(p.requires_grad for p in Network(_config(shards, tmp_path, mode=mode, levels=levels,
                                                           features_from=init)).backbone.parameters())
    for key, count in (("optimizer", trained), ("head_optimizer", 2)):  # the backbone's, then the head's
        momentum = state[key]["state"]
        assert len(momentum) == count and all("momentum_buffer" in entry for entry in momentum.values()), key
    assert state["clustering"] == ("" if mode == "rotnet" else "epoch000") and state["previous_clustering"] == ""
    if mode == "rotnet":
        assert not (tmp_path / mode / "features").exists()
        return
    assert record["clustering_name"] == "epoch000" and record["clustering"]["num_clusters"] == levels[0]
    assert set(record["clustering"]["nmi"]) == {"user", "device", "gps", "hashtag"}
    store = open_store(str(tmp_path / mode / "features" / "epoch000"))
    embedded_with = store.attrs["model"]["checkpoint"]["weights_sha256"]
    if mode == "clusterfit":  # the features of the given network, not of the one being trained
        assert embedded_with == weights_digest(load_checkpoint(init))
        assert not list((tmp_path / mode).glob("backbone-*.pt"))
        # ClusterFit as its paper defines it: none of DeepCluster's additions (Sobel, whitening, balancing).
        from dataengine.clustering import open_clustering

        assert state["sobel"] is False and not open_clustering(store, "epoch000").pca().whiten
        assert json.loads(state["config"])["data"]["balanced_sampling"] is False
    else:
        assert embedded_with == weights_digest(load_checkpoint(str(tmp_path / mode / "backbone-epoch000.pt")))


def _planted_batch(n: int = 16, size: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """Images whose class (``i % 4``) is the colour of their bottom-right quarter and whose orientation shows in
    a bright top-left corner: an easy task every mode can learn to perfection on one batch."""
    generator = torch.Generator().manual_seed(0)
    classes = torch.arange(n) % 4
    images = torch.randint(0, 40, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    images[:, :, :size // 4, :size // 4] = 255
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=torch.uint8)
    images[:, :, size // 2:, size // 2:] = colours[classes].view(n, 3, 1, 1)
    return images, classes.numpy()


@pytest.mark.parametrize("mode, levels", [("rotnet", (2, 3)), ("deepcluster", (4,)), ("deepercluster", (2, 4)),
                                          ("clusterfit", (4,))])
def test_every_mode_learns_a_planted_task(mode, levels, one_torch_thread):
    """The loss of each mode, through the trainer's network, head and optimizer settings, goes to ~0 on one batch
    with planted targets (rotations drawn anew at every step), and every accuracy it reports reaches 1."""
    from trainer.labels import Labels
    from trainer.network import Network
    from trainer.step import step_loss

    config = _config("-", "-", mode=mode, levels=levels, sobel=False, features_from="x")
    images, classes = _planted_batch()
    if mode == "deepercluster":  # 2 parents of 2 children each; leaf = class
        labels = Labels("planted", classes, classes % 2, classes // 2, np.array([2, 2]), 4)
    else:
        labels = Labels("planted", classes, classes, np.zeros_like(classes), np.zeros(0, np.int64), 4)
    network = Network(config)
    if mode != "rotnet":
        network.set_heads(config, labels, 0)
    optim = config.optim
    optimizer = torch.optim.SGD(network.parameters(), lr=optim.lr, momentum=optim.momentum,
                                weight_decay=optim.weight_decay)
    network.train()
    losses = []
    for step in range(20):
        loss, stats = step_loss(config, network, labels, images, torch.arange(len(images)), 0, 0, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0], losses
    assert {key: float(value) for key, value in stats.items() if key.endswith("_acc")} == {
        key: 1.0 for key in MODE_FIELDS[mode] if key.endswith("_acc")}


def test_a_reassignment_keeps_the_backbone_momentum_and_renews_the_heads(shards, tmp_path, one_torch_thread):
    """As in the reference code: the backbone's SGD state (momentum buffers) survives a re-clustering; only the
    heads' optimizers are made anew, for the new heads' parameters."""
    from trainer.loop import Trainer
    from trainer.step import step_inputs

    trainer = Trainer(_config(shards, tmp_path / "run"))  # SGD momentum 0.9
    trainer.recluster(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for step in range(2):
        trainer.train_step(*step_inputs(trainer.config, trainer.labels, images, torch.arange(16), 0, 0, step))
    optimizers = trainer.optimizers
    backbone = optimizers.backbone
    before = {parameter: backbone.state[parameter]["momentum_buffer"].clone()
              for parameter in trainer.network.backbone.parameters() if parameter.requires_grad}
    assert before and all(bool(buffer.abs().sum() > 0) for buffer in before.values())
    old_heads = [*trainer.network.head.parameters(), *trainer.network.sub_heads.parameters()]
    assert all("momentum_buffer" in optimizers.head.state[p] for p in trainer.network.head.parameters())

    trainer.recluster(1)
    assert optimizers.backbone is backbone
    for parameter, buffer in before.items():
        assert torch.equal(backbone.state[parameter]["momentum_buffer"], buffer)
    old = {id(parameter) for parameter in old_heads}
    for name in ("head", "sub_heads"):
        optimizer, parameters = getattr(optimizers, name), list(getattr(trainer.network, name).parameters())
        assert not optimizer.state, name  # no momentum carried over to a new clustering's heads
        held = [id(parameter) for parameter in optimizer.param_groups[0]["params"]]
        assert held == [id(parameter) for parameter in parameters] and not set(held) & old, name


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


def test_a_run_stopped_by_its_budget_leaves_a_checkpoint_that_says_the_budget_is_spent(shards, tmp_path,
                                                                                      monkeypatch):
    # The budget runs out just after an epoch's checkpoint (the clock jumps there): the run must not stop on a
    # checkpoint that records less than the budget, whose resume would train on.
    import types

    import trainer.budget

    jump = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + jump[0])
    monkeypatch.setattr(trainer.budget, "time", clock)

    def milestone(name: str) -> None:
        if name == "epoch.saved":
            jump[0] = 1000.0

    config = _config(shards, tmp_path / "run", mode="rotnet", epochs=50, time_budget=500.0)
    first = run_train(config, milestone=milestone)
    assert first.epochs < 50
    assert torch.load(first.checkpoint, weights_only=True)["elapsed"] >= 500.0
    again = run_train(config)
    assert (again.epochs, again.steps) == (first.epochs, first.steps)


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
    """The backbone, the head and (DeeperCluster) the sub-class heads with their momentum, from a checkpoint."""
    from trainer.checkpoint import load_sub_heads
    from trainer.run_folder import RunFolder

    state = torch.load(path, weights_only=True)
    weights = {**state["backbone"], **{f"head.{k}": v for k, v in state["head"].items()}}
    if state.get("sub_heads"):
        folder = RunFolder(os.path.dirname(path))
        shards = load_sub_heads(folder, state["sub_heads"], 0, len(state["sub_heads"]["sub_counts"]))
        weights |= {f"sub_heads.{key}": value for key, value in shards.items() if value is not None}
    return weights


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
    assert reference.keys() == resumed.keys() and {"sub_heads.weight", "sub_heads.momentum_weight"} <= set(reference)
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def _rank_main(rank: int, world_size: int, port: int, config: TrainConfig) -> None:
    import torch.distributed as dist

    from trainer.loop import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        trainer = Trainer(config)
        trainer.run()
        torch.save(dict(trainer.network.named_parameters()), os.path.join(config.out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _data_parallel_reference(config: TrainConfig, world_size: int) -> tuple[dict[str, torch.Tensor], ...]:
    """Epoch 0 of ``config`` over ``world_size`` ranks computed in one process: the network and head as the
    trainer initialises them, the run's own clustering, every rank's batch of every step, the gradients of the
    ranks averaged before each SGD step. Returns the parameters before and after."""
    from dataengine.shards import load_shard_set
    from trainer.augment import CropConfig
    from trainer.data import EpochPlan
    from trainer.network import Network
    from trainer.recluster import Reclusterer
    from trainer.step import epoch_loader, step_loss

    labels = Reclusterer(config, 0, lambda _name: None).labels_of("epoch000")
    network = Network(config)
    network.set_heads(config, labels, 0)  # one process: every sub-class head
    optim = config.optim
    optimizer = torch.optim.SGD(network.parameters(), lr=optim.lr, momentum=optim.momentum,
                                weight_decay=optim.weight_decay)
    shard_set, crop = load_shard_set(config.data.shards), CropConfig(size=config.data.image_size,
                                                                     scale=config.data.crop_scale)
    loaders, steps = zip(*(epoch_loader(config, shard_set, labels, crop, EpochPlan(epoch=0, rank=rank,
                                                                                   world_size=world_size))
                           for rank in range(world_size)))
    initial = {name: parameter.detach().clone() for name, parameter in network.named_parameters()}
    trained = [parameter for parameter in network.parameters() if parameter.requires_grad]
    network.train()
    for step, batches in zip(range(min(steps)), zip(*loaders)):
        grads = []
        for rank, (images, rows) in enumerate(batches):
            optimizer.zero_grad(set_to_none=False)
            step_loss(config, network, labels, images, rows, 0, rank, step)[0].backward()
            # A sub-head no row of a rank's batch uses contributes zeros; the fixed Sobel layer has no gradient.
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trained])
        for parameter, *per_rank in zip(trained, *grads):
            parameter.grad = sum(per_rank) / world_size
        optimizer.step()
    return initial, {name: parameter.detach() for name, parameter in network.named_parameters()}


def test_two_gloo_ranks_hold_the_weights_of_a_data_parallel_reference(shards, tmp_path, free_port,
                                                                     one_torch_thread):
    # The reference averages each rank's gradients, Eq. 5 as written: the sub-class heads' too (batch).
    config = _config(shards, tmp_path / "ddp", epochs=1, samples_per_epoch=320, sub_head_grad_mean="batch")
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port, config), nprocs=2, join=True)
    (record,) = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert record["steps"] >= 4 and record["clustering_name"] == "epoch000"
    ranks = [torch.load(tmp_path / "ddp" / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    initial, reference = _data_parallel_reference(config, 2)
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for name, expected in reference.items():
        if name.startswith("sub_heads."):  # each rank holds its share of the sub-class heads; together the whole
            assert ranks[0][name].shape[0] > 0 and ranks[1][name].shape[0] > 0, name
            torch.testing.assert_close(torch.cat([ranks[0][name], ranks[1][name]]), expected, rtol=1e-5,
                                       atol=1e-6, msg=name)
            continue
        # Parameters only: BatchNorm running statistics are each rank's own (the checkpoint keeps rank 0's).
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    moved = {name for name in reference if not torch.equal(reference[name], initial[name])}
    assert moved == {name for name, p in ranks[0].items() if p.requires_grad}, "every trained parameter moves"
    for name in set(reference) - moved:  # the fixed Sobel layer stays fixed on every rank
        assert torch.equal(ranks[0][name], initial[name]) and torch.equal(ranks[1][name], initial[name]), name
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    for name, tensor in ranks[0].items():
        part, key = name.split(".", 1)
        if part != "sub_heads":
            assert torch.equal(checkpoint[part][key], tensor), name
    # The sub-class heads: one file per rank, named by the checkpoint, read back whole.
    from trainer.checkpoint import load_sub_heads
    from trainer.run_folder import RunFolder

    reference = checkpoint["sub_heads"]
    whole = load_sub_heads(RunFolder(str(tmp_path / "ddp")), reference, 0, len(reference["sub_counts"]))
    for key in ("weight", "bias"):
        name = f"sub_heads.sub_{key}"
        assert torch.equal(whole[key], torch.cat([ranks[0][name], ranks[1][name]])), name


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
    assert (state["epoch"], state["step"], state["version"]) == (0, 3, 3)
    torch.save(dict(_one_optimizer(state, config), version=1, config=_flat_v1(config)), path)
    resumed = run_train(config)
    expected, got = _weights(reference.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert torch.load(path, weights_only=True)["version"] == 3


def _one_optimizer(state: dict, config: TrainConfig) -> dict:
    """``state`` with its optimizers as versions 1 and 2 stored them: one SGD over every backbone parameter
    (the fixed Sobel layer's too, without momentum) then the head's."""
    from trainer.network import Network

    backbone, head = state["optimizer"], state["head_optimizer"]
    parameters = list(Network(config).backbone.parameters())
    trained = [index for index, parameter in enumerate(parameters) if parameter.requires_grad]
    entries = {trained[new]: entry for new, entry in backbone["state"].items()}
    entries |= {len(parameters) + new: entry for new, entry in head["state"].items()}
    group = dict(backbone["param_groups"][0], params=list(range(len(parameters) + 2)))
    legacy = {key: value for key, value in state.items() if key != "head_optimizer"}
    return legacy | {"optimizer": {"state": entries, "param_groups": [group]}}


@pytest.mark.parametrize("change, match", [
    (dict(version=1, config=json.dumps({"shards": "x", "out": "y", "learning_rate": 0.1})),
     "stored configuration \\(checkpoint version 1, one flat mapping\\) cannot be read.*learning_rate"),
    (dict(version=4), "version 4; this trainer reads versions 1 to 3"),
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
