"""What a report is asked for (:class:`ReportConfig`) and what it returns (:class:`ReportResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dataengine.metrics import AVERAGE_METHODS, DEFAULT_AVERAGE_METHOD, ClusterFlagConfig, NMIResult, SizeStats

FORMAT = "dataengine.report"
VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Configuration of one report."""

    store: str
    """Feature store written by ``dataengine embed`` (local path or fsspec URL)."""
    clustering: str
    """Name of the clustering of the store to report on."""
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
    nmi_average: str = DEFAULT_AVERAGE_METHOD
    """Normalisation of the headline NMI, its chance level and the AMI: ``geometric`` (``I / sqrt(H(A) H(B))``,
    DeepCluster's definition) or ``arithmetic`` (``I / ((H(A) + H(B)) / 2)``, scikit-learn's default), or
    ``min``/``max``; both the geometric and the arithmetic NMI are reported whatever this is."""
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
        if self.nmi_average not in AVERAGE_METHODS:
            raise ValueError(f"nmi_average={self.nmi_average!r} must be one of {', '.join(AVERAGE_METHODS)}")
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
    warnings: list[str]
    """Problems a reader must know, e.g. rows without a cluster (coverage below 1)."""
    seconds: float
    """Wall time of the report."""

    def summary(self) -> dict[str, Any]:
        """The ``--json`` summary: ``nmi`` (kind -> nmi, chance, ami, near_chance, coverage), ``html`` and headline
        figures."""
        return {
            "nmi": {kind: _headline(result) for kind, result in self.nmi.items()},
            "levels": {str(level): {kind: _headline(r) for kind, r in by_kind.items()}
                       for level, by_kind in self.level_nmi.items()},
            "pairs": [{k: p[k] for k in ("a", "b", "nmi")} for p in self.pairs],
            "html": self.html, "report": self.report_json, "out": self.out, "clustering": self.clustering,
            "level": self.level, "num_rows": self.num_rows, "num_clusters": self.num_clusters,
            "selected_clusters": len(self.selected), "thumbnail_failures": len(self.thumbnail_failures),
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def _headline(result: NMIResult) -> dict[str, float | bool | None]:
    values = result.as_dict()
    return {"nmi": values["nmi"], "chance": values["chance_nmi"], "ami": values["ami"],
            "near_chance": values["near_chance"], "coverage": values["coverage"]}
