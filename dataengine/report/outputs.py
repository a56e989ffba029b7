"""What a report writes: ``report.json``, ``clusters.csv``, plots, grids and ``index.html`` (last)."""

from __future__ import annotations

import csv
import io
import math
import re
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


# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that spreadsheets show as written instead of running it as a formula.

    Text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading single quote, as
    OWASP recommends against CSV injection (metadata such as a user name ``=HYPERLINK(...)`` would otherwise
    become a live link or command in Excel or LibreOffice). Numbers stay numbers, negative ones included:
    only text cells are changed, and text that is exactly a plain decimal number (``-5``, ``-1.5e3``) is left
    as it is, since a spreadsheet reads it as that number, never as a formula.
    """
    if not isinstance(value, str) or not value.startswith(_FORMULA_TRIGGERS) or _PLAIN_NUMBER.fullmatch(value):
        return value
    return "'" + value


def _clusters_csv(profiles: ClusterProfiles, labels: StoreLabels) -> bytes:
    """One line per cluster: id, size, flags, then purity, dominant value (empty when no row has that
    metadata) and labelled rows per kind; text cells pass through :func:`spreadsheet_safe`.

    Lines end with CRLF (RFC 4180): Python's csv module quotes a value holding a line-end character only when
    that character is part of the line terminator, and a bare CR inside a metadata value would otherwise split
    its row in two for readers.
    """
    kinds = list(profiles.purity)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(["cluster", "size", "landmark", "single_user", "device"]
                    + [f"{kind}_{column}" for kind in kinds for column in ("purity", "dominant", "labelled")])
    for index, cluster in enumerate(profiles.cluster_ids.tolist()):
        line: list[Any] = [cluster, int(profiles.sizes[index])]
        line += [int(getattr(profiles, name)[index]) for name in ("landmark", "single_user", "device")]
        for kind in kinds:
            table = profiles.purity[kind]
            purity, code = float(table.purity[index]), int(table.dominant[index])
            line += ["" if math.isnan(purity) else f"{purity:.6g}", labels.describe(kind, code) if code >= 0 else "",
                     int(table.labelled[index])]
        writer.writerow([spreadsheet_safe(cell) for cell in line])
    return text.getvalue().encode()


# Files a report owns besides index.html, report.json and clusters.csv: one folder level, fixed extensions.
_OWNED_FILE = re.compile(r"(plots/[^/\\]+\.png|grids/[^/\\]+\.jpg)")


def _previous_files(out: Location) -> set[str]:
    """Plots and grids of a report already in ``out`` (from its ``report.json``), so that a new report can remove
    the ones it does not rewrite. Anything else in the folder is not the report's and stays."""
    if not out.exists("report.json"):
        return set()
    try:
        old = out.read_json("report.json")
    except (OSError, ValueError):  # unreadable: not a report of ours, so none of its files are known
        return set()
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        return set()
    names = old.get("files")
    if names is None:  # a report written before "files" existed: its plots and grids
        names = [*old.get("plots", []), *(s.get("grid") for s in old.get("selected", []) if isinstance(s, dict))]
    return {name for name in names if isinstance(name, str) and _OWNED_FILE.fullmatch(name)}


def _write_outputs(out: Location, report: dict[str, Any], profiles: ClusterProfiles, labels: StoreLabels,
                   images: dict[str, bytes]) -> None:
    """Grids, plots, ``clusters.csv``, ``report.json``, then ``index.html`` (last: present = report complete).

    A report already in ``out`` is replaced whole: its ``index.html`` goes first, and its plots and grids that
    the new report does not rewrite are removed before the new ``report.json`` (which lists the new files)
    replaces the old one, so a run stopped half-way still knows what to clean.
    """
    from dataengine.report.html import render_html, render_plots

    previous = _previous_files(out)
    out.remove("index.html")
    plots = render_plots(report, profiles.sizes)
    report["plots"] = sorted(plots)
    report["files"] = sorted({**images, **plots})
    report["html"] = out.child_url("index.html")
    for name, data in {**images, **plots}.items():
        out.write_bytes(name, data)
    for name in sorted(previous - set(report["files"])):
        out.remove(name)
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
