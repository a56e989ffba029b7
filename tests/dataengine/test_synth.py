"""Synthetic YFCC100M-like corpus: format, determinism, planted structure, anomalies, CLI."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
from urllib.parse import quote_plus, unquote_plus

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataengine import synth
from dataengine.errors import OutputExistsError
from dataengine.synth import (
    SCANNER_DEVICE, SynthConfig, generate_corpus, read_anomalies, read_classes, read_near_duplicates,
)

CONFIG = SynthConfig(num_images=400, seed=7)
LON, LAT, ACC = 12, 13, 14


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The default-parameter corpus at test scale (anomalies on), generated once for the module."""
    out = str(tmp_path_factory.mktemp("synth") / "corpus")
    summary = generate_corpus(out, CONFIG)
    rows = [line.split("\t") for line in _read(out, "metadata.tsv").decode("utf-8").split("\n")[:-1]]
    manifest = json.loads(_read(out, "synth.json"))
    classes = read_classes(os.path.join(out, "classes.tsv"))
    return {"out": out, "summary": summary, "rows": rows, "manifest": manifest, "classes": classes,
            "anomalies": read_anomalies(os.path.join(out, "anomalies.tsv"))}


def _read(out: str, rel: str) -> bytes:
    with open(os.path.join(out, rel), "rb") as handle:
        return handle.read()


def _files(out: str) -> dict[str, bytes]:
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, out)] = _read(out, os.path.relpath(path, out))
    return found


def _tags(field: str) -> list[str]:
    return [unquote_plus(t) for t in field.split(",")] if field else []


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # PIL raises several types for unreadable data; any of them means "corrupt" here
        return False
    return True


def test_same_seed_gives_identical_bytes_and_another_seed_differs(corpus, tmp_path):
    again = generate_corpus(str(tmp_path / "again"), CONFIG)
    assert not again.skipped
    assert _files(corpus["out"]) == _files(str(tmp_path / "again"))
    other = str(tmp_path / "other")
    generate_corpus(other, SynthConfig(num_images=400, seed=8))
    assert _read(other, "metadata.tsv") != _read(corpus["out"], "metadata.tsv")


def test_metadata_lines_follow_the_yfcc100m_layout(corpus):
    rows, summary = corpus["rows"], corpus["summary"]
    assert len(rows) == summary.num_rows == summary.num_images + summary.num_videos
    assert all(len(fields) == 25 for fields in rows)
    assert [int(f[0]) for f in rows] == list(range(len(rows)))
    ids = [int(f[1]) for f in rows]
    assert len(set(ids)) == len(ids) and min(ids) > 0
    assert not all(b - a == 1 for a, b in zip(ids, ids[1:]))
    for f in rows:
        assert re.fullmatch(r"[0-9a-f]{32}", f[2]) and re.fullmatch(r"\d+@N\d\d", f[3])
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.0", f[5]) and int(f[6]) > 0
        assert f[15] == f"http://www.flickr.com/photos/{f[3]}/{f[1]}/"
        assert f[16] == f"http://farm{f[20]}.staticflickr.com/{f[19]}/{f[1]}_{f[21]}.jpg"
        assert re.fullmatch(r"[0-9a-f]{10}", f[21]) and re.fullmatch(r"[0-9a-f]{10}", f[22])
        assert f[18].startswith("http://creativecommons.org/licenses/") and "Attribution" in unquote_plus(f[17])
        assert f[24] in ("0", "1") and (f[23] == "jpg") == (f[24] == "0")


