"""The report run: passes over the store, the evaluator, the selected clusters and their photo grids."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dataengine.fs import Location
from dataengine.locks import check_output_path, locked_output
from dataengine.metrics.labels import KIND_HASHTAG
from dataengine.metrics.store import StoreLabels, evaluate_store, row_blocks
from dataengine.report.clusterings import Series, comparisons, coverage_warnings, open_series
from dataengine.report.config import ReportConfig, ReportResult, SelectedCluster
from dataengine.report.outputs import _Computed, _describe_cluster, _report_dict, _result, _write_outputs
from dataengine.report.selection import sample_rows, select_clusters
from dataengine.store import FeatureStore, open_store

logger = logging.getLogger(__name__)


def run_report(config: ReportConfig, progress: Callable[[int], None] | None = None) -> ReportResult:
    """Compute the report of ``config.clustering`` and write it to ``config.out``.

    Args:
        config: what to report on and where.
        progress: called with the number of rows of each block read (:func:`progress_total` in all).

    Raises:
        FileNotFoundError: no store at ``config.store``, or no ingest output for the thumbnails.
        IncompleteOutputError: the store is not complete.
        KeyError: a clustering that the store does not hold (the message lists those present).
        ValueError: a level that the clustering does not have; a ``shards`` not the store's source.
        OutputUnusableError: ``out`` is a file, lies under a file, or is not writable.
        OutputLockedError: another run is writing ``out``.
    """
    start = time.perf_counter()
    check_output_path(config.out)
    store = open_store(config.store, config.storage_options)
    # Opened first so that a missing ingest output fails before the passes over the store, not after.
    reader = _open_shards(store, config) if config.thumbnails else None
    try:
        with locked_output(config.out, config.storage_options):
            return _run(store, reader, config, progress, start)
    finally:
        if reader is not None:
            reader.close()


def progress_total(config: ReportConfig) -> int:
    """The rows :func:`run_report` reports to its ``progress`` callback in all: one pass over the store, a tag
    pass before it when the store holds hashtags, and one more with ``thumbnails`` (when a cluster is drawn)."""
    store = open_store(config.store, config.storage_options)
    has_tags = KIND_HASHTAG in StoreLabels(store, config.gps_cell_deg).kinds
    return store.num_rows * (1 + int(has_tags) + int(config.thumbnails))


def _run(store: FeatureStore, reader: Any, config: ReportConfig, progress: Callable[[int], None] | None,
         start: float) -> ReportResult:
    labels = StoreLabels(store, config.gps_cell_deg)
    blocks = row_blocks(store.num_rows, config.block_rows)
    computed = _compute(store, labels, blocks, config, progress)
    tag_counts = labels.tag_vocabulary.counts if labels.tag_vocabulary is not None else None
    chosen = select_clusters(computed.profiles, tag_counts, flags=config.flags, max_landmarks=config.max_landmarks)
    selected = [_describe_cluster(cluster, reasons, computed.profiles, labels) for cluster, reasons in chosen.items()]
    failures: list[dict[str, Any]] = []
    images: dict[str, bytes] = {}
    if reader is not None and selected:
        selected, failures, images = _photo_grids(store, reader, computed.main, selected, blocks, config, progress)
    out = Location(config.out, config.storage_options)
    report = _report_dict(config, store, computed, selected, failures, labels)
    _write_outputs(out, report, computed.profiles, labels, images)
    result = _result(out, report, computed, selected, failures, time.perf_counter() - start)
    logger.info("report of %s written to %s in %.1f s", computed.main.label, result.html, result.seconds)
    return result


def _compute(store: FeatureStore, labels: StoreLabels, blocks: list[tuple[int, int]], config: ReportConfig,
             progress: Callable[[int], None] | None) -> _Computed:
    """The tag pass, then one pass feeding every level and compared clustering to the evaluator."""
    clustering, main = open_series(store, config.clustering, config.level)
    others = [open_series(store, name, config.level)[1] for name in config.compare]
    series = [Series(clustering, level) for level in clustering.levels] + others
    sequence = [main, *others]
    evaluator = evaluate_store(labels, {s.label: s.ids for s in series}, blocks,
                               compare=comparisons([s.label for s in sequence]), progress=progress)
    profiles = evaluator.profiles(main.label, config.flags)
    if not profiles.cluster_ids.size:
        raise ValueError(f"clustering {main.label} assigns no row to a cluster: nothing to report")
    warnings = coverage_warnings(series, evaluator, store)
    for line in warnings:
        logger.warning("%s", line)
    return _Computed(main=main, levels=clustering.levels, kinds=labels.kinds,
                     nmi=evaluator.nmi(chance_seed=config.seed, average_method=config.nmi_average),
                     pairs=evaluator.pair_nmi(average_method=config.nmi_average), sequence=sequence,
                     profiles=profiles, size_stats=evaluator.size_stats(main.label, main.num_clusters),
                     warnings=warnings)


def _photo_grids(store: FeatureStore, reader: Any, main: Series, selected: list[SelectedCluster],
                 blocks: list[tuple[int, int]], config: ReportConfig, progress: Callable[[int], None] | None,
                 ) -> tuple[list[SelectedCluster], list[dict[str, Any]], dict[str, bytes]]:
    """Draw the rows of each selected cluster, read their photos by random access (``reader``: a
    :class:`~dataengine.thumbnails.ShardImageReader`) and make the grids."""
    from dataengine.thumbnails import encode_jpeg, make_grid

    per_grid = config.grid_side ** 2
    rows = sample_rows(main.ids, {s.cluster: per_grid for s in selected},
                       {s.cluster: s.size for s in selected}, seed=config.seed, blocks=blocks)
    if progress:
        progress(store.num_rows)
    keys = store.keys
    failures: list[dict[str, Any]] = []
    images: dict[str, bytes] = {}
    updated = []
    for chosen in selected:
        picked = rows[chosen.cluster]
        expected = [str(k) for k in keys.get_orthogonal_selection(np.asarray(picked, dtype=np.int64))]
        thumbs, bad = reader.thumbnails(picked, config.tile_size, expected_keys=expected)
        failures += [dict(f.to_dict(), cluster=chosen.cluster) for f in bad]
        name = f"grids/{main.name}-level{main.level}-cluster{chosen.cluster}.jpg"
        images[name] = encode_jpeg(make_grid(thumbs, config.tile_size, config.grid_side))
        updated.append(SelectedCluster(**dict(chosen.to_dict(), rows=picked, grid=name)))
    return updated, failures, images


def _open_shards(store: FeatureStore, config: ReportConfig) -> Any:
    """The ingest output behind the store (or ``config.shards``), checked to be the one embedded."""
    from dataengine.errors import IncompleteOutputError
    from dataengine.thumbnails import ShardImageReader

    source = store.attrs.get("source", {})
    url = config.shards or source.get("url")
    if not url:
        raise ValueError(f"{store.url} does not record its ingest output; pass shards=URL (--shards) or "
                         "thumbnails=False (--no-thumbnails)")
    try:
        reader = ShardImageReader(url, config.storage_options)
    except IncompleteOutputError as exc:
        raise FileNotFoundError(f"cannot read the photos for the grids: {exc}; pass shards=URL (--shards) or "
                                "thumbnails=False (--no-thumbnails)") from exc
    if source.get("digest") and reader.digest != source["digest"]:
        reader.close()
        raise ValueError(f"{url} is not the ingest output {store.url} was embedded from (manifest digest "
                         f"{reader.digest[:12]} != {source['digest'][:12]}); its rows would not match the store's")
    return reader
