"""Embed: ingest shards -> Zarr v3 feature store, streaming, resumable, distributed.

Design:

* Rows are grouped in *blocks* of ``chunk_rows * chunks_per_shard`` rows (one stored object of features,
  see :mod:`dataengine.store`). Ranks own disjoint contiguous ranges of blocks (:func:`split_evenly`); a
  block with a completion record is skipped on re-runs, so a run killed at any moment resumes where it
  stopped, on any number of ranks.
* The main process plans *pieces* (the rows of one shard inside the pending blocks, split so that every
  DataLoader worker gets some); workers stream their pieces' shards with webdataset, decode and crop the
  JPEGs and ship uint8 tensors cut at *batch* boundaries. Batches have a fixed composition: batch ``k`` of
  block ``b`` is always rows ``[b0 + k*B, min(b0 + (k+1)*B, b1))``, whichever rank computes it and wherever a
  run resumed, so features are bit-identical across resume and across rank counts (same device, threads,
  batch size and seed). Normalisation runs in the model (:class:`~dataengine.models.FeatureExtractor`).
* A sample that fails to decode (or is absent from its shard) gets zero features, ``valid = False`` and an
  entry in its block's record; the run continues. I/O errors stop the run (re-run to resume).
* Mixed precision (bf16 autocast) and channels_last are used on CUDA only: CPU runs stay in fp32 so that they
  are reproducible bit for bit.

Preprocessing (fixed, no random op): decode to RGB, resize the shorter side to ``resize_size`` (bilinear,
PIL), center-crop ``image_size`` x ``image_size``: pixel for pixel what torchvision's ``Resize(resize_size)`` +
``CenterCrop(image_size)`` give on the PIL image.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data

from dataengine.errors import OutputExistsError
from dataengine.shards import ShardSet, StreamErrors, load_shard_set, register_fsspec_opener, sample_stream, split_evenly
from dataengine.store import (
    MAX_RECORDED_FAILURES,
    FeatureStore,
    StoreLayout,
    create_store,
    inspect_existing,
    open_store,
    remove_partial_writes,
    write_keys_and_metadata,
)

logger = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
MIN_CHUNK_BYTES = 1 << 20
# Largest batch tried when the batch size is automatic.
AUTO_MAX_BATCH = {"cpu": 64, "cuda": 512}


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Configuration of one embedding run."""

    shards: str
    """Ingest output folder (holding ``manifest.json``), local path or fsspec URL."""
    out: str
    """Feature store (Zarr v3 group), local path or fsspec URL."""
    model: str | None = None
    """Architecture (see :data:`dataengine.models.ARCHS`); default ``resnet18``, or the checkpoint's."""
    sobel: bool = False
    """Put the fixed grayscale + Sobel layer in front of the model (a checkpoint says for itself)."""
    weights: str | None = None
    """Local state-dict file (torchvision layout or ``Backbone.state_dict()``); ``None`` = random init."""
    checkpoint: str | None = None
    """Trainer checkpoint file (or run folder holding ``checkpoint.pt``): arch, sobel and weights."""
    layer: str | None = None
    """Layer whose output is the feature (global-average-pooled); ``None`` = the architecture's default."""
    image_size: int = 224
    """Side of the square center crop fed to the model."""
    resize_size: int | None = None
    """Shorter side after resizing, before the crop; ``None`` = ``round(image_size * 256 / 224)``."""
    batch_size: int | None = None
    """Images per forward pass; ``None`` = the largest that fits (up to 64 on CPU, 512 on CUDA)."""
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    """DataLoader worker processes decoding images; 0 decodes in the main process."""
    dtype: str = "float16"
    """Stored feature type: ``float16`` or ``float32``."""
    chunk_rows: int | None = None
    """Rows per ``features`` chunk; ``None`` = smallest multiple of the batch size giving >= 1 MiB chunks."""
    chunks_per_shard: int = 1
    """Chunks per stored object with the Zarr sharding codec; 1 = no sharding."""
    seed: int = 0
    """Seed of the random initialisation (used when no weights are given)."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    num_threads: int | None = None
    """torch intra-op threads in this process; ``None`` leaves torch's default."""
    amp: bool | None = None
    """bf16 autocast; ``None`` = on CUDA only."""
    channels_last: bool | None = None
    """channels_last memory format; ``None`` = on CUDA only (on CPU it measured no faster for resnet18)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for remote shards and store (``endpoint_url``, ``key``, ``secret``...)."""
    overwrite: bool = False
    """Replace a store made with another configuration instead of raising."""

    def __post_init__(self) -> None:
        from dataengine.models import ARCHS

        if self.model is not None and self.model not in ARCHS:
            raise ValueError(f"model must be one of {', '.join(ARCHS)}, got {self.model!r}")
        if self.weights and self.checkpoint:
            raise ValueError("give weights=FILE or checkpoint=RUN, not both")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("image_size", "chunks_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "chunk_rows", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None for automatic), got {getattr(self, name)}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size}): the "
                             "center crop must fit inside the resized image")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def resolved_resize_size(self) -> int:
        """``resize_size``, or the ImageNet evaluation convention 256/224 of ``image_size``."""
        return self.resize_size if self.resize_size is not None else round(self.image_size * 256 / 224)


