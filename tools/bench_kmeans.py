"""Benchmarks of the k-means in ``indexes/`` (numbers for BENCHMARKS.md).

    python tools/bench_kmeans.py throughput   [--rows 1000000] [--repeats 3]
    python tools/bench_kmeans.py hierarchical [--rows 1000000] [--repeats 3]
    python tools/bench_kmeans.py out-of-core  [--rows 5000000] [--repeats 3] [--workdir /tmp/bench_kmeans]
    python tools/bench_kmeans.py distributed  [--rows 1000000] [--repeats 3]
    python tools/bench_kmeans.py all

Every measurement is repeated and its median reported, next to a reference measured in the same run:
SGEMM GFLOP/s for the assignment throughput, ``faiss.Kmeans`` for the hierarchical k-means, one rank for
two ranks. The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: tools/ is not a package
    sys.path.insert(0, str(ROOT))

from indexes.assign import Assigner, ClusterSums  # noqa: E402
from indexes.data import ArrayDataset  # noqa: E402
from indexes.hierarchical import HierarchicalKMeansConfig, fit_hierarchical_kmeans  # noqa: E402
from indexes.threads import default_num_threads, set_num_threads  # noqa: E402

DIM = 128


def synthetic(rows: int, dim: int = DIM, centers: int = 2000, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """l2-normalised rows around random centres (like whitened, normalised image features)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim)).astype(np.float32)
    out = np.empty((rows, dim), dtype=dtype)
    for start in range(0, rows, 1 << 18):
        stop = min(start + (1 << 18), rows)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block = means[rng.integers(0, centers, stop - start)] + 0.7 * noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def timed(function, repeats: int) -> tuple[float, list[float], object]:
    """Median wall time of ``repeats`` calls, all times, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times, result


def wall_and_cpu(function, flops: float) -> tuple[float, float]:
    """GFLOP per wall-clock second and per CPU-second (all threads) of one call.

    CPU time is less sensitive than wall time to other processes sharing the cores.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return flops / wall / 1e9, flops / cpu / 1e9


def bench_throughput(args) -> dict:
    """One k-means iteration (assignment + float64 sums) in GFLOP/s (2 N d k), against SGEMM and faiss.

    Each round measures SGEMM, our iteration and one faiss.Kmeans iteration back to back, so that the
    ratios of a round share the machine's load; the medians over rounds are reported.
    """
    import faiss

    rows = synthetic(args.rows)
    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    out = {"rows": args.rows, "dim": DIM, "threads": args.threads, "sgemm": "4096^3 float32, numpy BLAS, all threads"}
    for k in (256, 1024):
        centroids = rows[np.random.default_rng(1).choice(args.rows, k, replace=False)]
        flops = 2 * args.rows * DIM * k
        assigner = Assigner(centroids, backend="blas", num_threads=args.threads)
        # Once per process, not per iteration: numba import and compiled-kernel load, thread pool, scratch.
        start = time.perf_counter()
        assigner.assign(rows[:65536], ClusterSums.zeros(k, DIM))
        out[f"k{k}_first_call_seconds"] = first = time.perf_counter() - start
        print(f"k={k}: first call (set-up included) on 65,536 rows: {first * 1e3:.0f} ms", flush=True)
        rounds = []
        for _ in range(args.repeats):
            sgemm, sgemm_cpu = wall_and_cpu(lambda: a @ a, 2 * 4096**3)
            time.sleep(0.5)  # OpenBLAS's threads spin ~0.1 s after a call: not on the next measurement's cores
            ours, ours_cpu = wall_and_cpu(lambda: assigner.assign(rows, ClusterSums.zeros(k, DIM)), flops)
            km = faiss.Kmeans(DIM, k, niter=2, seed=1, max_points_per_centroid=args.rows, verbose=False)
            km.train(rows)  # faiss reports cumulative times: the second iteration is a difference
            theirs = flops / (km.iteration_stats[1]["time"] - km.iteration_stats[0]["time"]) / 1e9
            rounds.append({"sgemm_gflops": sgemm, "ours_gflops": ours, "faiss_gflops": theirs,
                           "ours_over_sgemm": ours / sgemm, "faiss_over_sgemm": theirs / sgemm,
                           "sgemm_gflop_per_cpu_s": sgemm_cpu, "ours_gflop_per_cpu_s": ours_cpu,
                           "ours_over_sgemm_cpu": ours_cpu / sgemm_cpu})
            print(f"k={k}: SGEMM {sgemm:.1f} GFLOP/s, ours {ours:.1f} ({ours / sgemm:.2f}), "
                  f"faiss {theirs:.1f} ({theirs / sgemm:.2f}); per CPU-second: SGEMM {sgemm_cpu:.1f}, "
                  f"ours {ours_cpu:.1f} ({ours_cpu / sgemm_cpu:.2f})", flush=True)
        out[f"k{k}"] = {"rounds": rounds, **{f"median_{key}": float(np.median([r[key] for r in rounds]))
                                             for key in rounds[0]}}
    return out


