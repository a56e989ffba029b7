"""The DeeperCluster paper's protocol (section 4.3) at small scale: RotNet first, then three methods from it.

For every seed: train RotNet from scratch for ``--r0-budget`` CPU seconds (R0); from R0's backbone (``train
--init``: weights only, new heads and optimizer), with equal CPU budgets (``--budget``), continue RotNet, train
DeeperCluster and train DeepCluster. Then evaluate random init, R0 and the three continued networks with
``dataengine eval`` (linear-probe and k-NN top-1 on a held-out split of the training tar; the dataset's own
test split is never read) and the NMI between a 10-way k-means of the train features and the labels. For the
clustering methods, the training log gives the NMI of every re-assignment's clustering with the labels and
with the previous clustering (DeepCluster's stability measure).

Labels are used only for evaluation. Every stage is skipped when its output is there (resumable); results go
to ``OUT/results.json`` and a table is printed. Every child process runs with one thread (``--threads 1``,
in-process data loading), so two of these can share a 2-core machine.

Usage: python tools/exp_protocol.py --dataset cifar10 --out OUT --seeds 0 1 2 [--r0-budget 150 --budget 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance_cifar import dataengine, label_nmi, split  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
DATASETS = {"cifar10": os.path.join(DATA, "cifar10-train.tar"),
            "imagenette": os.path.join(DATA, "imagenette2-train-4k.tar")}
METHODS = ("rotnet", "deepercluster", "deepcluster")
ONE_THREAD = ("--threads", "1", "--workers", "0")


def train(args: argparse.Namespace, method: str, seed: int, shards: str, out: str, budget: float,
          init: str | None, extra: tuple[str, ...] = ()) -> dict:
    """Train ``method`` for ``budget`` CPU seconds (from ``init`` when given, with ``extra`` train options); its
    per-epoch log summarised."""
    levels = {"rotnet": args.deeper_levels, "deepercluster": args.deeper_levels, "deepcluster": args.deep_k}[method]
    every = {"rotnet": 1, "deepercluster": args.deeper_every, "deepcluster": 1}[method]
    if not os.path.exists(os.path.join(out, "done.json")):
        with open(os.path.join(os.makedirs(out, exist_ok=True) or out, "code.txt"), "w") as handle:
            handle.write(code_version())
        dataengine("train", shards, "--out", out, "--mode", method, *(["--init", init] if init else []),
                   "--arch", "small", "--image-size", str(args.image_size), "--epochs", "1000",
                   "--reassign-every", str(every), "--levels", levels, "--batch-size", "128", "--lr", str(args.lr),
                   *ONE_THREAD, "--seed", str(seed), "--time-budget", str(budget), "--budget-clock", "cpu",
                   "--checkpoint-every", "100", *extra)
        open(os.path.join(out, "done.json"), "w").close()
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        epochs = [json.loads(line) for line in handle]
    code = open(os.path.join(out, "code.txt")).read() if os.path.exists(os.path.join(out, "code.txt")) else None
    clusterings = [e["clustering"] for e in epochs if "clustering" in e]
    return {"checkpoint": os.path.join(out, "checkpoint.pt"), "epochs": len(epochs), "code": code,
            "steps": sum(e.get("steps", 0) for e in epochs),
            "clusterings": len(clusterings),
            "clustering_seconds": [round(c.get("seconds", 0.0), 1) for c in clusterings],
            "clustering_label_nmi": [round(c["nmi"]["label"]["nmi"], 4) for c in clusterings
                                     if "label" in c.get("nmi", {})],
            "clustering_label_chance": [round(c["nmi"]["label"]["chance"], 4) for c in clusterings
                                        if "label" in c.get("nmi", {})],
            "clustering_nmi_previous": [None if c.get("nmi_previous") is None else round(c["nmi_previous"], 4)
                                        for c in clusterings if "nmi_previous" in c]}


def code_version() -> str:
    """The commit of the code the dataengine commands run (with ``+changes`` when the tree differs from it): the
    first ``PYTHONPATH`` entry's checkout when one is set (the ablation's other tree), else this one's."""
    root = (os.environ.get("PYTHONPATH") or "").split(os.pathsep)[0] or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..")
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "dataengine",
                            "trainer", "indexes"], capture_output=True, text=True).stdout.strip()
    return commit + ("+changes" if dirty else "")


def evaluate(args: argparse.Namespace, checkpoint: str | None, seed: int, shards: dict[str, str],
             work: str) -> dict:
    """Linear probe, k-NN and label NMI of a checkpoint's (or a random Sobel network's) frozen features."""
    source = ["--checkpoint", checkpoint] if checkpoint else ["--random", "--sobel"]
    summary = dataengine("eval", *source, "--arch", "small", "--image-size", str(args.image_size),
                         "--train", shards["train"], "--test", shards["test"], "--out", work, "--seed", str(seed),
                         "--threads", "1", "--workers", "1", "--overwrite")
    summary["label_nmi"] = label_nmi(os.path.join(work, "features", "train"), seed)
    return summary


