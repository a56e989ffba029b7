"""Calibrate ``dataengine plan`` on whole stages, and check its predictions against measured runs.

Every stage runs as a user runs it, one CLI command each, on ``../shared/data/imagenette2-train-4k.tar``
(a prefix of it below 4,000 photos, every photo several times above, ingested with ``--keep-duplicates``):
``ingest``, ``embed`` (the small convnet at 32 by default), ``cluster``, ``report`` and one epoch of
``train``. For each command: wall time, CPU time, the peak resident memory of its largest process (``wait4``
rusage: the command and the workers it waited for) and the bytes of its output folder.

``--calibrate FILE --sizes A,B``: runs at two sizes and writes, per stage, the CPU seconds per image or
sample (slope of CPU time), the serial start-up (CPU time at the smaller size minus that slope's share),
memory as a base plus bytes per row (slope of the peak), and bytes per image; rates that small runs cannot
measure (k-means GFLOP/s, store reads, NMI per row, other models) come from ``bench_kmeans``, ``bench_nmi``
and ``bench_embed`` with ``--calibrate``.

``--check --sizes A,B,C [--calibration FILE] [--measurements FILE]``: runs at each size and prints, per
stage, predicted / measured for wall time, CPU time, peak memory and bytes (what BENCHMARKS.md records);
``--measurements`` saves the runs, or re-scores saved ones against the current plan without running them.

Usage: python tools/bench_plan.py --calibrate calibration.json [--sizes 2000,8000]
       python tools/bench_plan.py --check [--sizes 1000,4000,16000] [--calibration calibration.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TAR = os.path.join(HERE, "..", "..", "shared", "data", "imagenette2-train-4k.tar")
LEVELS = "4,16"
PCA = 64


def sized_tar(source: str, images: int, scratch: str) -> str:
    """A tar of ``images`` photos: a prefix of ``source``, or its photos repeated under ``copy<i>/`` prefixes."""
    path = os.path.join(scratch, f"photos-{images}.tar")
    if os.path.exists(path):
        return path
    with tarfile.open(source) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive if m.isfile()]
    with tarfile.open(path + ".partial", "w") as target:
        for index in range(images):
            member, data = members[index % len(members)]
            info = tarfile.TarInfo(f"copy{index // len(members)}/{member.name}")
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))
    os.replace(path + ".partial", path)
    return path


def folder_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (scratch ``.tmp`` folders excluded)."""
    total = 0
    for root, folders, files in os.walk(path):
        folders[:] = [f for f in folders if f != ".tmp"]
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def run_stages(tar: str, images: int, work: str, args: argparse.Namespace) -> dict[str, dict]:
    """Every stage at one size, each measured on its own."""
    cli = [sys.executable, "-m", "dataengine", "--quiet"]
    paths = {name: os.path.join(work, name) for name in ("ingest", "store", "report", "train")}
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    commands = {
        "ingest": ([*cli, "ingest", "--images", tar, "--out", paths["ingest"], "--keep-duplicates", "--json"],
                   paths["ingest"]),
        "embed": ([*cli, "embed", paths["ingest"], "--out", paths["store"], "--model", args.model, "--image-size",
                   str(args.image_size), "--json"], paths["store"]),
        "cluster": ([*cli, "cluster", paths["store"], "--clustering", "c", "--levels", LEVELS, "--pca", str(PCA), "--json"],
                    paths["store"]),
        "report": ([*cli, "report", paths["store"], "--clustering", "c", "--out", paths["report"], "--json"],
                   paths["report"]),
        "train": ([*cli, "train", paths["ingest"], "--out", paths["train"], "--arch", "small", "--image-size", "32",
                   "--epochs", "1", "--reassign-every", "1", "--levels", LEVELS, "--pca", str(PCA), "--json"],
                  paths["train"]),
    }
    results = {}
    for stage, (command, out) in commands.items():
        results[stage] = run_measured(command, out)
        if stage == "cluster":  # the clustering lives inside the store: count what it added
            results[stage]["bytes"] -= results["embed"]["bytes"]
        if stage == "ingest":
            results[stage]["shard_bytes"] = folder_bytes(os.path.join(out, "shards"))
        print(f"  {images} images, {stage}: {results[stage]['seconds']:.1f} s, {results[stage]['cpu']:.1f} CPU-s, "
              f"peak {results[stage]['peak_rss'] / 2**20:.0f} MiB, {results[stage]['bytes'] / 2**20:.1f} MiB",
              flush=True)
    return results


