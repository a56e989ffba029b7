"""What a report writes: ``report.json``, ``clusters.csv``, plots, grids and ``index.html`` (last)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dataengine.fs import Location
from dataengine.metrics import ClusterProfiles, NMIResult, SizeStats, finite_or_none
from dataengine.metrics.store import StoreLabels
from dataengine.report.clusterings import Series
from dataengine.report.config import FORMAT, VERSION, ReportConfig, ReportResult, SelectedCluster
from dataengine.store import FeatureStore


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
    warnings: list[str]


def _describe_cluster(cluster: int, reasons: list[str], profiles: ClusterProfiles,
                      labels: StoreLabels) -> SelectedCluster:
    index = int(np.searchsorted(profiles.cluster_ids, cluster))
    dominant = {}
    for kind, table in profiles.purity.items():
        code = int(table.dominant[index])
        dominant[kind] = {"value": labels.describe(kind, code), "code": code,
                          "purity": finite_or_none(float(table.purity[index])),
                          "count": int(table.dominant_count[index]), "labelled": int(table.labelled[index])}
    flags = [name for name in ("landmark", "single_user", "device") if getattr(profiles, name)[index]]
    return SelectedCluster(cluster=cluster, reasons=reasons, size=int(profiles.sizes[index]), dominant=dominant,
                           flags=flags)


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
        "sizes": {key: finite_or_none(value) for key, value in asdict(computed.size_stats).items()},
        "flags": {name: int(getattr(profiles, name).sum()) for name in ("landmark", "single_user", "device")},
        "listed_clusters": _listed_clusters(profiles, labels, config.num_listed_clusters),
        "selected": [s.to_dict() for s in selected], "thumbnail_failures": failures,
        "gps_cell_deg": config.gps_cell_deg, "warnings": computed.warnings,
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
    from dataengine.report.html import render_html, render_plots

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
        thumbnail_failures=failures, warnings=computed.warnings, seconds=seconds,
    )
