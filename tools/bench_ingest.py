"""Benchmark ``dataengine ingest`` against the kernel limit measured in the same run.

Kernel limit: the very same per-image work (``dataengine.images.normalize_image``: full decode, EXIF, RGB,
resize, JPEG encode, plus the sha256 of the original bytes) in a bare ``multiprocessing.Pool`` loop over all
cores, writing nothing. It is measured two ways: as a program started from the shell (reading the tar,
starting the pool: the same fixed costs a command pays) and as the steady-state rate of a warm pool on bytes
already in memory (the pure compute ceiling). Ingest: the real command from the shell (``dataengine ingest
--images TAR --out DIR``), wall time including interpreter start-up, tar reading, shard writing, parquet
and manifest. The ratios ingest/kernel say what the pipeline keeps of the machine (target >= 0.90).

Both commands are also measured in CPU seconds (user + system of the process and its workers): on a shared
machine wall time mostly measures the other tenants (a job that needs less CPU can even finish later, having
fewer runnable processes to claim a share with), while on two cores the CPU a command burns per image is what
decides its rate on a quiet machine. The CPU ratio is kernel program CPU / ingest CPU.

Both run with the bytecode of dataengine's modules compiled first, as an installed package has it (pip
compiles at install time). Without that, a workplace that sets PYTHONDONTWRITEBYTECODE=1 with an editable
install recompiles every module at every start: ~25 ms more for the CLI's dozen modules than for the kernel
program's one, which measures the environment rather than the command.

Memory layout moves both programs by up to ~10%, by accident: the spelling of the tar's path
(``a/../a/x.tar`` against ``a/x.tar``) and whether imported modules had to be compiled change the heap that
the forked workers inherit, and with it how fast they decode (measured: the same kernel program 2.45 or 2.85
CPU-s depending only on stale bytecode of an identical module). So the repeats cycle through ``--layouts``
equivalent spellings of the tar's path, both programs using the same one in a round, and alternate which
program runs first; medians are over all repeats, and the per-spelling medians are printed to show the spread.

With ``--scale N`` both run on a tar holding every photo N times under distinct names (ingest with
``--keep-duplicates``, so that both decode and encode every copy): the fixed costs of a command (interpreter,
CLI and pyarrow imports, the final merge) weigh N times less, which shows the per-image ratio.

Usage: python tools/bench_ingest.py [--tar ../shared/data/imagenette2-train-4k.tar] [--repeats 8] [--layouts 4]
                                   [--scale 1]
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import dataengine
from dataengine.images import normalize_image

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TAR = os.path.join(HERE, "..", "..", "shared", "data", "imagenette2-train-4k.tar")


def _kernel(args: tuple[bytes, int, int]) -> int:
    data, image_size, quality = args
    hashlib.sha256(data).hexdigest()
    return len(normalize_image(data, image_size, quality).jpeg)


def read_members(tar_path: str) -> list[bytes]:
    with tarfile.open(tar_path) as archive:
        return [archive.extractfile(m).read() for m in archive if m.isfile()]


def kernel_rate(blobs: list[bytes], workers: int, image_size: int, quality: int) -> float:
    """Images/s of the bare kernel over all cores (pool start-up excluded)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        pool.map(_kernel, [(blobs[0], image_size, quality)] * workers)  # warm the workers up
        start = time.perf_counter()
        pool.map(_kernel, [(b, image_size, quality) for b in blobs], chunksize=32)
        return len(blobs) / (time.perf_counter() - start)


KERNEL_PROGRAM = """
import multiprocessing, sys, tarfile
from tools_bench_kernel import kernel
if __name__ == "__main__":
    path, workers, size, quality = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    with tarfile.open(path) as archive:
        blobs = [archive.extractfile(m).read() for m in archive if m.isfile()]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        done = sum(1 for _ in pool.imap_unordered(kernel, [(b, size, quality) for b in blobs], chunksize=32))
    print(done)
"""


def path_spellings(path: str, count: int) -> list[str]:
    """``count`` equivalent spellings of ``path`` (plain, ``/./``, ``/../<folder>/``, ``//``), for layouts."""
    folder, name = os.path.split(os.path.abspath(path))
    spellings = [os.path.join(folder, name), os.path.join(folder, ".", name),
                 os.path.join(folder, "..", os.path.basename(folder), name), folder + "//" + name]
    return spellings[: max(1, min(count, len(spellings)))]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a measured command; on failure, stop with its stderr (a benchmark must not hide a crash)."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed with exit status {result.returncode}:\n{result.stderr[-8000:]}")
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kernel_program_rate(tar_path: str, workers: int, image_size: int, quality: int,
                        scratch: str) -> tuple[float, float]:
    """Images/s of the bare kernel as a whole program started from the shell, and its CPU seconds."""
    with open(os.path.join(scratch, "tools_bench_kernel.py"), "w") as handle:
        handle.write("import hashlib\nfrom dataengine.images import normalize_image\n\n"
                     "def kernel(args):\n    data, size, quality = args\n    hashlib.sha256(data).hexdigest()\n"
                     "    return len(normalize_image(data, size, quality).jpeg)\n")
    program = os.path.join(scratch, "kernel_program.py")
    with open(program, "w") as handle:
        handle.write(KERNEL_PROGRAM)
    compileall.compile_dir(scratch, maxlevels=0, quiet=1)
    cpu, start = _children_cpu(), time.perf_counter()
    result = _run([sys.executable, program, tar_path, str(workers), str(image_size), str(quality)], cwd=scratch)
    return int(result.stdout.strip()) / (time.perf_counter() - start), _children_cpu() - cpu