def test_text_fields_are_url_encoded_and_round_trip(corpus):
    decoded_tags = set()
    for f in corpus["rows"]:
        for index in (4, 7, 8, 9, 17):
            assert quote_plus(unquote_plus(f[index]), safe="") == f[index]
        for tag in f[10].split(",") + f[11].split(","):
            assert quote_plus(unquote_plus(tag), safe="") == tag
        decoded_tags.update(_tags(f[10]))
    assert "" not in decoded_tags
    assert {"new york", "café", "東京", "hello, world", "rock & roll"} <= decoded_tags
    nicknames = {unquote_plus(f[4]) for f in corpus["rows"]}
    assert any(" " in n for n in nicknames) and any(not n.isascii() for n in nicknames)
    descriptions = {unquote_plus(f[9]) for f in corpus["rows"]}
    assert any("\n" in d for d in descriptions) and any("\t" in d for d in descriptions)


def test_geotags_are_all_present_or_all_empty(corpus):
    states = collections.Counter()
    for f in corpus["rows"]:
        present = (f[LON] != "", f[LAT] != "", f[ACC] != "")
        assert len(set(present)) == 1
        states[present[0]] += 1
        if present[0]:
            assert -180 <= float(f[LON]) <= 180 and -90 <= float(f[LAT]) <= 90 and 1 <= int(f[ACC]) <= 16
    assert states[True] and states[False]


def test_every_planted_feature_is_present(corpus):
    rows, manifest, classes = corpus["rows"], corpus["manifest"], corpus["classes"]
    videos = [f for f in rows if f[24] == "1"]
    assert len(videos) == corpus["summary"].num_videos >= 1
    assert not any(int(f[1]) in classes for f in videos)
    assert not any(os.path.exists(os.path.join(corpus["out"], "images", f"{f[1]}.jpg")) for f in videos)
    planted = manifest["planted"]
    assert sum(f[10] == "" for f in rows) == planted["no_tags"] > 0
    assert sum(f[LAT] == "" for f in rows) == planted["no_gps"] > 0
    assert sum(f[7] == "" for f in rows) == planted["no_device"] > 0
    assert sum(f[11] != "" for f in rows) == planted["machine_tags"] > 0
    bogus = [f[5] for f in rows if not 2000 <= int(f[5][:4]) <= 2015]
    assert len(bogus) == planted["bogus_date"] > 0
    tag_counts = collections.Counter(t for f in rows for t in _tags(f[10]))
    vocabulary = set(synth.NOISE_TAGS).union(*synth.CLASS_TAGS.values())
    assert 0 < sum(1 for t, n in tag_counts.items() if t not in vocabulary and n <= 2) <= planted["rare_tags"]
    assert tag_counts.most_common(1)[0][0] in synth.NOISE_TAGS


def test_scanner_device_only_and_mostly_for_drawings(corpus):
    classes = corpus["classes"]
    scanned = [int(f[1]) for f in corpus["rows"] if unquote_plus(f[7]) == SCANNER_DEVICE]
    drawings = [pid for pid, name in classes.items() if name == "drawing"]
    assert scanned and all(classes[pid] == "drawing" for pid in scanned)
    assert len(scanned) == corpus["manifest"]["planted"]["scanner_photos"] >= 0.75 * len(drawings)
    cameras = {unquote_plus(f[7]) for f in corpus["rows"] if f[7]} - {SCANNER_DEVICE}
    assert cameras <= set(synth.CAMERAS)


def test_landmarks_are_shared_coordinates_of_many_users(corpus):
    users_at = collections.defaultdict(set)
    for f in corpus["rows"]:
        if f[LAT]:
            users_at[(f[LAT], f[LON])].add(f[3])
    landmarks = corpus["manifest"]["landmarks"]
    assert len(landmarks) == CONFIG.num_landmarks
    shared = {place for place, users in users_at.items() if len(users) >= 4}
    assert shared == {(f"{lm['lat']:.6f}", f"{lm['lon']:.6f}") for lm in landmarks}
    for lm in landmarks:
        ids = [int(f[1]) for f in corpus["rows"] if (f[LAT], f[LON]) == (f"{lm['lat']:.6f}", f"{lm['lon']:.6f}")]
        assert {corpus["classes"][pid] for pid in ids} == {lm["class"]}


