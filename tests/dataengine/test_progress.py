"""Progress of the long commands: totals known before the run (ingest's input rows, embed's, cluster's and
report's passes), the bar's done/total, rate and ETA, and the rate of a resumed ingest."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from dataengine.ingest import IngestConfig, run_ingest
from dataengine.ingest.inputs import count_input_rows, pending_rows
from tests.dataengine.test_ingest import make_folder, yfcc_line


def test_input_rows_counted_from_listings_headers_and_lines(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=4, classes=("a", "b"))
    (tmp_path / "imgs" / "a" / "notes.txt").write_text("not an image")
    assert count_input_rows(None, str(tmp_path / "imgs")) == 8
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    assert count_input_rows(None, str(tmp_path / "imgs.tar")) == 8
    with tarfile.open(tmp_path / "wds.tar", "w") as tar:  # a webdataset: one row per sample, sidecars or not
        for key in ("s0", "s1", "s2"):
            for extension, data in (("jpg", (tmp_path / "imgs" / "a" / "000.jpg").read_bytes()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert count_input_rows(None, str(tmp_path / "wds.tar")) == 3
    (tmp_path / "meta.tsv").write_text("\n".join(yfcc_line(i, i) for i in range(5)) + "\n\n")
    assert count_input_rows(str(tmp_path / "meta.tsv"), str(tmp_path / "imgs")) == 5
    (tmp_path / "meta.tsv.gz").write_bytes(gzip.compress((tmp_path / "meta.tsv").read_bytes()))
    assert count_input_rows(str(tmp_path / "meta.tsv.gz"), str(tmp_path / "imgs")) is None  # a full read: unknown
    assert count_input_rows(None, str(tmp_path / "missing")) is None
    for path in ("imgs", "imgs.tar", "wds.tar"):  # what ingest itself finds
        result = run_ingest(IngestConfig(images=str(tmp_path / path), out=str(tmp_path / f"out-{path}"), workers=0))
        assert sum(result.counts.values()) == count_input_rows(None, str(tmp_path / path))


def test_pending_rows_of_a_resumed_and_of_a_multi_node_ingest(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=10, classes=("a", "b"))
    config = IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), workers=0, shard_size=6)
    assert pending_rows(config, 20) == (20, 0) and pending_rows(config, None) is None
    run_ingest(config)
    assert pending_rows(config, 20) == (0, 20)
    _drop_last_shard(tmp_path / "out", 3)  # shards 0-2 (18 rows) stay done
    assert pending_rows(config, 20) == (2, 18)
    nodes = [IngestConfig(images="x", out=str(tmp_path / f"n{rank}"), num_nodes=3, node_rank=rank, split_rows=4)
             for rank in range(3)]
    assert [pending_rows(node, 30)[0] for node in nodes] == [12, 10, 8]  # blocks of 4 rows dealt round-robin


def _drop_last_shard(out, index: int) -> None:
    """What a run killed while writing shard ``index`` leaves: no manifest, no stats of that shard."""
    os.remove(out / "manifest.json")
    os.remove(out / "stats" / f"shard-{index:06d}.json")
    for name in os.listdir(out / "nodes"):
        os.remove(out / "nodes" / name)


def _terminal_env() -> dict[str, str]:
    """A terminal for rich (bars drawn) in a subprocess whose output is captured."""
    return dict(os.environ, FORCE_COLOR="1", COLUMNS="200", TERM="xterm")


def test_a_resumed_ingest_reports_the_rate_of_its_own_rows_and_its_bar_a_total(tmp_path):
    make_folder(tmp_path / "imgs", num_per_class=10, classes=("a", "b"))
    command = [sys.executable, "-m", "dataengine", "ingest", "--images", str(tmp_path / "imgs"), "--out",
               str(tmp_path / "out"), "--shard-size", "6", "--workers", "0", "--json"]
    subprocess.run(command, check=True, capture_output=True)
    _drop_last_shard(tmp_path / "out", 3)
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=_terminal_env())
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["rows_this_run"] == 2 and summary["resumed_shards"] == 3
    assert summary["rows_per_second"] == pytest.approx(2 / summary["seconds"])  # not the 20 rows of the output
    plain = " ".join(_plain(done.stderr).split())
    assert "/20" in plain and "rows/s" in plain and "?" not in plain.split("/20")[0][-8:]  # 18 done before: x/20
    assert "20 rows, 18 of them not by this run" in plain


def _plain(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text).replace("\r", "\n")


def test_the_bar_shows_done_total_rate_and_time_left(monkeypatch):
    from rich.console import Console

    from dataengine.app import cli

    buffer = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buffer, force_terminal=True, width=150))
    with cli.progress_bar("embed", total=1000, completed=400) as update:
        for _ in range(6):
            update(100)
    text = _plain(buffer.getvalue())
    assert "1,000/1,000" in text and "rows/s" in text and "0:00:00" in text
    buffer.seek(0)
    buffer.truncate(0)
    with cli.progress_bar("ingest") as update:  # no total: done/?, a rate still
        update(5)
    assert "5/?" in _plain(buffer.getvalue())
    buffer.seek(0)
    buffer.truncate(0)
    with cli.progress_bar("train", unit="steps") as update:  # phases: each epoch's bar starts over
        update(total=8, completed=3, description="train epoch 2/2")
        for _ in range(5):
            update(1)
    text = _plain(buffer.getvalue())
    assert "train epoch 2/2" in text and "8/8" in text and "steps/s" in text
    assert cli.rate_text(0.5123) == "0.512" and cli.rate_text(12.34) == "12.3" and cli.rate_text(4350.2) == "4,350"


def test_cluster_embed_and_report_totals_are_what_they_report(tmp_path):
    import torch

    from dataengine.cluster import ClusterConfig, progress_total as cluster_total, run_cluster
    from dataengine.embed import EmbedConfig, run_embed
    from dataengine.report import ReportConfig, run_report
    from dataengine.report.run import progress_total as report_total
    from dataengine.shards import load_shard_set
    from dataengine.synth import SynthConfig, generate_corpus

    torch.set_num_threads(1)
    generate_corpus(str(tmp_path / "corpus"), SynthConfig(num_images=120, seed=2, anomalies=False))
    run_ingest(IngestConfig(yfcc=str(tmp_path / "corpus" / "metadata.tsv"), images=str(tmp_path / "corpus" / "images"),
                            out=str(tmp_path / "ingest"), workers=0))
    counted = []
    run_embed(EmbedConfig(shards=str(tmp_path / "ingest"), out=str(tmp_path / "store"), model="small", image_size=32,
                          workers=0, chunk_rows=32, batch_size=32), progress=counted.append)
    assert sum(counted) == load_shard_set(str(tmp_path / "ingest")).num_samples
    config = ClusterConfig(store=str(tmp_path / "store"), name="c", levels=(2, 3), pca_dim=8, num_threads=1)
    counted.clear()
    run_cluster(config, progress=counted.append)
    assert sum(counted) == cluster_total(config, 120) == 3 * 120
    for thumbnails in (True, False):
        report = ReportConfig(store=str(tmp_path / "store"), clustering="c", out=str(tmp_path / f"r{thumbnails}"),
                              thumbnails=thumbnails)
        counted.clear()
        run_report(report, progress=counted.append)
        assert sum(counted) == report_total(report)
