"""Ingest: photos + YFCC100M metadata (or an image folder / tar) -> webdataset shards, resumably.

Design (README, section "Ingest", and its output layout):

* The main process enumerates input rows in order and hands blocks of rows to ``workers`` processes, which
  fetch bytes (read, or download), normalise images and build each sample's tar members (through a shared
  memory arena, not the pool's pipe). Results come back *in input order* and the main process alone packs
  them into shards of exactly ``shard_size`` samples (the last one may be smaller).
* A shard is built in a local scratch file, published atomically (rename, or upload), followed by its
  ledger part, its metadata part and last its stats file: a shard is done only when its stats exist. Done
  shards always form a prefix, so a re-run after SIGKILL resumes at the first row after the last done shard,
  with the set of already-seen hashes reloaded, and produces byte-identical shards.
* Exact duplicates (same sha256 of the original bytes) are dropped in input order (the first one wins).
* With several nodes, input rows are dealt out in blocks of ``split_rows`` rows round-robin; each node
  writes its own shards (``shard-r003-000000.tar``) and a done marker; whichever node finds all markers
  present merges: ``metadata.parquet``, ``ledger.jsonl`` and last ``manifest.json``. Duplicates are found
  within a node; duplicates across nodes are counted in the manifest (``cross_node_duplicates``).

Modules: :mod:`~dataengine.ingest.config` (the run's config, result and statuses),
:mod:`~dataengine.ingest.pipeline` (worker processes: rows -> samples in input order),
:mod:`~dataengine.ingest.writer` (samples -> published shards), :mod:`~dataengine.ingest.resume` (the
recorded config and the done prefix), :mod:`~dataengine.ingest.seen` (the photo ids stored so far, ~9 bytes
each), :mod:`~dataengine.ingest.merging` (the nodes' parts -> manifest) and
:mod:`~dataengine.ingest.run` (the stage). The shard layout itself belongs to :mod:`dataengine.shards`.
"""

from dataengine.ingest.config import STATUSES, IngestConfig, IngestResult
from dataengine.ingest.merging import merge
from dataengine.ingest.run import run_ingest, run_merge

__all__ = ["STATUSES", "IngestConfig", "IngestResult", "merge", "run_ingest", "run_merge"]
