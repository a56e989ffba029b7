"""Ray's overhead for ingest: ``--distributor ray`` on a local 2-CPU Ray cluster against the multiprocessing
path with 2 workers, on the same photos.

Both are the real command started from the shell (``dataengine ingest --images TAR --out DIR``), one after
the other in each round (alternating which goes first), ``--repeats`` rounds; medians of the wall times and
their ratio. The Ray cluster (``ray start --head --num-cpus 2``) is started once before the rounds and joined
through ``RAY_ADDRESS``, as on a cluster users already run: its start-up is printed apart, not counted.
Outputs are checked byte-identical (shards, metadata, ledger, manifest).

Usage: python tools/bench_ray_ingest.py [--tar ../shared/data/imagenette2-train-4k.tar] [--repeats 3]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TAR = os.path.join(HERE, "..", "..", "shared", "data", "imagenette2-train-4k.tar")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ingest(tar: str, out: str, distributor: str, env: dict[str, str]) -> float:
    command = [sys.executable, "-m", "dataengine", "ingest", "--images", tar, "--out", out, "--workers", "2",
               "--distributor", distributor, "--json"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _same(a: str, b: str) -> bool:
    for folder, _, names in os.walk(a):
        for name in names:
            left = os.path.join(folder, name)
            if not filecmp.cmp(left, os.path.join(b, os.path.relpath(left, a)), shallow=False):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tar", default=DEFAULT_TAR)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isfile(args.tar):
        sys.exit(f"no such tar: {args.tar}")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    scratch = tempfile.mkdtemp(prefix="bench-ray-ingest-")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    start = time.perf_counter()
    started = subprocess.run([ray_cli, "start", "--head", "--num-cpus", "2", "--include-dashboard=false",
                              "--disable-usage-stats", f"--temp-dir={scratch}/ray"], capture_output=True, text=True)
    if started.returncode:
        sys.exit(f"ray start failed: {started.stderr[-2000:]}")
    cluster_start = time.perf_counter() - start
    env_ray = dict(env, RAY_ADDRESS="auto")
    times: dict[str, list[float]] = {"multiprocessing": [], "ray": []}
    try:
        for round_ in range(args.repeats):
            order = ("multiprocessing", "ray") if round_ % 2 == 0 else ("ray", "multiprocessing")
            for distributor in order:
                out = os.path.join(scratch, f"{distributor}-{round_}")
                times[distributor].append(_ingest(args.tar, out, distributor,
                                                  env_ray if distributor == "ray" else env))
            print(f"round {round_}: " + ", ".join(f"{d} {times[d][-1]:.2f} s" for d in times), file=sys.stderr)
        identical = _same(os.path.join(scratch, "multiprocessing-0"), os.path.join(scratch, "ray-0"))
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {d: statistics.median(t) for d, t in times.items()}
    print(json.dumps({"cpu": _cpu_model(), "cores": os.cpu_count(), "repeats": args.repeats,
                      "cluster_start_s": round(cluster_start, 2),
                      "multiprocessing_s": [round(t, 2) for t in times["multiprocessing"]],
                      "ray_s": [round(t, 2) for t in times["ray"]],
                      "median_multiprocessing_s": round(medians["multiprocessing"], 2),
                      "median_ray_s": round(medians["ray"], 2),
                      "overhead_ratio": round(medians["ray"] / medians["multiprocessing"], 3),
                      "byte_identical": identical}))


if __name__ == "__main__":
    main()
