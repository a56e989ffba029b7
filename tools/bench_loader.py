"""Training input alone (no model): samples/s and CPU microseconds per sample, on every core.

The trainer's loader (shards -> samples -> JPEG decode -> random-resized crop + flip -> batches, in
``--workers`` DataLoader worker processes; the main process only receives the batches) reads:

* ``s3``: the shards on an S3 endpoint (moto's server on 127.0.0.1, in its own process, whose CPU time is
  left out: it stands in for the storage service);
* ``local``: the same shards on local disk;
* ``memory``: the decoded images already in memory as uint8 tensors (the same crop and batches, no I/O, no
  decoding).

* ``gpu`` (``--gpu-decode``, CUDA only): the same shards read by the same workers, which only parse the tars
  and hand over the JPEG bytes; the main process decodes each batch on the GPU (``torchvision.io.decode_jpeg``
  with ``device="cuda"``) and crops and resizes there with the same crop code.

The reference, ``kernel``, is the bare per-sample work with nothing around it: the same number of processes,
each decoding its share of the JPEG bytes (already in memory) with PIL and applying the same crop and resize
(:func:`trainer.augment.resized_crop_flip`), keeping nothing. Every source runs once per repeat, in a rotating
order; the tool prints medians of samples/s, of CPU microseconds per sample (the process tree's user + system
time: main process and workers), and of the per-repeat ratios ``s3 / local`` (target >= 0.9) and
``local / kernel`` (target >= 0.8).

Data: ``--imagenette PATH`` (default ``../shared/data/imagenette2-train-4k.tar`` beside the checkout: real
photos) when present, else a synthetic corpus (``--source-size`` pixels on the shorter side); ingested into shards of ``--shard-size``.

Usage: nice -n 10 python tools/bench_loader.py [--images 2000] [--crop 224] [--workers N] [--batch 64]
[--repeats 5] [--gpu-decode]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

IMAGENETTE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "imagenette2-train-4k.tar")


# ------------------------------------------------------------------------------------------------ data


def _ingest(root: str, images: int, source_size: int, shard_size: int, imagenette: str | None) -> str:
    from dataengine.ingest import IngestConfig, run_ingest

    out = os.path.join(root, "ingest")
    if imagenette:
        run_ingest(IngestConfig(images=imagenette, out=out, shard_size=shard_size, image_size=256))
        return out
    from dataengine.synth import SynthConfig, generate_corpus

    corpus = os.path.join(root, "corpus")
    generate_corpus(corpus, SynthConfig(num_images=images, seed=0, anomalies=False, min_image_size=source_size,
                                        max_image_size=int(source_size * 1.33)))
    run_ingest(IngestConfig(yfcc=os.path.join(corpus, "metadata.tsv"), images=os.path.join(corpus, "images"),
                            out=out, shard_size=shard_size, image_size=source_size))
    return out


def _jpegs(shards: str, limit: int) -> list[bytes]:
    from dataengine.shards import image_member, load_shard_set, sample_stream

    found = []
    for sample in sample_stream(load_shard_set(shards).urls()):
        found.append(image_member(sample))
        if len(found) == limit:
            break
    return found


class _Moto:
    """moto's S3 server in its own process (so that its CPU time is not the loader's)."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.options = {"endpoint_url": f"http://127.0.0.1:{self.port}", "key": "bench", "secret": "bench"}
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.2)

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def upload(self, folder: str, url: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        fs.mkdir(url.split("/")[2])
        for base, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(base, name)
                fs.put_file(path, f"{url}/{os.path.relpath(path, folder)}")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ sources


def _stream_loader(shards: str, storage_options: dict | None, crop: int, batch: int, workers: int,
                   epoch: int) -> Iterable:
    """The trainer's input for one epoch, every sample once (what a RotNet epoch or a re-clustering reads)."""
    from dataengine.shards import load_shard_set
    from trainer.augment import CropConfig
    from trainer.data import EpochPlan, ShardStream, make_loader
    from trainer.sampler import StreamConfig

    shard_set = load_shard_set(shards, storage_options)
    stream = ShardStream(shard_set.shards, None, StreamConfig(seed=0, buffer_size=2048),
                         CropConfig(size=crop, scale=(0.2, 1.0)), EpochPlan(epoch, 0, 1), batch, storage_options)
    return make_loader(stream, batch, workers)


class _InMemory(torch.utils.data.IterableDataset):
    """Decoded images in memory, each worker cropping its share with the loader's crop."""

    def __init__(self, images: list[torch.Tensor], crop: int, epoch: int) -> None:
        super().__init__()
        self.images, self.crop, self.epoch = images, crop, epoch

    def __iter__(self):
        from trainer.augment import CROP_DRAWS, CropConfig, resized_crop_flip

        info = torch.utils.data.get_worker_info()
        worker, count = (0, 1) if info is None else (info.id, info.num_workers)
        config = CropConfig(size=self.crop, scale=(0.2, 1.0))
        draws = np.random.default_rng([self.epoch, worker]).random((len(self.images), CROP_DRAWS))
        for index in range(worker, len(self.images), count):
            yield resized_crop_flip(self.images[index], config, draws[index]), index


class _RawJpegs(torch.utils.data.IterableDataset):
    """The loader's shard reading alone: each worker yields its samples' JPEG bytes undecoded."""

    def __init__(self, shards: str, storage_options: dict | None, epoch: int) -> None:
        super().__init__()
        self.shards, self.storage_options, self.epoch = shards, storage_options, epoch

    def __iter__(self):
        from dataengine.shards import image_member, load_shard_set, register_fsspec_opener
        from trainer.augment import CropConfig
        from trainer.data import EpochPlan, ShardStream
        from trainer.sampler import StreamConfig

        info = torch.utils.data.get_worker_info()
        worker, count = (0, 1) if info is None else (info.id, info.num_workers)
        register_fsspec_opener(self.storage_options)
        stream = ShardStream(load_shard_set(self.shards, self.storage_options).shards, None,
                             StreamConfig(seed=0, buffer_size=2048), CropConfig(size=1), EpochPlan(self.epoch, 0, 1),
                             1, self.storage_options)
        for row, sample in stream.worker_stream(worker, count, stream._shard_rows):
            yield torch.frombuffer(bytearray(image_member(sample)), dtype=torch.uint8), row


def _as_list(items: list) -> list:
    return items


def _gpu_decode(shards: str, crop: int, batch: int, workers: int, epoch: int) -> int:
    """Decode every batch of JPEG bytes on the GPU and crop it there; the samples delivered."""
    import torchvision

    from trainer.augment import CROP_DRAWS, CropConfig, resized_crop_flip

    loader = torch.utils.data.DataLoader(_RawJpegs(shards, None, epoch), batch_size=batch, num_workers=workers,
                                         collate_fn=_as_list, pin_memory=True)
    config, rng, delivered = CropConfig(size=crop, scale=(0.2, 1.0)), np.random.default_rng(epoch), 0
    for items in loader:
        images = torchvision.io.decode_jpeg([data for data, _ in items], device="cuda")
        draws = rng.random((len(images), CROP_DRAWS))
        out = torch.stack([resized_crop_flip(image.float(), config, d) for image, d in zip(images, draws)])
        delivered += len(out)
    torch.cuda.synchronize()
    return delivered


def _memory_loader(images: list[torch.Tensor], crop: int, batch: int, workers: int, epoch: int) -> Iterable:
    from trainer.data import make_loader

    return make_loader(_InMemory(images, crop, epoch), batch, workers)


def _kernel_part(jpegs: list[bytes], crop: int, seed: int) -> None:
    from trainer.augment import CROP_DRAWS, CropConfig, resized_crop_flip
    from trainer.data import decode_rgb

    torch.set_num_threads(1)  # as in a DataLoader worker
    config = CropConfig(size=crop, scale=(0.2, 1.0))
    draws = np.random.default_rng(seed).random((len(jpegs), CROP_DRAWS))
    for index, data in enumerate(jpegs):
        resized_crop_flip(decode_rgb(data), config, draws[index])


def _kernel(jpegs: list[bytes], crop: int, workers: int, epoch: int) -> int:
    """Decode + crop every JPEG in ``workers`` forked processes (their shares given before the fork)."""
    context = multiprocessing.get_context("fork")
    parts = [context.Process(target=_kernel_part, args=(jpegs[w::workers], crop, epoch * 1000 + w))
             for w in range(max(workers, 1))]
    for part in parts:
        part.start()
    for part in parts:
        part.join()
        if part.exitcode != 0:
            raise RuntimeError(f"kernel process exited with {part.exitcode}")
    return len(jpegs)


# ------------------------------------------------------------------------------------------------ timing


def _measure(run: Callable[[], int], extra_cpu: Callable[[], float] = lambda: 0.0) -> tuple[float, float]:
    """(samples/s, CPU microseconds per sample) of ``run()``, which returns the samples it delivered; CPU is
    the process tree's, less ``extra_cpu`` (a server standing in for storage)."""
    from trainer.budget import process_tree_cpu_seconds

    cpu0, extra0, start = process_tree_cpu_seconds(), extra_cpu(), time.perf_counter()
    samples = run()
    seconds = time.perf_counter() - start
    cpu = process_tree_cpu_seconds() - cpu0 - (extra_cpu() - extra0)
    return samples / seconds, cpu / samples * 1e6


def _drain(loader: Iterable) -> int:
    return sum(len(rows) for _, rows in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="Synthetic images (Imagenette: its 4,000).")
    parser.add_argument("--synthetic", action="store_true", help="Synthetic images even when Imagenette exists.")
    parser.add_argument("--imagenette", default=IMAGENETTE, help="Imagenette tar (used when it exists).")
    parser.add_argument("--source-size", type=int, default=256, help="Shorter side of synthetic images.")
    parser.add_argument("--crop", type=int, default=224, help="Training crop side.")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Processes (default: all cores).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sources", default="s3,local,memory,kernel")
    parser.add_argument("--gpu-decode", action="store_true",
                        help="Also measure 'gpu': JPEGs decoded and cropped on the GPU (CUDA only).")
    args = parser.parse_args()
    use_imagenette = os.path.exists(args.imagenette) and not args.synthetic
    sources = args.sources.split(",") + (["gpu"] if args.gpu_decode else [])
    unknown = sorted(set(sources) - {"s3", "local", "memory", "kernel", "gpu"})
    if unknown:
        parser.error(f"unknown source(s) {', '.join(unknown)}; choose among s3, local, memory, kernel")
    if "gpu" in sources and not torch.cuda.is_available():
        parser.error("--gpu-decode needs CUDA, and torch sees no GPU here")

    from trainer.data import decode_rgb

    moto = _Moto() if "s3" in sources else None
    try:
        with tempfile.TemporaryDirectory() as root:
            shards = _ingest(root, args.images, args.source_size, args.shard_size,
                             args.imagenette if use_imagenette else None)
            if moto is not None:
                moto.upload(shards, "s3://bench/ingest")
            jpegs = _jpegs(shards, 1 << 62)
            decoded = [decode_rgb(data) for data in jpegs] if "memory" in sources else []
            runs = {
                "s3": lambda e: _measure(lambda: _drain(_stream_loader("s3://bench/ingest", moto.options, args.crop,
                                                                       args.batch, args.workers, e)),
                                         moto.cpu_seconds),
                "local": lambda e: _measure(lambda: _drain(_stream_loader(shards, None, args.crop, args.batch,
                                                                          args.workers, e))),
                "memory": lambda e: _measure(lambda: _drain(_memory_loader(decoded, args.crop, args.batch,
                                                                           args.workers, e))),
                "kernel": lambda e: _measure(lambda: _kernel(jpegs, args.crop, args.workers, e)),
                "gpu": lambda e: _measure(lambda: _gpu_decode(shards, args.crop, args.batch, args.workers, e)),
            }
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in sources}
            for repeat in range(args.repeats):
                order = sources[repeat % len(sources):] + sources[:repeat % len(sources)]
                for name in order:
                    results[name].append(runs[name](repeat))
    finally:
        if moto is not None:
            moto.close()
    _report(args, use_imagenette, len(jpegs), results)


