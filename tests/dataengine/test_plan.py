"""`dataengine plan`: the per-stage model, the calibration file the benchmarks write, and the command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dataengine.plan import (
    DEFAULT_CALIBRATION, PlanConfig, cluster_flops, load_calibration, plan_run, update_calibration,
)


def by_stage(config: PlanConfig, calibration=None) -> dict:
    return {p.stage: p for p in plan_run(config, calibration)}


def test_work_grows_linearly_and_spreads_over_cores_and_nodes():
    small, large = by_stage(PlanConfig(num_images=10**6, cores=4)), by_stage(PlanConfig(num_images=2 * 10**6, cores=4))
    rates = DEFAULT_CALIBRATION["stages"]
    for stage in ("ingest", "embed"):
        fixed = rates[stage]["fixed_cpu_seconds"]
        assert large[stage].cpu_seconds - fixed == pytest.approx(2 * (small[stage].cpu_seconds - fixed))
        assert small[stage].seconds == pytest.approx(fixed + (small[stage].cpu_seconds - fixed) / 4)
        assert large[stage].disk_bytes > 1.9 * small[stage].disk_bytes
    wide = by_stage(PlanConfig(num_images=10**6, cores=4, nodes=8))
    assert wide["ingest"].seconds < small["ingest"].seconds / 7 and wide["ingest"].processes == 8 * 5
    # the duplicate-detection table of an ingest node holds that node's rows only
    assert wide["ingest"].peak_memory_bytes < small["ingest"].peak_memory_bytes


def test_cluster_flops_follow_levels_and_samples():
    config = PlanConfig(num_images=10**6, levels=(4, 256), pca_dim=128, sample_per_centroid=256, neighbor_index=False)
    flops, passes = cluster_flops(config, 512)
    n, d, p = 10**6, 512, 128
    # PCA covariance; level 0 trains on 4 x 256 rows; level 1 on 1024 x 256 (of the 10^6); both assign every row
    expected = (2 * n * d * d + 10 * 2 * (4 * 256) * 4 * p + 2 * n * 4 * p + 10 * 2 * (1024 * 256) * 256 * p
                + 2 * n * 256 * p)
    assert passes == 5 and flops == pytest.approx(expected + 4 * 2 * n * d * p)
    finer = cluster_flops(PlanConfig(num_images=10**6, levels=(4, 1024), pca_dim=128, neighbor_index=False), 512)[0]
    assert finer > 3 * flops / 2


def test_gpus_need_a_measured_gpu_rate(tmp_path):
    plans = by_stage(PlanConfig(num_images=10**6, gpus=8, epochs=2))
    assert plans["embed"].seconds is None and "no GPU rate" in plans["embed"].notes[0]
    assert plans["embed"].processes == 8 and plans["train"].seconds is None
    path = str(tmp_path / "calibration.json")
    update_calibration(path, "embed", {"models": {"resnet18@224": {"gpu_images_per_second": 2000.0}}}, "test")
    update_calibration(path, "train", {"models": {"small@32": {"gpu_samples_per_second": 5000.0}}}, "test")
    plans = by_stage(PlanConfig(num_images=10**6, gpus=8, epochs=2), load_calibration(path))
    fixed = DEFAULT_CALIBRATION["stages"]["embed"]["fixed_cpu_seconds"]
    assert plans["embed"].seconds == pytest.approx(fixed + 10**6 / (2000 * 8))
    assert plans["train"].seconds is not None
    resnet50 = by_stage(PlanConfig(num_images=10**6, gpus=8, model="resnet50"), load_calibration(path))["embed"]
    assert resnet50.seconds > plans["embed"].seconds and "scaled by FLOPs" in resnet50.notes[0]


def test_calibration_file_updates_some_keys_and_keeps_the_defaults(tmp_path):
    path = str(tmp_path / "calibration.json")
    update_calibration(path, "ingest", {"cpu_seconds_per_image": 0.002}, "python tools/bench_ingest.py")
    update_calibration(path, "cluster", {"gflops_per_core": 10.0}, "python tools/bench_kmeans.py")
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert data["sources"]["ingest"][0]["command"] == "python tools/bench_ingest.py" and "cores" in data["machine"]
    loaded = load_calibration(path)
    assert loaded["stages"]["ingest"]["cpu_seconds_per_image"] == 0.002
    assert loaded["stages"]["ingest"]["shard_bytes_per_image"] == DEFAULT_CALIBRATION["stages"]["ingest"][
        "shard_bytes_per_image"]
    slow = by_stage(PlanConfig(num_images=10**7), loaded)["cluster"]
    assert slow.seconds > by_stage(PlanConfig(num_images=10**7))["cluster"].seconds
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a dataengine.calibration"):
        load_calibration(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="stage"):
        update_calibration(path, "dance", {}, "x")


def test_object_storage_holds_the_outputs_and_disk_the_scratch():
    local, remote = by_stage(PlanConfig(num_images=10**6)), by_stage(PlanConfig(num_images=10**6, storage="s3"))
    for stage in ("ingest", "embed", "cluster"):
        assert local[stage].object_bytes == 0 and remote[stage].object_bytes > 0
        assert remote[stage].disk_bytes < local[stage].disk_bytes
    assert remote["ingest"].object_bytes == local["ingest"].disk_bytes  # a local output is built in place...
    assert 0 < remote["ingest"].disk_bytes < 10**8  # ...a remote one in a local scratch shard first


def test_neighbor_index_only_in_a_single_process_and_within_its_budget():
    single = by_stage(PlanConfig(num_images=10**7, index_memory_bytes=1 << 30))["cluster"]
    without = by_stage(PlanConfig(num_images=10**7, neighbor_index=False))["cluster"]
    assert 0 < single.disk_bytes - without.disk_bytes <= 1 << 30
    ranks = by_stage(PlanConfig(num_images=10**7, nodes=2))["cluster"]
    assert "no neighbour index" in ranks.notes[0] and ranks.processes == 2


@pytest.mark.parametrize("values, message", [
    ({"num_images": 0}, "num_images"), ({"num_images": 5, "model": "vit"}, "model"),
    ({"num_images": 5, "levels": (4, 0)}, "levels"), ({"num_images": 5, "storage": "ftp"}, "storage"),
])
def test_config_names_the_bad_value(values, message):
    with pytest.raises(ValueError, match=message):
        PlanConfig(**values)


def test_cli_prints_every_stage_and_a_json_line(tmp_path):
    command = [sys.executable, "-m", "dataengine", "plan", "--images", "100000000", "--levels", "4,1000",
               "--gpus", "8", "--nodes", "4", "--epochs", "3", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert [s["stage"] for s in summary["stages"]] == ["ingest", "embed", "cluster", "report", "train"]
    assert summary["total_seconds"] is None and "no GPU rate measured" in done.stderr
    assert "peak memory" in done.stderr and "BENCHMARKS.md defaults" in done.stderr
    for extra, message in ((["--calibration", str(tmp_path / "none.json")], "none.json"),
                           (["--levels", "4,x"], "comma-separated")):
        failed = subprocess.run(command[:4] + ["--images", "10"] + extra, capture_output=True, text=True)
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr
