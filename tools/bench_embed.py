"""Benchmark ``dataengine embed`` against the ideal measured in the same run, and the store's write speed.

Cases (on ../shared/data): resnet18 at 224 on Imagenette photos, the small convnet at 32 on CIFAR-10. The
inputs are a subset of each tar (``--limit``), ingested once into a scratch folder with ``dataengine ingest``.

For each case, ``--repeats`` times, all on every core:

* decode rate: the embed DataLoader alone (webdataset streaming, JPEG decode, resize, crop; same workers and
  batch grid), iterating and dropping the batches;
* forward rate: the model alone on random uint8 batches of the same size (same threads, same model path),
  measured before and after the end-to-end run (the mean is used: the load of a shared machine drifts);
* end to end: ``run_embed`` into a fresh store (model build, DataLoader start, writes included).

On CPU, decoding and the forward pass compete for the same cores, so the ideal is
``1 / (1/forward + 1/decode)``; on a GPU they overlap and the ideal is ``min(forward, decode)``. The ratio
end-to-end / ideal says what the pipeline keeps (target >= 0.90 on CPU). Medians are reported.

Store write throughput: an (N, d) float16 array written block by block through the feature store
(``FeatureStore.write_block``: zstd-compressed chunks, valid mask, completion records) against ``np.save`` of
the same array to a raw ``.npy`` file.

Usage: python tools/bench_embed.py [--repeats 3] [--limit-imagenette 1024] [--limit-cifar 20000]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tarfile
import tempfile
import time

import numpy as np
import torch

from dataengine.embed import BatchGrid, DecodeDataset, EmbedConfig, make_loader, plan_pieces, run_embed
from dataengine.embed import model as embed_model
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.shards import load_shard_set
from dataengine.store import StoreLayout, create_store, open_store

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")


def subset_tar(source: str, limit: int, out: str) -> str:
    """A tar of ``limit`` image members of ``source``, evenly spaced (so that every class is present)."""
    with tarfile.open(source) as archive:
        members = [m for m in archive.getmembers() if m.isfile()]
        step = max(1, len(members) // limit)
        with tarfile.open(out, "w") as subset:
            for member in members[::step][:limit]:
                subset.addfile(member, archive.extractfile(member))
    return out


def ingest(tar_path: str, out: str, image_size: int) -> str:
    run_ingest(IngestConfig(images=tar_path, out=out, image_size=image_size, workers=os.cpu_count() or 1))
    return out


def decode_rate(shards: str, config: EmbedConfig, batch_size: int) -> float:
    """Images/s of the embed DataLoader alone."""
    shard_set = load_shard_set(shards)
    keys = open_store(config.out).keys  # the store of a previous end-to-end run holds the keys
    n = shard_set.num_samples
    grid = BatchGrid(rows_per_block=n, batch_size=batch_size, num_rows=n)
    rows = max(batch_size, -(-n // (2 * max(1, config.workers))))
    pieces = plan_pieces(shard_set, lambda s, e: [str(k) for k in keys[s:e]], [(0, n)],
                         -(-rows // batch_size) * batch_size)
    dataset = DecodeDataset(pieces, grid, config.resolved_resize_size, config.image_size)
    start = time.perf_counter()
    count = sum(len(item["rows"]) for item in make_loader(dataset, config.workers, pin_memory=False))
    assert count == n, (count, n)
    return n / (time.perf_counter() - start)


def forward_rate(config: EmbedConfig, batch_size: int, seconds: float = 10.0) -> float:
    """Images/s of the model alone on random uint8 batches (for about ``seconds``), through embed's own model
    path (device, AMP and channels_last as embed resolves them; features copied back to the host)."""
    model = embed_model.build_model(config)
    batch = torch.randint(0, 256, (batch_size, 3, config.image_size, config.image_size), dtype=torch.uint8)
    if model.device.type == "cuda":
        batch = batch.pin_memory()
    embed_model.forward(model, batch)  # warm-up
    done, start = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - start < seconds:
        embed_model.forward(model, batch)
        done += 1
    return done * batch_size / (time.perf_counter() - start)


def ideal_rate(forward: float, decode: float) -> float:
    """CPU: decoding and forward share the cores; GPU: they overlap."""
    if torch.cuda.is_available():
        return min(forward, decode)
    return 1 / (1 / forward + 1 / decode)


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def end_to_end_rate(config: EmbedConfig) -> tuple[float, int, float]:
    """Images/s of ``run_embed``, its batch size, and its CPU seconds per image (workers included)."""
    shutil.rmtree(config.out, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = run_embed(config)
    cpu = _cpu_seconds() - cpu
    return result.num_rows / (time.perf_counter() - start), result.batch_size, cpu / result.num_rows


def bench_case(name: str, shards: str, arch: str, image_size: int, resize_size: int, repeats: int,
               scratch: str) -> tuple[float, float]:
    """Print the case's figures; returns its median end-to-end images/s and CPU seconds per image."""
    workers = min(4, os.cpu_count() or 1)
    config = EmbedConfig(shards=shards, out=os.path.join(scratch, f"store-{name}"), model=arch,
                         image_size=image_size, resize_size=resize_size, workers=workers)
    n = load_shard_set(shards).num_samples
    print(f"\n{name}: {arch} at {image_size} (resize {resize_size}), {n} images, {workers} workers, "
          f"{torch.get_num_threads()} torch threads")
    # What run_embed will pick.
    auto_batch = embed_model.fit_batch_size(embed_model.build_model(config), image_size, None)
    decodes, forwards, ends, ratios, cpus = [], [], [], [], []
    for repeat in range(repeats):
        # The end-to-end run is bracketed by two forward measurements: on a shared machine the load drifts.
        before = forward_rate(config, auto_batch)
        rate, batch_size, cpu = end_to_end_rate(config)
        ends.append(rate)
        cpus.append(cpu)
        decodes.append(decode_rate(shards, config, batch_size))
        forwards.append((before + forward_rate(config, batch_size)) / 2)
        ratios.append(ends[-1] / ideal_rate(forwards[-1], decodes[-1]))
        print(f"  run {repeat}: batch {batch_size}, decode {decodes[-1]:.1f} img/s, forward {forwards[-1]:.1f} "
              f"img/s (before {before:.1f}), end-to-end {ends[-1]:.1f} img/s, ratio {ratios[-1]:.3f}, "
              f"load {os.getloadavg()[0]:.1f}")
    decode, forward, end = (statistics.median(v) for v in (decodes, forwards, ends))
    ideal = ideal_rate(forward, decode)
    print(f"  median decode {decode:.1f} img/s, forward {forward:.1f} img/s, ideal {ideal:.1f} img/s, "
          f"end-to-end {end:.1f} img/s")
    print(f"  ratio end-to-end / ideal: median of runs {statistics.median(ratios):.3f}, of medians "
          f"{end / ideal:.3f} (target >= 0.90)")
    return end, statistics.median(cpus)


