"""Embed: ingest shards -> Zarr v3 feature store, streaming, resumable, distributed.

Design:

* Rows are grouped in *blocks* of ``chunk_rows * chunks_per_shard`` rows (one stored object of features,
  see :mod:`dataengine.store`). Ranks own disjoint contiguous ranges of blocks
  (:func:`indexes.data.shard_bounds`); a block with a completion record is skipped on re-runs, so a run
  killed at any moment resumes where it stopped, on any number of ranks.
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

Modules: :mod:`~dataengine.embed.config` (what to embed), :mod:`~dataengine.embed.decode` (preprocessing,
planning of pieces, the decoding dataset), :mod:`~dataengine.embed.model` (the network, forward pass, batch
size), :mod:`~dataengine.embed.blocks` (batches -> blocks, the background block writer),
:mod:`~dataengine.embed.output` (creating or checking the feature store, marking it complete) and
:mod:`~dataengine.embed.run` (:func:`run_embed`, over ranks).
"""

from __future__ import annotations

from dataengine.embed.config import EmbedConfig, EmbedResult
from dataengine.embed.decode import BatchGrid, DecodeDataset, Piece, load_image, make_loader, plan_pieces
from dataengine.embed.run import run_embed

__all__ = ["BatchGrid", "DecodeDataset", "EmbedConfig", "EmbedResult", "Piece", "load_image", "make_loader",
           "plan_pieces", "run_embed"]
