"""The report page and plots from a report dict: escaping, self-containment, formatting, plots by content."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from dataengine.report.html import PLOT_NMI, PLOT_SEQUENCE, PLOT_SIZES, data_uri, render_html, render_plots

HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
KINDS = ["user", "gps"]


def nmi(value: float | None) -> dict:
    return {"nmi": value, "chance_nmi": 0.01, "coverage": 0.5, "rows_used": 10, "num_clusters": 3, "num_labels": 4}


def report(name: str = HOSTILE, sequence: int = 1, **extra) -> dict:
    """A report dict shaped as report.json, every text field carrying ``name``."""
    cluster = {"cluster": 7, "reasons": ["largest", name], "flags": ["landmark"], "size": 12, "grid": "grids/a.jpg",
               "dominant": {kind: {"value": name, "purity": 0.5, "labelled": 8, "count": 4, "code": 1}
                            for kind in KINDS}}
    return {
        "store": name, "num_rows": 100, "clustering": name, "level": 1, "levels": [0, 1], "kinds": KINDS,
        "nmi": {"user": nmi(0.25), "gps": nmi(None)},
        "level_nmi": {"0": {"user": nmi(0.1), "gps": nmi(0.2)}, "1": {"user": nmi(0.25), "gps": nmi(None)}},
        "sequence": [{"clustering": f"{name}{i}", "level": 1, "nmi": {"user": nmi(0.2), "gps": nmi(0.3)}}
                     for i in range(sequence)],
        "pairs": [{"a": f"{name}0/level1", "b": f"{name}1/level1", "nmi": 0.4, "rows_used": 9}][:sequence - 1],
        "sizes": {"num_clusters": 4, "num_empty": 1, "min": 0, "median": 2.5, "max": 12, "entropy": 1.0,
                  "normalized_entropy": 0.7, "gini": 0.3},
        "flags": {"landmark": 1, "single_user": 0, "device": 0},
        "selected": [cluster], "listed_clusters": [dict(cluster, reasons=[])],
        "thumbnail_failures": [{"cluster": 7, "row": 3, "key": name, "error": name}],
        "config": {"clustering": name}, "warnings": [f"{name}: 3 of 100 rows have no cluster"], **extra,
    }


def images(sequence: bool = False) -> dict[str, bytes]:
    found = {name: b"\x89PNG fake" for name in (PLOT_SIZES, PLOT_NMI)}
    if sequence:
        found[PLOT_SEQUENCE] = b"\x89PNG fake"
    return {**found, "grids/a.jpg": b"\xff\xd8 fake"}


def test_every_text_from_the_data_is_escaped_and_the_page_loads_nothing():
    page = render_html(report(), images())
    assert "<script>" not in page and "onerror=alert(2)>" not in page
    assert html.escape(HOSTILE, quote=True) in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert page.count('class="warning"') == 1


def test_undefined_figures_read_as_a_dash_and_sections_follow_the_data():
    page = render_html(report("c", sequence=1), images())
    gps_row = re.search(r"<td class=\"text\">gps</td><td>([^<]*)</td>", page)
    assert gps_row and gps_row.group(1) == "-"  # NMI None
    assert "<td>0.2500</td>" in page and "Compared clusterings" not in page
    compared = render_html(report("c", sequence=2), images(sequence=True))
    assert "Compared clusterings" in compared and "NMI along the sequence" in compared
    assert 'class="warning"' not in render_html(report("c", warnings=[]), images())


def test_data_uri_types_follow_the_suffix():
    assert data_uri("plots/x.png", b"ab") == "data:image/png;base64,YWI="
    assert data_uri("grids/Y.JPG", b"ab").startswith("data:image/jpeg;base64,")
    with pytest.raises(KeyError):
        data_uri("notes.svg", b"<svg/>")


def test_plots_are_pngs_named_by_what_the_report_holds_and_reproducible():
    sizes = np.array([50, 20, 20, 3, 1])
    one = render_plots(report("c", sequence=1), sizes)
    assert sorted(one) == sorted([PLOT_SIZES, PLOT_NMI])
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in one.values())
    assert render_plots(report("c", sequence=1), sizes) == one  # no timestamps: same bytes
    two = render_plots(report("c", sequence=2), sizes)
    assert sorted(two) == sorted([PLOT_SIZES, PLOT_NMI, PLOT_SEQUENCE])
    assert sorted(render_plots(report("c", kinds=[], sequence=2), sizes)) == [PLOT_SIZES]
