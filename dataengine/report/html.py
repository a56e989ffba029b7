"""Rendering of a report computed by :mod:`dataengine.report`: matplotlib plots and one self-contained HTML page.

The page inlines its CSS and every image as a ``data:`` URI and declares a Content-Security-Policy that forbids
any other resource, so it can be mailed or opened anywhere and never reaches the network. All text taken from
the data (user ids, tags, device names) is HTML-escaped: tags are free text written by uploaders.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.grids { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; width: 392px; } figure img { width: 100%; image-rendering: auto; }
figcaption { font-size: 0.85em; line-height: 1.35; } figcaption b { font-size: 1.05em; }
.flag { background: #ffe9a8; border-radius: 3px; padding: 0 0.3em; margin-left: 0.3em; }
.warning { background: #fde2e1; border-left: 4px solid #c0392b; padding: 0.4em 0.8em; }
details pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""

PLOT_SIZES = "plots/cluster_sizes.png"
PLOT_NMI = "plots/nmi.png"
PLOT_SEQUENCE = "plots/nmi_sequence.png"


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata: the same report gives the same bytes. Fixed margins (set by each plot) rather
    # than bbox_inches="tight", which draws every figure twice.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _figure(width: float, height: float) -> Any:
    # The object API without pyplot: no global backend or figure state, safe in threads and libraries.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _margins(figure: Any, bottom: float = 0.15, **kwargs: float) -> None:
    figure.subplots_adjust(**{"left": 0.08, "right": 0.98, "top": 0.9, "bottom": bottom, **kwargs})


def render_plots(report: dict[str, Any], sizes: np.ndarray) -> dict[str, bytes]:
    """The report's PNG plots by output path: cluster sizes, NMI per kind, NMI along the sequence (if any)."""
    plots = {PLOT_SIZES: plot_cluster_sizes(sizes)}
    if report["kinds"]:
        plots[PLOT_NMI] = plot_nmi(report["level_nmi"], report["kinds"])
    if len(report["sequence"]) > 1 and report["kinds"]:
        plots[PLOT_SEQUENCE] = plot_nmi_sequence(report["sequence"], report["pairs"], report["kinds"])
    return plots


def plot_cluster_sizes(sizes: np.ndarray) -> bytes:
    """Histogram of cluster sizes (log-spaced bins) beside the sizes ranked largest first."""
    figure = _figure(10, 3.4)
    left, right = figure.subplots(1, 2)
    sizes = np.asarray(sizes, dtype=np.int64)
    bins = np.unique(np.geomspace(1, max(2, sizes.max()) + 1, num=30).astype(np.int64))
    from matplotlib.ticker import MaxNLocator

    left.hist(sizes, bins=bins, color="#4c72b0")
    left.set_xscale("log")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.set(xlabel="cluster size (rows)", ylabel="clusters", title="Cluster-size distribution")
    ranked = np.sort(sizes)[::-1]
    right.plot(np.arange(1, ranked.size + 1), ranked, color="#4c72b0", marker="." if ranked.size < 60 else None)
    right.set_yscale("log")
    right.set(xlabel="rank", ylabel="size (rows)", title="Sizes, largest first")
    _margins(figure, wspace=0.25)
    return _png(figure)


def plot_nmi(level_nmi: dict[str, dict[str, dict[str, Any]]], kinds: Sequence[str]) -> bytes:
    """Bars of NMI per metadata kind (one bar per level), chance levels as black ticks."""
    figure = _figure(7, 3.4)
    axes = figure.subplots()
    levels = sorted(level_nmi, key=int)
    width = 0.8 / len(levels)
    x = np.arange(len(kinds))
    for i, level in enumerate(levels):
        nmi = [_value(level_nmi[level][kind]["nmi"]) for kind in kinds]
        chance = [_value(level_nmi[level][kind]["chance_nmi"]) for kind in kinds]
        offset = x - 0.4 + (i + 0.5) * width
        axes.bar(offset, nmi, width * 0.9, label=f"level {level}")
        axes.scatter(offset, chance, marker="_", s=300, color="black", zorder=3,
                     label="chance" if i == len(levels) - 1 else None)
    axes.set_xticks(x, list(kinds))
    axes.set(ylabel="NMI", ylim=(0, 1), title="NMI with each metadata partition")
    axes.legend(fontsize="small")
    _margins(figure, left=0.1)
    return _png(figure)


