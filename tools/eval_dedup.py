"""Precision and recall of near-duplicate removal on the synthetic corpus's planted near-duplicates.

Two corpora (a validation seed and a test seed) with planted near-duplicates (resized, re-encoded and cropped
copies of earlier photos, ``near_duplicates.tsv``) go through the real pipeline: ``synth -> ingest -> embed ->
cluster`` (the small convnet, random initialisation). The threshold is the best-F1 one on the validation
corpus (:func:`dataengine.curate.choose_threshold`); ``dataengine curate --dedup-threshold`` then runs on the
test corpus through the CLI and its ledger is scored against the planted rows. Per kind of copy, the recall
and the share of copies that landed in the same cluster as their source (the rule only looks within clusters)
are printed too.

Usage: python tools/eval_dedup.py [--images 2000] [--near-duplicates 250] [--image-size 32] [--levels 4,8]
                                  [--space whitened] [--val-seed 1] [--test-seed 2] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def build(root: str, args: argparse.Namespace, seed: int) -> None:
    """Corpus, ingest, store and clustering ``c`` under ``root`` (each step skipped when done)."""
    from dataengine.cluster import ClusterConfig, run_cluster
    from dataengine.embed import EmbedConfig, run_embed
    from dataengine.ingest import IngestConfig, run_ingest
    from dataengine.synth import SynthConfig, generate_corpus

    generate_corpus(f"{root}/corpus", SynthConfig(num_images=args.images, seed=seed,
                                                   num_near_duplicates=args.near_duplicates))
    run_ingest(IngestConfig(yfcc=f"{root}/corpus/metadata.tsv", images=f"{root}/corpus/images", out=f"{root}/ingest",
                            workers=args.workers))
    run_embed(EmbedConfig(shards=f"{root}/ingest", out=f"{root}/store", model="small", image_size=args.image_size,
                          workers=args.workers, seed=seed))
    run_cluster(ClusterConfig(store=f"{root}/store", name="c", seed=seed, pca_dim=args.pca,  # done: a no-op
                              levels=tuple(int(v) for v in args.levels.split(","))))


def planted_mask(root: str, keys: list[str]) -> tuple[np.ndarray, dict[int, tuple[int, str]]]:
    from dataengine.synth import read_near_duplicates

    planted = read_near_duplicates(f"{root}/corpus/near_duplicates.tsv")
    return np.array([int(k) in planted for k in keys]), planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--near-duplicates", type=int, default=None, help="default: images // 8")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--levels", default="4,8")
    parser.add_argument("--pca", type=int, default=32)
    parser.add_argument("--space", default="whitened", choices=["whitened", "features"])
    parser.add_argument("--val-seed", type=int, default=1)
    parser.add_argument("--test-seed", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "eval_dedup"))
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args()
    args.near_duplicates = args.near_duplicates if args.near_duplicates is not None else args.images // 8

    from dataengine.curate import choose_threshold, clustering_similarities, dedup_scores
    from dataengine.store import open_store

    tag = f"n{args.images}-d{args.near_duplicates}-s{args.image_size}-l{args.levels.replace(',', 'x')}-p{args.pca}"
    val, test = (os.path.join(args.workdir, f"{tag}-seed{s}") for s in (args.val_seed, args.test_seed))
    for root, seed in ((val, args.val_seed), (test, args.test_seed)):
        build(root, args, seed)
    store = open_store(f"{val}/store")
    _, _, similarities = clustering_similarities(store, "c", space=args.space)
    threshold = choose_threshold(similarities, planted_mask(val, [str(k) for k in store.keys[:]])[0])
    out = f"{test}/curated-{args.space}"
    command = [sys.executable, "-m", "dataengine", "--quiet", "curate", f"{test}/store", "--clustering", "c",
               "--out", out, "--dedup-threshold", repr(threshold), "--dedup-space", args.space, "--overwrite",
               "--json"]
    curated = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    with open(f"{out}/ledger.jsonl", encoding="utf-8") as handle:
        ledger = [json.loads(line) for line in handle]
    keys = [e["id"] for e in ledger]
    planted, sources = planted_mask(test, keys)
    dropped = np.array([e["status"] == "near_duplicate" for e in ledger])
    scores = dedup_scores(dropped, planted)
    cluster = {e["id"]: e["cluster"] for e in ledger}
    kinds = {}
    for kind in ("resized", "reencoded", "cropped"):
        rows = [i for i, k in enumerate(keys) if planted[i] and sources[int(k)][1] == kind]
        same = [cluster[keys[i]] == cluster.get(str(sources[int(keys[i])][0])) for i in rows]
        kinds[kind] = {"planted": len(rows), "recall": float(dropped[rows].mean()) if rows else None,
                       "same_cluster_as_source": float(np.mean(same)) if rows else None}
    summary = {"config": vars(args), "threshold": threshold, "test": scores.to_dict(), "kinds": kinds,
               "counts": curated["counts"]}
    print(f"threshold {threshold:.4f} (best F1 on seed {args.val_seed}); seed {args.test_seed}: dropped "
          f"{scores.dropped}, planted {scores.planted}, precision {scores.precision:.3f}, recall {scores.recall:.3f}")
    for kind, figures in kinds.items():
        print(f"  {kind:9s} {figures['planted']:4d} planted, recall {figures['recall']:.3f}, same cluster as the "
              f"source {figures['same_cluster_as_source']:.3f}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