def test_class_sizes_are_long_tailed(corpus):
    sizes = collections.Counter(corpus["classes"].values())
    ordered = [sizes[name] for name in CONFIG.class_names]
    assert ordered == list(corpus["summary"].class_sizes.values())
    assert sum(ordered) == CONFIG.num_images and min(ordered) >= 1
    assert ordered == sorted(ordered, reverse=True) and ordered[0] >= 5 * ordered[-1]
    assert ordered[0] > sum(ordered) / 4  # the head class holds far more than its 1/12 "fair" share


def test_users_prefer_classes_and_tags_follow_classes(corpus):
    preferred = {u["nsid"]: set(u["preferred"]) for u in corpus["manifest"]["users"]}
    at_landmarks = {(f"{lm['lat']:.6f}", f"{lm['lon']:.6f}") for lm in corpus["manifest"]["landmarks"]}
    own = [(f[3], corpus["classes"][int(f[1])]) for f in corpus["rows"]
           if f[24] == "0" and (f[LAT], f[LON]) not in at_landmarks]
    assert sum(cls in preferred[user] for user, cls in own) / len(own) > 0.75
    homes = {u["nsid"]: (u["lat"], u["lon"]) for u in corpus["manifest"]["users"]}
    for f in corpus["rows"]:
        if f[LAT] and (f[LAT], f[LON]) not in at_landmarks:
            assert abs(float(f[LAT]) - homes[f[3]][0]) < 0.1 and abs(float(f[LON]) - homes[f[3]][1]) < 0.1
    for name in CONFIG.class_names[:6]:
        counts = collections.Counter(t for f in corpus["rows"] if corpus["classes"].get(int(f[1])) == name
                                     for t in _tags(f[10]) if t not in synth.NOISE_TAGS)
        assert counts.most_common(1)[0][0] in synth.CLASS_TAGS[name][:3]


def test_images_decode_with_varied_sizes(corpus):
    anomalies, sizes = corpus["anomalies"], set()
    for pid in corpus["classes"]:
        if pid in anomalies:
            continue
        with Image.open(os.path.join(corpus["out"], "images", f"{pid}.jpg")) as image:
            image.load()
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    assert all(CONFIG.min_image_size <= side <= CONFIG.max_image_size for size in sizes for side in size)
    assert len(sizes) > 20 and any(w != h for w, h in sizes)


def test_anomalies_are_as_declared(corpus):
    out, rows, anomalies, manifest = corpus["out"], corpus["rows"], corpus["anomalies"], corpus["manifest"]
    order = {int(f[1]): i for i, f in enumerate(rows)}
    data = {pid: _read(out, f"images/{pid}.jpg") for pid in corpus["classes"]
            if os.path.exists(os.path.join(out, "images", f"{pid}.jpg"))}
    counts = collections.Counter(anomalies.values())
    assert dict(counts, ok=len(rows) - len(anomalies)) == manifest["expected_counts"]
    assert counts == {"video": corpus["summary"].num_videos, "missing": 2, "corrupt": 3, "duplicate": 3}
    assert {pid for pid, kind in anomalies.items() if kind == "missing"} == set(manifest["anomalies"]["missing"])
    assert sorted(manifest["anomalies"]["corrupt"].values()) == ["empty", "text", "truncated"]
    for pid, kind in anomalies.items():
        assert (pid in data) == (kind in ("corrupt", "duplicate"))
        if kind == "corrupt":
            assert not _decodes(data[pid])
    first_seen = {}
    for pid in sorted(data, key=order.get):  # file order: the first row with given bytes wins
        digest = hashlib.sha256(data[pid]).hexdigest()
        if anomalies.get(pid) != "corrupt":
            assert (digest in first_seen) == (anomalies.get(pid) == "duplicate")
            first_seen.setdefault(digest, pid)
    for dup, source in manifest["anomalies"]["duplicate"].items():
        assert data[int(dup)] == data[source] and order[source] < order[int(dup)] and source not in anomalies
        assert corpus["classes"][int(dup)] == corpus["classes"][source]