def plot_nmi_sequence(sequence: list[dict[str, Any]], pairs: list[dict[str, Any]], kinds: Sequence[str]) -> bytes:
    """NMI per kind along the sequence of clusterings, and NMI between consecutive clusterings."""
    figure = _figure(8, 3.6)
    axes = figure.subplots()
    names = [f"{s['clustering']}/level{s['level']}" for s in sequence]
    x = np.arange(len(names))
    for kind in kinds:
        axes.plot(x, [_value(s["nmi"][kind]["nmi"]) for s in sequence], marker="o", label=kind)
    consecutive = {(p["a"], p["b"]): p["nmi"] for p in pairs}
    steps = [_value(consecutive.get((a, b))) for a, b in zip(names, names[1:])]
    axes.plot(x[1:], steps, marker="s", linestyle="--", color="black", label="NMI(t-1, t)")
    axes.set_xticks(x, names, rotation=20, ha="right")
    axes.set(ylabel="NMI", ylim=(0, 1.05), title="NMI along the sequence of clusterings")
    axes.legend(fontsize="small", ncol=2)
    _margins(figure, left=0.12, bottom=0.3)
    return _png(figure)


def _value(value: Any) -> float:
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------


def data_uri(name: str, data: bytes) -> str:
    """``data:`` URI of an image file's bytes (type from the name's suffix)."""
    suffix = name[name.rfind("."):].lower()
    return f"data:{_MIME[suffix]};base64,{base64.b64encode(data).decode('ascii')}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], text_columns: int | set[int] = 1) -> str:
    """An HTML table; text columns (the first ``text_columns``, or those indices) are left-aligned."""
    text = set(range(text_columns)) if isinstance(text_columns, int) else text_columns

    def cell(tag: str, index: int, value: Any) -> str:
        css = ' class="text"' if index in text else ""
        return f"<{tag}{css}>{_esc(_fmt(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _nmi_rows(by_kind: dict[str, dict[str, Any]], kinds: Sequence[str]) -> list[list[Any]]:
    return [[kind, r["nmi"], r["chance_nmi"], "within noise" if r.get("near_chance") else "", r.get("ami"),
             r.get("nmi_geometric"), r.get("nmi_arithmetic"), r["coverage"], r["rows_used"], r["num_clusters"],
             r["num_labels"]]
            for kind in kinds for r in [by_kind[kind]]]


_NMI_HEADER = ["metadata", "NMI", "chance NMI", "vs chance", "AMI", "NMI geometric", "NMI arithmetic", "coverage",
               "rows used", "clusters", "values"]


def _near_chance_warnings(by_kind: dict[str, dict[str, Any]], kinds: Sequence[str]) -> str:
    """One warning line per kind whose NMI is within noise of its chance level."""
    lines = [f"NMI with {kind} ({_fmt(r['nmi'])}) is within noise of its chance level ({_fmt(r['chance_nmi'])}; "
             f"AMI {_fmt(r.get('ami'))}): this clustering shows no association with {kind} beyond chance."
             for kind in kinds for r in [by_kind[kind]] if r.get("near_chance")]
    return "".join(f'<p class="warning">{_esc(line)}</p>' for line in lines)


def _img(name: str, images: dict[str, bytes], alt: str, css: str = "plot") -> str:
    return f'<img class="{css}" alt="{_esc(alt)}" src="{data_uri(name, images[name])}">'