@dataclass
class EmbedResult:
    """Summary of an embedding run (as seen by this rank)."""

    out: str
    num_rows: int
    dim: int
    num_blocks: int
    computed_blocks: int
    resumed_blocks: int
    computed_rows: int
    num_invalid: int
    seconds: float
    images_per_second: float
    rank: int = 0
    world_size: int = 1
    complete: bool = True
    batch_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- preprocessing


def _describe(exc: BaseException) -> str:
    # Messages may embed object reprs ("<_io.BytesIO object at 0x7f...>"); drop them so records are reproducible.
    return f"{type(exc).__name__}: {re.sub(r' ?<[^<>]* at 0x[0-9a-f]+>', '', str(exc))}"


def load_image(data: bytes, resize_size: int, image_size: int) -> np.ndarray:
    """Decode an image, resize its shorter side to ``resize_size`` and center-crop ``image_size``.

    Returns:
        ``(3, image_size, image_size)`` uint8 array.

    Raises:
        Exception: whatever PIL raises for undecodable bytes (callers record it).
    """
    from PIL import Image

    # No JPEG draft (reduced-scale) decoding: it would be faster for large images, but then the result would
    # differ from torchvision's Resize + CenterCrop, which the trainer and users apply to the same images.
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        size = (resize_size, int(resize_size * height / width))
    else:
        size = (int(resize_size * width / height), resize_size)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - image_size) / 2.0))
    top = int(round((size[1] - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class BatchGrid:
    """The fixed batch composition: batch ``k`` of block ``b`` = rows ``[b0 + k*B, min(b0 + (k+1)*B, b1))``."""

    rows_per_block: int
    batch_size: int
    num_rows: int

    def batch_of(self, row: int) -> tuple[int, int]:
        """``(block, k)`` of a global row."""
        block = row // self.rows_per_block
        return block, (row - block * self.rows_per_block) // self.batch_size

    def batch_rows(self, batch: tuple[int, int]) -> tuple[int, int]:
        """Global rows ``[start, end)`` of a batch."""
        start = batch[0] * self.rows_per_block + batch[1] * self.batch_size
        block_end = min((batch[0] + 1) * self.rows_per_block, self.num_rows)
        return start, min(start + self.batch_size, block_end)


@dataclass(frozen=True)
class Piece:
    """Consecutive rows of one shard for one worker to decode.

    Attributes:
        shard_url: the tar to stream.
        shard_name: its name relative to the ingest root (for records).
        first_row: global row of ``keys[0]``.
        keys: expected keys of rows ``first_row ...``, in order.
    """

    shard_url: str
    shard_name: str
    first_row: int
    keys: tuple[str, ...]


def plan_pieces(shard_set: ShardSet, keys: Callable[[int, int], list[str]], ranges: list[tuple[int, int]],
                piece_rows: int) -> list[Piece]:
    """Cut global row ranges into pieces of at most ``piece_rows`` rows, never spanning two shards.

    Args:
        shard_set: the shards.
        keys: ``keys(start, end)`` gives the expected keys of rows ``[start, end)``.
        ranges: disjoint global row ranges to cover, in order.
        piece_rows: largest piece.
    """
    pieces = []
    for start, end in ranges:
        for shard, low, high in shard_set.overlapping(start, end):
            for piece_start in range(shard.first_row + low, shard.first_row + high, piece_rows):
                piece_end = min(piece_start + piece_rows, shard.first_row + high)
                pieces.append(Piece(shard.url, shard.name, piece_start, tuple(keys(piece_start, piece_end))))
    return pieces


def _pending_ranges(layout: StoreLayout, blocks: list[int]) -> list[tuple[int, int]]:
    """Merge consecutive blocks into global row ranges."""
    ranges: list[tuple[int, int]] = []
    for block in blocks:
        start, end = layout.block_rows(block)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def _piece_rows(total_rows: int, workers: int, batch_size: int) -> int:
    """Piece length giving every worker a few pieces (a worker skips, without decoding, the rows of its shard
    before its piece, so pieces are not made smaller than needed)."""
    if workers <= 1:
        return max(1, total_rows)
    target = max(1, 2 * max(1, workers))
    rows = max(batch_size, math.ceil(total_rows / target))
    return math.ceil(rows / batch_size) * batch_size


# --------------------------------------------------------------------------------------------- decoding


class DecodeDataset(torch.utils.data.IterableDataset):
    """Decoded pieces; DataLoader worker ``w`` of ``W`` takes pieces ``w, w + W, ...``.

    Items: ``{"rows": int64 (n,), "images": uint8 (n, 3, S, S), "failures": [...]}`` with all rows in one batch
    of the :class:`BatchGrid`; ``failures`` lists ``{"row", "key", "error"}`` of rows whose image is zeros.
    """

    def __init__(self, pieces: list[Piece], grid: BatchGrid, resize_size: int, image_size: int,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.pieces = pieces
        self.grid = grid
        self.resize_size = resize_size
        self.image_size = image_size
        self.storage_options = dict(storage_options or {})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        register_fsspec_opener(self.storage_options)
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(self.pieces), num_workers):
            yield from self._decode_piece(self.pieces[index])

    def _decode_piece(self, piece: Piece) -> Iterator[dict[str, Any]]:
        expected = {key: piece.first_row + i for i, key in enumerate(piece.keys)}
        errors = StreamErrors()
        pending: list[tuple[int, np.ndarray | None, str | None]] = []
        for sample in sample_stream([piece.shard_url], handler=errors):
            row = expected.pop(sample["__key__"], None)
            if row is None:
                continue  # a sample of the shard outside this piece
            if pending and self.grid.batch_of(row) != self.grid.batch_of(pending[0][0]):
                yield self._item(pending, piece)
                pending = []
            pending.append((row, *self._decode(sample)))
            if not expected:
                break  # every row of the piece is in: skip the rest of the shard
        if pending:
            yield self._item(pending, piece)
        yield from self._missing(expected, piece, errors)

    def _decode(self, sample: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
        data = sample.get("jpg")
        if data is None:
            return None, f"no .jpg member for key {sample['__key__']} (members: {sorted(sample)})"
        try:
            return load_image(data, self.resize_size, self.image_size), None
        except Exception as exc:  # any decode failure is a per-sample failure: recorded by _item
            return None, _describe(exc)

    def _missing(self, expected: dict[str, int], piece: Piece, errors: StreamErrors) -> Iterator[dict[str, Any]]:
        """Rows never met in the stream (absent from the shard, or after a tar error) become failures."""
        reason = f"not found in {piece.shard_name}" + (f" ({errors.errors[-1]})" if errors.errors else "")
        by_batch: dict[tuple[int, int], list[tuple[int, None, str]]] = {}
        for row in sorted(expected.values()):
            by_batch.setdefault(self.grid.batch_of(row), []).append((row, None, reason))
        for rows in by_batch.values():
            yield self._item(rows, piece)

    def _item(self, pending: list[tuple[int, np.ndarray | None, str | None]], piece: Piece) -> dict[str, Any]:
        images = torch.zeros((len(pending), 3, self.image_size, self.image_size), dtype=torch.uint8)
        failures = []
        for i, (row, image, error) in enumerate(pending):
            if image is not None:
                images[i] = torch.from_numpy(image)
            else:
                failures.append({"row": row, "key": piece.keys[row - piece.first_row], "error": error})
        rows = torch.tensor([row for row, _, _ in pending], dtype=torch.int64)
        return {"rows": rows, "images": images, "failures": failures}


def make_loader(dataset: DecodeDataset, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The DataLoader over a :class:`DecodeDataset` (items are already batched by the dataset)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=4 if workers else None)


# --------------------------------------------------------------------------------------------- assembly


@dataclass
class _Block:
    start: int
    features: np.ndarray
    valid: np.ndarray
    failures: list[dict[str, Any]] = field(default_factory=list)
    remaining: int = 0


class _Assembler:
    """Collects decoded rows into fixed-composition batches, and batch features into blocks."""

    def __init__(self, layout: StoreLayout, grid: BatchGrid, dim: int) -> None:
        self.layout = layout
        self.grid = grid
        self.dim = dim
        self.batches: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.blocks: dict[int, _Block] = {}

    def add(self, item: dict[str, Any]) -> tuple[Any, Any, list[dict[str, Any]]] | None:
        """Add a decoded item; returns ``(rows, images, failures)`` once its batch is complete."""
        batch = self.grid.batch_of(int(item["rows"][0]))
        parts = self.batches.setdefault(batch, [])
        parts.append(item)
        start, end = self.grid.batch_rows(batch)
        if sum(len(p["rows"]) for p in parts) < end - start:
            return None
        del self.batches[batch]
        if len(parts) == 1:
            return parts[0]["rows"], parts[0]["images"], parts[0]["failures"]
        rows = torch.cat([p["rows"] for p in parts])
        order = torch.argsort(rows)
        images = torch.cat([p["images"] for p in parts])[order]
        return rows[order], images, [f for p in parts for f in p["failures"]]

    def put(self, rows: np.ndarray, features: np.ndarray, failures: list[dict[str, Any]]) -> _Block | None:
        """Store a batch's features; returns the block once all its rows are in."""
        index = int(rows[0]) // self.layout.rows_per_block
        block = self.blocks.get(index)
        if block is None:
            start, end = self.layout.block_rows(index)
            block = _Block(start, np.zeros((end - start, self.dim), self.layout.dtype), np.ones(end - start, bool),
                           remaining=end - start)
            self.blocks[index] = block
        local = rows - block.start
        block.features[local] = features
        for failure in failures:
            block.valid[failure["row"] - block.start] = False
            block.features[failure["row"] - block.start] = 0
        block.failures.extend(failures)
        block.remaining -= len(rows)
        if block.remaining:
            return None
        return self.blocks.pop(index)


# --------------------------------------------------------------------------------------------- model


@dataclass
class _Model:
    extractor: Any
    device: Any
    amp: bool
    channels_last: bool
    arch: str
    sobel: bool
    layer: str
    dim: int
    weights: dict[str, Any] | None
    checkpoint: dict[str, Any] | None


def _file_digest(path: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"name": os.path.basename(path.rstrip("/")), "sha256": digest.hexdigest()}


def _build_model(config: EmbedConfig) -> _Model:
    from dataengine import models

    device = _device(config.device)
    torch.manual_seed(config.seed)  # random init must be identical on every rank and every resume
    weights = checkpoint = None
    if config.checkpoint:
        backbone = models.load_checkpoint(config.checkpoint)
        if config.model and config.model != backbone.arch:
            raise ValueError(f"model {config.model} differs from the checkpoint's architecture {backbone.arch}")
        if config.sobel and not backbone.has_sobel:
            raise ValueError("sobel=True, but the checkpoint's backbone has no Sobel layer")
        # The weights, not the file: a checkpoint re-saved with other optimizer state embeds the same.
        checkpoint = {"name": os.path.basename(models.checkpoint_file(config.checkpoint).rstrip("/")),
                      "weights_sha256": models.weights_digest(backbone)}
    else:
        backbone, _ = models.build_backbone(config.model or "resnet18", config.sobel)
        if config.weights:
            models.load_weights(backbone, config.weights)
            weights = _file_digest(config.weights)
    extractor = models.FeatureExtractor(backbone, config.layer).to(device).eval()
    amp = device.type == "cuda" if config.amp is None else config.amp
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    dim = models.feature_dim(extractor, config.image_size)
    return _Model(extractor, device, amp, channels_last, backbone.arch, backbone.has_sobel, extractor.layer, dim,
                  weights, checkpoint)


def _device(name: str) -> Any:
    if name == "auto":
        name = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def _forward(model: _Model, images: Any) -> np.ndarray:
    x = images.to(model.device, non_blocking=True)
    if model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.amp):
        out = model.extractor(x)
    return out.float().cpu().numpy()


def _checked_forward(model: _Model, images: torch.Tensor) -> np.ndarray:
    try:
        return _forward(model, images)
    except (RuntimeError, MemoryError) as exc:
        if _is_oom(exc):
            raise MemoryError(f"a batch of {len(images)} images does not fit in {model.device.type} memory "
                              f"({_describe(exc)}); pass a smaller --batch-size") from exc
        raise


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) or \
        "out of memory" in str(exc).lower()


def _fit_batch_size(model: _Model, image_size: int, requested: int | None) -> int:
    """The requested batch size if one forward pass of it fits in memory, else (automatic) the largest power
    of two up to :data:`AUTO_MAX_BATCH` that does (probed on CUDA, estimated on CPU).

    Raises:
        MemoryError: the requested size, or a batch of 1, does not fit; the message says what to do.
    """
    size = requested or AUTO_MAX_BATCH[model.device.type]
    if requested is None and model.device.type == "cpu":
        # CPU allocators rarely fail cleanly (the OS kills the process instead): size from an estimate.
        return min(size, _cpu_memory_cap(model, image_size))
    while True:
        try:
            _forward(model, torch.zeros((size, 3, image_size, image_size), dtype=torch.uint8))
            return size
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise
            if requested is not None or size == 1:
                raise MemoryError(f"a batch of {size} images of {image_size}px does not fit in "
                                  f"{model.device.type} memory ({_describe(exc)}); "
                                  + ("pass a smaller --batch-size" if requested else "use a smaller model or "
                                     "--image-size")) from exc
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            size //= 2
            logger.info("batch does not fit in memory; trying %d", size)


def _cpu_memory_cap(model: _Model, image_size: int) -> int:
    """Batch size whose activations (the sum of every layer's output for one image, an upper bound) take at
    most half of the available memory, rounded down to a power of two."""
    import psutil

    total = [0]

    def count(_module: Any, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in model.extractor.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        _forward(model, torch.zeros((1, 3, image_size, image_size), dtype=torch.uint8))
    finally:
        for handle in handles:
            handle.remove()
    cap = int(psutil.virtual_memory().available * 0.5 // max(1, total[0]))
    return max(1, 2 ** int(math.log2(max(1, cap))))


# --------------------------------------------------------------------------------------------- distributed


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool, device: Any) -> bool:
    """True when ``ok`` on every rank (also a barrier); a no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# --------------------------------------------------------------------------------------------- store setup


def _output_config(config: EmbedConfig, model: _Model, batch_size: int, chunk_rows: int) -> dict[str, Any]:
    return {"model": model.arch, "sobel": model.sobel, "weights": model.weights, "checkpoint": model.checkpoint,
            "layer": model.layer, "image_size": config.image_size, "resize_size": config.resolved_resize_size,
            "batch_size": batch_size, "dtype": config.dtype, "chunk_rows": chunk_rows,
            "chunks_per_shard": config.chunks_per_shard, "seed": config.seed,
            "precision": "bfloat16" if model.amp else "float32", "channels_last": model.channels_last,
            "device_type": model.device.type}


def _default_chunk_rows(dim: int, dtype: str, batch_size: int) -> int:
    rows = math.ceil(MIN_CHUNK_BYTES / (dim * np.dtype(dtype).itemsize))
    return math.ceil(rows / batch_size) * batch_size


def _resolve(config: EmbedConfig, model: _Model, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The output config. On resume, automatic fields (batch size, chunk rows) take their recorded values when
    everything else matches, so a resumed run computes exactly as the first one did."""
    old = (recorded or {}).get("config") or {}
    if old:
        candidate = _output_config(config, model, config.batch_size or old.get("batch_size"),
                                   config.chunk_rows or old.get("chunk_rows"))
        if candidate == old:
            return candidate
    batch_size = config.batch_size or _fit_batch_size(model, config.image_size, None)
    chunk_rows = config.chunk_rows or _default_chunk_rows(model.dim, config.dtype, batch_size)
    return _output_config(config, model, batch_size, chunk_rows)


def _prepare_store(config: EmbedConfig, shard_set: ShardSet, model: _Model, wanted: dict[str, Any],
                   recorded: dict[str, Any] | None) -> None:
    """Rank 0: create the store, or check that the existing one was made by the same configuration."""
    if recorded is not None and recorded.get("state") != "initializing":
        same = recorded.get("config") == wanted and recorded.get("source", {}).get("digest") == shard_set.digest
        if same:
            removed = remove_partial_writes(config.out)
            if removed:
                logger.info("removed %d partial writes left by an interrupted run", removed)
            return
        if not config.overwrite:
            raise OutputExistsError(f"{config.out} holds features made with another configuration or input "
                                    f"({recorded.get('config')}); use another --out or --overwrite")
        logger.warning("--overwrite: replacing the feature store at %s", config.out)
    _create(config, shard_set, model, wanted)


def _create(config: EmbedConfig, shard_set: ShardSet, model: _Model, wanted: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    from dataengine.fs import open_input

    layout = StoreLayout(num_rows=shard_set.num_samples, dim=model.dim, dtype=config.dtype,
                         chunk_rows=wanted["chunk_rows"], chunks_per_shard=config.chunks_per_shard)
    attrs = _store_attrs(config, shard_set, model, wanted, layout)
    store = create_store(config.out, config.storage_options, layout, attrs)
    with open_input(shard_set.metadata_url, shard_set.storage_options) as handle:
        table = pq.read_table(handle, columns=["key", "user", "device", "label", "tags", "lat", "lon"])
    if table.num_rows != shard_set.num_samples:
        raise ValueError(f"{shard_set.metadata_url} has {table.num_rows} rows but the manifest lists "
                         f"{shard_set.num_samples} samples")
    columns = write_keys_and_metadata(store, table)
    store.write_attrs("", {"metadata_columns": columns, "state": "embedding"})
    logger.info("created %s: %d rows x %d (%s), %d blocks of %d rows", config.out, layout.num_rows, layout.dim,
                layout.dtype, layout.num_blocks, layout.rows_per_block)


def _store_attrs(config: EmbedConfig, shard_set: ShardSet, model: _Model, wanted: dict[str, Any],
                 layout: StoreLayout) -> dict[str, Any]:
    from dataengine.models import IMAGENET_MEAN, IMAGENET_STD

    return {
        "num_rows": layout.num_rows, "dim": layout.dim, "dtype": layout.dtype, "chunk_rows": layout.chunk_rows,
        "rows_per_block": layout.rows_per_block, "num_blocks": layout.num_blocks,
        "model": {"arch": model.arch, "sobel": model.sobel, "weights": model.weights, "checkpoint": model.checkpoint,
                  "init": "weights" if (model.weights or model.checkpoint) else f"random (seed {config.seed})"},
        "layer": model.layer,
        "preprocessing": {"decode": "RGB", "resize_shorter_side": config.resolved_resize_size,
                          "interpolation": "bilinear", "center_crop": config.image_size,
                          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "source": {"url": shard_set.url, "digest": shard_set.digest, "num_samples": shard_set.num_samples,
                   "num_shards": len(shard_set.shards)},
        "config": wanted,
    }


def _layout_of(attrs: dict[str, Any]) -> StoreLayout:
    config = attrs["config"]
    return StoreLayout(num_rows=attrs["num_rows"], dim=attrs["dim"], dtype=attrs["dtype"],
                       chunk_rows=config["chunk_rows"], chunks_per_shard=config["chunks_per_shard"])


# --------------------------------------------------------------------------------------------- run


def run_embed(config: EmbedConfig, progress: Callable[[int], None] | None = None) -> EmbedResult:
    """Embed every sample of ``config.shards`` into the feature store ``config.out``, resuming any earlier run.

    Under ``torch.distributed`` (initialised by the caller, e.g. the CLI under ``torchrun``) every rank calls
    this; rank 0 creates the store, each rank embeds its own blocks, rank 0 marks the store complete.

    Args:
        config: what to embed and how.
        progress: called with the number of rows of each block just written.

    Raises:
        IncompleteOutputError: the ingest output has no manifest.
        OutputExistsError: ``out`` holds another store (and not ``overwrite``).
        WeightsMismatchError: the weights do not fit the model.
    """
    start = time.perf_counter()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    rank, world_size = _dist_info()
    shard_set = load_shard_set(config.shards, config.storage_options)
    model = _build_model(config)
    store, wanted = _open_or_create(config, shard_set, model, rank)
    layout = _layout_of(store.attrs)
    if store.complete:
        logger.info("%s is already complete (%d rows); nothing to do", config.out, layout.num_rows)
        return _result(config, store, layout, wanted, start, rank, world_size, 0, 0, layout.num_blocks)
    records = store.block_records()
    mine = split_evenly(layout.num_blocks, world_size, rank)
    pending = [b for b in mine if records[b] is None]
    if len(pending) < len(mine):
        logger.info("rank %d: resuming, %d of %d blocks already done", rank, len(mine) - len(pending), len(mine))
    computed_rows = _embed_and_finalize(config, shard_set, store, layout, model, wanted["batch_size"], pending,
                                        rank, progress)
    resumed = len(mine) - len(pending)
    return _result(config, store, layout, wanted, start, rank, world_size, len(pending), computed_rows, resumed)


def _embed_and_finalize(config: EmbedConfig, shard_set: ShardSet, store: FeatureStore, layout: StoreLayout,
                        model: _Model, batch_size: int, blocks: list[int], rank: int,
                        progress: Callable[[int], None] | None) -> int:
    """Embed this rank's pending blocks; once every rank is done, rank 0 marks the store complete. A failure on
    any rank raises on every rank (none waits for a dead one); finished blocks are kept for the re-run."""
    error, computed_rows = None, 0
    try:
        computed_rows = _embed_blocks(config, shard_set, store, layout, model, batch_size, blocks, progress)
    except Exception as exc:  # re-raised below, once the other ranks know
        error = exc
    if not _all_ok(error is None, model.device):
        if error is not None:
            raise error
        raise RuntimeError("another rank failed (see its log); re-run to resume: finished blocks are kept")
    if rank == 0:
        _finalize(store)
    _all_ok(True, model.device)  # the others return once the store is marked complete
    return computed_rows


def _open_or_create(config: EmbedConfig, shard_set: ShardSet, model: _Model,
                    rank: int) -> tuple[FeatureStore, dict[str, Any]]:
    """Rank 0 creates or checks the store while the others wait; then every rank opens it and checks that the
    recorded configuration is its own (automatic fields excepted: rank 0's values are taken)."""
    ok, error = True, None
    if rank == 0:
        try:
            recorded = inspect_existing(config.out, config.storage_options)
            _prepare_store(config, shard_set, model, _resolve(config, model, recorded), recorded)
        except Exception as exc:  # re-raised below, after telling the other ranks not to wait
            ok, error = False, exc
    if not _all_ok(ok, model.device):
        if error is not None:
            raise error
        raise RuntimeError("rank 0 could not prepare the feature store; see its log")
    store = open_store(config.out, config.storage_options, mode="r+", allow_incomplete=True)
    recorded = store.attrs["config"]
    mine = _output_config(config, model, config.batch_size or recorded["batch_size"],
                          config.chunk_rows or recorded["chunk_rows"])
    if mine != recorded:
        raise OutputExistsError(f"{config.out}: rank {rank} resolved another configuration than rank 0 "
                                f"({mine} vs {recorded})")
    return store, recorded


def _embed_blocks(config: EmbedConfig, shard_set: ShardSet, store: FeatureStore, layout: StoreLayout,
                  model: _Model, batch_size: int, blocks: list[int],
                  progress: Callable[[int], None] | None) -> int:
    """Decode, forward and write ``blocks``; returns the number of rows written."""
    if not blocks:
        return 0
    grid = BatchGrid(layout.rows_per_block, batch_size, layout.num_rows)
    ranges = _pending_ranges(layout, blocks)
    total = sum(end - start for start, end in ranges)
    keys = store.keys
    pieces = plan_pieces(shard_set, lambda s, e: [str(k) for k in keys[s:e]], ranges,
                         _piece_rows(total, config.workers, batch_size))
    dataset = DecodeDataset(pieces, grid, config.resolved_resize_size, config.image_size, config.storage_options)
    loader = make_loader(dataset, config.workers, pin_memory=model.device.type == "cuda")
    assembler = _Assembler(layout, grid, model.dim)
    writer = _BlockWriter(store, layout, progress)
    try:
        for item in loader:
            batch = assembler.add(item)
            if batch is None:
                continue
            rows, images, failures = batch
            block = assembler.put(rows.numpy(), _checked_forward(model, images), failures)
            if block is not None:
                writer.submit(block)
    except BaseException:
        writer.close(check=False)  # let the blocks already computed land; the run's own error wins
        raise
    writer.close(check=True)
    if assembler.blocks or assembler.batches:
        raise RuntimeError(f"internal error: {len(assembler.blocks)} blocks left incomplete")
    return writer.rows


class _BlockWriter:
    """Writes finished blocks on one background thread, so that the forward loop does not wait for compression
    and storage (on a GPU that wait would idle the device). At most ``max_pending`` blocks are in flight, and
    a failed write raises at the next :meth:`submit` or at :meth:`close`."""

    def __init__(self, store: FeatureStore, layout: StoreLayout, progress: Callable[[int], None] | None,
                 max_pending: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.layout = layout
        self.progress = progress
        self.max_pending = max_pending
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embed-writer")
        self.pending: collections.deque = collections.deque()
        self.rows = 0

    def submit(self, block: _Block) -> None:
        while len(self.pending) >= self.max_pending:
            self._finish_oldest()
        self.pending.append((self.pool.submit(_write_block, self.store, self.layout, block), len(block.valid)))

    def _finish_oldest(self) -> None:
        future, rows = self.pending.popleft()
        future.result()
        self.rows += rows
        if self.progress:
            self.progress(rows)

    def close(self, check: bool) -> None:
        """Wait for every pending write; with ``check``, raise the first failure."""
        try:
            while check and self.pending:
                self._finish_oldest()
        finally:
            self.pool.shutdown(wait=True)


def _write_block(store: FeatureStore, layout: StoreLayout, block: _Block) -> None:
    index = block.start // layout.rows_per_block
    failures = sorted(block.failures, key=lambda f: f["row"])
    record = {"block": index, "rows": [block.start, block.start + len(block.valid)], "invalid": failures}
    store.write_block(index, block.start, block.features, block.valid, record)
    for failure in failures:
        logger.warning("row %d (%s): %s", failure["row"], failure["key"], failure["error"])


def _finalize(store: FeatureStore) -> None:
    """Mark the store complete once every block has its record (the attributes are written last)."""
    records = store.block_records()
    if any(record is None for record in records):
        logger.warning("%s: %d blocks are not done; not marking the store complete", store.url,
                       sum(r is None for r in records))
        return
    failures = [f for record in records for f in record["invalid"]]
    store.write_attrs("", {"num_invalid": len(failures), "failures": failures[:MAX_RECORDED_FAILURES],
                           "state": "complete", "complete": True})


def _result(config: EmbedConfig, store: FeatureStore, layout: StoreLayout, wanted: dict[str, Any], start: float,
            rank: int, world_size: int, computed_blocks: int, computed_rows: int, resumed: int) -> EmbedResult:
    # Reopen: rank 0 may have marked the store complete since this process read its attributes.
    attrs = open_store(config.out, config.storage_options, allow_incomplete=True).attrs
    seconds = time.perf_counter() - start
    return EmbedResult(out=config.out, num_rows=layout.num_rows, dim=layout.dim, num_blocks=layout.num_blocks,
                       computed_blocks=computed_blocks, resumed_blocks=resumed, computed_rows=computed_rows,
                       num_invalid=int(attrs.get("num_invalid", 0)), seconds=seconds,
                       images_per_second=computed_rows / max(seconds, 1e-9), rank=rank, world_size=world_size,
                       complete=bool(attrs.get("complete")), batch_size=wanted["batch_size"])