def run_measured(command: list[str], out: str) -> dict:
    """:func:`measure` through ``wait4`` (the rusage of this command and the descendants it waited for)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Read both pipes fully before reaping the process with wait4 (communicate() would reap it itself).
    stdout, stderr = process.stdout.read(), process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr.decode()[-6000:]}")
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
            "bytes": folder_bytes(out)}


def plan_for(images: int, args: argparse.Namespace, calibration: str | None) -> dict[str, dict]:
    from dataengine.plan import PlanConfig, load_calibration, plan_run

    config = PlanConfig(num_images=images, cores=os.cpu_count() or 1, model=args.model, image_size=args.image_size,
                        levels=tuple(int(v) for v in LEVELS.split(",")), pca_dim=PCA, epochs=1,
                        train_arch="small", train_image_size=32)
    return {p.stage: p.to_dict() for p in plan_run(config, load_calibration(calibration))}


def slope(small: float, large: float, sizes: tuple[int, int]) -> float:
    return (large - small) / (sizes[1] - sizes[0])


def calibrate(measured: dict[int, dict], args: argparse.Namespace) -> None:
    """Write the per-stage constants two sizes give into ``args.calibrate``.

    Ingest and embed: CPU seconds per image (the slope of CPU time), the serial start-up (CPU time at the
    smaller size minus that slope's share). Cluster, report and train: the start-up is the smaller run's CPU
    time beyond what the plan's rates predict for its variable part. Memory: base plus bytes per row (the
    slope of the peak); bytes: the slope of the output's size.
    """
    from dataengine.plan import MODEL_DIMS, load_calibration, update_calibration

    sizes = tuple(sorted(measured))
    small, large = measured[sizes[0]], measured[sizes[1]]
    command = " ".join(["python", "tools/bench_plan.py"] + sys.argv[1:])

    def base_and_slope(stage: str, key: str) -> tuple[int, float]:
        per_row = max(0.0, slope(small[stage][key], large[stage][key], sizes))
        return int(small[stage][key] - per_row * sizes[0]), per_row

    def per_unit_and_fixed(stage: str) -> tuple[float, float]:
        per_unit = slope(small[stage]["cpu"], large[stage]["cpu"], sizes)
        return per_unit, max(0.0, small[stage]["cpu"] - per_unit * sizes[0])

    cpu, fixed = per_unit_and_fixed("ingest")
    base, per_row = base_and_slope("ingest", "peak_rss")
    shards = slope(small["ingest"]["shard_bytes"], large["ingest"]["shard_bytes"], sizes)
    update_calibration(args.calibrate, "ingest", {
        "cpu_seconds_per_image": cpu, "fixed_cpu_seconds": fixed, "base_rss_bytes": base, "main_bytes_per_row": per_row,
        "shard_bytes_per_image": shards,
        "metadata_bytes_per_image": slope(small["ingest"]["bytes"], large["ingest"]["bytes"], sizes) - shards,
    }, command)
    cpu, fixed = per_unit_and_fixed("embed")
    base, per_row = base_and_slope("embed", "peak_rss")
    # The store's bytes per row over the feature dimension: float16 values after zstd, keys and metadata with
    # them (a folder input has little metadata).
    per_value = slope(small["embed"]["bytes"], large["embed"]["bytes"], sizes) / MODEL_DIMS[args.model]
    update_calibration(args.calibrate, "embed", {
        "models": {f"{args.model}@{args.image_size}": {"cpu_seconds_per_image": cpu}}, "fixed_cpu_seconds": fixed,
        "base_rss_bytes": base, "bytes_per_row": per_row, "store_bytes_per_value": per_value,
        "metadata_bytes_per_row": 0.0,
    }, command)
    train_cpu = slope(small["train"]["cpu"] - small["embed"]["cpu"] - small["cluster"]["cpu"],
                      large["train"]["cpu"] - large["embed"]["cpu"] - large["cluster"]["cpu"], sizes)
    update_calibration(args.calibrate, "train", {"models": {"small@32": {"cpu_seconds_per_sample": train_cpu}}},
                       command)
    predicted = plan_for(sizes[0], args, args.calibrate)
    rates = load_calibration(args.calibrate)["stages"]
    for stage in ("cluster", "report", "train"):
        base, per_row = base_and_slope(stage, "peak_rss")
        variable = predicted[stage]["cpu_seconds"] - rates[stage]["fixed_cpu_seconds"]
        values = {"fixed_cpu_seconds": max(0.0, small[stage]["cpu"] - variable), "base_rss_bytes": base,
                  "bytes_per_row": per_row}
        if stage == "report":
            values["output_bytes"] = small["report"]["bytes"]
        update_calibration(args.calibrate, stage, values, command)
    print(json.dumps(load_calibration(args.calibrate)["stages"], indent=1))


def check(measured: dict[int, dict], args: argparse.Namespace) -> dict:
    """Predicted / measured per stage and size, printed and returned."""
    ratios: dict = {}
    for images, stages in sorted(measured.items()):
        predicted = plan_for(images, args, args.calibration)
        for stage, got in stages.items():
            plan = predicted[stage]
            row = {"seconds": (plan["seconds"] or float("nan")) / got["seconds"],
                   "cpu": (plan["cpu_seconds"] or float("nan")) / got["cpu"],
                   "memory": plan["peak_memory_bytes"] / got["peak_rss"],
                   "bytes": (plan["disk_bytes"] + plan["object_bytes"]) / max(got["bytes"], 1),
                   "measured": {"seconds": got["seconds"], "cpu": got["cpu"], "peak_rss": got["peak_rss"],
                                "bytes": got["bytes"]}}
            ratios.setdefault(str(images), {})[stage] = row
            print(f"{images:7d} {stage:8s} time {row['seconds']:.2f} ({got['seconds']:.1f} s measured), CPU "
                  f"{row['cpu']:.2f} ({got['cpu']:.1f} s), memory "
                  f"{row['memory']:.2f} ({got['peak_rss'] / 2**20:.0f} MiB), bytes {row['bytes']:.2f} "
                  f"({got['bytes'] / 2**20:.1f} MiB)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--calibrate", metavar="FILE", help="write the measured constants into this file")
    mode.add_argument("--check", action="store_true", help="compare plan predictions with measured runs")
    parser.add_argument("--sizes", default=None, help="photos per run (default 2000,8000 / 1000,4000,16000)")
    parser.add_argument("--calibration", default=None, help="with --check: calibration file (default: built-in)")
    parser.add_argument("--model", default="small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--tar", default=DEFAULT_TAR)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_plan"))
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    parser.add_argument("--measurements", metavar="FILE",
                        help="--check: score the runs saved in FILE if it exists (else run and save them there)")
    args = parser.parse_args()
    sizes = [int(v) for v in (args.sizes or ("2000,8000" if args.calibrate else "1000,4000,16000")).split(",")]
    if args.calibrate and len(sizes) != 2:
        sys.exit("--calibrate needs two sizes")
    if not os.path.exists(args.tar):
        sys.exit(f"{args.tar} not found (see ../shared/data/README.md)")
    os.makedirs(args.workdir, exist_ok=True)
    if args.measurements and os.path.exists(args.measurements):
        with open(args.measurements, encoding="utf-8") as handle:
            measured = {int(images): stages for images, stages in json.load(handle).items()}
    else:
        measured = {}
        for images in sizes:
            measured[images] = run_stages(sized_tar(args.tar, images, args.workdir), images,
                                          os.path.join(args.workdir, f"run-{images}"), args)
        if args.measurements:
            with open(args.measurements, "w", encoding="utf-8") as handle:
                json.dump(measured, handle, indent=1)
    if args.calibrate:
        calibrate(measured, args)
    else:
        ratios = check(measured, args)
        if args.json:
            print(json.dumps({"sizes": sizes, "load": os.getloadavg(), "ratios": ratios}))


if __name__ == "__main__":
    main()
