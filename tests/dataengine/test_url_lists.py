"""``ingest --url-list`` in img2dataset's formats against the local HTTP server: every input format with its
columns, the resize modes, the size filters, bad rows as per-row statuses, resume after a kill, and the
options as img2dataset names them."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataengine.errors import InputUnusableError
from dataengine.images import Resize
from dataengine.ingest import IngestConfig, run_ingest

SIZES = [(60, 40), (40, 60), (80, 80), (30, 20), (90, 10)]


def _records(server) -> list[dict]:
    server.handler.images = {f"{i}.jpg": server.jpeg(i, size) for i, size in enumerate(SIZES)}
    return [{"url": f"{server}/ok/{i}.jpg", "text": f"photo {i}", "license": f"cc-{i}", "score": i / 2}
            for i in range(len(SIZES))]


def _write(path, records: list[dict], fmt: str) -> str:
    if fmt == "txt":
        path.write_text("\n".join(r["url"] for r in records) + "\n")
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(records[0])] + [sep.join(str(v) for v in r.values()) for r in records]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def _ingest(tmp_path, url_list: str, out: str = "out", **options):
    settings = dict(url_list=url_list, out=str(tmp_path / out), workers=1, shard_size=2, image_size=32,
                    download_timeout=2.0, download_retries=1)
    settings.update(options)
    return run_ingest(IngestConfig(**settings))


def _samples(out) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for name in sorted(os.listdir(out / "shards")):
        with tarfile.open(out / "shards" / name) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "json", "jsonl", "parquet"])
def test_each_format_is_read_with_its_columns(tmp_path, server, fmt):
    records = _records(server)
    columns = {} if fmt == "txt" else {"caption_col": "text", "save_additional_columns": ("license", "score")}
    result = _ingest(tmp_path, _write(tmp_path / f"urls.{fmt}", records, fmt), **columns)
    assert result.counts["ok"] == 5 and result.num_shards == 3
    samples = _samples(tmp_path / "out")
    assert sorted(samples) == [f"{i:09d}" for i in range(5)]  # keys: the row number, in input order
    table = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    assert [row["key"] for row in table] == sorted(samples)
    for i, row in enumerate(table):
        sidecar = json.loads(samples[row["key"]]["json"])
        assert sidecar["url"] == row["url"] == row["download_url"] == records[i]["url"]
        assert (sidecar["original_width"], sidecar["original_height"]) == SIZES[i]
        if fmt == "txt":
            assert "caption" not in sidecar and "txt" not in samples[row["key"]]
            continue
        assert sidecar["caption"] == row["caption"] == f"photo {i}" and samples[row["key"]]["txt"] == b"photo %d" % i
        # license is an ingest column (a string); score keeps its type where the format has types
        assert sidecar["license"] == row["license"] == f"cc-{i}"
        assert row["score"] == (str(i / 2) if fmt in ("csv", "tsv") else i / 2)


def test_the_output_opens_as_shards_for_the_later_stages(tmp_path, server):
    """embed/train read it as any ingest output; curate copies its rows' ingest columns (the extra columns
    once made its cast of the metadata fail)."""
    import numpy as np

    from dataengine.curate.write import _metadata_rows
    from dataengine.shards import load_shard_set

    _ingest(tmp_path, _write(tmp_path / "u.csv", _records(server), "csv"), caption_col="text",
            save_additional_columns=("score",))
    shards = load_shard_set(str(tmp_path / "out"))
    assert shards.num_samples == 5
    rows = _metadata_rows(shards, np.array([4, 0]))
    assert [row["key"] for row in rows] == ["000000004", "000000000"] and rows[0]["license"] is None


@pytest.mark.parametrize("mode, size, expected", [
    ("keep_ratio", (60, 40), (48, 32)), ("center_crop", (60, 40), (32, 32)), ("border", (60, 40), (32, 32)),
    ("no", (60, 40), (60, 40)), ("keep_ratio", (30, 20), (30, 20)), ("border", (30, 20), (30, 20))])
def test_resize_modes(tmp_path, server, mode, size, expected):
    server.handler.images = {"a.jpg": server.jpeg(1, size)}
    _ingest(tmp_path, _write(tmp_path / "u.txt", [{"url": f"{server}/ok/a.jpg"}], "txt"), resize_mode=mode)
    row = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()[0]
    (jpeg,) = [s["jpg"] for s in _samples(tmp_path / "out").values()]
    assert (row["width"], row["height"]) == expected == Image.open(io.BytesIO(jpeg)).size


def test_border_pads_with_white_and_upscaling_is_img2datasets_choice(tmp_path, server):
    image = Image.open(io.BytesIO(_resized(server.jpeg(2, (64, 16)), Resize(mode="border"))))
    assert image.size == (32, 32) and min(image.getpixel((16, 1))) > 240 and image.getpixel((16, 16))[0] < 200
    small = server.jpeg(3, (16, 8))
    assert Image.open(io.BytesIO(_resized(small, Resize(mode="keep_ratio")))).size == (16, 8)
    assert Image.open(io.BytesIO(_resized(small, Resize(mode="keep_ratio", only_if_bigger=False)))).size == (64, 32)


def _resized(data: bytes, resize: Resize) -> bytes:
    from dataengine.images import normalize_image

    return normalize_image(data, 32, 90, resize=resize).jpeg


def test_size_filters_are_a_per_row_status(tmp_path, server):
    records = _records(server)  # 60x40, 40x60, 80x80, 30x20, 90x10
    result = _ingest(tmp_path, _write(tmp_path / "u.jsonl", records, "jsonl"), min_image_size=15,
                     max_aspect_ratio=2.0)
    assert result.counts["ok"] == 4 and result.counts["filtered"] == 1
    ledger = [json.loads(line) for line in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert ledger[4]["status"] == "filtered" and "image too small: 90x10" in ledger[4]["error"]
    _ingest(tmp_path, _write(tmp_path / "u.jsonl", records, "jsonl"), "out2", max_aspect_ratio=1.4)
    ledger = [json.loads(line) for line in (tmp_path / "out2" / "ledger.jsonl").read_text().splitlines()]
    assert [e["status"] for e in ledger] == ["filtered", "filtered", "ok", "filtered", "filtered"]  # 1.5, 1.5, 9
    assert "aspect ratio too large: 60x40, over 1.4" in ledger[0]["error"]


def test_bad_rows_get_a_status_and_the_run_goes_on(tmp_path, server):
    server.handler.images = {"a.jpg": server.jpeg(1), "b.jpg": server.jpeg(2)}
    lines = [json.dumps({"url": f"{server}/ok/a.jpg"}), "{not json", json.dumps(["a", "list"]),
             json.dumps({"url": ""}), json.dumps({"other": 1}), json.dumps({"url": f"{server}/status/404"}),
             json.dumps({"url": "ftp://example.com/x.jpg"}), json.dumps({"url": f"{server}/ok/not-an-image"}),
             json.dumps({"url": f"{server}/ok/again/a.jpg"}), json.dumps({"url": f"{server}/ok/b.jpg"})]
    (tmp_path / "u.jsonl").write_text("\n".join(lines) + "\n")
    result = _ingest(tmp_path, str(tmp_path / "u.jsonl"))
    ledger = [json.loads(line) for line in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert [e["status"] for e in ledger] == ["ok", "bad_metadata", "bad_metadata", "bad_metadata", "bad_metadata",
                                             "download_failed", "download_failed", "corrupt", "duplicate", "ok"]
    assert "not JSON" in ledger[1]["error"] and "not an object" in ledger[2]["error"]
    assert "no URL in column 'url'" in ledger[3]["error"] and "HTTP Error 404" in ledger[5]["error"]
    assert result.counts["ok"] == 2 and sum(result.counts.values()) == 10


def test_a_named_column_missing_from_the_header_is_one_error_before_writing(tmp_path, server):
    path = _write(tmp_path / "u.csv", _records(server), "csv")
    with pytest.raises(InputUnusableError, match="has no column 'URL'.*its columns: url, text, license, score"):
        _ingest(tmp_path, path, url_col="URL")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="cannot tell the format"):
        IngestConfig(url_list="urls.dat", out="o")
    with pytest.raises(ValueError, match="no columns"):
        IngestConfig(url_list="urls.txt", out="o", caption_col="text")
    with pytest.raises(ValueError, match="resize mode must be one of"):
        IngestConfig(url_list="urls.txt", out="o", resize_mode="crop")


def test_resume_after_kill_gives_the_same_shards(tmp_path, server):
    """SIGKILL in the middle of a run (a slow URL holds it there), then a re-run: the same bytes as one run."""
    records = _records(server)
    records[3]["url"] = f"{server}/trickle/3.jpg"  # 10 s of body, cut at 3 s: the run is inside it when killed
    path = _write(tmp_path / "u.csv", records, "csv")
    script = ("import sys; from dataengine.ingest import IngestConfig, run_ingest; run_ingest(IngestConfig("
              f"url_list={path!r}, out=sys.argv[1], shard_size=2, image_size=32, workers=1, block_rows=2, "
              "caption_col='text', save_additional_columns=['license'], download_timeout=3, download_retries=0))")
    command = [sys.executable, "-c", script]
    process = subprocess.Popen([*command, str(tmp_path / "killed")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (tmp_path / "killed" / "stats" / "shard-000000.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    for out in ("killed", "whole"):
        subprocess.run([*command, str(tmp_path / out)], check=True, capture_output=True)
    for name in ("metadata.parquet", "ledger.jsonl", "shards/shard-000000.tar", "shards/shard-000001.tar"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert manifest["counts"]["ok"] == 4 and manifest["counts"]["download_failed"] == 1


def test_rows_are_counted_for_progress_and_dry_run_checks_the_list(tmp_path, server):
    """A URL list's rows are counted where that reads no more than the listing (txt, jsonl lines; a parquet
    footer); --dry-run checks the list as the run does (it once checked nothing for a URL list)."""
    from dataengine.dryrun import ingest_dry_run
    from dataengine.ingest.inputs import count_input_rows

    records = _records(server)
    for fmt, expected in (("txt", 5), ("jsonl", 5), ("parquet", 5), ("csv", None), ("json", None)):
        config = IngestConfig(url_list=_write(tmp_path / f"u.{fmt}", records, fmt), out=str(tmp_path / "o"))
        assert count_input_rows(None, None, {}, config.url_list_spec) == expected, fmt
    planned = ingest_dry_run(IngestConfig(url_list=str(tmp_path / "u.parquet"), out=str(tmp_path / "o")))
    assert planned.rows == planned.todo_rows == 5 and not (tmp_path / "o").exists()
    with pytest.raises(InputUnusableError, match="URL list .* does not exist"):
        ingest_dry_run(IngestConfig(url_list=str(tmp_path / "missing.txt"), out=str(tmp_path / "o")))
    with pytest.raises(InputUnusableError, match="has no column 'URL'"):
        ingest_dry_run(IngestConfig(url_list=str(tmp_path / "u.parquet"), url_col="URL", out=str(tmp_path / "o")))


def test_the_ray_distributor_without_ray_is_one_error(tmp_path, server, monkeypatch):
    from dataengine.errors import DataEngineError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(DataEngineError, match=r"--distributor ray needs Ray: pip install 'dataengine\[ray\]'"):
        _ingest(tmp_path, _write(tmp_path / "u.txt", _records(server), "txt"), distributor="ray")


@pytest.mark.timeout(300)
def test_a_list_on_s3_gives_the_same_shards_as_a_local_one(tmp_path, server, s3_server, s3_bucket):
    import gzip

    import s3fs

    records = _records(server)
    local = _write(tmp_path / "u.csv", records, "csv")
    fs = s3fs.S3FileSystem(**s3_server)
    fs.pipe(f"{s3_bucket}/lists/u.csv.gz", gzip.compress((tmp_path / "u.csv").read_bytes()))
    fs.put(_write(tmp_path / "u.parquet", records, "parquet"), f"{s3_bucket}/lists/u.parquet")
    _ingest(tmp_path, local, "local", caption_col="text")
    for name in ("u.csv.gz", "u.parquet"):
        result = _ingest(tmp_path, f"{s3_bucket}/lists/{name}", f"s3-{name}", caption_col="text",
                         storage_options=s3_server)
        assert result.counts["ok"] == 5
        assert _samples(tmp_path / f"s3-{name}") == _samples(tmp_path / "local"), name
