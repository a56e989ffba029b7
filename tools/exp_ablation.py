"""Ablation of the DeeperCluster fixes, each turned back to its earlier behaviour in turn, on one seed.

Same data, split, budget and R0 (RotNet from scratch) as ``tools/exp_protocol.py`` (pass the same ``--out``: R0
and the ingests are shared); each variant trains DeeperCluster from R0 for ``--budget`` CPU seconds and is
evaluated like the protocol's methods (linear probe, k-NN, label NMI). Variants:
- ``default``: the current defaults (the protocol's DeeperCluster run of the seed when it is there);
- ``stream_off``: the non-iid stream of before: the train split ingested in folder order (``--no-shuffle``,
  class-sorted shards) and read 4 shards at a time (``--shards-in-flight 4``);
- ``grad_off``: sub-class head gradients averaged over the whole batch (``--sub-head-grad-mean batch``)
  where the default is per super-class, or the reverse; needs a trainer with that option;
- ``momentum_off``: backbone optimizer rebuilt at every re-assignment: trained with the code given by
  ``--momentum-off-tree`` (a checkout from before the backbone optimizer was kept; there is no option);
- ``sample_off``: the level-0 k-means trained on 256 rows per centroid (``--sample-per-centroid 256``)
  instead of every row.
A variant whose option this trainer lacks is reported as not run. Results go to ``OUT/ablation.json``.

Usage: python tools/exp_ablation.py --out OUT --seed 0 [--variants default stream_off ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance_cifar import dataengine  # noqa: E402
from exp_protocol import add_arguments, evaluate, prepare, save_result, train  # noqa: E402

VARIANTS = ("default", "stream_off", "grad_off", "momentum_off", "sample_off")


def train_help() -> str:
    return subprocess.run([sys.executable, "-m", "dataengine", "train", "--help"], capture_output=True, text=True,
                          env=os.environ | {"COLUMNS": "400"}).stdout


def grad_off_option(help_text: str) -> tuple[str, ...] | None:
    """The sub-class head gradient mean that is not the default, as train options (None: no such option)."""
    if "--sub-head-grad-mean" not in help_text:
        return None
    line = next(line for line in help_text.splitlines() if "--sub-head-grad-mean" in line)
    match = re.search(r"default: \(?(batch|superclass)\b", line)
    if match is None:
        raise SystemExit(f"cannot read the default of --sub-head-grad-mean from: {line.strip()}")
    return ("--sub-head-grad-mean", "batch" if match.group(1) == "superclass" else "superclass")


def trained_config(checkpoint: str) -> dict:
    """The optimisation section of a trainer checkpoint's stored configuration."""
    import torch

    return json.loads(torch.load(checkpoint, map_location="cpu", weights_only=True)["config"])["optim"]


def imported_from(tree: str) -> str:
    """Where ``python -m dataengine`` run in ``tree`` with it on PYTHONPATH imports the trainer from."""
    return subprocess.run([sys.executable, "-c", "import trainer; print(trainer.__file__)"], cwd=tree,
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": tree}).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--momentum-off-tree", help="Checkout of the trainer that rebuilds the backbone optimizer")
    args = parser.parse_args()
    args.out = os.path.abspath(args.out)
    args.tar = args.tar and os.path.abspath(args.tar)
    shards = prepare(args)
    r0 = os.path.join(args.out, "runs", "r0", str(args.seed))
    if not os.path.exists(os.path.join(r0, "done.json")):
        raise SystemExit(f"no R0 for seed {args.seed} in {args.out}: run tools/exp_protocol.py there first")
    results_path = os.path.join(args.out, "ablation.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    help_text = train_help()
    for variant in args.variants:
        key = f"{variant}/{args.seed}"
        if key in results:
            continue
        extra: tuple[str, ...] = ()
        train_shards = shards["train"]
        environment, workdir = dict(os.environ), os.getcwd()
        if variant == "stream_off":
            train_shards = os.path.join(args.out, "ingest-train-sorted")
            dataengine("ingest", "--images", os.path.join(args.out, "split", "train"), "--out", train_shards,
                       "--image-size", str(args.image_size), "--workers", "1", "--no-shuffle")
            extra = ("--shards-in-flight", "4")
        elif variant == "grad_off":
            option = grad_off_option(help_text)
            if option is None:
                print(f"{key}: not run: this trainer has no --sub-head-grad-mean", flush=True)
                continue
            extra = option
        elif variant == "momentum_off":
            if not args.momentum_off_tree:
                print(f"{key}: not run: give --momentum-off-tree", flush=True)
                continue
            tree = os.path.abspath(args.momentum_off_tree)
            if not imported_from(tree).startswith(tree + os.sep):
                raise SystemExit(f"--momentum-off-tree {tree}: the trainer is not imported from it")
            # ``python -m`` puts its working folder first on sys.path: run it in the tree, not in this checkout.
            environment["PYTHONPATH"], workdir = tree, tree
        elif variant == "sample_off":
            extra = ("--sample-per-centroid", "256")
        start = time.perf_counter()
        saved, cwd = dict(os.environ), os.getcwd()
        os.environ.clear()
        os.environ.update(environment)
        os.chdir(workdir)
        try:
            # The default variant is the protocol's DeeperCluster run of this seed (trained once, shared).
            run = os.path.join(args.out, *(("runs", "deepercluster") if variant == "default" else
                                           ("ablation", variant)), str(args.seed))
            training = train(args, "deepercluster", args.seed, train_shards, run, args.budget,
                             os.path.join(r0, "checkpoint.pt"), extra)
            training["options"] = list(extra)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            os.chdir(cwd)
        if variant == "grad_off" and trained_config(training["checkpoint"])["sub_head_grad_mean"] != extra[1]:
            raise SystemExit(f"{key}: the run did not train with {' '.join(extra)}")
        result = evaluate(args, training["checkpoint"], args.seed, shards, os.path.join(run, "eval")) | {
            "training": training, "seconds": round(time.perf_counter() - start, 1)}
        save_result(results_path, results, key, result)
        print(f"{key}: linear {result['linear_top1']:.4f} knn {result['knn_top1']:.4f} "
              f"nmi {result['label_nmi']:.4f} ({result['seconds']:.0f} s)", flush=True)
    print(markdown(results, args.seed))


DESCRIPTIONS = {"default": "all fixes (the protocol's DeeperCluster run)",
                "stream_off": "stream off: `--no-shuffle` ingest, `--shards-in-flight 4`",
                "grad_off": "head gradient off: `--sub-head-grad-mean batch`",
                "momentum_off": "backbone momentum off: optimizer rebuilt at each re-assignment",
                "sample_off": "k-means sample off: `--sample-per-centroid 256`"}


def markdown(results: dict, seed: int) -> str:
    """The variants of ``seed`` as a Markdown table (probes, training log, each clustering's NMI vs labels)."""
    lines = ["| variant | code | linear top-1 | k-NN top-1 | NMI vs labels (10-means) | epochs | steps "
             "| clustering NMI vs labels at each re-assignment |", "|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        result = results.get(f"{variant}/{seed}")
        if result is None:
            continue
        run = result["training"]
        nmis = ", ".join(f"{n:.3f}" for n in run["clustering_label_nmi"]) or "-"
        lines.append(f"| {DESCRIPTIONS[variant]} | {run.get('code') or '?'} | {result['linear_top1']:.4f} | "
                     f"{result['knn_top1']:.4f} | {result['label_nmi']:.4f} | {run['epochs']} | {run['steps']:,} "
                     f"| {nmis} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
