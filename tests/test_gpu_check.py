"""``tools/gpu_check.sh``: refuses in one line where there is no GPU; ``--cpu-smoke`` runs every stage tiny on
the CPU (embed, cluster, 2 epochs under torchrun killed and resumed, the assignment figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path):
    done = _run("--workdir", str(tmp_path), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check.sh: torch sees no CUDA device here; run with --cpu-smoke to check the script on the CPU"]


@pytest.mark.slow
def test_the_cpu_smoke_runs_every_stage(tmp_path):
    """Several minutes on a busy 2-core machine (resnet50 and VGG-16-BN at 32 px, 48 images)."""
    done = _run("--cpu-smoke", "--workdir", str(tmp_path), timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["mode"] == "cpu" and figures["train_epochs"] == 2
    resumed = figures["resumed_from"]
    assert resumed["epoch"] < 2 and resumed["total_steps"] > 0, "killed inside the 2 epochs, after some steps"
    assert figures["embed_images_per_second"] > 0 and figures["cluster_rows_per_second"] > 0
    assert len(figures["train_images_per_second"]) == 2 and min(figures["train_images_per_second"]) > 0
    assert 0 < figures["assign_gflops"] and 0 < figures["fraction_of_peak"]
    assert set(figures["seconds"]) == {"synth", "ingest", "embed", "cluster", "train", "assign"}
