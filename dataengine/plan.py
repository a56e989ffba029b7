"""Resource planning: expected wall time, peak memory per process and bytes written by every stage of a run.

Each stage's cost is a linear model whose constants are per-stage rates measured by the benchmarks
(``tools/bench_*.py --calibrate FILE`` writes them into a calibration file; without one the figures of
``BENCHMARKS.md`` are used, :data:`DEFAULT_CALIBRATION`). A stage's CPU time is a serial part (start-up:
imports, model building, output set-up) plus work that is spread over every core of every node; its wall time
on an otherwise idle machine is ``fixed_cpu_seconds + work / (cores x nodes)``, or the work divided among the
GPUs where a GPU rate was measured:

* ingest: ``images x cpu_seconds_per_image``; the main process of each node keeps one entry per ingested photo
  (exact-duplicate detection), so its memory grows with the node's rows.
* embed: ``images x cpu_seconds_per_image`` (or ``images / gpu_images_per_second`` per GPU); the rate is
  measured per model and image size, and scaled by the model's FLOPs and the pixel count for a model or size
  without a measurement (said so in the notes).
* cluster: floating-point operations (PCA covariance and whitening, every Lloyd iteration of every level on its
  training sample, the assignment of every row at every level, the neighbour index) at the measured k-means
  GFLOP/s per core, plus one read of the features per pass over the store at the measured read cost.
* report: one NMI with its chance level per (level, metadata kind) at the measured seconds per row.
* train: ``epochs x samples x cpu_seconds_per_sample`` plus an embed and a clustering of the training set at
  every re-assignment.

Bytes are those each stage leaves behind (on local disk, or in object storage with ``storage="s3"``, where
local disk holds the scratch it uploads from); arrays count at their uncompressed size, an upper bound (zstd
shrinks cluster ids and the neighbour index on disk). A stage whose rate was never measured for the requested hardware
(e.g. a GPU rate) has no time (``None``) and a note saying which benchmark to run.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "dataengine.calibration"
VERSION = 1
STAGES = ("ingest", "embed", "cluster", "report", "train")
MODEL_DIMS = {"small": 256, "resnet18": 512, "resnet50": 2048, "vgg16_bn": 4096}
# Forward GFLOPs per image at 224 x 224 (multiply-adds x 2): torchvision's published figures, and the small
# convnet's 15 MFLOPs at 32 x 32 scaled to 224 (x 49). Used only to scale a measured rate to another model.
MODEL_GFLOPS_224 = {"small": 0.735, "resnet18": 3.64, "resnet50": 8.18, "vgg16_bn": 31.0}
METADATA_KINDS = 4  # hashtag, user, GPS, device (YFCC100M); a class label would add one

# The figures of BENCHMARKS.md ("Planning"): whole stages from the CLI on Imagenette photos stored at 256
# pixels (`tools/bench_plan.py --calibrate`, 2,000 and 8,000 photos), k-means GFLOP/s and NMI per row from
# their benchmarks, the cost of reading stored features and the k-means memory per row from the out-of-core
# k-means at 1M and 5M rows.
DEFAULT_CALIBRATION: dict[str, Any] = {
    "format": FORMAT,
    "version": VERSION,
    "machine": "2 cores, AMD EPYC (Zen 3), 24 GiB, no GPU (BENCHMARKS.md)",
    "stages": {
        "ingest": {
            "cpu_seconds_per_image": 0.00121,
            "fixed_cpu_seconds": 1.31,
            "shard_bytes_per_image": 16365,
            "metadata_bytes_per_image": 396,
            "base_rss_bytes": 106_217_472,
            "main_bytes_per_row": 414,
        },
        "embed": {
            "models": {
                "small@32": {"cpu_seconds_per_image": 0.00549},
                "resnet18@224": {"cpu_seconds_per_image": 0.185},  # 10.8 img/s on 2 busy cores (bench_embed)
            },
            "fixed_cpu_seconds": 7.54,
            "store_bytes_per_value": 1.79,  # float16 after zstd, keys and a folder input's metadata included
            "metadata_bytes_per_row": 0.0,
            "base_rss_bytes": 785_691_989,
            "bytes_per_row": 479,
        },
        "cluster": {
            "gflops_per_core": 71.0,  # k-means assignment + float64 sums: 141.5-143.3 GFLOP/s on 2 cores
            "read_seconds_per_value": 7.9e-9,
            "fixed_cpu_seconds": 9.26,
            "base_rss_bytes": 848_052_224,
            "bytes_per_row": 19,
        },
        "report": {
            "seconds_per_row_score": 3.6e-7,  # one NMI with its chance level: 3.56 s for 10M rows
            "fixed_cpu_seconds": 3.63,
            "base_rss_bytes": 155_112_789,
            "bytes_per_row": 151,
            "output_bytes": 326_153,
        },
        "train": {
            "models": {"small@32": {"cpu_seconds_per_sample": 0.0184}},  # decoding 256-pixel JPEGs included
            "fixed_cpu_seconds": 5.05,
            "base_rss_bytes": 1_068_911_274,
            "bytes_per_row": 8574,
        },
    },
}


def load_calibration(path: str | None = None) -> dict[str, Any]:
    """The default calibration, updated with the stages and keys of the file at ``path`` (if given).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a calibration file of a supported version.
    """
    calibration = copy.deepcopy(DEFAULT_CALIBRATION)
    if path is None:
        return calibration
    with open(path, encoding="utf-8") as handle:
        try:
            measured = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(measured, dict) or measured.get("format") != FORMAT or measured.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} file of version {VERSION}")
    _merge(calibration["stages"], measured.get("stages", {}))
    calibration["machine"] = measured.get("machine", calibration["machine"])
    calibration["sources"] = measured.get("sources", {})
    return calibration


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def machine_description() -> str:
    """Cores, CPU model and memory of this machine, and its GPUs (for the record of a calibration)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    gpus = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{os.cpu_count()} cores, {model}, {memory / 2**30:.0f} GiB, {gpus}"


