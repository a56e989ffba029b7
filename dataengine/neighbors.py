"""``dataengine neighbors``: the nearest images of a query, which is a key of the store, a source path of an
ingested image (as the ingest recorded it, or any path ending with it), or an image file, embedded here with
the store's own model (rebuilt from what the store recorded, and checked to be the same weights).

Each neighbour comes with its row, key, distance in the clustering's whitened space, leaf cluster, label and
source path (from the ingest's ``metadata.parquet``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from dataengine.clustering import latest_clustering, open_clustering
from dataengine.errors import DataEngineError
from dataengine.store import FeatureStore, open_store

logger = logging.getLogger(__name__)


def find_neighbors(store_url: str, query: str, k: int, name: str | None = None,
                   storage_options: dict[str, Any] | None = None, shards: str | None = None) -> dict[str, Any]:
    """The ``k`` nearest images of ``query`` under clustering ``name`` (default: the latest one).

    Returns:
        ``{"name", "query", "query_kind" (key, source or image), "query_row" (None for an image file),
        "neighbors": [{"row", "key", "distance", "cluster", "label", "source", "path"}...]}``.

    Raises:
        KeyError: no such clustering, one without a neighbour index, or a query that is none of the three.
        ValueError: an image file that cannot be decoded, or a store whose model cannot be rebuilt here.
    """
    from indexes.faiss_index import checked_ids

    store = open_store(store_url, storage_options)
    name = name or latest_clustering(store)
    clustering = open_clustering(store, name)
    pca = clustering.pca()
    index = clustering.neighbor_index(dim=pca.output_dim)
    table = _metadata(store, storage_options, shards)
    keys = np.asarray([str(key) for key in store.keys[:]], dtype=object)
    kind, row = _find_row(query, keys, table["source"])
    if row is None:
        features = embed_image_file(store, query)
    else:
        features = np.asarray(store.features[row:row + 1], dtype=np.float32)
    distances, rows = index.search(np.ascontiguousarray(pca.apply(features), dtype=np.float32), k)
    rows = checked_ids(rows[0], store.num_rows, f"neighbour index of clustering {name!r}")
    found = rows >= 0
    leaf = clustering.assignment_array(clustering.leaf_level)
    return {"name": name, "query": query, "query_kind": kind, "query_row": row, "neighbors": [
        {"row": int(r), "key": str(keys[r]), "distance": float(d), "cluster": int(leaf[int(r)]),
         "label": table["label"][r], "source": table["source"][r], "path": _path(table["root"], table["source"][r])}
        for r, d in zip(rows[found], distances[0][found])]}


def _path(root: str | None, source: str | None) -> str | None:
    """The image's path: its source under the ingest's images folder (a URL source is its own path)."""
    if source is None or "://" in source or root is None:
        return source
    return root.rstrip("/") + "/" + source


def _find_row(query: str, keys: np.ndarray, sources: list[str | None]) -> tuple[str, int | None]:
    """``("key", row)``, ``("source", row)`` or ``("image", None)`` for a file that is not an ingested source."""
    matches = np.flatnonzero(keys == query)
    if matches.size:
        return "key", int(matches[0])
    normalized = query.replace(os.sep, "/")
    for row, source in enumerate(sources):
        if source and (normalized == source or normalized.endswith("/" + source.lstrip("/"))):
            return "source", row
    if os.path.isfile(query):
        return "image", None
    raise KeyError(f"{query!r} is no key of the store, no source path of its images, and no image file")


def _metadata(store: FeatureStore, storage_options: dict[str, Any] | None,
              shards: str | None) -> dict[str, list[Any]]:
    """The ``source`` and ``label`` columns of the store's ingest output (``shards``: another copy of it), row
    aligned with the store (``None`` values when the ingest output is gone), and the images folder that the
    sources are relative to (``root``; ``None`` for a tar, downloads or an unknown ingest)."""
    import pyarrow.parquet as pq

    from dataengine.fs import open_input
    from dataengine.shards import load_shard_set

    url = shards or store.attrs.get("source", {}).get("url")
    table = None
    if url:
        try:
            shard_set = load_shard_set(url, storage_options)
            with open_input(shard_set.metadata_url, shard_set.storage_options) as handle:
                table = pq.ParquetFile(handle).read(columns=["source", "label"])
        except (OSError, ValueError, KeyError, DataEngineError) as exc:  # the ingest output moved or is gone
            logger.warning("no paths or labels: the ingest output %s cannot be read (%s)", url, exc)
    if table is None or table.num_rows != store.num_rows:
        return {"source": [None] * store.num_rows, "label": [None] * store.num_rows, "root": None}
    images = shard_set.manifest.get("config", {}).get("images")
    root = images if images and not images.lower().endswith((".tar", ".tar.gz", ".tgz")) else None
    return {"source": table["source"].to_pylist(), "label": table["label"].to_pylist(), "root": root}


def embed_image_file(store: FeatureStore, path: str) -> np.ndarray:
    """The feature of the image file at ``path``, as the store's model computes it (one row, float32).

    Raises:
        ValueError: the file is not a decodable image, or the store's model cannot be rebuilt with the same
            weights here (a weights file or checkpoint moved away).
    """
    import torch

    from dataengine.embed.decode import load_image
    from dataengine.embed.model import build_model, forward

    recorded = store.attrs["config"]
    model = build_model(_embed_config(store))
    if model.record["weights_sha256"] != recorded["weights_sha256"]:
        raise ValueError(f"the model rebuilt from {store.url}'s record has other weights than the store's "
                         f"({model.record['weights_sha256'][:12]} vs {recorded['weights_sha256'][:12]})")
    try:
        with open(path, "rb") as handle:
            image = load_image(handle.read(), recorded["resize_size"], recorded["image_size"])
    except Exception as exc:  # PIL raises many types for undecodable bytes
        raise ValueError(f"{path} is not an image that can be decoded: {type(exc).__name__}: {exc}") from None
    return forward(model, torch.from_numpy(image)[None]).astype(np.float32)


def _embed_config(store: FeatureStore) -> Any:
    """The :class:`~dataengine.embed.EmbedConfig` that rebuilds the store's model on the CPU."""
    from dataengine.embed import EmbedConfig

    recorded, model = store.attrs["config"], store.attrs["model"]
    values: dict[str, Any] = {"shards": "", "out": "", "sobel": recorded["sobel"], "layer": recorded["layer"],
                              "image_size": recorded["image_size"], "resize_size": recorded["resize_size"],
                              "seed": recorded["seed"], "device": "cpu", "workers": 0}
    if recorded.get("checkpoint"):
        values.update(checkpoint=model["source"], sobel=False)
    elif recorded.get("weights"):
        values.update(model=recorded["model"], weights=model["source"])
    elif recorded["model_kind"] == "arch":
        values.update(model=recorded["model"])
    else:  # torchvision weights, TorchScript file, module:function: the --model value itself
        values.update(model=recorded["model_name"], sobel=False, layer=None if recorded["model_kind"] != "torchvision"
                      else recorded["layer"])
    return EmbedConfig(**values)
