"""Training throughput: shards on a moto S3 server vs local shards vs tensors already in memory (the ideal).

The same DeeperCluster step (small convnet with Sobel, 32-pixel crops, hierarchical head, batch 64) is fed
from: decoded uint8 tensors in memory (no I/O, no decoding: the ideal), the trainer's streamed input
(webdataset shards -> balanced stream -> decode -> random-resized crop, one DataLoader worker) over local
shards, and over the same shards on an S3 endpoint (moto's server on 127.0.0.1, through fsspec). Each with
and without cluster balancing (long-tailed random labels). Samples/s are medians over repeats; the ratios to
the in-memory ideal are printed.

Usage: python tools/bench_train.py [--images 2000] [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def _corpus(root: str, num_images: int) -> str:
    from dataengine.ingest import IngestConfig, run_ingest
    from dataengine.synth import SynthConfig, generate_corpus

    generate_corpus(os.path.join(root, "corpus"), SynthConfig(num_images=num_images, seed=0, anomalies=False))
    out = os.path.join(root, "ingest")
    run_ingest(IngestConfig(yfcc=os.path.join(root, "corpus", "metadata.tsv"),
                            images=os.path.join(root, "corpus", "images"), out=out, shard_size=250))
    return out


def _step_fn(num_parents: int = 4, children: int = 16):
    from trainer.config import ClusteringConfig, DataConfig, TrainConfig
    from trainer.network import Network
    from trainer.losses import HierarchicalHead, rotation_sub_counts, super_targets
    from trainer.rotation import random_rotations, rotate_batch

    network = Network(TrainConfig(out="-", data=DataConfig(shards="-", image_size=32),
                                  clustering=ClusteringConfig(levels=(num_parents, children))))
    head = HierarchicalHead(network.feature_dim, rotation_sub_counts([children] * num_parents))
    optimizer = torch.optim.SGD(list(network.parameters()) + list(head.parameters()), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    def step(images: torch.Tensor, rows: torch.Tensor) -> None:
        rotations = random_rotations(len(images), generator)
        parents = rows % num_parents
        loss, _ = head(network.features(rotate_batch(images, rotations)), super_targets(parents, rotations),
                       (rows // num_parents) % children)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _timed(batches, step, steps: int) -> float:
    iterator = iter(batches)
    images, rows = next(iterator)  # start-up (workers, first shard) is not part of the rate
    step(images, rows)
    start, done = time.perf_counter(), 0
    for images, rows in iterator:
        step(images, rows)
        done += len(images)
        if done >= steps * len(images):
            break
    return done / (time.perf_counter() - start)


def _memory_batches(shards: str, batch: int):
    from dataengine.shards import load_shard_set, sample_stream
    from trainer.data import decode_rgb

    shard_set = load_shard_set(shards)
    crop = torch.stack([decode_rgb(s["jpg"])[:, :32, :32] for s in sample_stream(shard_set.urls())])
    while True:
        for start in range(0, len(crop) - batch + 1, batch):
            yield crop[start:start + batch], torch.arange(start, start + batch)


def _stream_batches(shards: str, batch: int, balanced: bool, storage_options: dict | None):
    from dataengine.shards import load_shard_set
    from trainer.augment import CropConfig
    from trainer.data import EpochPlan, ShardStream, make_loader
    from trainer.sampler import ClusterBalance, StreamConfig

    shard_set = load_shard_set(shards, storage_options)
    labels = np.minimum(np.random.default_rng(0).zipf(1.5, shard_set.num_samples) - 1, 63).astype(np.int64)
    balance = ClusterBalance(labels) if balanced else None
    epoch = 0
    while True:
        stream = ShardStream(shard_set.shards, balance, StreamConfig(seed=0, buffer_size=512),
                             CropConfig(size=32, scale=(0.2, 1.0)), EpochPlan(epoch, 0, 1), batch, storage_options)
        yield from make_loader(stream, batch, workers=1)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
    with tempfile.TemporaryDirectory() as root:
        shards = _corpus(root, args.images)
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        fs.put(shards, "s3://bench/ingest", recursive=True)
        step = _step_fn()
        sources = {"memory (ideal)": lambda b: _memory_batches(shards, args.batch)}
        for balanced in (False, True):
            tag = "balanced" if balanced else "plain"
            sources[f"local shards, {tag}"] = lambda b, bal=balanced: _stream_batches(shards, args.batch, bal, None)
            sources[f"s3 shards, {tag}"] = lambda b, bal=balanced: _stream_batches("s3://bench/ingest", args.batch,
                                                                                    bal, options)
        rates: dict[str, list[float]] = {name: [] for name in sources}
        for _ in range(args.repeats):
            for name, make in sources.items():
                rates[name].append(_timed(make(None), step, args.steps))
    server.stop()
    ideal = statistics.median(rates["memory (ideal)"])
    print(f"{args.images} synthetic images, batch {args.batch}, {args.steps} steps, {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:24s} {rate:8.1f} samples/s   ratio to in-memory {rate / ideal:.3f}")


if __name__ == "__main__":
    main()
