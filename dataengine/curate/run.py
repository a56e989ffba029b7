"""The curate stage: check the output, decide (or reload) the selection, copy the kept samples, summarise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dataengine.curate.config import CurateConfig, CurateResult
from dataengine.curate.select import check_inputs, compute_selection
from dataengine.curate.summary import compare_subsets, write_cluster_sizes
from dataengine.curate.write import (
    check_config, done_shards, load_selection, save_selection, write_metadata, write_shards,
)
from dataengine.errors import InputUnusableError
from dataengine.fs import Location
from dataengine.locks import check_output_path, locked_output
from dataengine.shards import ShardSet, build_manifest, load_shard_set
from dataengine.store import FeatureStore, open_store

logger = logging.getLogger(__name__)


def run_curate(config: CurateConfig, progress: Callable[[int], None] | None = None) -> CurateResult:
    """Write the subset of ``config.store``'s rows chosen by ``config`` as a shard set under ``config.out``.

    Resumes an earlier partial run with the same configuration (the saved selection, after the done shards).

    Args:
        config: what to select and where to write it.
        progress: called with the number of rows compared while deduplicating, then of samples written.

    Raises:
        OutputExistsError: ``out`` holds something else, or a curation with another configuration.
        KeyError: the store has no complete clustering of that name.
        InputUnusableError: no row is left to select, or the source shards are not the store's.
        OutputUnusableError: ``out`` is a file, lies under a file, or is not writable.
        OutputLockedError: another run is writing ``out``.
    """
    start = time.perf_counter()
    check_output_path(config.out)
    store = open_store(config.store, config.storage_options)
    source = _source(store, config)
    check_inputs(store, config)
    with locked_output(config.out, config.storage_options):
        return _curate(store, source, config, start, progress)


def _curate(store: FeatureStore, source: ShardSet, config: CurateConfig, start: float,
            progress: Callable[[int], None] | None) -> CurateResult:
    out = Location(config.out, config.storage_options)
    wanted = dict(config.output_config(), store=Location(config.store).url,
                  source={"url": source.url, "digest": source.digest})
    if check_config(out, config, wanted):
        logger.info("%s is already complete; nothing to do", out.url)
        return _result(out, start, resumed=len(done_shards(out)))
    selection = load_selection(out)
    if selection is None:
        selection = compute_selection(store, config, progress)
        if not selection.counts()["selected"]:
            raise InputUnusableError(f"nothing to keep: {selection.counts()} rows of {store.url} by status")
        save_selection(out, selection, [str(k) for k in store.keys[:]], config.strategy, config.shard_size)
    else:
        logger.info("resuming: the selection of a previous run is reloaded from %s", out.url)
    counts = selection.counts()
    if config.total is not None and counts["selected"] < config.total:
        logger.warning("only %d rows are left to select (after invalid rows and near-duplicates), fewer than "
                       "the %d asked for", counts["selected"], config.total)
    resumed = write_shards(out, source, selection.selected_rows, config.shard_size, progress)
    shards = done_shards(out)
    write_metadata(out, len(shards))
    write_cluster_sizes(out, selection)
    report = compare_subsets(store, selection, config.seed)
    summary = {"counts": counts, "num_selected": counts["selected"], "num_rows": len(selection.status),
               "level": selection.level, "num_clusters": selection.num_clusters,
               "dedup_threshold": config.dedup_threshold, "report": report}
    out.write_json("curate.json", summary)
    manifest = build_manifest(wanted, shards, counts, 0)
    manifest["curated_from"] = {"store": store.url, "clustering": config.clustering, "shards": source.url,
                                "digest": source.digest}
    out.write_json("manifest.json", manifest)
    return _result(out, start, resumed)


def _source(store: FeatureStore, config: CurateConfig) -> ShardSet:
    """The ingest output behind the store (or ``config.shards``), checked to be the one embedded."""
    recorded = store.attrs.get("source", {})
    url = config.shards or recorded.get("url")
    if not url:
        raise ValueError(f"{store.url} does not record its ingest output; pass shards=URL (--shards)")
    source = load_shard_set(url, config.storage_options)
    if recorded.get("digest") and source.digest != recorded["digest"]:
        raise ValueError(f"{url} is not the ingest output {store.url} was embedded from (manifest digest "
                         f"{source.digest[:12]} != {recorded['digest'][:12]}); its rows would not match the store's")
    if source.num_samples != store.num_rows:
        raise ValueError(f"{url} holds {source.num_samples} samples, the store {store.num_rows} rows")
    return source


def _result(out: Location, start: float, resumed: int) -> CurateResult:
    summary: dict[str, Any] = out.read_json("curate.json")
    manifest = out.read_json("manifest.json")
    return CurateResult(out=out.url, num_rows=summary["num_rows"], num_selected=summary["num_selected"],
                        counts=summary["counts"], num_shards=manifest["num_shards"], level=summary["level"],
                        num_clusters=summary["num_clusters"], seconds=time.perf_counter() - start,
                        resumed_shards=resumed, dedup_threshold=summary["dedup_threshold"], report=summary["report"])