def scaled_tar(tar_path: str, scale: int, scratch: str) -> str:
    """A tar with every file of ``tar_path`` ``scale`` times, under ``copy<i>/`` prefixes."""
    path = os.path.join(scratch, f"scaled-{scale}.tar")
    with tarfile.open(tar_path) as source, tarfile.open(path, "w") as target:
        members = [(m, source.extractfile(m).read()) for m in source if m.isfile()]
        for copy in range(scale):
            for member, data in members:
                info = tarfile.TarInfo(f"copy{copy}/{member.name}")
                info.size = len(data)
                target.addfile(info, io.BytesIO(data))
    return path


def ingest_rate(tar_path: str, workers: int, image_size: int, quality: int,
                scratch: str, keep_duplicates: bool = False) -> tuple[float, float, dict]:
    """Images/s of ``dataengine ingest`` from the shell (wall time of the whole command), its CPU seconds."""
    out = os.path.join(scratch, "out")
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "dataengine", "--quiet", "ingest", "--images", tar_path, "--out", out,
               "--workers", str(workers), "--image-size", str(image_size), "--quality", str(quality), "--json"]
    if keep_duplicates:
        command.append("--keep-duplicates")
    cpu, start = _children_cpu(), time.perf_counter()
    result = _run(command)
    seconds = time.perf_counter() - start
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return summary["counts"]["ok"] / seconds, _children_cpu() - cpu, summary


def startup_seconds() -> float:
    start = time.perf_counter()
    _run([sys.executable, "-m", "dataengine", "ingest", "--help"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tar", default=DEFAULT_TAR)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--layouts", type=int, default=4, help="Spellings of the tar's path to cycle through (1-4).")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--scale", type=int, default=1, help="Run on a tar with every photo this many times.")
    parser.add_argument("--calibrate", metavar="FILE",
                        help="store ingest's CPU seconds per image for `dataengine plan` (start-up included: use "
                             "--scale 5 or more so that it weighs little)")
    args = parser.parse_args()
    if not os.path.exists(args.tar):
        sys.exit(f"{args.tar} not found (see ../shared/data/README.md)")
    # Bytecode as an installed package has it (see the module docstring); a no-op when it is up to date.
    compileall.compile_dir(os.path.dirname(dataengine.__file__), quiet=1)
    blobs = read_members(args.tar)
    print(f"{len(blobs) * args.scale} images from {os.path.basename(args.tar)} (x{args.scale}), {args.workers} "
          f"workers, image_size={args.image_size}, repeats={args.repeats}")
    kernels, programs, ingests, starts, program_cpus, ingest_cpus = [], [], [], [], [], []
    by_layout: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tar = scaled_tar(args.tar, args.scale, scratch) if args.scale > 1 else args.tar
        spellings = path_spellings(tar, args.layouts)
        blobs *= args.scale
        for repeat in range(args.repeats):
            spelling = spellings[repeat % len(spellings)]
            kernels.append(kernel_rate(blobs, args.workers, args.image_size, args.quality))
            for which in ("program", "ingest") if repeat % 2 == 0 else ("ingest", "program"):
                if which == "program":
                    rate, cpu = kernel_program_rate(spelling, args.workers, args.image_size, args.quality, scratch)
                    programs.append(rate)
                    program_cpus.append(cpu)
                else:
                    rate, cpu, summary = ingest_rate(spelling, args.workers, args.image_size, args.quality, scratch,
                                                     keep_duplicates=args.scale > 1)
                    ingests.append(rate)
                    ingest_cpus.append(cpu)
            by_layout.setdefault(spelling, []).append(ingests[-1] / programs[-1])
            starts.append(startup_seconds())
            print(f"  run {repeat} ({spelling}): kernel warm pool {kernels[-1]:.1f} img/s, kernel program "
                  f"{programs[-1]:.1f} img/s ({program_cpus[-1]:.2f} CPU-s), ingest {ingests[-1]:.1f} img/s "
                  f"({ingest_cpus[-1]:.2f} CPU-s; ok={summary['counts']['ok']}, shards={summary['num_shards']})")
    for spelling, ratios in by_layout.items():
        print(f"  ratio with {spelling}: median {statistics.median(ratios):.3f} over {len(ratios)} runs")
    kernel, program, ingest = (statistics.median(v) for v in (kernels, programs, ingests))
    print(f"kernel, warm pool (compute ceiling): {kernel:8.1f} images/s ({kernel / args.workers:.1f} per core)")
    print(f"kernel, whole program from shell   : {program:8.1f} images/s ({program / args.workers:.1f} per core)")
    print(f"dataengine ingest from the shell   : {ingest:8.1f} images/s ({ingest / args.workers:.1f} per core)")
    print(f"ratio ingest / kernel program      : {ingest / program:.3f} (target >= 0.90)")
    print(f"ratio ingest / warm-pool ceiling   : {ingest / kernel:.3f}")
    program_cpu, ingest_cpu = statistics.median(program_cpus), statistics.median(ingest_cpus)
    print(f"CPU seconds, kernel program / ingest: {program_cpu:.2f} / {ingest_cpu:.2f} "
          f"({program_cpu / len(blobs) * 1e6:.0f} / {ingest_cpu / len(blobs) * 1e6:.0f} us per image)")
    print(f"CPU ratio kernel program / ingest  : {program_cpu / ingest_cpu:.3f} (what 2 cores give on a quiet machine)")
    print(f"CLI start-up (ingest --help): {statistics.median(starts) * 1000:.0f} ms")
    if args.calibrate:
        from dataengine.plan import update_calibration

        update_calibration(args.calibrate, "ingest", {"cpu_seconds_per_image": ingest_cpu / len(blobs)},
                           " ".join(["python", "tools/bench_ingest.py"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
