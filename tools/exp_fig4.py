"""The DeeperCluster paper's Figure 4 at small scale: NMI of the clustering with every metadata kind over training.

On the synthetic YFCC-like corpus (``dataengine synth``: planted users, hashtags, GPS, devices and latent
visual classes), three feature sources are clustered with the same hierarchical k-means (``--levels``, PCA-
whitened to 64 dims) and the leaf clustering is scored against every metadata kind (the trainer's monitor:
NMI normalised by the geometric mean, with its chance level) and against the planted visual class (the
analogue of the paper's ImageNet-classifier labels):
- DeeperCluster, re-assigned every epoch: the clustering of each re-assignment (epoch 0 clusters the random
  initial network), for ``--budget`` CPU seconds;
- RotNet trained for the same budget, its final features;
- a random Sobel network's features.

Resumable; results go to ``OUT/fig4.json``; ``--plot PNG`` draws the figure from it (one panel per kind).
Children run with one thread.

Usage: python tools/exp_fig4.py --out OUT [--num-images 4000 --budget 300 --seed 0] [--plot fig4.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance_cifar import dataengine  # noqa: E402

from dataengine.errors import DataEngineError  # noqa: E402

KINDS = ("class", "hashtag", "user", "gps", "device")


def machine() -> str:
    """CPU model name (as lscpu shows it) and core count of this machine."""
    with open("/proc/cpuinfo") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores"


def planted_classes(corpus: str) -> dict[str, str]:
    with open(os.path.join(corpus, "classes.tsv")) as handle:
        return dict(line.rstrip("\n").split("\t")[:2] for line in handle if line.strip())


def score(store_url: str, name: str, classes: dict[str, str]) -> dict:
    """NMI (and chance level) of clustering ``name`` with every metadata kind, and NMI with the planted class."""
    import numpy as np

    from dataengine.clustering import open_clustering
    from dataengine.metrics import Contingency
    from dataengine.store import open_store
    from trainer.monitor import clustering_nmi

    summary = clustering_nmi(store_url, name)
    store = open_store(store_url)
    clustering = open_clustering(store, name)
    leaves = np.asarray(clustering.assignment_array(clustering.leaf_level))
    names = sorted(set(classes.values()))
    codes = np.array([names.index(classes[k]) if k in classes else -1 for k in np.asarray(store.keys[:])])
    keep = (leaves >= 0) & (codes >= 0)
    nmi = {kind: {"nmi": round(v["nmi"], 4), "chance": round(v["chance"], 4)} for kind, v in summary["nmi"].items()}
    table = Contingency()
    table.update(leaves[keep], codes[keep])
    nmi["class"] = {"nmi": round(float(table.nmi()), 4), "chance": round(float(table.chance_nmi()), 4)}
    return {"nmi": nmi, "num_clusters": summary["num_clusters"]}


def deepercluster(args: argparse.Namespace, shards: str, run: str, classes: dict[str, str]) -> list[dict]:
    """Train DeeperCluster, scoring each re-assignment's clustering while its feature store still exists."""
    scored_path = os.path.join(run, "scored.json")
    scored = json.load(open(scored_path)) if os.path.exists(scored_path) else {}
    command = [sys.executable, "-m", "dataengine", "--quiet", "train", shards, "--out", run, "--mode",
               "deepercluster", "--arch", "small", "--image-size", str(args.image_size), "--epochs", "1000",
               "--reassign-every", "1", "--levels", args.levels, "--batch-size", "128", "--threads", "1",
               "--workers", "0", "--seed", str(args.seed), "--time-budget", str(args.budget), "--budget-clock",
               "cpu", "--checkpoint-every", "100"]
    done = os.path.join(run, "done.json")
    process = None if os.path.exists(done) else subprocess.Popen(command, stdout=subprocess.DEVNULL)
    features = os.path.join(run, "features")
    while True:
        finished = process is None or process.poll() is not None
        logged = set()
        if os.path.exists(os.path.join(run, "metrics.jsonl")):
            with open(os.path.join(run, "metrics.jsonl")) as handle:
                logged = {json.loads(line).get("clustering_name") for line in handle}
        for name in sorted(os.listdir(features)) if os.path.isdir(features) else []:
            # A clustering is complete once its epoch's log line names it (or a later epoch is training).
            later = any(other > name for other in os.listdir(features))
            if name in scored or not (name in logged or later or finished):
                continue
            try:
                scored[name] = score(os.path.join(features, name), name, classes)
            except (FileNotFoundError, KeyError, ValueError, DataEngineError) as error:  # removed or not yet written
                print(f"{name}: not scored ({error})", flush=True)
                continue
            with open(scored_path, "w") as handle:
                json.dump(scored, handle, indent=1, sort_keys=True)
            print(f"deepercluster {name}: " + " ".join(f"{k} {v['nmi']:.3f}" for k, v in scored[name]["nmi"].items()),
                  flush=True)
        if finished:
            break
        time.sleep(3)
    if process is not None:
        if process.returncode != 0:
            raise SystemExit(f"train failed with exit code {process.returncode}")
        open(done, "w").close()
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        epochs = [json.loads(line) for line in handle]
    points = []
    for epoch in epochs:
        name = epoch.get("clustering_name")
        if "clustering" not in epoch or name is None:
            continue
        logged_nmi = {k: {"nmi": round(v["nmi"], 4), "chance": round(v["chance"], 4)}
                      for k, v in epoch["clustering"]["nmi"].items()}
        points.append({"epoch": epoch["epoch"], "steps_before": sum(e.get("steps", 0) for e in epochs
                                                                     if e["epoch"] < epoch["epoch"]),
                       "nmi": logged_nmi | ({"class": scored[name]["nmi"]["class"]} if name in scored else {}),
                       "nmi_previous": epoch["clustering"].get("nmi_previous")})
    return points


