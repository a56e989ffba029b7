"""tools/bench_scale.py at a size CI affords: a metadata ingest resumed after a kill counts the time of every
attempt; video lines make fewer rows than lines (99M lines, 96M photos); --prune deletes what no later part reads;
--metadata tiled writes what ingesting every line writes; --trainer-rows cuts the epoch short."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(tmp_path, *extra, rows=3000, work="work"):
    results = tmp_path / "results.json"
    command = [sys.executable, os.path.join(ROOT, "tools", "bench_scale.py"), "--rows", str(rows),
               "--work", str(tmp_path / work), "--results", str(results), "--part-rows", "500", *extra]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(results.read_text())


def test_a_resumed_metadata_ingest_adds_up_the_time_of_its_earlier_attempts_and_prunes_its_inputs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    killed = {"seconds": 1000.0, "cpu_s": 1500.0, "peak_rss_mb": 12345.0, "children_peak_rss_mb": 1.0}
    (work / "metadata-attempts.json").write_text(json.dumps([killed]))
    part = _bench(tmp_path, "--parts", "metadata", "--keep", "--video-rate", "0.1", "--prune")["parts"]["metadata"]
    assert part["rows"] == 3000 and 0 < part["counts"]["video"] < 600
    assert part["counts"]["ok"] + part["counts"]["video"] == 3000
    assert not (work / "yfcc.tsv.gz").exists() and not (work / "ingest" / "meta").exists()
    assert not (work / "ingest" / "ledger").exists() and (work / "ingest" / "metadata.parquet").exists()
    assert 1000 < part["seconds"] < 1000 + 600 and 1500 < part["cpu_s"] < 1500 + 600
    assert part["peak_rss_mb"] == 12345.0 and part["earlier_attempts"] == [killed]
    assert part["rows_per_s"] == 3000 / part["seconds"]


def test_tiled_metadata_is_what_ingesting_every_line_writes_and_the_trainer_epoch_can_be_cut_short(tmp_path):
    import pyarrow.parquet as pq

    # 25,000 lines: two whole copies of the 10,000-line template and half of a third, videos among them.
    common = ("--keep", "--video-rate", "0.1")
    ingested = _bench(tmp_path, "--parts", "metadata", *common, rows=25_000, work="ingested")["parts"]["metadata"]
    tiled = _bench(tmp_path, "--parts", "metadata,store,cluster,trainer", "--metadata", "tiled",
                   "--trainer-rows", "5000", *common, rows=25_000, work="tiled")["parts"]
    assert tiled["metadata"]["mode"] == "tiled" and tiled["metadata"]["rows"] == ingested["counts"]["ok"]
    expected = pq.read_table(tmp_path / "ingested" / "ingest" / "metadata.parquet")
    written = pq.read_table(tmp_path / "tiled" / "ingest" / "metadata.parquet")
    assert written.num_rows > 20_000 and written.equals(expected)
    trainer = tiled["trainer"]
    assert trainer["epoch_extrapolated"] and 5000 <= trainer["emitted"] < 6000
    scale = trainer["rows"] / trainer["emitted"]
    assert abs(trainer["epoch_seconds"] - trainer["measured_seconds"] * scale) < 1e-6 * trainer["epoch_seconds"]