def bench_hierarchical(args) -> dict:
    """Hierarchical 4 x 256 against flat faiss.Kmeans k=1024, 10 iterations, every row trained on."""
    import faiss

    rows = synthetic(args.rows)
    config = HierarchicalKMeansConfig(levels=(4, 256), num_iterations=10, seed=1, max_points_per_centroid=None,
                                      backend="blas", num_threads=args.threads)

    def flat():
        km = faiss.Kmeans(DIM, 1024, niter=10, seed=1, max_points_per_centroid=args.rows, verbose=False)
        km.train(rows)
        sqdist, _ = km.index.search(rows, 1)  # the final assignment, as ours computes it
        return float(sqdist.sum(dtype=np.float64))

    results = {"ours": [], "faiss": []}
    objectives = {}
    for _ in range(args.repeats):  # interleaved: both see the same load
        start = time.perf_counter()
        objectives["ours"] = fit_hierarchical_kmeans(ArrayDataset(rows), config).levels[-1].objective
        results["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        objectives["faiss"] = flat()
        results["faiss"].append(time.perf_counter() - start)
        print(f"hierarchical {results['ours'][-1]:.1f} s, faiss flat {results['faiss'][-1]:.1f} s", flush=True)
    ours, theirs = np.median(results["ours"]), np.median(results["faiss"])
    out = {
        "rows": args.rows, "threads": args.threads, "ours_seconds": results["ours"], "faiss_seconds": results["faiss"],
        "speedup": float(theirs / ours), "ours_objective": objectives["ours"], "faiss_objective": objectives["faiss"],
        "objective_ratio": objectives["ours"] / objectives["faiss"],
    }
    print(f"hierarchical 4x256 is {out['speedup']:.2f}x faster than flat faiss k=1024; "
          f"objective ratio (ours / faiss) {out['objective_ratio']:.4f}", flush=True)
    return out


def make_store(path: Path, rows: int) -> None:
    """A Zarr array of ``rows`` x 128 float16 rows, written chunk by chunk (bounded memory)."""
    import zarr

    if (path / "done").exists():
        return
    chunk = 65536
    array = zarr.create_array(store=str(path / "features.zarr"), shape=(rows, DIM), chunks=(chunk, DIM),
                              dtype="float16", overwrite=True)
    for start in range(0, rows, 16 * chunk):
        stop = min(start + 16 * chunk, rows)
        array[start:stop] = synthetic(stop - start, seed=start).astype(np.float16)
    (path / "done").write_text("ok")


def out_of_core_child(args) -> dict:
    """In a fresh process: cluster the Zarr store, report time and peak RSS."""
    import zarr

    array = zarr.open_array(str(Path(args.workdir) / "features.zarr"), mode="r")
    start = time.process_time()  # one pass reading the rows as the k-means does (float16 -> float32 blocks)
    for _ in ArrayDataset(array, block_rows=65536).iter_blocks():
        pass
    read_cpu = time.process_time() - start
    config = HierarchicalKMeansConfig(levels=(4, 256), num_iterations=10, seed=1,
                                      max_points_per_centroid=args.sample_per_centroid, num_threads=args.threads)
    start = time.perf_counter()
    result = fit_hierarchical_kmeans(ArrayDataset(array, block_rows=65536), config)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"seconds": seconds, "peak_rss_bytes": peak, "read_cpu_seconds": read_cpu,
            "objective": result.levels[-1].objective,
            "leaf_sizes_min": int(result.levels[-1].sizes.min()), "leaf_sizes_max": int(result.levels[-1].sizes.max())}


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's VmHWM belongs to the process image, whereas ``ru_maxrss`` also counts the parent's pages at
    fork time: a child forked from a large benchmark process would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_out_of_core(args) -> dict:
    """5M x 128 float16 from a Zarr store into 4 x 256, each run in a fresh process (its own peak RSS)."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    make_store(workdir, args.rows)
    runs = []
    for _ in range(args.repeats):
        command = [sys.executable, __file__, "out-of-core-child", "--workdir", str(workdir), "--threads",
                   str(args.threads), "--sample-per-centroid", str(args.sample_per_centroid), "--rows", str(args.rows)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        print(f"out-of-core: {runs[-1]['seconds']:.1f} s, peak RSS {runs[-1]['peak_rss_bytes'] / 2**30:.2f} GiB",
              flush=True)
    return {
        "read_cpu_seconds_per_value": float(np.median([r["read_cpu_seconds"] for r in runs])) / (args.rows * DIM),
        "rows": args.rows, "data_bytes": args.rows * DIM * 2, "sample_per_centroid": args.sample_per_centroid,
        "runs": runs, "median_seconds": float(np.median([r["seconds"] for r in runs])),
        "max_peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
    }


def distributed_child(rank: int, world_size: int, port: int, rows: int, threads: int, out_dir: str) -> None:
    """One rank of the distributed benchmark: its shard of the same synthetic rows."""
    import torch.distributed as dist

    from indexes.distributed import TorchReducer

    set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        data = ArrayDataset(synthetic(rows)).shard(rank, world_size)
        config = HierarchicalKMeansConfig(levels=(4, 256), num_iterations=10, seed=1, num_threads=threads)
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        result = fit_hierarchical_kmeans(data, config, reducer=TorchReducer())
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), leaf=result.leaf_assignments,
                 top=result.levels[0].assignments, seconds=seconds, cpu_seconds=cpu)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, rows: int, threads: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Wall time (slowest rank), CPU time (all ranks) and the joined level-0 and leaf assignments."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        mp.spawn(distributed_child, args=(world_size, port, rows, threads, out_dir), nprocs=world_size, join=True)
        parts = [np.load(os.path.join(out_dir, f"rank{r}.npz")) for r in range(world_size)]
        seconds = max(float(p["seconds"]) for p in parts)
        cpu = sum(float(p["cpu_seconds"]) for p in parts)
        return seconds, cpu, np.concatenate([p["top"] for p in parts]), np.concatenate([p["leaf"] for p in parts])


def bench_distributed(args) -> dict:
    """2 ranks (gloo, half the threads each) against 1 rank (all threads) on the same rows: same ids? time?

    Wall time is the slowest rank's; CPU time adds up every rank's, and shows the work done apart from
    waiting in the per-iteration all-reduce (which grows when other processes share the cores).
    """
    one, two, one_cpu, two_cpu = [], [], [], []
    identical = True
    for _ in range(args.repeats):
        seconds1, cpu1, top1, leaf1 = run_ranks(1, args.rows, args.threads)
        seconds2, cpu2, top2, leaf2 = run_ranks(2, args.rows, max(1, args.threads // 2))
        one.append(seconds1)
        two.append(seconds2)
        one_cpu.append(cpu1)
        two_cpu.append(cpu2)
        identical &= bool(np.array_equal(top1, top2) and np.array_equal(leaf1, leaf2))
        print(f"1 rank {seconds1:.1f} s ({cpu1:.1f} CPU-s), 2 ranks {seconds2:.1f} s ({cpu2:.1f} CPU-s), "
              f"identical assignments: {identical}", flush=True)
    return {"rows": args.rows, "one_rank_seconds": one, "two_rank_seconds": two, "one_rank_cpu_seconds": one_cpu,
            "two_rank_cpu_seconds": two_cpu, "two_over_one": float(np.median(two) / np.median(one)),
            "two_over_one_cpu": float(np.median(two_cpu) / np.median(one_cpu)), "identical_assignments": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "hierarchical", "out-of-core", "distributed", "all",
                                         "out-of-core-child"])
    parser.add_argument("--rows", type=int, default=None, help="rows of synthetic data (default per benchmark)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_num_threads())
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_kmeans"))
    parser.add_argument("--sample-per-centroid", type=int, default=256)
    parser.add_argument("--calibrate", metavar="FILE", help="store the cluster stage's rates for `dataengine plan`")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_num_threads(args.threads)
    if args.what == "out-of-core-child":
        print(json.dumps(out_of_core_child(args)))
        return
    benches = {"throughput": (bench_throughput, 1_000_000), "hierarchical": (bench_hierarchical, 1_000_000),
               "out-of-core": (bench_out_of_core, 5_000_000), "distributed": (bench_distributed, 1_000_000)}
    chosen = list(benches) if args.what == "all" else [args.what]
    report = {}
    rows = args.rows
    for name in chosen:
        function, default_rows = benches[name]
        args.rows = rows or default_rows
        report[name] = function(args)
    if args.calibrate:
        calibrate(args, report)
    print(json.dumps(report))


def calibrate(args, report: dict) -> None:
    """The k-means GFLOP/s per core (throughput) and the CPU cost of reading a stored value (out-of-core)."""
    from dataengine.plan import update_calibration

    values = {}
    if "throughput" in report:
        rates = [report["throughput"][f"k{k}"]["median_ours_gflops"] for k in (256, 1024)]
        values["gflops_per_core"] = float(np.mean(rates)) / args.threads
    if "out-of-core" in report:
        values["read_seconds_per_value"] = report["out-of-core"]["read_cpu_seconds_per_value"]
    if not values:
        sys.exit("--calibrate needs the throughput or out-of-core benchmark")
    update_calibration(args.calibrate, "cluster", values, " ".join(["python", "tools/bench_kmeans.py"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