def test_classes_are_visual_and_not_colour(corpus):
    """A 5-NN on the grey-level Fourier magnitude (position-free) recovers the class; the mean colour does not."""
    neighbours = pytest.importorskip("sklearn.neighbors")
    selection = pytest.importorskip("sklearn.model_selection")
    fourier, colour, labels = [], [], []
    for pid, name in corpus["classes"].items():
        if pid in corpus["anomalies"]:
            continue
        with Image.open(os.path.join(corpus["out"], "images", f"{pid}.jpg")) as image:
            rgb = image.convert("RGB")
        colour.append(np.asarray(rgb, dtype=np.float32).reshape(-1, 3).mean(axis=0))
        grey = np.asarray(rgb.convert("L").resize((32, 32)), dtype=np.float32)
        magnitude = np.fft.fftshift(np.abs(np.fft.fft2((grey - grey.mean()) / (grey.std() + 1e-3))))
        fourier.append(np.log1p(magnitude[8:24, 8:24]).ravel())
        labels.append(name)
    scores = {}
    for kind, features in (("fourier", np.array(fourier)), ("colour", np.array(colour))):
        features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
        model = neighbours.KNeighborsClassifier(5)
        scores[kind] = selection.cross_val_score(model, features, np.array(labels), cv=3).mean()
    majority = max(collections.Counter(labels).values()) / len(labels)
    assert scores["fourier"] > max(0.5, majority + 0.25)
    assert scores["colour"] < scores["fourier"] - 0.2


# ------------------------------------------------------------------------------------------ near-duplicates

NEAR = SynthConfig(num_images=400, seed=7, num_near_duplicates=30)


@pytest.fixture(scope="module")
def near_corpus(tmp_path_factory):
    """CONFIG with near-duplicates planted."""
    out = str(tmp_path_factory.mktemp("near") / "corpus")
    summary = generate_corpus(out, NEAR)
    return {"out": out, "summary": summary, "near": read_near_duplicates(os.path.join(out, "near_duplicates.tsv")),
            "manifest": json.loads(_read(out, "synth.json"))}


def _pixels(out: str, pid: int) -> np.ndarray:
    with Image.open(os.path.join(out, "images", f"{pid}.jpg")) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def _distance_to_copy(source: np.ndarray, copy: np.ndarray, kind: str) -> float:
    """Mean absolute pixel difference between ``copy`` and what ``kind`` makes of ``source`` (for a crop: the
    best-matching window of the source); inf when the copy cannot come from the source by that kind."""
    (h, w), (ch, cw) = source.shape[:2], copy.shape[:2]
    if kind == "resized":
        resized = Image.fromarray(source.astype(np.uint8)).resize((cw, ch), Image.Resampling.BICUBIC)
        return float(np.abs(np.asarray(resized, dtype=np.float32) - copy).mean())
    if kind == "reencoded":
        return float(np.abs(source - copy).mean()) if (h, w) == (ch, cw) else np.inf
    if ch > h or cw > w:
        return np.inf
    windows = np.lib.stride_tricks.sliding_window_view(source, (ch, cw, 3))[:, :, 0]
    return float(np.abs(windows - copy).mean(axis=(2, 3, 4)).min())