def save_result(path: str, results: dict, key: str, result: dict) -> None:
    """Add ``result`` under ``key``, merged with what other processes (other seeds) wrote since, atomically."""
    if os.path.exists(path):
        with open(path) as handle:
            results.update({k: v for k, v in json.load(handle).items() if k not in results})
    results[key] = result
    with open(path + ".tmp", "w") as handle:
        json.dump(results, handle, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def prepare(args: argparse.Namespace) -> dict[str, str]:
    """Split the tar per class into train and held-out folders and ingest both (one thread, resumable)."""
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    os.makedirs(args.out, exist_ok=True)
    train_dir, test_dir = split(args.tar or DATASETS[args.dataset], args.out, args.per_class_train,
                                args.per_class_test)
    shards = {name: os.path.join(args.out, f"ingest-{name}") for name in ("train", "test")}
    for name, folder in (("train", train_dir), ("test", test_dir)):
        dataengine("ingest", "--images", folder, "--out", shards[name], "--image-size", str(args.image_size),
                   "--workers", "1")
    return shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, budget and method options (shared with tools/exp_ablation.py)."""
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    parser.add_argument("--tar", help="Labelled tar of class folders (default: the dataset's in ../shared/data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-class-train", type=int, default=500)
    parser.add_argument("--per-class-test", type=int, default=200, help="Held-out images per class (evaluation)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--r0-budget", type=float, default=150.0, help="CPU seconds of RotNet from scratch (R0)")
    parser.add_argument("--budget", type=float, default=150.0, help="CPU seconds of each method from R0")
    parser.add_argument("--deeper-levels", default="4,25", help="DeeperCluster m,k (m super-classes x k)")
    parser.add_argument("--deeper-every", type=int, default=1, help="DeeperCluster re-assignment period, epochs")
    parser.add_argument("--deep-k", default="100", help="DeepCluster's k (re-assigned every epoch)")
    parser.add_argument("--lr", type=float, default=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--r0-seed", type=int, help="Continue every seed from the R0 of this seed (trained "
                        "already) instead of training an R0 per seed")
    args = parser.parse_args()
    shards = prepare(args)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    results["config"] = {k: v for k, v in vars(args).items() if k != "seeds"}

    def record(key: str, make) -> None:
        if key in results:
            return
        start = time.perf_counter()
        result = make() | {"seconds": round(time.perf_counter() - start, 1)}
        save_result(results_path, results, key, result)
        r = results[key]
        print(f"{key}: linear {r['linear_top1']:.4f} knn {r['knn_top1']:.4f} nmi {r['label_nmi']:.4f} "
              f"({r['seconds']:.0f} s)", flush=True)

    for seed in args.seeds:
        runs = os.path.join(args.out, "runs")
        r0 = os.path.join(runs, "r0", str(seed if args.r0_seed is None else args.r0_seed))

        def trained(method: str, out: str, budget: float, init: str | None) -> dict:
            training = train(args, method, seed, shards["train"], out, budget, init) | {"init": init}
            return evaluate(args, training["checkpoint"], seed, shards, os.path.join(out, "eval")) | {
                "training": training}

        if args.r0_seed is None:
            record(f"r0/{seed}", lambda: trained("rotnet", r0, args.r0_budget, None))
        elif not os.path.exists(os.path.join(r0, "done.json")):
            raise SystemExit(f"--r0-seed {args.r0_seed}: no finished R0 in {r0}")
        for method in args.methods:
            record(f"{method}/{seed}", lambda: trained(method, os.path.join(runs, method, str(seed)), args.budget,
                                                         os.path.join(r0, "checkpoint.pt")))
        record(f"random/{seed}", lambda: evaluate(args, None, seed, shards, os.path.join(runs, "random", str(seed))))
    print(markdown(results, ("random", "r0", *args.methods), args.seeds))


NAMES = {"random": "random init (Sobel)", "r0": "R0: RotNet from scratch", "rotnet": "R0 + RotNet",
         "deepercluster": "R0 + DeeperCluster", "deepcluster": "R0 + DeepCluster"}


def markdown(results: dict, methods: tuple[str, ...], seeds: list[int]) -> str:
    """The results as two Markdown tables: the probes per seed with means, and each training run's log."""
    def cells(rows: list[dict], key: str) -> str:
        values = " / ".join(f"{r[key]:.4f}" for r in rows)
        return f"{values} | {statistics.mean(r[key] for r in rows):.3f}"

    lines = [f"| method | linear top-1, seeds {' / '.join(map(str, seeds))} | mean | k-NN top-1 | mean "
             "| NMI vs labels (10-means) | mean |", "|---|---|---|---|---|---|---|"]
    training = ["| run | code | epochs | steps | re-assignments | clustering NMI vs labels (chance) at each "
                "| NMI with the previous clustering |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        rows = [results[f"{method}/{s}"] for s in seeds if f"{method}/{s}" in results]
        if not rows:
            continue
        lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells(rows, k) for k in (
            "linear_top1", "knn_top1", "label_nmi")) + " |")
        for seed in seeds:
            run = results.get(f"{method}/{seed}", {}).get("training")
            if run:
                pairs = ", ".join(f"{n:.3f} ({c:.3f})" for n, c in zip(run["clustering_label_nmi"],
                                                                       run.get("clustering_label_chance", [])))
                previous = ", ".join("-" if p is None else f"{p:.3f}" for p in run["clustering_nmi_previous"])
                training.append(f"| {NAMES.get(method, method)}, seed {seed} | {run.get('code') or '?'} | "
                                f"{run['epochs']} | {run['steps']:,} | {run['clusterings']} | {pairs or '-'} | "
                                f"{previous or '-'} |")
    return "\n".join(lines + [""] + training)


if __name__ == "__main__":
    main()
