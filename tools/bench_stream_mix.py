"""How well the training stream mixes classes: the largest class's share of a batch, and classes per batch.

The batches are the rows the trainer's DataLoader gives (:func:`trainer.data.batch_rows`: the same shard
order, interleaving, shuffle blocks and worker round-robin, without reading a shard), measured against the
rows' classes (:func:`trainer.data.batch_mix`). Layouts: ``sorted`` shards each hold one class (an ingest of a
class-sorted folder with ``--no-shuffle``), ``shuffled`` shards hold a seeded permutation of the rows (ingest's
default); ``iid`` batches are consecutive slices of a global permutation (the reference's whole-epoch
shuffle). Streams: ``before`` (4 shards in flight, the earlier default), ``now`` (the default). Deterministic:
no timing, the same figures on every machine.

    python tools/bench_stream_mix.py            # CIFAR-10 train split, Imagenette train split, 100 classes
    python tools/bench_stream_mix.py --json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dataengine.shards import ShardInfo
from trainer.augment import CropConfig
from trainer.config import DataConfig
from trainer.data import EpochPlan, ShardStream, batch_mix, batch_rows
from trainer.sampler import StreamConfig

DATASETS = {  # name: (rows per class, classes, shard size)
    "cifar10 (50,000 rows, 10 classes)": (5000, 10, 1000),
    "imagenette (9,469 rows, 10 classes)": (947, 10, 1000),
    "100 classes (100,000 rows)": (1000, 100, 1000),
}


def measure(per_class: int, num_classes: int, shard_size: int, batch: int, workers: int,
            seed: int) -> list[dict]:
    """Rows of the table for one dataset."""
    classes = np.repeat(np.arange(num_classes), per_class)
    num_rows = classes.size
    shards = [ShardInfo(i, f"s{i}.tar", f"s{i}.tar", min(shard_size, num_rows - first), first)
              for i, first in enumerate(range(0, num_rows, shard_size))]
    permuted = classes[np.random.default_rng(seed).permutation(num_rows)]
    iid_rows = np.random.default_rng(seed + 1).permutation(num_rows)
    rows = [{"layout": "any", "stream": "iid",
             **batch_mix((iid_rows[i:i + batch] for i in range(0, num_rows - batch + 1, batch)), classes)}]
    defaults = DataConfig(shards="")
    streams = {"before": (4, 2048, 1), "now": (defaults.shards_in_flight, defaults.buffer_size, defaults.copy_spread)}
    for layout, labels in (("sorted", classes), ("shuffled", permuted)):
        for name, (in_flight, buffer, spread) in streams.items():
            stream = ShardStream(shards, None, StreamConfig(seed=seed, buffer_size=buffer, copy_spread=spread),
                                 CropConfig(size=8), EpochPlan(0, 0, 1), batch, shards_in_flight=in_flight)
            rows.append({"layout": layout, "stream": f"{name} ({in_flight} in flight)",
                         **batch_mix(batch_rows(stream, workers), labels)})
    for row in rows:
        row["vs_iid"] = row["max_class_share"] / rows[0]["max_class_share"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (1 rank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {name: measure(*layout, args.batch_size, args.workers, args.seed) for name, layout in DATASETS.items()}
    if args.json:
        print(json.dumps(results))
        return
    print(f"batch {args.batch_size}, {args.workers} DataLoader worker(s), one rank")
    print("| data | shards | stream | largest class share | x iid | classes per batch |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        for row in rows:
            print(f"| {name} | {row['layout']} | {row['stream']} | {row['max_class_share']:.3f} | "
                  f"{row['vs_iid']:.2f} | {row['classes_per_batch']:.1f} |")


if __name__ == "__main__":
    main()
