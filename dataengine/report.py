"""Report stage: how a clustering of a feature store relates to the photos' metadata, as JSON and HTML.

``run_report`` reads a clustering written by ``dataengine cluster`` (``clusterings/NAME/level{L}``: one int32
cluster id per row) and the metadata columns that ``dataengine embed`` copied into the store, in blocks of
rows, and feeds them to :class:`dataengine.metrics.ClusteringEvaluator`:

* NMI against each metadata kind present (hashtag, user, GPS cell, device, class label) with its chance level
  and coverage, for every level of the clustering; NMI between clusterings and along a sequence of named
  clusterings (e.g. the trainer's epochs): ``NAME`` first, then the compared ones in the order given;
* per cluster: size, purity and dominant value per kind, landmark / single-user / device flags; the
  distribution of cluster sizes (min, median, max, entropy, Gini);
* 3x3 grids of random photos of selected clusters (largest, purest per kind, landmarks, a device cluster, a
  head-tag and a tail-tag cluster), read from the ingest shards by random access (:mod:`dataengine.thumbnails`).

Passes over the store: tag counts (hashtags need the global tag distribution first), then every clustering
and label code, then the selected clusters' rows for the thumbnails. Memory is one block of rows plus the
sparse contingency tables. Output (``OUT`` local or fsspec URL; re-running recomputes and replaces it)::

    OUT/report.json     every figure (NMI tables, size statistics, selected clusters, failures, config)
    OUT/clusters.csv    one line per cluster: size, flags, purity and dominant value per kind
    OUT/plots/*.png     the plots; OUT/grids/*.jpg the photo grids
    OUT/index.html      self-contained report (images inlined as data URIs), written last

Rendering lives in :mod:`dataengine.report_html`; this module only computes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dataengine.fs import Location
from dataengine.metrics import (
    KIND_DEVICE, KIND_GPS, KIND_HASHTAG, KIND_LABEL, KIND_USER, METADATA_KINDS, ClusterFlagConfig, ClusterProfiles,
    ClusteringEvaluator, NMIResult, SizeStats, TagVocabulary, categorical_codes, consecutive_pairs, count_tags,
    device_labels, gps_cell_bounds, gps_cells, least_frequent_tags,
)
from dataengine.store import FeatureStore, open_store

logger = logging.getLogger(__name__)

FORMAT = "dataengine.report"
VERSION = 1
# Store metadata column behind each categorical kind (GPS uses the lat and lon columns).
_CATEGORICAL_COLUMNS = {KIND_USER: "user", KIND_DEVICE: "device", KIND_LABEL: "label"}
_LEVEL_ARRAY = re.compile(r"level(\d+)")


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Configuration of one report."""

    store: str
    """Feature store written by ``dataengine embed`` (local path or fsspec URL)."""
    clustering: str
    """Name of the clustering to report on (``clusterings/NAME`` in the store)."""
    out: str
    """Output folder (local path or fsspec URL) for ``index.html``, ``report.json``, plots and grids."""
    compare: tuple[str, ...] = ()
    """Other clusterings of the store: NMI with ``clustering`` and along the sequence ``(clustering, *compare)``."""
    level: int | None = None
    """Level reported in detail (profiles, grids, compared clusterings); ``None`` = the finest present."""
    shards: str | None = None
    """Ingest output holding the photos; ``None`` = the one the store was embedded from (``source.url``)."""
    thumbnails: bool = True
    """Draw photo grids of selected clusters (needs the ingest output)."""
    grid_side: int = 3
    """Photos per grid side: ``grid_side ** 2`` random photos per selected cluster."""
    tile_size: int = 128
    """Side of each photo in a grid, in pixels."""
    max_landmarks: int = 3
    """Landmark clusters shown as grids, largest first."""
    num_listed_clusters: int = 20
    """Largest clusters listed in the HTML table (``clusters.csv`` lists them all)."""
    gps_cell_deg: float = 1.0
    """Side in degrees of the GPS grid cells that form the GPS partition."""
    block_rows: int = 1 << 20
    """Rows read from the store at a time."""
    seed: int = 0
    """Seed of the chance levels and of the photos drawn for the grids."""
    flags: ClusterFlagConfig = field(default_factory=ClusterFlagConfig)
    """Thresholds of the landmark / single-user / device flags and of the purest-cluster choice."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the store, the ingest output and ``out``."""

    def __post_init__(self) -> None:
        if not self.clustering or "/" in self.clustering:
            raise ValueError(f"clustering={self.clustering!r} must be a clustering name without '/'")
        if self.clustering in self.compare or len(set(self.compare)) != len(self.compare):
            raise ValueError(f"compare={list(self.compare)} must name distinct clusterings other than "
                             f"{self.clustering!r}")
        if self.level is not None and self.level < 0:
            raise ValueError(f"level must be >= 0 (or None for the finest), got {self.level}")
        for name in ("grid_side", "tile_size", "block_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_landmarks", "num_listed_clusters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.gps_cell_deg <= 180:
            raise ValueError(f"gps_cell_deg must be in (0, 180] degrees, got {self.gps_cell_deg}")

    def resolved(self) -> dict[str, Any]:
        """JSON-able config without credentials."""
        values = asdict(self)
        values.pop("storage_options")
        values["compare"] = list(self.compare)
        return values


@dataclass(frozen=True, kw_only=True)
class SelectedCluster:
    """A cluster shown as a photo grid, with why it was chosen and what dominates it."""

    cluster: int
    """Cluster id at the reported level."""
    reasons: list[str]
    """Why it was chosen (``largest``, ``purest user``, ``landmark``, ``head tag``...)."""
    size: int
    """Rows in the cluster."""
    dominant: dict[str, dict[str, Any]]
    """Per kind: ``value`` (readable), ``code``, ``purity``, ``count`` (rows with it) and ``labelled``."""
    flags: list[str]
    """Flags raised for the cluster (``landmark``, ``single_user``, ``device``)."""
    rows: list[int] = field(default_factory=list)
    """Rows shown in the grid."""
    grid: str | None = None
    """Path of the grid image relative to the output folder."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReportResult:
    """What a report computed and where it wrote it."""

    out: str
    """Output folder."""
    html: str
    """Path or URL of ``index.html``."""
    report_json: str
    """Path or URL of ``report.json``."""
    clustering: str
    """Name of the clustering reported on."""
    level: int
    """Level reported in detail."""
    levels: list[int]
    """Levels the clustering has."""
    kinds: list[str]
    """Metadata kinds present in the store."""
    num_rows: int
    """Rows of the store."""
    num_clusters: int
    """Non-empty clusters at the reported level."""
    nmi: dict[str, NMIResult]
    """NMI per kind of the clustering at the reported level."""
    level_nmi: dict[int, dict[str, NMIResult]]
    """NMI per kind at every level present."""
    sequence: list[dict[str, Any]]
    """``{"clustering", "level", "nmi": {kind: NMIResult.as_dict()}}`` along ``(clustering, *compare)``."""
    pairs: list[dict[str, Any]]
    """``{"a", "b", "nmi", "rows_used", ...}`` for every compared pair of clusterings."""
    size_stats: SizeStats
    """Cluster-size distribution at the reported level."""
    selected: list[SelectedCluster]
    """Clusters shown as photo grids."""
    thumbnail_failures: list[dict[str, Any]]
    """Photos that could not be shown: ``{"cluster", "row", "key", "error"}``."""
    seconds: float
    """Wall time of the report."""

    def summary(self) -> dict[str, Any]:
        """The ``--json`` summary: ``nmi`` (kind -> nmi, chance, coverage), ``html`` and headline figures."""
        return {
            "nmi": {kind: _headline(result) for kind, result in self.nmi.items()},
            "levels": {str(level): {kind: _headline(r) for kind, r in by_kind.items()}
                       for level, by_kind in self.level_nmi.items()},
            "pairs": [{k: p[k] for k in ("a", "b", "nmi")} for p in self.pairs],
            "html": self.html, "report": self.report_json, "out": self.out, "clustering": self.clustering,
            "level": self.level, "num_rows": self.num_rows, "num_clusters": self.num_clusters,
            "selected_clusters": len(self.selected), "thumbnail_failures": len(self.thumbnail_failures),
            "seconds": round(self.seconds, 3),
        }


def _headline(result: NMIResult) -> dict[str, float | None]:
    values = result.as_dict()
    return {"nmi": values["nmi"], "chance": values["chance_nmi"], "coverage": values["coverage"]}


def _finite(value: float) -> float | None:
    """JSON has no NaN: undefined figures become null."""
    return None if isinstance(value, float) and math.isnan(value) else value


# --------------------------------------------------------------------------------------------------
# Metadata kinds read from the store, block by block
# --------------------------------------------------------------------------------------------------


class StoreLabels:
    """Label codes (-1 = missing) of every metadata kind a feature store holds, for any block of rows.

    The store keeps categorical columns as codes into a sorted vocabulary; the metrics encoders are applied
    once to that vocabulary (devices normalised, empty strings missing), so each block is one array lookup.
    Hashtags need the global tag distribution first: call :meth:`count_tags` before reading blocks.
    """

    def __init__(self, store: FeatureStore, gps_cell_deg: float = 1.0) -> None:
        self._group = store.group
        self._arrays: dict[str, Any] = {}  # opened once: on object storage each lookup is a request
        self._gps_cell_deg = gps_cell_deg
        columns = store.attrs.get("metadata_columns", {})
        self._categorical: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind, column in _CATEGORICAL_COLUMNS.items():
            if columns.get(column) == "categorical":
                encode = device_labels if kind == KIND_DEVICE else categorical_codes
                codes, vocabulary = encode(store.read_array(f"metadata/{column}/vocab").tolist())
                self._categorical[kind] = (np.append(codes, -1), vocabulary)  # code -1 indexes the final -1
        self._has_gps = columns.get("lat") == "float" and columns.get("lon") == "float"
        self._tag_names: Any = None
        if columns.get("tags") == "ragged":
            import pyarrow as pa

            self._tag_names = pa.array(store.read_array("metadata/tags/vocab").tolist(), pa.string())
        self.tag_vocabulary: TagVocabulary | None = None

    @property
    def kinds(self) -> list[str]:
        """Kinds present, in :data:`~dataengine.metrics.METADATA_KINDS` order."""
        present = set(self._categorical) | ({KIND_GPS} if self._has_gps else set())
        present |= {KIND_HASHTAG} if self._tag_names is not None else set()
        return [kind for kind in METADATA_KINDS if kind in present]

    def tags(self, start: int, end: int) -> Any:
        """The tags of rows ``[start, end)`` as a pyarrow list<string> array."""
        import pyarrow as pa

        offsets = np.asarray(self._array("metadata/tags/offsets")[start:end + 1], dtype=np.int64)
        codes = np.asarray(self._array("metadata/tags/codes")[int(offsets[0]):int(offsets[-1])])
        values = self._tag_names.take(pa.array(codes, type=pa.int32(), mask=codes < 0))
        return pa.LargeListArray.from_arrays(pa.array(offsets - offsets[0]), values)

    def count_tags(self, blocks: Sequence[tuple[int, int]], progress: Callable[[int], None] | None = None) -> None:
        """First pass: the global tag counts behind the least-frequent-tag rule."""
        if self._tag_names is None:
            return

        def tag_blocks() -> Iterator[Any]:
            for start, end in blocks:
                yield self.tags(start, end)
                if progress:
                    progress(end - start)

        self.tag_vocabulary = count_tags(tag_blocks())

    def block(self, start: int, end: int) -> dict[str, np.ndarray]:
        """Label codes of every kind for rows ``[start, end)``."""
        labels: dict[str, np.ndarray] = {}
        if self._tag_names is not None:
            if self.tag_vocabulary is None:
                raise RuntimeError("call count_tags over every block before reading hashtag labels")
            labels[KIND_HASHTAG] = least_frequent_tags(self.tags(start, end), self.tag_vocabulary)
        for kind, (mapping, _) in self._categorical.items():
            labels[kind] = mapping[np.asarray(self._array(f"metadata/{_CATEGORICAL_COLUMNS[kind]}/codes")[start:end])]
        if self._has_gps:
            lat, lon = self._array("metadata/lat")[start:end], self._array("metadata/lon")[start:end]
            labels[KIND_GPS] = gps_cells(lat, lon, self._gps_cell_deg)
        return {kind: labels[kind] for kind in self.kinds}

    def _array(self, path: str) -> Any:
        if path not in self._arrays:
            self._arrays[path] = self._group[path]
        return self._arrays[path]

    def describe(self, kind: str, code: int) -> str:
        """Readable value of a label code (a GPS cell as its latitude/longitude bounds)."""
        if code < 0:
            return "-"
        if kind == KIND_GPS:
            lat0, lon0, lat1, lon1 = gps_cell_bounds(code, self._gps_cell_deg)
            return f"lat {lat0:g}..{lat1:g}, lon {lon0:g}..{lon1:g}"
        if kind == KIND_HASHTAG:
            return str(self.tag_vocabulary.tags[code])
        return str(self._categorical[kind][1][code])


def row_blocks(num_rows: int, block_rows: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(num_rows)`` in blocks of ``block_rows``."""
    return [(start, min(start + block_rows, num_rows)) for start in range(0, num_rows, block_rows)]


# --------------------------------------------------------------------------------------------------
# Clusterings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One level of one clustering, as read from the store."""

    name: str
    level: int

    @property
    def label(self) -> str:
        """``NAME/levelL``: its name in the evaluator and in the report."""
        return f"{self.name}/level{self.level}"

    @property
    def path(self) -> str:
        return f"clusterings/{self.label}"


def clustering_levels(store: FeatureStore, name: str) -> list[int]:
    """Levels present in a complete clustering of the store, ascending.

    Raises:
        KeyError: no complete clustering of that name (the message lists those present).
        ValueError: the clustering has no ``level{L}`` array of one id per row.
    """
    from dataengine.cluster import load_clustering

    load_clustering(store, name)
    group = store.group[f"clusterings/{name}"]
    levels = sorted(int(match.group(1)) for key in group.array_keys() if (match := _LEVEL_ARRAY.fullmatch(key)))
    if not levels:
        raise ValueError(f"clustering {name!r} in {store.url} has no level0, level1... arrays")
    for level in levels:
        shape = group[f"level{level}"].shape
        if shape != (store.num_rows,):
            raise ValueError(f"clusterings/{name}/level{level} has shape {shape}; expected ({store.num_rows},)")
    return levels


def _pick_level(name: str, levels: list[int], wanted: int | None) -> int:
    if wanted is None:
        return levels[-1]
    if wanted not in levels:
        raise ValueError(f"clustering {name!r} has levels {levels}; level {wanted} is not among them")
    return wanted


def _num_clusters(store: FeatureStore, series: Series) -> int | None:
    """Clusters at that level including empty ones, when the clustering records it."""
    summary = store.read_attrs(f"clusterings/{series.name}").get("summary", {})
    counts = summary.get("num_clusters") or []
    return int(counts[series.level]) if series.level < len(counts) else None


def _comparisons(sequence: list[str]) -> list[tuple[str, str]]:
    """Consecutive pairs along the sequence, then the first one against each other."""
    pairs = consecutive_pairs(sequence)
    pairs += [(sequence[0], other) for other in sequence[2:]]
    return pairs


# --------------------------------------------------------------------------------------------------
# Choosing the clusters shown as photo grids
# --------------------------------------------------------------------------------------------------


def select_clusters(profiles: ClusterProfiles, tag_counts: np.ndarray | None, *, flags: ClusterFlagConfig,
                    max_landmarks: int) -> dict[int, list[str]]:
    """The clusters worth a photo grid, each with the reasons it was chosen (deterministic, in this order).

    The largest cluster; per kind the purest cluster with at least ``flags.min_size`` rows and
    ``flags.min_labelled`` labelled rows (ties: more labelled rows, then the smaller id); the largest landmark
    clusters; the largest device cluster; and, among clusters whose dominant hashtag is held by at least two
    of their rows, the one whose hashtag is most frequent in the whole corpus (head tag) and the one whose
    hashtag is rarest (tail tag).

    Args:
        profiles: per-cluster profiles of the reported clustering.
        tag_counts: global count of each hashtag code (``TagVocabulary.counts``), None without hashtags.
        flags: thresholds (see :class:`~dataengine.metrics.ClusterFlagConfig`).
        max_landmarks: landmark clusters to show at most.
    """
    ids, sizes = profiles.cluster_ids, profiles.sizes
    chosen: dict[int, list[str]] = {}

    def add(index: int, reason: str) -> None:
        chosen.setdefault(int(ids[index]), []).append(reason)

    if ids.size:
        add(int(np.argmax(sizes)), "largest")
    big = sizes >= flags.min_size
    for kind, table in profiles.purity.items():
        eligible = np.flatnonzero(big & (table.labelled >= max(flags.min_labelled, 1)))
        if eligible.size:
            add(int(eligible[np.lexsort((ids[eligible], -table.labelled[eligible], -table.purity[eligible]))[0]]),
                f"purest {kind}")
    by_size = np.argsort(-sizes, kind="stable")
    for index in [i for i in by_size if profiles.landmark[i]][:max_landmarks]:
        add(int(index), "landmark")
    for index in [i for i in by_size if profiles.device[i]][:1]:
        add(int(index), "device cluster")
    if tag_counts is not None and KIND_HASHTAG in profiles.purity:
        for index, reason in _tag_clusters(profiles, tag_counts, flags):
            add(index, reason)
    return chosen


def _tag_clusters(profiles: ClusterProfiles, tag_counts: np.ndarray,
                  flags: ClusterFlagConfig) -> list[tuple[int, str]]:
    """The head-tag and tail-tag clusters (see :func:`select_clusters`)."""
    table = profiles.purity[KIND_HASHTAG]
    eligible = np.flatnonzero((profiles.sizes >= flags.min_size) & (table.labelled >= max(flags.min_labelled, 1))
                              & (table.dominant_count >= 2))
    if not eligible.size:
        return []
    corpus_count = tag_counts[table.dominant[eligible]]
    ids, purity = profiles.cluster_ids[eligible], table.purity[eligible]
    head = eligible[np.lexsort((ids, -purity, -corpus_count))[0]]
    found = [(int(head), "head tag")]
    rest = eligible != head
    if rest.any():
        tail = eligible[rest][np.lexsort((ids[rest], -purity[rest], corpus_count[rest]))[0]]
        found.append((int(tail), "tail tag"))
    return found


def sample_rows(ids: Any, wanted: dict[int, int], sizes: dict[int, int], *, seed: int,
                blocks: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """``wanted[c]`` random rows of each cluster ``c`` in one pass over an id array, ascending.

    The photos are fixed before reading: ranks drawn with ``numpy.random.default_rng((seed, c))`` among the
    cluster's ``sizes[c]`` rows, so a cluster shows the same photos whichever other clusters are chosen.

    Args:
        ids: the clustering's id array (zarr array or numpy), read in ``blocks``.
        wanted: photos per cluster.
        sizes: rows per cluster.
        seed: seed of the draw.
        blocks: ``(start, end)`` row blocks covering the array.
    """
    ranks = {c: np.sort(np.random.default_rng((seed, c)).choice(sizes[c], min(k, sizes[c]), replace=False))
             for c, k in wanted.items()}
    seen = dict.fromkeys(wanted, 0)
    rows: dict[int, list[int]] = {c: [] for c in wanted}
    targets = np.array(sorted(wanted), dtype=np.int64)
    for start, end in blocks:
        block = np.asarray(ids[start:end])
        hits = np.flatnonzero(np.isin(block, targets))
        for cluster in np.unique(block[hits]).tolist():
            where = hits[block[hits] == cluster]
            low = seen[cluster]
            take = ranks[cluster][(ranks[cluster] >= low) & (ranks[cluster] < low + where.size)]
            rows[cluster].extend((start + where[take - low]).tolist())
            seen[cluster] = low + where.size
    return rows


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class _Computed:
    """Everything the passes over the store produced."""

    main: Series
    levels: list[int]
    kinds: list[str]
    nmi: dict[str, dict[str, NMIResult]]
    pairs: dict[tuple[str, str], NMIResult]
    sequence: list[Series]
    profiles: ClusterProfiles
    size_stats: SizeStats


def run_report(config: ReportConfig, progress: Callable[[int], None] | None = None) -> ReportResult:
    """Compute the report of ``config.clustering`` and write it to ``config.out``.

    Args:
        config: what to report on and where.
        progress: called with the number of rows of each block read (the store is read three times).

    Raises:
        FileNotFoundError: no store at ``config.store``, or no ingest output for the thumbnails.
        IncompleteOutputError: the store is not complete.
        KeyError: a clustering that the store does not hold (the message lists those present).
        ValueError: a level that the clustering does not have; a ``shards`` not the store's source.
    """
    start = time.perf_counter()
    store = open_store(config.store, config.storage_options)
    # Opened first so that a missing ingest output fails before the passes over the store, not after.
    reader = _open_shards(store, config) if config.thumbnails else None
    try:
        return _run(store, reader, config, progress, start)
    finally:
        if reader is not None:
            reader.close()


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
    levels = clustering_levels(store, config.clustering)
    main = Series(config.clustering, _pick_level(config.clustering, levels, config.level))
    others = [Series(name, _pick_level(name, clustering_levels(store, name), config.level))
              for name in config.compare]
    series = [Series(config.clustering, level) for level in levels] + others
    sequence = [main, *others]
    pairs = _comparisons([s.label for s in sequence])
    labels.count_tags(blocks, progress)
    evaluator = ClusteringEvaluator([s.label for s in series], labels.kinds, compare=pairs)
    arrays = {s.label: store.group[s.path] for s in series}
    for start, end in blocks:
        evaluator.update({label: np.asarray(array[start:end]) for label, array in arrays.items()},
                         labels.block(start, end))
        if progress:
            progress(end - start)
    profiles = evaluator.profiles(main.label, config.flags)
    if not profiles.cluster_ids.size:
        raise ValueError(f"{main.path} assigns no row to a cluster: nothing to report")
    return _Computed(main=main, levels=levels, kinds=labels.kinds, nmi=evaluator.nmi(chance_seed=config.seed),
                     pairs=evaluator.pair_nmi(), sequence=sequence, profiles=profiles,
                     size_stats=evaluator.size_stats(main.label, _num_clusters(store, main)))


def _describe_cluster(cluster: int, reasons: list[str], profiles: ClusterProfiles,
                      labels: StoreLabels) -> SelectedCluster:
    index = int(np.searchsorted(profiles.cluster_ids, cluster))
    dominant = {}
    for kind, table in profiles.purity.items():
        code = int(table.dominant[index])
        dominant[kind] = {"value": labels.describe(kind, code), "code": code,
                          "purity": _finite(float(table.purity[index])), "count": int(table.dominant_count[index]),
                          "labelled": int(table.labelled[index])}
    flags = [name for name in ("landmark", "single_user", "device") if getattr(profiles, name)[index]]
    return SelectedCluster(cluster=cluster, reasons=reasons, size=int(profiles.sizes[index]), dominant=dominant,
                           flags=flags)


def _photo_grids(store: FeatureStore, reader: Any, main: Series, selected: list[SelectedCluster],
                 blocks: list[tuple[int, int]], config: ReportConfig, progress: Callable[[int], None] | None,
                 ) -> tuple[list[SelectedCluster], list[dict[str, Any]], dict[str, bytes]]:
    """Draw the rows of each selected cluster, read their photos by random access (``reader``: a
    :class:`~dataengine.thumbnails.ShardImageReader`) and make the grids."""
    from dataengine.thumbnails import encode_jpeg, make_grid

    per_grid = config.grid_side ** 2
    rows = sample_rows(store.group[main.path], {s.cluster: per_grid for s in selected},
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


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _report_dict(config: ReportConfig, store: FeatureStore, computed: _Computed, selected: list[SelectedCluster],
                 failures: list[dict[str, Any]], labels: StoreLabels) -> dict[str, Any]:
    """Every figure of the report, JSON-ready (NaN as null)."""
    main, profiles = computed.main, computed.profiles
    by_level = {str(level): {kind: computed.nmi[f"{main.name}/level{level}"][kind].as_dict()
                             for kind in computed.kinds} for level in computed.levels}
    return {
        "format": FORMAT, "version": VERSION, "config": config.resolved(),
        "store": store.url, "num_rows": store.num_rows, "clustering": main.name, "level": main.level,
        "levels": computed.levels, "kinds": computed.kinds,
        "nmi": by_level[str(main.level)], "level_nmi": by_level,
        "sequence": [{"clustering": s.name, "level": s.level,
                      "nmi": {kind: computed.nmi[s.label][kind].as_dict() for kind in computed.kinds}}
                     for s in computed.sequence],
        "pairs": [dict(result.as_dict(), a=a, b=b) for (a, b), result in computed.pairs.items()],
        "sizes": {key: _finite(value) for key, value in asdict(computed.size_stats).items()},
        "flags": {name: int(getattr(profiles, name).sum()) for name in ("landmark", "single_user", "device")},
        "listed_clusters": _listed_clusters(profiles, labels, config.num_listed_clusters),
        "selected": [s.to_dict() for s in selected], "thumbnail_failures": failures,
        "gps_cell_deg": config.gps_cell_deg,
    }


def _listed_clusters(profiles: ClusterProfiles, labels: StoreLabels, count: int) -> list[dict[str, Any]]:
    """The ``count`` largest clusters with their dominant values (the HTML table)."""
    order = np.argsort(-profiles.sizes, kind="stable")[:count]
    return [_describe_cluster(int(profiles.cluster_ids[i]), [], profiles, labels).to_dict() for i in order]


def _clusters_csv(profiles: ClusterProfiles, labels: StoreLabels) -> bytes:
    """One line per cluster: id, size, flags, then purity, dominant value and labelled rows per kind."""
    kinds = list(profiles.purity)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["cluster", "size", "landmark", "single_user", "device"]
                    + [f"{kind}_{column}" for kind in kinds for column in ("purity", "dominant", "labelled")])
    for index, cluster in enumerate(profiles.cluster_ids.tolist()):
        line: list[Any] = [cluster, int(profiles.sizes[index])]
        line += [int(getattr(profiles, name)[index]) for name in ("landmark", "single_user", "device")]
        for kind in kinds:
            table = profiles.purity[kind]
            purity = float(table.purity[index])
            line += ["" if math.isnan(purity) else f"{purity:.6g}", labels.describe(kind, int(table.dominant[index])),
                     int(table.labelled[index])]
        writer.writerow(line)
    return text.getvalue().encode()


def _write_outputs(out: Location, report: dict[str, Any], profiles: ClusterProfiles, labels: StoreLabels,
                   images: dict[str, bytes]) -> None:
    """Grids, plots, ``clusters.csv``, ``report.json``, then ``index.html`` (last: present = report complete)."""
    from dataengine.report_html import render_html, render_plots

    plots = render_plots(report, profiles.sizes)
    report["plots"] = sorted(plots)
    report["html"] = out.child_url("index.html")
    for name, data in {**images, **plots}.items():
        out.write_bytes(name, data)
    out.write_bytes("clusters.csv", _clusters_csv(profiles, labels))
    out.write_json("report.json", report)
    out.write_bytes("index.html", render_html(report, {**images, **plots}).encode())


def _result(out: Location, report: dict[str, Any], computed: _Computed, selected: list[SelectedCluster],
            failures: list[dict[str, Any]], seconds: float) -> ReportResult:
    main = computed.main
    return ReportResult(
        out=out.url, html=report["html"], report_json=out.child_url("report.json"), clustering=main.name,
        level=main.level, levels=computed.levels, kinds=computed.kinds, num_rows=report["num_rows"],
        num_clusters=int(computed.profiles.cluster_ids.size), nmi=computed.nmi[main.label],
        level_nmi={level: computed.nmi[f"{main.name}/level{level}"] for level in computed.levels},
        sequence=report["sequence"], pairs=report["pairs"], size_stats=computed.size_stats, selected=selected,
        thumbnail_failures=failures, seconds=seconds,
    )