def _report(args: argparse.Namespace, use_imagenette: bool, num_images: int,
            results: dict[str, list[tuple[float, float]]]) -> None:
    data = "Imagenette (224 x 224 JPEG)" if use_imagenette else f"synthetic ({args.source_size}+ px JPEG)"
    print(f"{num_images} images, {data}; crop {args.crop}, batch {args.batch}, {args.workers} processes, "
          f"{args.repeats} repeats; {_cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for name, values in results.items():
        rates, cpu = [v[0] for v in values], [v[1] for v in values]
        print(f"{name:8s} {statistics.median(rates):9.1f} samples/s  {statistics.median(cpu):8.0f} CPU-us/sample  "
              f"(rates {', '.join(f'{r:.0f}' for r in rates)})")
    for high, low, target in (("s3", "local", 0.9), ("local", "kernel", 0.8), ("memory", "kernel", None),
                              ("gpu", "local", None)):
        if high in results and low in results:
            ratios = [a[0] / b[0] for a, b in zip(results[high], results[low])]
            cpu = [b[1] / a[1] for a, b in zip(results[high], results[low])]
            goal = f" (target >= {target})" if target else ""
            print(f"{high} / {low}: {statistics.median(ratios):.3f} by samples/s{goal}, "
                  f"{statistics.median(cpu):.3f} by CPU per sample; per repeat "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}")


def _cpu_model() -> str:
    """``lscpu``'s model name (the platform's processor field where lscpu is missing)."""
    try:
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):  # no lscpu on this system: the figure still gets a label
        listing = ""
    for line in listing.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