def features_of(args: argparse.Namespace, shards: str, store: str, classes: dict[str, str],
                checkpoint: str | None) -> dict:
    source = ["--checkpoint", checkpoint] if checkpoint else ["--model", "small", "--sobel", "--seed", str(args.seed)]
    if not os.path.exists(os.path.join(store, "zarr.json")):
        dataengine("embed", shards, "--out", store, *source, "--image-size", str(args.image_size), "--threads", "1",
                   "--workers", "1", "--overwrite")
    dataengine("cluster", store, "--clustering", "fig4", "--levels", args.levels, "--pca", "64", "--seed", str(args.seed),
               "--threads", "1", "--no-neighbor-index", "--overwrite")
    return score(store, "fig4", classes)


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["deepercluster"]
    fig, axes = plt.subplots(1, len(KINDS), figsize=(3.2 * len(KINDS), 3.0), sharex=True)
    for axis, kind in zip(axes, KINDS):
        xs = [p["epoch"] for p in points if kind in p["nmi"]]
        axis.plot(xs, [p["nmi"][kind]["nmi"] for p in points if kind in p["nmi"]], "o-", label="DeeperCluster")
        for source, style in (("rotnet", "C1--"), ("random", "C2:")):
            if source in results and kind in results[source]["nmi"]:
                axis.axhline(results[source]["nmi"][kind]["nmi"], color=style[:2], linestyle=style[2:],
                             label=f"{source} features")
        chance = [p["nmi"][kind].get("chance") for p in points if kind in p["nmi"]]
        if chance and chance[0] is not None:
            axis.plot(xs, chance, color="grey", linewidth=0.8, label="chance level")
        axis.set_title(kind)
        axis.set_xlabel("epoch (re-assignment)")
    axes[0].set_ylabel("NMI (geometric)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(results: dict) -> str:
    """NMI with every kind: one row per DeeperCluster re-assignment, then RotNet's and random features."""
    lines = ["| features | " + " | ".join(KINDS) + " | NMI with the previous clustering |",
             "|---|" + "---|" * (len(KINDS) + 1)]

    def row(label: str, nmi: dict, previous: str) -> str:
        return f"| {label} | " + " | ".join(
            f"{nmi[k]['nmi']:.3f}" + (f" ({nmi[k]['chance']:.3f})" if nmi[k].get("chance") is not None else "")
            if k in nmi else "-" for k in KINDS) + f" | {previous} |"

    for point in results.get("deepercluster", []):
        previous = point.get("nmi_previous")
        lines.append(row(f"DeeperCluster, epoch {point['epoch']} ({point['steps_before']:,} steps before)",
                         point["nmi"], "-" if previous is None else f"{previous:.3f}"))
    for source, label in (("rotnet", "RotNet, same budget"), ("random", "random Sobel network")):
        if source in results:
            steps = f" ({results[source]['steps']:,} steps)" if "steps" in results[source] else ""
            lines.append(row(label + steps, results[source]["nmi"], "-"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--ingest-size", type=int, default=48, help="Shorter side of the ingested images")
    parser.add_argument("--image-size", type=int, default=32, help="Training and embedding crop")
    parser.add_argument("--levels", default="4,16", help="Hierarchical k-means m,k of every feature source")
    parser.add_argument("--budget", type=float, default=300.0, help="CPU seconds of DeeperCluster and of RotNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="Write the figure to this PNG (from OUT/fig4.json; nothing is trained)")
    args = parser.parse_args()
    results_path = os.path.join(args.out, "fig4.json")
    if args.plot:
        results = json.load(open(results_path))
        config = results["config"]
        plot(results, args.plot, f"synthetic corpus, {config['num_images']} photos, small convnet at "
                                 f"{config['image_size']} px, {config['budget']:.0f} CPU-s per method, "
                                 f"levels {config['levels']}, seed {config['seed']}; {config.get('machine', '')}")
        print(markdown(results))
        return
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    corpus, shards = os.path.join(args.out, "corpus"), os.path.join(args.out, "ingest")
    dataengine("synth", corpus, "--num-images", str(args.num_images), "--seed", str(args.seed))
    dataengine("ingest", "--yfcc", os.path.join(corpus, "metadata.tsv"), "--images", os.path.join(corpus, "images"),
               "--out", shards, "--image-size", str(args.ingest_size), "--shard-size", "250", "--workers", "1")
    classes = planted_classes(corpus)
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    results["config"] = {k: v for k, v in vars(args).items() if k != "plot"} | {"machine": machine()}

    def save() -> None:
        with open(results_path, "w") as handle:
            json.dump(results, handle, indent=1, sort_keys=True)

    save()

    if "random" not in results:
        results["random"] = features_of(args, shards, os.path.join(args.out, "random.zarr"), classes, None)
        save()
    print("random:", json.dumps(results["random"]["nmi"]), flush=True)
    if "deepercluster" not in results:
        results["deepercluster"] = deepercluster(args, shards, os.path.join(args.out, "deepercluster"), classes)
        save()
    if "rotnet" not in results:
        run = os.path.join(args.out, "rotnet")
        if not os.path.exists(os.path.join(run, "done.json")):
            dataengine("train", shards, "--out", run, "--mode", "rotnet", "--arch", "small", "--image-size",
                       str(args.image_size), "--epochs", "1000", "--batch-size", "128", "--threads", "1",
                       "--workers", "0", "--seed", str(args.seed), "--time-budget", str(args.budget),
                       "--budget-clock", "cpu", "--checkpoint-every", "100")
            open(os.path.join(run, "done.json"), "w").close()
        with open(os.path.join(run, "metrics.jsonl")) as handle:
            epochs = [json.loads(line) for line in handle]
        results["rotnet"] = features_of(args, shards, os.path.join(args.out, "rotnet.zarr"), classes,
                                        os.path.join(run, "checkpoint.pt")) | {
            "epochs": len(epochs), "steps": sum(e.get("steps", 0) for e in epochs)}
        save()
    print("rotnet:", json.dumps(results["rotnet"]["nmi"]), flush=True)
    for source in ("random", "rotnet"):  # results of a version that gave the planted class no chance level
        if "chance" not in results[source]["nmi"]["class"]:
            results[source] |= score(os.path.join(args.out, f"{source}.zarr"), "fig4", classes)
            save()
    print(markdown(results))


if __name__ == "__main__":
    main()