def _summary_section(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    facts = [["store", report["store"]], ["rows", report["num_rows"]],
             ["clustering", f"{report['clustering']} (levels {', '.join(map(str, report['levels']))})"],
             ["reported level", report["level"]], ["non-empty clusters", sizes["num_clusters"] - sizes["num_empty"]],
             ["metadata kinds", ", ".join(report["kinds"]) or "none"]]
    warnings = "".join(f'<p class="warning">{_esc(line)}</p>' for line in report.get("warnings", []))
    return (f"<h1>Clustering report: {_esc(report['clustering'])}, level {report['level']}</h1>"
            f'<p class="sub">NMI against metadata partitions with chance levels (DeeperCluster, section 5.3)</p>'
            + warnings + _table(["", ""], facts, text_columns=2))


def _nmi_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    kinds = report["kinds"]
    if not kinds:
        return "<h2>NMI</h2><p>The store holds no metadata to compare the clustering with.</p>"
    average = report.get("config", {}).get("nmi_average", "geometric")
    normaliser = {"geometric": "I / sqrt(H(A) H(B)), as DeepCluster defines it",
                  "arithmetic": "I / ((H(A) + H(B)) / 2), scikit-learn's default"}.get(average, f"the {average} entropy")
    parts = [f"<h2>NMI, level {report['level']}</h2>",
             f'<p class="sub">NMI normalised by {_esc(normaliser)}; chance NMI: a seeded permutation of the '
             "clusters; AMI: adjusted for the mutual information expected by chance (0 at chance, 1 for the same "
             "partition); within noise: less than 3 standard deviations of independent partitions above "
             "chance</p>",
             _near_chance_warnings(report["nmi"], kinds), _table(_NMI_HEADER, _nmi_rows(report["nmi"], kinds))]
    if len(report["levels"]) > 1:
        rows = [[f"level {level}"] + [by_kind[kind]["nmi"] for kind in kinds]
                for level, by_kind in sorted(report["level_nmi"].items(), key=lambda item: int(item[0]))]
        parts += ["<h3>Every level</h3>", _table(["level", *kinds], rows)]
    parts.append(_img(PLOT_NMI, images, "NMI per metadata kind"))
    return "".join(parts)


def _sequence_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    if len(report["sequence"]) < 2:
        return ""
    kinds = report["kinds"]
    rows = [[f"{s['clustering']}/level{s['level']}"] + [s["nmi"][kind]["nmi"] for kind in kinds]
            for s in report["sequence"]]
    pairs = [[p["a"], p["b"], p["nmi"], p["rows_used"]] for p in report["pairs"]]
    parts = ["<h2>Compared clusterings</h2>", _table(["clustering", *kinds], rows),
             _table(["clustering", "clustering", "NMI", "rows used"], pairs, text_columns=2)]
    if PLOT_SEQUENCE in images:
        parts.append(_img(PLOT_SEQUENCE, images, "NMI along the sequence of clusterings"))
    return "".join(parts)


def _sizes_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    sizes, flags = report["sizes"], report["flags"]
    stats = [[sizes["num_clusters"], sizes["num_empty"], sizes["min"], sizes["median"], sizes["max"],
              sizes["entropy"], sizes["normalized_entropy"], sizes["gini"]]]
    header = ["clusters", "empty", "min", "median", "max", "entropy (nats)", "normalized entropy", "Gini"]
    flag_rows = [[name.replace("_", "-"), count] for name, count in flags.items()]
    return ("<h2>Cluster sizes</h2>" + _table(header, stats, text_columns=0)
            + _img(PLOT_SIZES, images, "cluster-size distribution")
            + "<h3>Flagged clusters</h3>" + _table(["flag", "clusters"], flag_rows))


def _caption(cluster: dict[str, Any]) -> str:
    flags = "".join(f'<span class="flag">{_esc(flag.replace("_", "-"))}</span>' for flag in cluster["flags"])
    lines = [f"<b>cluster {cluster['cluster']}</b>: {_esc(', '.join(cluster['reasons']))}{flags}<br>"
             f"{cluster['size']} photos"]
    for kind, dominant in cluster["dominant"].items():
        if dominant["labelled"]:
            lines.append(f"{_esc(kind)}: {_esc(dominant['value'])} ({_fmt(100 * dominant['purity'], 0)}% of "
                         f"{dominant['labelled']})")
    return "<br>".join(lines)


def _grids_section(report: dict[str, Any], images: dict[str, bytes]) -> str:
    figures = []
    for cluster in report["selected"]:
        picture = _img(cluster["grid"], images, f"photos of cluster {cluster['cluster']}", "grid") \
            if cluster.get("grid") else ""
        figures.append(f"<figure>{picture}<figcaption>{_caption(cluster)}</figcaption></figure>")
    failures = report["thumbnail_failures"]
    note = ""
    if failures:
        rows = [[f["cluster"], f["row"], f["key"], f["error"]] for f in failures]
        note = "<h3>Photos that could not be shown</h3>" + _table(["cluster", "row", "key", "error"], rows, {2, 3})
    return ("<h2>Selected clusters</h2><p>Random photos of each cluster; captions give the dominant value of each "
            "metadata kind and its share of the cluster's rows that have that metadata.</p>"
            f'<div class="grids">{"".join(figures)}</div>{note}')


def _listed_section(report: dict[str, Any]) -> str:
    kinds = report["kinds"]
    rows = []
    for cluster in report["listed_clusters"]:
        row: list[Any] = [cluster["cluster"], cluster["size"], ", ".join(cluster["flags"])]
        for kind in kinds:
            dominant = cluster["dominant"][kind]
            row += [dominant["value"], dominant["purity"]]
        rows.append(row)
    header = ["cluster", "size", "flags"] + [f"{kind} {what}" for kind in kinds for what in ("dominant", "purity")]
    text = {2} | {3 + 2 * i for i in range(len(kinds))}  # flags and dominant values
    return "<h2>Largest clusters</h2><p>All clusters are in clusters.csv.</p>" + _table(header, rows, text)


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The self-contained HTML page of a report (``images``: output path -> bytes of each plot and grid)."""
    config = _esc(json.dumps(report["config"], indent=1, sort_keys=True))
    body = "".join([
        _summary_section(report), _nmi_section(report, images), _sequence_section(report, images),
        _sizes_section(report, images), _grids_section(report, images), _listed_section(report),
        f"<h2>Configuration</h2><details><summary>report configuration</summary><pre>{config}</pre></details>",
    ])
    title = _esc(f"dataengine report: {report['clustering']} level {report['level']}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{_CSS}</style></head><body>{body}</body></html>\n")