def update_calibration(path: str, stage: str, values: dict[str, Any], command: str) -> None:
    """Write measured ``values`` for ``stage`` into the calibration file at ``path`` (created if absent).

    Args:
        path: the calibration file.
        stage: one of :data:`STAGES`.
        values: keys of that stage (as in :data:`DEFAULT_CALIBRATION`), nested dicts merged.
        command: the benchmark command that measured them, recorded with this machine and the date under
            ``sources[stage]``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "stages": {}, "sources": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    machine = machine_description()
    _merge(data.setdefault("stages", {}).setdefault(stage, {}), values)
    data.setdefault("sources", {}).setdefault(stage, []).append(
        {"command": command, "machine": machine, "date": datetime.date.today().isoformat(), "keys": sorted(values)})
    data["machine"] = machine
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """The run to plan."""

    num_images: int
    """Photos to ingest (and embed, cluster, report on)."""
    nodes: int = 1
    """Machines."""
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    """CPU cores per node."""
    gpus: int = 0
    """GPUs per node (embed and train run one process per GPU)."""
    model: str = "resnet18"
    """Embedding model."""
    image_size: int = 224
    """Embedding crop size."""
    dim: int | None = None
    """Feature dimension; ``None`` = the model's default feature."""
    levels: tuple[int, ...] = (4, 256)
    """Clusters per level."""
    pca_dim: int | None = 256
    """Whitened dimension (``None``: the feature dimension)."""
    num_iterations: int = 10
    """Lloyd iterations per k-means."""
    sample_per_centroid: int = 256
    """Training rows per centroid."""
    neighbor_index: bool = True
    """Build the nearest-neighbour index over all rows (single-process clustering only)."""
    index_memory_bytes: int = 2 << 30
    """Memory budget of that index."""
    epochs: int = 0
    """Training epochs (0: no training stage)."""
    reassign_every: int = 1
    """Epochs between re-clusterings during training."""
    train_arch: str = "small"
    """Architecture trained."""
    train_image_size: int = 32
    """Training crop size."""
    storage: str = "local"
    """Where outputs live: ``local`` disk or ``s3`` (object storage; local disk holds scratch only)."""

    def __post_init__(self) -> None:
        for name in ("num_images", "nodes", "cores", "image_size", "num_iterations", "sample_per_centroid",
                     "reassign_every", "train_image_size", "index_memory_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus", "epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("model", "train_arch"):
            if getattr(self, name) not in MODEL_DIMS:
                raise ValueError(f"{name} must be one of {', '.join(MODEL_DIMS)}, got {getattr(self, name)!r}")
        if not self.levels or any(k < 1 for k in self.levels):
            raise ValueError(f"levels must be cluster counts >= 1, got {self.levels}")
        if self.dim is not None and self.dim < 1 or self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"dim and pca_dim must be >= 1, got {self.dim} and {self.pca_dim}")
        if self.storage not in ("local", "s3"):
            raise ValueError(f"storage must be local or s3, got {self.storage!r}")

    @property
    def feature_dim(self) -> int:
        return self.dim or MODEL_DIMS[self.model]


