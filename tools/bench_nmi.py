"""Benchmark: NMI of a large clustering against a label partition, dataengine vs scikit-learn.

Default: 10M rows, 100k clusters, 100k labels, labels = a random function of the cluster with 50% of the
rows relabelled at random. Each method runs in its own subprocess that generates the same arrays from
the seed, so the peak-memory figure of one method is not polluted by another's; the methods take turns
for ``--rounds`` rounds so that load from other processes on a shared machine hits them alike. Reported
per method: median wall and CPU time over all runs, and the peak resident memory above the process's
resident memory once the input arrays exist (Linux ``/proc/self/clear_refs`` resets the high-water mark;
elsewhere a 5 ms RSS sampler approximates it). The speed-up is sklearn's median over ours, same run.

Both sides normalise by the geometric mean of the entropies (DeepCluster's NMI, dataengine's default).
``ours+ami`` adds the adjusted mutual information (expected MI from the marginals, over distinct class sizes);
``sklearn+ami`` is scikit-learn's ``adjusted_mutual_info_score``, whose expected MI is quadratic in the numbers
of classes: not in the default methods (at 100k x 100k classes it does not finish), ask for it on small data.

    python tools/bench_nmi.py                     # ~3 min: 2 rounds of ours x3, sklearn x1, chance x3, ami x3
    python tools/bench_nmi.py --rows 1000000 --clusters 10000 --labels 10000 --json
    python tools/bench_nmi.py --rows 100000 --clusters 1000 --labels 1000 --methods ours+ami,sklearn+ami
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

METHODS = ("ours", "sklearn", "ours+chance", "ours+ami", "sklearn+ami")
DEFAULT_METHODS = ("ours", "sklearn", "ours+chance", "ours+ami")


def make_data(rows: int, clusters: int, labels: int, noise: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids and correlated labels: a random map of the cluster, or a random label (``noise``)."""
    rng = np.random.default_rng(seed)
    assignment = rng.integers(0, clusters, rows)
    mapping = rng.integers(0, labels, clusters)
    relabel = rng.random(rows) < noise
    label = mapping[assignment]
    label[relabel] = rng.integers(0, labels, int(relabel.sum()))
    return assignment, label


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process above its level at ``start``."""

    def __init__(self) -> None:
        self._baseline = 0
        self._peak = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self.method = "VmHWM"

    def start(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._baseline = self._process.memory_info().rss
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM, the kernel's exact high-water mark
        except OSError:
            self.method = "sampled"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def stop(self) -> int:
        """Bytes of peak resident memory above the baseline."""
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            return max(self._peak - self._baseline, 0)
        return max((_status_kib("VmHWM") or 0) * 1024 - self._baseline, 0)


def run_worker(args: argparse.Namespace) -> dict:
    """Time one method on freshly generated arrays; returns its figures."""
    clusters, labels = make_data(args.rows, args.clusters, args.labels, args.noise, args.seed)
    if args.worker == "sklearn":
        from sklearn.metrics import normalized_mutual_info_score

        def compute() -> tuple[float, float | None]:
            return normalized_mutual_info_score(labels, clusters, average_method="geometric"), None
    elif args.worker == "sklearn+ami":
        from sklearn.metrics import adjusted_mutual_info_score

        def compute() -> tuple[float, float | None]:
            return adjusted_mutual_info_score(labels, clusters, average_method="geometric"), None
    else:
        from dataengine.metrics import Contingency

        def compute() -> tuple[float, float | None]:
            table = Contingency()
            table.update(clusters, labels)
            if args.worker == "ours+chance":
                result = table.result(chance_seed=0, adjusted=False)
                return result.nmi, result.chance_nmi
            if args.worker == "ours+ami":
                return table.ami(), None
            return table.nmi(), None

    repeats = args.sklearn_repeats if args.worker.startswith("sklearn") else args.repeats
    gc.collect()
    memory = PeakMemory()
    memory.start()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        nmi, chance = compute()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    peak = memory.stop()
    return {"method": args.worker, "times_s": times, "cpu_times_s": cpu_times, "nmi": nmi,
            "chance_nmi": chance, "peak_bytes": peak, "memory_method": memory.method}


def run_method(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--rows", str(args.rows),
               "--clusters", str(args.clusters), "--labels", str(args.labels), "--noise", str(args.noise),
               "--seed", str(args.seed), "--repeats", str(args.repeats),
               "--sklearn-repeats", str(args.sklearn_repeats)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def pool(method_runs: list[dict]) -> dict:
    """One method's runs over all rounds: every time, medians, the largest peak."""
    times = [t for run in method_runs for t in run["times_s"]]
    cpu_times = [t for run in method_runs for t in run["cpu_times_s"]]
    peak = max(method_runs, key=lambda run: run["peak_bytes"])
    return {"times_s": times, "cpu_times_s": cpu_times, "median_s": statistics.median(times),
            "median_cpu_s": statistics.median(cpu_times), "nmi": method_runs[-1]["nmi"],
            "chance_nmi": method_runs[-1]["chance_nmi"], "peak_bytes": peak["peak_bytes"],
            "memory_method": peak["memory_method"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--clusters", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--noise", type=float, default=0.5, help="share of rows given a random label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median reported)")
    parser.add_argument("--sklearn-repeats", type=int, default=1, help="timed runs of sklearn (slow)")
    parser.add_argument("--rounds", type=int, default=2, help="turns of every method (medians pool them)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    parser.add_argument("--calibrate", metavar="FILE",
                        help="store the seconds per row of one NMI with its chance level for `dataengine plan`")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for _ in range(args.rounds):
        for method in methods:
            runs[method].append(run_method(method, args))
    results = {method: pool(method_runs) for method, method_runs in runs.items()}
    for method, r in results.items():
        label = "ami" if method.endswith("+ami") else "nmi"
        print(f"{method:12s} median {r['median_s']:7.3f} s (cpu {r['median_cpu_s']:7.3f} s)  "
              f"runs {[round(t, 2) for t in r['times_s']]}  peak +{r['peak_bytes'] / 2**20:7.1f} MiB  "
              f"{label} {r['nmi']:.12f}" + ("" if r["chance_nmi"] is None else f"  chance {r['chance_nmi']:.6f}"))
    summary = {"rows": args.rows, "clusters": args.clusters, "labels": args.labels, "noise": args.noise,
               "cpus": os.cpu_count(), "load_average": os.getloadavg(), "results": results}
    if "ours" in results and "sklearn" in results:
        ours, reference = results["ours"], results["sklearn"]
        summary["speedup"] = reference["median_s"] / ours["median_s"]
        summary["speedup_cpu"] = reference["median_cpu_s"] / ours["median_cpu_s"]
        summary["abs_nmi_diff"] = abs(reference["nmi"] - ours["nmi"])
        summary["memory_ratio"] = reference["peak_bytes"] / max(ours["peak_bytes"], 1)
        print(f"speed-up vs sklearn: {summary['speedup']:.1f}x wall, {summary['speedup_cpu']:.1f}x cpu  "
              f"|nmi diff| {summary['abs_nmi_diff']:.2e}  "
              f"peak memory sklearn/ours: {summary['memory_ratio']:.2f}x")
    if "ours+ami" in results and "sklearn+ami" in results:
        ours, reference = results["ours+ami"], results["sklearn+ami"]
        summary["ami_speedup"] = reference["median_s"] / ours["median_s"]
        summary["abs_ami_diff"] = abs(reference["nmi"] - ours["nmi"])
        print(f"AMI speed-up vs sklearn: {summary['ami_speedup']:.1f}x wall  |ami diff| {summary['abs_ami_diff']:.2e}")
    if args.calibrate:
        if "ours+chance" not in results:
            sys.exit("--calibrate needs the ours+chance method")
        from dataengine.plan import update_calibration

        update_calibration(args.calibrate, "report",
                           {"seconds_per_row_score": results["ours+chance"]["median_s"] / args.rows},
                           " ".join(["python", "tools/bench_nmi.py"] + sys.argv[1:]))
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
