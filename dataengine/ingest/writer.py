"""Ingest's single writer: samples, in input order, -> shards of ``shard_size`` published atomically.

Each shard is followed by its ledger part, its metadata part and last its stats file (a shard is done only
when its stats exist): see :mod:`dataengine.ingest.resume` for how a re-run finds the done prefix.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

from dataengine.fs import Location
from dataengine.ingest.config import IngestConfig
from dataengine.ingest.pipeline import MetadataBlock, Sample
from dataengine.ingest.resume import ResumeState
from dataengine.metadata_table import rows_to_parquet_bytes, table_to_parquet_bytes
from dataengine.shards import IMAGE_DATA_OFFSET
from dataengine.tario import TarWriter

_LEDGER_JSON = json.JSONEncoder(ensure_ascii=False)


class ShardWriter:
    """Packs samples, in input order, into shards of ``shard_size`` and publishes each one atomically."""

    def __init__(self, out: Location, config: IngestConfig, state: ResumeState) -> None:
        self.out = out
        self.config = config
        self.index = state.next_index
        self.seen_hashes = state.seen_hashes
        self.seen_keys = state.seen_keys
        self.input_start = state.input_end
        self.scratch = out.scratch_dir()
        self.done_counts = collections.Counter(state.counts)
        self.num_shards = state.num_shards
        self.num_samples = state.num_samples
        self._known: set[str] = set()  # of the block being added: its photo ids seen in earlier blocks
        self._block_keys: set[str] = set()  # and those it stored so far
        self._extra_columns = bool(config.url_list)  # a URL list's caption and additional columns
        self._reset()

    def _reset(self) -> None:
        self._tar: TarWriter | None = None
        self._meta: list[dict[str, Any]] = []
        self._tables: list[Any] = []  # metadata-only mode: the part's rows as Arrow tables
        self._num_meta = 0  # rows of the part: its samples (with an image) or its metadata rows
        self._ledger: list[dict[str, Any]] = []
        self._counts: collections.Counter = collections.Counter()
        self._last_row = self.input_start - 1
        self._shard = f"shards/{self.name}.tar"

    @property
    def name(self) -> str:
        return f"{self.config.shard_prefix}-{self.index:06d}"

    def add_block(self, samples: list[Sample] | MetadataBlock) -> None:
        """Record a block of rows, in input order (the photo ids seen before are looked up at once)."""
        if isinstance(samples, MetadataBlock):
            self._add_metadata_block(samples)
            return
        ok = [s.key for s in samples if s.status == "ok"]
        known = self.seen_keys.contains_many(ok) if ok else ()
        self._known = {key for key, hit in zip(ok, known) if hit}
        self._block_keys = set()
        for sample in samples:
            self._add(sample)
        self.seen_keys.add_many(list(self._block_keys))
        self._known, self._block_keys = set(), set()

    def _add_metadata_block(self, block: MetadataBlock) -> None:
        """Metadata-only mode: the block's ledger entries, and its ok rows' table cut at the parts' ends (a
        photo id seen before makes its row ``bad_metadata``, as in :meth:`_classify`)."""
        import numpy as np

        ok = [i for i, status in enumerate(block.statuses) if status == "ok"]
        keys = [block.keys[i] for i in ok]
        known = self.seen_keys.contains_many(keys) if keys else ()
        statuses, errors, stored = block.statuses, block.errors, set()
        kept = np.ones(len(ok), bool)
        for j, (i, key, hit) in enumerate(zip(ok, keys, known)):
            if hit or key in stored:
                statuses[i], errors[i], kept[j] = "bad_metadata", f"photo id {key} appears again", False
            else:
                stored.add(key)
        self.seen_keys.add_many(list(stored))
        table = block.table if kept.all() else block.table.filter(kept)
        start, in_part = 0, 0  # of ``table``: the first row of the open part, and its rows there so far
        for row, key, status, error in zip(block.rows, block.keys, statuses, errors):
            self._ledger.append({"row": row, "id": key, "status": status, "error": error, "shard": None})
            self._counts[status] += 1
            self._last_row = row
            if status == "ok":
                self._num_meta, in_part = self._num_meta + 1, in_part + 1
                if self._num_meta == self.config.shard_size:
                    self._tables.append(table.slice(start, in_part))
                    start, in_part = start + in_part, 0
                    self.close_shard()
        if in_part:
            self._tables.append(table.slice(start))

    def _add(self, sample: Sample) -> None:
        """Record one row of the block being added; ok samples go into the open shard, which closes once full."""
        self._classify(sample)
        shard = self._shard if sample.status == "ok" else None
        self._ledger.append({"row": sample.row, "id": sample.key, "status": sample.status,
                             "error": sample.error, "shard": shard})
        self._counts[sample.status] += 1
        self._last_row = sample.row
        if sample.status == "ok":
            self._write_sample(sample)
            self._num_meta += 1
            if self._num_meta == self.config.shard_size:
                self.close_shard()

    def _classify(self, sample: Sample) -> None:
        if sample.status != "ok":
            return
        if sample.key in self._known or sample.key in self._block_keys:
            sample.status, sample.error = "bad_metadata", f"photo id {sample.key} appears again"
            return
        digest = bytes.fromhex(sample.sha256)[:16]
        first = self.seen_hashes.get(digest)
        if first is not None and not self.config.keep_duplicates:
            sample.status, sample.error = "duplicate", f"same bytes as {first}"
            return
        self.seen_hashes.setdefault(digest, sample.key)
        self._block_keys.add(sample.key)

    def _write_sample(self, sample: Sample) -> None:
        row = sample.metadata  # the worker's copy: completed in place into the parquet row
        if self._tar is None:
            self._tar = TarWriter(os.path.join(self.scratch, f"{self.name}.tar.partial"))
        offset = self._tar.offset + IMAGE_DATA_OFFSET
        self._tar.write(sample.member)
        row.update(shard=-1, position=len(self._meta), offset=offset, size=sample.jpeg_size)
        self._meta.append(row)

    def close_shard(self) -> None:
        """Publish the open shard: tar, ledger part, metadata part, and last its stats."""
        if not self._ledger:
            return
        stats: dict[str, Any] = {"index": self.index, "part": self.name, "name": None, "num_samples": self._num_meta,
                                 "bytes": 0, "sha256": None, "input_start": self.input_start,
                                 "input_end": self._last_row + 1,
                                 "counts": dict(self._counts), "node_rank": self.config.node_rank}
        if self._tar is not None:
            size, digest = self._tar.close()
            stats.update(name=self._shard, bytes=size, sha256=digest)
            self.out.publish(self._tar.path, stats["name"])
            self.num_shards += 1
        if self._meta:
            self.out.write_bytes(f"meta/{self.name}.parquet", rows_to_parquet_bytes(self._meta, self._extra_columns))
        elif self._tables:
            self.out.write_bytes(f"meta/{self.name}.parquet", table_to_parquet_bytes(self._tables))
        ledger = "".join(_LEDGER_JSON.encode(entry) + "\n" for entry in self._ledger)
        self.out.write_bytes(f"ledger/{self.name}.jsonl", ledger.encode())
        self.out.write_json(f"stats/{self.name}.json", stats)
        self.done_counts.update(self._counts)
        self.num_samples += self._num_meta
        self.index += 1
        self.input_start = self._last_row + 1
        self._reset()