@dataclass
class StagePlan:
    """What one stage is expected to take."""

    stage: str
    seconds: float | None
    """Wall time on an otherwise idle machine; ``None`` when no rate was measured for this hardware (see
    ``notes``)."""
    cpu_seconds: float | None
    """CPU time of all its processes (``None`` where a GPU does the work)."""
    processes: int
    """Processes running it (all nodes)."""
    peak_memory_bytes: int
    """Peak resident memory of its largest process."""
    disk_bytes: int
    """Local disk: outputs (with ``storage="local"``) and scratch."""
    object_bytes: int
    """Object storage: outputs (with ``storage="s3"``)."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _place(config: PlanConfig, outputs: float, scratch: float = 0.0) -> tuple[int, int]:
    """(disk, object storage) bytes of a stage's outputs and the local scratch it uploads them from (a local
    output is built in place: its scratch files are renamed into it)."""
    if config.storage == "s3":
        return int(scratch), int(outputs)
    return int(outputs), 0


def _times(config: PlanConfig, fixed_cpu: float, parallel_cpu: float | None) -> tuple[float | None, float | None]:
    """(wall, CPU) seconds of a serial part and a part spread over every core of every node."""
    if parallel_cpu is None:
        return None, None
    return fixed_cpu + parallel_cpu / (config.cores * config.nodes), fixed_cpu * config.nodes + parallel_cpu


def plan_ingest(config: PlanConfig, rates: dict[str, Any]) -> StagePlan:
    seconds, cpu = _times(config, rates["fixed_cpu_seconds"], config.num_images * rates["cpu_seconds_per_image"])
    per_image = rates["shard_bytes_per_image"] + rates["metadata_bytes_per_image"]
    scratch = config.nodes * 1000 * rates["shard_bytes_per_image"]  # one shard being built per node
    disk, objects = _place(config, config.num_images * per_image, scratch)
    memory = rates["base_rss_bytes"] + config.num_images / config.nodes * rates["main_bytes_per_row"]
    return StagePlan(stage="ingest", seconds=seconds, cpu_seconds=cpu, processes=config.nodes * (config.cores + 1),
                     peak_memory_bytes=int(memory), disk_bytes=disk, object_bytes=objects)


def _per_unit(table: dict[str, Any], arch: str, size: int, key: str) -> tuple[float | None, list[str]]:
    """A measured per-image (or per-sample) figure for ``arch@size``, or one scaled by FLOPs from another."""
    exact = table.get(f"{arch}@{size}", {}).get(key)
    if exact is not None:
        return float(exact), []
    for name, figures in sorted(table.items()):
        if figures.get(key) is None:
            continue
        other, other_size = name.split("@")
        scale = (MODEL_GFLOPS_224[arch] * size ** 2) / (MODEL_GFLOPS_224[other] * int(other_size) ** 2)
        if key.startswith("gpu_"):
            scale = 1 / scale  # a rate, not a cost
        return float(figures[key]) * scale, [f"{arch}@{size}: scaled by FLOPs from the {name} measurement"]
    return None, []


def _model_work(config: PlanConfig, units: float, rates: dict[str, Any], arch: str, size: int, what: str,
                fixed_cpu: float) -> tuple[float | None, float | None, int, list[str]]:
    """(wall, CPU) seconds and processes to push ``units`` images or samples through ``arch@size``."""
    table = rates.get("models", {})
    if config.gpus:
        per_second, notes = _per_unit(table, arch, size, f"gpu_{what}s_per_second")
        processes = config.nodes * config.gpus
        if per_second is None:
            return None, None, processes, [
                f"no GPU rate measured for {arch}: run the benchmark with --calibrate on a GPU machine"]
        return fixed_cpu + units / (per_second * processes), None, processes, notes
    cpu, notes = _per_unit(table, arch, size, f"cpu_seconds_per_{what}")
    if cpu is None:
        return None, None, config.nodes, ["no CPU rate measured for any model: run the benchmark with --calibrate"]
    return (*_times(config, fixed_cpu, units * cpu), config.nodes, notes)


def plan_embed(config: PlanConfig, rates: dict[str, Any], *, arch: str | None = None, size: int | None = None,
               dim: int | None = None) -> StagePlan:
    arch, size = arch or config.model, size or config.image_size
    dim = dim or (config.feature_dim if arch == config.model else MODEL_DIMS[arch])
    seconds, cpu, processes, notes = _model_work(config, config.num_images, rates, arch, size, "image",
                                                 rates["fixed_cpu_seconds"])
    outputs = config.num_images * (dim * rates["store_bytes_per_value"] + rates["metadata_bytes_per_row"])
    disk, objects = _place(config, outputs)
    memory = rates["base_rss_bytes"] + config.num_images * rates["bytes_per_row"]  # the metadata table
    return StagePlan(stage="embed", seconds=seconds, cpu_seconds=cpu, processes=processes,
                     peak_memory_bytes=int(memory), disk_bytes=disk, object_bytes=objects, notes=notes)


def cluster_flops(config: PlanConfig, dim: int) -> tuple[float, int]:
    """Floating-point operations of a clustering, and the passes it makes over the stored features."""
    from indexes.faiss_index import ivf_training_rows

    n, pca = config.num_images, min(config.pca_dim or dim, dim)
    flops = 2.0 * n * dim * dim  # covariance of the PCA
    total_clusters = 1
    for k in config.levels:
        total_clusters *= k
        trained = min(n, total_clusters * config.sample_per_centroid)
        flops += config.num_iterations * 2.0 * trained * k * pca + 2.0 * n * k * pca  # Lloyd + assignment
    passes = 1 + 2 * len(config.levels) + (1 if config.neighbor_index else 0)
    flops += (passes - 1) * 2.0 * n * dim * pca  # whitening at every pass after the PCA fit
    lists = _neighbor_index_plan(config, pca).num_lists if config.neighbor_index else 0
    if lists:  # an IVF index (a flat one costs nothing to build)
        flops += 2.0 * n * lists * pca  # assigning every row to an IVF list
        trained = ivf_training_rows(n, lists)
        flops += 10 * 2.0 * trained * lists * pca  # faiss trains the lists with 10 Lloyd iterations
    return flops, passes


def _neighbor_index_plan(config: PlanConfig, pca: int):
    """The neighbour index the clustering would build; one of ``--index-memory-gb`` bytes when none fits (the
    clustering refuses it then)."""
    from indexes.faiss_index import NeighborIndexConfig, NeighborIndexPlan, plan_neighbor_index

    try:
        return plan_neighbor_index(config.num_images, pca, NeighborIndexConfig(
            memory_budget_bytes=config.index_memory_bytes))
    except ValueError:
        return NeighborIndexPlan(kind="none", num_lists=0, pq_bytes=0, estimated_bytes=config.index_memory_bytes)


def plan_cluster(config: PlanConfig, rates: dict[str, Any], *, dim: int | None = None) -> StagePlan:
    dim = dim or config.feature_dim
    ranks = config.nodes * max(1, config.gpus)
    notes = []
    if config.neighbor_index and ranks > 1:
        notes.append("no neighbour index: it is built only by a single-process clustering")
        config = dataclasses.replace(config, neighbor_index=False)
    pca = min(config.pca_dim or dim, dim)
    flops, passes = cluster_flops(config, dim)
    work = flops / (rates["gflops_per_core"] * 1e9) + passes * config.num_images * dim * rates["read_seconds_per_value"]
    seconds, cpu = _times(config, rates["fixed_cpu_seconds"], work)
    index_bytes = _neighbor_index_plan(config, pca).estimated_bytes if config.neighbor_index else 0
    clusters, sample = 1, 0
    for k in config.levels:
        clusters *= k
        sample = max(sample, k * config.sample_per_centroid * pca * 4)
    memory = rates["base_rss_bytes"] + config.num_images / ranks * rates["bytes_per_row"] + sample + index_bytes
    outputs = config.num_images * 4 * len(config.levels) + clusters * pca * 4 * 2 + dim * pca * 4 + index_bytes
    disk, objects = _place(config, outputs)
    return StagePlan(stage="cluster", seconds=seconds, cpu_seconds=cpu, processes=ranks,
                     peak_memory_bytes=int(memory), disk_bytes=disk, object_bytes=objects, notes=notes)


def plan_report(config: PlanConfig, rates: dict[str, Any]) -> StagePlan:
    scores = len(config.levels) * METADATA_KINDS
    seconds = rates["fixed_cpu_seconds"] + config.num_images * scores * rates["seconds_per_row_score"]  # one process
    memory = rates["base_rss_bytes"] + config.num_images * rates["bytes_per_row"]
    leaves = math.prod(config.levels)
    disk, objects = _place(config, rates["output_bytes"] + leaves * 200)  # clusters.csv: a line per cluster
    return StagePlan(stage="report", seconds=seconds, cpu_seconds=seconds, processes=1,
                     peak_memory_bytes=int(memory), disk_bytes=disk, object_bytes=objects)


def plan_train(config: PlanConfig, calibration: dict[str, Any]) -> StagePlan:
    """Training epochs, plus an embed and a clustering (no neighbour index) at every re-assignment."""
    stages = calibration["stages"]
    rates = stages["train"]
    arch, size = config.train_arch, config.train_image_size
    seconds, cpu, processes, notes = _model_work(config, config.epochs * config.num_images, rates, arch, size,
                                                 "sample", rates["fixed_cpu_seconds"])
    reassignments = -(-config.epochs // config.reassign_every)
    embed = plan_embed(config, stages["embed"], arch=arch, size=size, dim=MODEL_DIMS[arch])
    cluster = plan_cluster(dataclasses.replace(config, neighbor_index=False), stages["cluster"], dim=MODEL_DIMS[arch])
    notes += embed.notes
    if seconds is not None and embed.seconds is not None:
        seconds += reassignments * (embed.seconds + cluster.seconds)
    if cpu is not None and embed.cpu_seconds is not None:
        cpu += reassignments * (embed.cpu_seconds + cluster.cpu_seconds)
    checkpoint = 3 * 4 * _parameters(arch)  # weights, momentum and the heads, float32
    # The run keeps the feature stores (and clusterings) of the current and the previous assignment.
    outputs = checkpoint + 2 * (embed.disk_bytes + embed.object_bytes + cluster.disk_bytes + cluster.object_bytes)
    disk, objects = _place(config, outputs)
    memory = max(rates["base_rss_bytes"] + config.num_images * rates["bytes_per_row"], embed.peak_memory_bytes,
                 cluster.peak_memory_bytes)
    return StagePlan(stage="train", seconds=seconds, cpu_seconds=cpu, processes=processes,
                     peak_memory_bytes=int(memory), disk_bytes=disk, object_bytes=objects, notes=notes)


def _parameters(arch: str) -> int:
    """Backbone parameters (torchvision's counts without the classifier; the small convnet's 0.4 M)."""
    return {"small": 390_000, "resnet18": 11_200_000, "resnet50": 23_500_000, "vgg16_bn": 134_300_000}[arch]


def plan_run(config: PlanConfig, calibration: dict[str, Any] | None = None) -> list[StagePlan]:
    """Every stage's plan: ingest, embed, cluster, report, and train when ``config.epochs > 0``."""
    calibration = calibration or load_calibration()
    stages = calibration["stages"]
    plans = [plan_ingest(config, stages["ingest"]), plan_embed(config, stages["embed"]),
             plan_cluster(config, stages["cluster"]), plan_report(config, stages["report"])]
    if config.epochs:
        plans.append(plan_train(config, calibration))
    return plans
