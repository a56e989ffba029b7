"""Acceptance on real data: random init vs RotNet vs DeepCluster vs DeeperCluster on CIFAR-10.

Splits ``../shared/data/cifar10-train.tar`` into a train and a test split (labels are used only for
evaluation), ingests both, trains every method with the small convnet on CPU under the same wall-clock
budget of CPU time (re-clusterings and DataLoader workers included, so that other work sharing the machine
changes how long a run takes, not how much it trains), then for every method and seed reports the linear-probe and k-NN top-1
(``dataengine eval``) and the NMI between a 10-way k-means of the train features and the labels.
Results go to ``OUT/results.json`` and are printed as a table; RESULTS.md quotes them.

Usage: python tools/acceptance_cifar.py --out OUT [--budget 480] [--seeds 0 1]
       [--per-class-train 2000 --per-class-test 500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TAR = os.path.join(HERE, "..", "..", "shared", "data", "cifar10-train.tar")
METHODS = ("random", "rotnet", "deepcluster", "deepercluster", "deepercluster_rotinit")
# deepercluster_rotinit: DeeperCluster initialised from the RotNet run of the same seed, as the paper does;
# its budget is on top of the RotNet run's (2 x budget in total).
# Re-clustering periods of the papers: DeepCluster every epoch, DeeperCluster every 3 epochs.
REASSIGN_EVERY = {"rotnet": 1, "deepcluster": 1, "deepercluster": 3}


def split(tar_path: str, out: str, per_train: int, per_test: int) -> tuple[str, str]:
    """Write train/<class>/ and test/<class>/ folders from the tar (first images per class to train)."""
    done = os.path.join(out, "split.done")
    train, test = os.path.join(out, "split", "train"), os.path.join(out, "split", "test")
    if os.path.exists(done):
        return train, test
    taken: dict[str, int] = {}
    with tarfile.open(tar_path) as archive:
        for member in sorted((m for m in archive if m.isfile()), key=lambda m: m.name):
            label = os.path.basename(os.path.dirname(member.name))
            index = taken.get(label, 0)
            if index >= per_train + per_test:
                continue
            target = os.path.join(train if index < per_train else test, label, os.path.basename(member.name))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(archive.extractfile(member).read())
            taken[label] = index + 1
    open(done, "w").close()
    return train, test


def dataengine(*args: str) -> dict:
    """Run a dataengine command and return its --json summary."""
    command = [sys.executable, "-m", "dataengine", "--quiet", *args, "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def train(method: str, seed: int, shards: str, out: str, budget: float) -> dict:
    mode = method.split("_")[0]
    levels = {"rotnet": "4,25", "deepcluster": "100", "deepercluster": "4,25"}[mode]
    extra = []
    if method == "deepercluster_rotinit":
        runs = os.path.dirname(os.path.dirname(out))
        extra = ["--init", os.path.join(runs, "rotnet", str(seed), "checkpoint.pt")]
    dataengine("train", shards, "--out", out, "--mode", mode, *extra, "--arch", "small", "--image-size", "32",
               "--epochs", "1000", "--reassign-every", str(REASSIGN_EVERY[mode]), "--levels", levels, "--pca", "64",
               "--batch-size", "128", "--lr", "0.05", "--workers", "1", "--seed", str(seed),
               "--time-budget", str(budget), "--budget-clock", "cpu", "--checkpoint-every", "100")
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        epochs = [json.loads(line) for line in handle]
    return {"checkpoint": os.path.join(out, "checkpoint.pt"), "epochs": len(epochs),
            "steps": sum(e.get("steps", 0) for e in epochs),
            "samples_per_second": [round(e.get("samples_per_second", 0.0)) for e in epochs],
            "clusterings": sum("clustering" in e for e in epochs),
            "clustering_seconds": [round(e["clustering"].get("seconds", 0.0), 1) for e in epochs if "clustering" in e],
            "clustering_label_nmi": [round(e["clustering"]["nmi"]["label"]["nmi"], 4) for e in epochs
                                     if "label" in e.get("clustering", {}).get("nmi", {})]}


def evaluate(checkpoint: str | None, seed: int, train_shards: str, test_shards: str, work: str) -> dict:
    source = ["--checkpoint", checkpoint] if checkpoint else ["--random", "--sobel"]
    summary = dataengine("eval", *source, "--arch", "small", "--image-size", "32", "--train", train_shards,
                         "--test", test_shards, "--out", work, "--seed", str(seed))
    summary["label_nmi"] = label_nmi(os.path.join(work, "features", "train"), seed)
    return summary


def label_nmi(store: str, seed: int) -> float:
    """NMI between a 10-way k-means of the (PCA-whitened) train features and the labels."""
    import numpy as np

    from dataengine.cluster import ClusterConfig, run_cluster
    from dataengine.clustering import open_clustering
    from dataengine.metrics import nmi_score
    from dataengine.store import open_store

    run_cluster(ClusterConfig(store=store, name="k10", levels=(10,), pca_dim=64, seed=seed, overwrite=True,
                              neighbor_index=False))
    opened = open_store(store)
    clusters = open_clustering(opened, "k10").assignments(0)
    labels = opened.metadata("label").codes
    keep = (clusters >= 0) & (np.asarray(labels) >= 0)
    return float(nmi_score(clusters[keep], np.asarray(labels)[keep]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tar", default=DEFAULT_TAR)
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=480.0,
                        help="CPU seconds per training run (8 minutes of CPU; about 4 wall minutes on 2 idle cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--per-class-train", type=int, default=2000)
    parser.add_argument("--per-class-test", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train_dir, test_dir = split(args.tar, args.out, args.per_class_train, args.per_class_test)
    shards = {name: os.path.join(args.out, f"ingest-{name}") for name in ("train", "test")}
    for name, folder in (("train", train_dir), ("test", test_dir)):
        dataengine("ingest", "--images", folder, "--out", shards[name], "--image-size", "32")
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for seed in args.seeds:
        for method in args.methods:
            key = f"{method}/{seed}"
            if key in results:
                continue
            start = time.perf_counter()
            run = os.path.join(args.out, "runs", method, str(seed))
            training = None if method == "random" else train(method, seed, shards["train"], run, args.budget)
            result = evaluate(training and training["checkpoint"], seed, shards["train"], shards["test"],
                              os.path.join(run, "eval"))
            result["training"] = training
            result["seconds"] = time.perf_counter() - start
            results[key] = result
            with open(results_path, "w") as handle:
                json.dump(results, handle, indent=1, sort_keys=True)
            print(f"{key}: linear {result['linear_top1']:.4f} knn {result['knn_top1']:.4f} "
                  f"nmi {result['label_nmi']:.4f} ({result['seconds']:.0f} s)", flush=True)
    print(f"{'method':15s} {'linear top-1':>14s} {'k-NN top-1':>12s} {'NMI labels':>11s}  (mean over seeds {args.seeds})")
    for method in args.methods:
        rows = [results[f"{method}/{s}"] for s in args.seeds if f"{method}/{s}" in results]
        if rows:
            mean = {k: statistics.mean(r[k] for r in rows) for k in ("linear_top1", "knn_top1", "label_nmi")}
            print(f"{method:15s} {mean['linear_top1']:14.4f} {mean['knn_top1']:12.4f} {mean['label_nmi']:11.4f}")


if __name__ == "__main__":
    main()