def calibrate(path: str, rates: dict[str, tuple[float, float]]) -> None:
    """Store the end-to-end figures for `dataengine plan`: images/s per GPU, or CPU seconds per image."""
    import sys

    from dataengine.plan import update_calibration

    if torch.cuda.is_available():
        models = {name: {"gpu_images_per_second": rate / torch.cuda.device_count()}
                  for name, (rate, _) in rates.items()}
    else:
        models = {name: {"cpu_seconds_per_image": cpu} for name, (_, cpu) in rates.items()}
    update_calibration(path, "embed", {"models": models}, " ".join(["python", "tools/bench_embed.py"] + sys.argv[1:]))


def bench_channels_last(repeats: int, scratch: str) -> None:
    """On CPU, does channels_last help resnet18 at 224? (it decides the CPU default)."""
    base = dict(shards=scratch, out=scratch, model="resnet18", image_size=224, device="cpu")
    plain, last = [], []
    for _ in range(repeats):
        plain.append(forward_rate(EmbedConfig(**base, channels_last=False), 32))
        last.append(forward_rate(EmbedConfig(**base, channels_last=True), 32))
    p, c = statistics.median(plain), statistics.median(last)
    print(f"\nresnet18 224 forward on CPU: contiguous {p:.1f} img/s, channels_last {c:.1f} img/s, "
          f"ratio {c / p:.3f}")


def bench_store_writes(num_rows: int, dim: int, repeats: int, scratch: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.standard_normal((num_rows, dim), dtype=np.float32).astype(np.float16)
    layout = StoreLayout(num_rows=num_rows, dim=dim, dtype="float16", chunk_rows=1024)
    mb = array.nbytes / 1e6
    stores, npys = [], []
    for _ in range(repeats):
        path = os.path.join(scratch, "write.zarr")
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        store = create_store(path, None, layout, {})
        for block in range(layout.num_blocks):
            lo, hi = layout.block_rows(block)
            store.write_block(block, lo, array[lo:hi], np.ones(hi - lo, bool), {"rows": [lo, hi], "invalid": []})
        stores.append(mb / (time.perf_counter() - start))
        start = time.perf_counter()
        np.save(os.path.join(scratch, "write.npy"), array)
        npys.append(mb / (time.perf_counter() - start))
    s, n = statistics.median(stores), statistics.median(npys)
    print(f"\nstore writes: {num_rows} x {dim} float16 ({mb:.0f} MB), {layout.num_blocks} blocks of "
          f"{layout.rows_per_block} rows")
    print(f"  feature store {s:.0f} MB/s, np.save {n:.0f} MB/s, ratio store / npy = {s / n:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-imagenette", type=int, default=1024)
    parser.add_argument("--limit-cifar", type=int, default=20000)
    parser.add_argument("--store-rows", type=int, default=200_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["resnet18", "small", "channels_last", "store"])
    parser.add_argument("--calibrate", metavar="FILE", help="store the end-to-end rates for `dataengine plan`")
    args = parser.parse_args()
    imagenette = os.path.join(DATA, "imagenette2-train-4k.tar")
    cifar = os.path.join(DATA, "cifar10-train.tar")
    for path in (imagenette, cifar):
        if not os.path.exists(path):
            raise SystemExit(f"{path} not found (see ../shared/data/README.md)")
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    rates = {}
    with tempfile.TemporaryDirectory() as scratch:
        if "resnet18" not in args.skip:
            tar = subset_tar(imagenette, args.limit_imagenette, os.path.join(scratch, "imagenette.tar"))
            shards = ingest(tar, os.path.join(scratch, "ingest-imagenette"), 256)
            rates["resnet18@224"] = bench_case("imagenette", shards, "resnet18", 224, 256, args.repeats, scratch)
        if "small" not in args.skip:
            tar = subset_tar(cifar, args.limit_cifar, os.path.join(scratch, "cifar.tar"))
            shards = ingest(tar, os.path.join(scratch, "ingest-cifar"), 32)
            rates["small@32"] = bench_case("cifar", shards, "small", 32, 32, args.repeats, scratch)
        if "channels_last" not in args.skip:
            bench_channels_last(args.repeats, scratch)
        if "store" not in args.skip:
            bench_store_writes(args.store_rows, 512, args.repeats, scratch)
    if args.calibrate and rates:
        calibrate(args.calibrate, rates)


if __name__ == "__main__":
    main()