def test_near_duplicates_are_altered_copies_of_an_earlier_photo_of_the_class(near_corpus):
    out, near, manifest = near_corpus["out"], near_corpus["near"], near_corpus["manifest"]
    rows = [line.split("\t") for line in _read(out, "metadata.tsv").decode("utf-8").split("\n")[:-1]]
    order = {int(f[1]): i for i, f in enumerate(rows)}
    classes, anomalies = read_classes(os.path.join(out, "classes.tsv")), read_anomalies(os.path.join(out, "anomalies.tsv"))
    assert len(near) == near_corpus["summary"].num_near_duplicates == 30
    assert collections.Counter(kind for _, kind in near.values()) == {"resized": 10, "reencoded": 10, "cropped": 10}
    assert manifest["near_duplicates"] == {str(pid): {"source": s, "kind": k} for pid, (s, k) in near.items()}
    assert list(near) == sorted(near, key=order.get)  # file order
    for pid, (source, kind) in near.items():
        assert order[source] < order[pid] and classes[source] == classes[pid]
        assert pid not in anomalies and source not in anomalies and source not in near
        assert _read(out, f"images/{pid}.jpg") != _read(out, f"images/{source}.jpg")
        original, copy = _pixels(out, source), _pixels(out, pid)
        (h, w), (ch, cw) = original.shape[:2], copy.shape[:2]
        if kind == "resized":
            assert 0.45 < ch / h < 0.85 and abs(ch / h - cw / w) < 0.05
        elif kind == "cropped":
            assert 0.65 < ch / h <= 0.92 and 0.65 < cw / w <= 0.92
        # Near: within JPEG noise of the source; far from another photo of the class brought to the source's size.
        other = next(p for p, name in classes.items() if name == classes[pid] and p not in (pid, source)
                     and p not in anomalies and p not in near)
        other_pixels = Image.fromarray(_pixels(out, other).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        assert _distance_to_copy(original, copy, kind) < 15
        assert _distance_to_copy(np.asarray(other_pixels, dtype=np.float32), copy, kind) > 20


def test_near_duplicates_change_nothing_but_their_own_images(corpus, near_corpus, tmp_path):
    plain, planted = _files(corpus["out"]), _files(near_corpus["out"])
    changed = {name for name in planted if plain.get(name) != planted[name]}
    assert changed == {f"images/{pid}.jpg" for pid in near_corpus["near"]} | {"near_duplicates.tsv", "synth.json"}
    before, after = json.loads(plain["synth.json"]), json.loads(planted["synth.json"])
    assert "num_near_duplicates" not in before["config"] and after["config"].pop("num_near_duplicates") == 30
    assert after.pop("near_duplicates") and after == before
    generate_corpus(str(tmp_path / "again"), NEAR)
    assert _files(str(tmp_path / "again")) == planted


def test_near_duplicates_ingest_as_ok_rows(tmp_path):
    from dataengine.ingest import IngestConfig, run_ingest

    corpus = tmp_path / "corpus"
    summary = generate_corpus(str(corpus), SynthConfig(num_images=60, seed=5, num_classes=4, num_near_duplicates=15))
    result = run_ingest(IngestConfig(yfcc=str(corpus / "metadata.tsv"), images=str(corpus / "images"),
                                     out=str(tmp_path / "out"), shard_size=32, workers=1))
    assert result.counts == {status: summary.expected_counts.get(status, 0) for status in result.counts}
    kept = set(pq.read_table(tmp_path / "out" / "metadata.parquet")["key"].to_pylist())
    assert {str(pid) for pid in read_near_duplicates(str(corpus / "near_duplicates.tsv"))} <= kept


def test_changing_near_duplicates_needs_overwrite_and_clears_their_list(tmp_path):
    out = str(tmp_path / "corpus")
    generate_corpus(out, SynthConfig(num_images=40, seed=2, num_classes=4, num_near_duplicates=6))
    with pytest.raises(OutputExistsError):
        generate_corpus(out, SynthConfig(num_images=40, seed=2, num_classes=4))
    generate_corpus(out, SynthConfig(num_images=40, seed=2, num_classes=4), overwrite=True)
    assert not os.path.exists(os.path.join(out, "near_duplicates.tsv"))


def test_clean_corpus_has_only_videos_as_anomalies(tmp_path):
    out = str(tmp_path / "clean")
    summary = generate_corpus(out, SynthConfig(num_images=60, seed=1, num_classes=5, anomalies=False))
    anomalies = read_anomalies(os.path.join(out, "anomalies.tsv"))
    assert set(anomalies.values()) == {"video"} and len(anomalies) == summary.num_videos
    assert summary.expected_counts == {"ok": 60, "video": summary.num_videos, "missing": 0, "corrupt": 0,
                                       "duplicate": 0}
    images = os.listdir(os.path.join(out, "images"))
    assert len(images) == 60 and all(_decodes(_read(out, f"images/{name}")) for name in images)


def test_rerun_skips_and_a_different_config_needs_overwrite(tmp_path):
    out = str(tmp_path / "corpus")
    config = SynthConfig(num_images=40, seed=2, num_classes=4)
    first = generate_corpus(out, config)
    assert not first.skipped and generate_corpus(out, config).skipped
    other = SynthConfig(num_images=48, seed=3, num_classes=4)
    with pytest.raises(OutputExistsError):
        generate_corpus(out, other)
    assert not generate_corpus(out, other, overwrite=True).skipped
    ids = set(read_classes(os.path.join(out, "classes.tsv")))
    on_disk = {int(name.split(".")[0]) for name in os.listdir(os.path.join(out, "images"))}
    assert on_disk <= ids  # files of the first corpus are gone


def test_writes_to_object_storage(s3_server, s3_bucket, tmp_path):
    import s3fs

    config = SynthConfig(num_images=30, seed=4, num_classes=3, anomalies=False)
    url = f"{s3_bucket}/corpus"
    summary = generate_corpus(url, config, storage_options=s3_server)
    generate_corpus(str(tmp_path / "local"), config)
    fs = s3fs.S3FileSystem(**s3_server)
    assert fs.cat_file(f"{url}/metadata.tsv") == _read(str(tmp_path / "local"), "metadata.tsv")
    assert len(fs.ls(f"{url}/images")) == summary.num_images
    assert generate_corpus(url, config, storage_options=s3_server).skipped


def test_progress_reports_every_photo_row(tmp_path):
    seen = []
    config = SynthConfig(num_images=30, seed=0, num_classes=3, anomalies=False)
    summary = generate_corpus(str(tmp_path / "p"), config, seen.append)
    assert sum(seen) == summary.num_images == 30


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 17}, "num_classes"),
        ({"num_images": 10}, "num_images"),
        ({"no_gps_rate": 1.5}, "no_gps_rate"),
        ({"min_image_size": 200}, "min_image_size"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"num_users": 0}, "num_users"),
        ({"num_corrupt": 500}, "num_corrupt"),
        ({"seed": -1}, "seed"),
        ({"landmark_rate": 0.9}, "landmark_rate"),
        ({"num_near_duplicates": -1}, "num_near_duplicates"),
        ({"num_images": 40, "num_near_duplicates": 11}, "num_near_duplicates"),
    ],
)
def test_config_rejects_bad_values(changes, word):
    with pytest.raises(ValueError, match=word):
        SynthConfig(**changes)


def test_cli_writes_corpus_and_prints_json_last(tmp_path):
    from typer.testing import CliRunner

    from dataengine.app import app

    out = str(tmp_path / "cli")
    result = CliRunner().invoke(app, ["synth", out, "--num-images", "40", "--seed", "3", "--no-anomalies", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["out"] == out and summary["num_images"] == 40 and summary["num_classes"] == 12
    assert summary["seconds"] >= 0 and summary["expected_counts"]["ok"] == 40
    assert len(os.listdir(os.path.join(out, "images"))) == 40
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "bad"), "--num-images", "5"])
    assert bad.exit_code == 2 and "num_images" in bad.output
    near = CliRunner().invoke(app, ["synth", str(tmp_path / "near"), "--num-images", "40", "--near-duplicates", "4",
                                    "--json"])
    assert near.exit_code == 0, near.output
    assert json.loads(near.stdout.strip().splitlines()[-1])["num_near_duplicates"] == 4
    assert len(read_near_duplicates(str(tmp_path / "near" / "near_duplicates.tsv"))) == 4
