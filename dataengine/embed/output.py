"""The feature store an embedding run writes: its resolved configuration, creation (rank 0) or the check that
an existing store was made by the same configuration, and the completion mark."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from dataengine.embed.config import EmbedConfig
from dataengine.embed.model import EmbedModel, fit_batch_size
from dataengine.errors import OutputExistsError
from dataengine.shards import ShardSet
from dataengine.store import (
    MAX_RECORDED_FAILURES,
    METADATA_COLUMNS,
    FeatureStore,
    StoreLayout,
    create_store,
    metadata_batches,
    remove_partial_writes,
    write_metadata_batches,
)

logger = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 1 << 20


def output_config(config: EmbedConfig, model: EmbedModel, batch_size: int, chunk_rows: int) -> dict[str, Any]:
    return {"model": model.arch, "sobel": model.sobel, "weights": model.weights, "checkpoint": model.checkpoint,
            "model_name": model.record["name"], "model_kind": model.record["kind"],
            "weights_sha256": model.record["weights_sha256"], "layer": model.layer, "image_size": config.image_size,
            "resize_size": config.resolved_resize_size,
            "batch_size": batch_size, "dtype": config.dtype, "chunk_rows": chunk_rows,
            "chunks_per_shard": config.chunks_per_shard, "seed": config.seed,
            "precision": "bfloat16" if model.amp else "float32", "channels_last": model.channels_last,
            "device_type": model.device.type}


def _default_chunk_rows(dim: int, dtype: str, batch_size: int) -> int:
    rows = math.ceil(MIN_CHUNK_BYTES / (dim * np.dtype(dtype).itemsize))
    return math.ceil(rows / batch_size) * batch_size


def resolve_config(config: EmbedConfig, model: EmbedModel, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """The output config. On resume, automatic fields (batch size, chunk rows) take their recorded values when
    everything else matches, so a resumed run computes exactly as the first one did."""
    old = (recorded or {}).get("config") or {}
    if old:
        candidate = output_config(config, model, config.batch_size or old.get("batch_size"),
                                   config.chunk_rows or old.get("chunk_rows"))
        if candidate == old:
            return candidate
    batch_size = config.batch_size or fit_batch_size(model, config.image_size, None)
    chunk_rows = config.chunk_rows or _default_chunk_rows(model.dim, config.dtype, batch_size)
    return output_config(config, model, batch_size, chunk_rows)


def prepare_store(config: EmbedConfig, shard_set: ShardSet, model: EmbedModel, wanted: dict[str, Any],
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


def _create(config: EmbedConfig, shard_set: ShardSet, model: EmbedModel, wanted: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    from dataengine.fs import open_input

    layout = StoreLayout(num_rows=shard_set.num_samples, dim=model.dim, dtype=config.dtype,
                         chunk_rows=wanted["chunk_rows"], chunks_per_shard=config.chunks_per_shard)
    attrs = _store_attrs(config, shard_set, model, wanted, layout)
    store = create_store(config.out, config.storage_options, layout, attrs)

    def batches() -> Iterator[Any]:  # metadata.parquet front to back, a batch at a time (twice)
        with open_input(shard_set.metadata_url, shard_set.storage_options) as handle:
            parquet = pq.ParquetFile(handle)
            if parquet.metadata.num_rows != shard_set.num_samples:
                raise ValueError(f"{shard_set.metadata_url} has {parquet.metadata.num_rows} rows but the manifest "
                                 f"lists {shard_set.num_samples} samples")
            names = [n for n in ("key", *METADATA_COLUMNS) if n in parquet.schema_arrow.names]
            yield from metadata_batches(parquet, names)

    columns = write_metadata_batches(store, batches, shard_set.num_samples)
    store.write_attrs("", {"metadata_columns": columns, "state": "embedding"})
    logger.info("created %s: %d rows x %d (%s), %d blocks of %d rows", config.out, layout.num_rows, layout.dim,
                layout.dtype, layout.num_blocks, layout.rows_per_block)


def _store_attrs(config: EmbedConfig, shard_set: ShardSet, model: EmbedModel, wanted: dict[str, Any],
                 layout: StoreLayout) -> dict[str, Any]:
    return {
        "num_rows": layout.num_rows, "dim": layout.dim, "dtype": layout.dtype, "chunk_rows": layout.chunk_rows,
        "rows_per_block": layout.rows_per_block, "num_blocks": layout.num_blocks,
        "model": {"arch": model.arch, "sobel": model.sobel, "weights": model.weights, "checkpoint": model.checkpoint,
                  "init": f"random (seed {config.seed})" if config.random_init else "weights", **model.record},
        "layer": model.layer,
        "preprocessing": {"decode": "RGB", "resize_shorter_side": config.resolved_resize_size,
                          "interpolation": "bilinear", "center_crop": config.image_size,
                          "mean": _scaled(model.extractor.mean), "std": _scaled(model.extractor.std)},
        "source": {"url": shard_set.url, "digest": shard_set.digest, "num_samples": shard_set.num_samples,
                   "num_shards": len(shard_set.shards)},
        "config": wanted,
    }


def _scaled(buffer: Any) -> list[float]:
    """The normalisation a model applies, in the [0, 1] pixel scale (its buffers hold 255 times that)."""
    return [round(float(v) / 255.0, 6) for v in buffer.flatten().cpu()]


def layout_of(attrs: dict[str, Any]) -> StoreLayout:
    config = attrs["config"]
    return StoreLayout(num_rows=attrs["num_rows"], dim=attrs["dim"], dtype=attrs["dtype"],
                       chunk_rows=config["chunk_rows"], chunks_per_shard=config["chunks_per_shard"])


def finalize(store: FeatureStore) -> None:
    """Mark the store complete once every block has its record (the attributes are written last)."""
    records = store.block_records()
    if any(record is None for record in records):
        logger.warning("%s: %d blocks are not done; not marking the store complete", store.url,
                       sum(r is None for r in records))
        return
    failures = [f for record in records for f in record["invalid"]]
    store.write_attrs("", {"num_invalid": len(failures), "failures": failures[:MAX_RECORDED_FAILURES],
                           "state": "complete", "complete": True})
