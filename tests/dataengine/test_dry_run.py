"""``--dry-run`` of ingest, embed, cluster and train: the inputs and the output checked as the run would, the
resolved configuration and the plan printed, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dataengine.clustering import clustering_attrs
from dataengine.dryrun import ingest_dry_run
from dataengine.embed import EmbedConfig, run_embed
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.store import open_store
from dataengine.synth import SynthConfig, generate_corpus


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dry")
    generate_corpus(str(root / "corpus"), SynthConfig(num_images=60, seed=4, anomalies=False))  # + 1 video line
    run_ingest(IngestConfig(yfcc=str(root / "corpus" / "metadata.tsv"), images=str(root / "corpus" / "images"),
                            out=str(root / "ingest"), workers=0))
    run_embed(EmbedConfig(shards=str(root / "ingest"), out=str(root / "store"), model="small", image_size=32,
                          workers=0, batch_size=32))
    return root


def _dry(*args: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-m", "dataengine", *args, "--dry-run", "--json"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), " ".join(done.stderr.split())


def test_ingest_dry_run_counts_plans_and_writes_nothing(pipeline):
    out = pipeline / "new-ingest"
    summary, text = _dry("ingest", "--yfcc", str(pipeline / "corpus" / "metadata.tsv"), "--images",
                         str(pipeline / "corpus" / "images"), "--out", str(out))
    assert not out.exists()
    assert summary["dry_run"] and summary["output"] == "new" and summary["rows"] == summary["todo_rows"] == 61
    assert summary["config"]["shuffle"] is False and summary["plan"]["stage"] == "ingest"
    assert summary["plan"]["disk_bytes"] > 0 and "nothing is written" in text and "wall time" in text
    bad = subprocess.run([sys.executable, "-m", "dataengine", "ingest", "--images", str(pipeline / "missing"),
                          "--out", str(out), "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and not out.exists()
    merge = subprocess.run([sys.executable, "-m", "dataengine", "ingest", "--images", str(pipeline / "corpus"),
                            "--out", str(out), "--merge", "--dry-run"], capture_output=True, text=True)
    assert merge.returncode == 2 and "give one" in merge.stderr and not out.exists()


def test_embed_dry_run_resolves_the_stored_configuration_and_writes_nothing(pipeline):
    out = pipeline / "new-store"
    summary, _ = _dry("embed", str(pipeline / "ingest"), "--out", str(out), "--model", "small", "--image-size", "32")
    assert not out.exists()
    assert summary["output"] == "new" and summary["rows"] == 60 and summary["config"]["resolved"]["batch_size"] > 0
    assert summary["plan"]["stage"] == "embed"
    done, _ = _dry("embed", str(pipeline / "ingest"), "--out", str(pipeline / "store"), "--model", "small",
                   "--image-size", "32", "--batch-size", "32")
    assert done["output"] == "complete" and done["todo_rows"] == 0 and done["plan"] is None


def test_cluster_dry_run_adds_no_clustering(pipeline):
    store = str(pipeline / "store")
    summary, text = _dry("cluster", store, "--clustering", "dry", "--levels", "2,40", "--pca", "8")
    assert clustering_attrs(open_store(store), "dry") is None
    assert summary["output"] == "new" and summary["rows"] == 60 and summary["plan"]["stage"] == "cluster"
    assert summary["config"]["levels"] == [2, 40] and "level 1 asks for 80 clusters of 60 rows" in text
    refused = subprocess.run([sys.executable, "-m", "dataengine", "cluster", store, "--clustering", "dry", "--pca", "999",
                              "--dry-run"], capture_output=True, text=True)
    assert refused.returncode == 2 and "larger than the feature dimension" in refused.stderr


def test_train_dry_run_writes_no_run_folder(pipeline):
    out = pipeline / "run"
    summary, _ = _dry("train", str(pipeline / "ingest"), "--out", str(out), "--epochs", "2", "--image-size", "32")
    assert not out.exists()
    assert summary["output"] == "new" and summary["rows"] == 60 and summary["plan"]["stage"] == "train"
    assert summary["config"]["schedule"]["epochs"] == 2 and "storage_options" not in summary["config"]["data"]


def test_a_dry_run_of_a_partial_ingest_plans_only_the_rest(tmp_path):
    from tests.dataengine.test_ingest import make_folder
    from tests.dataengine.test_progress import _drop_last_shard

    make_folder(tmp_path / "imgs", num_per_class=10, classes=("a", "b"))
    config = IngestConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "out"), workers=0, shard_size=6)
    run_ingest(config)
    _drop_last_shard(tmp_path / "out", 2)
    before = sorted(os.listdir(tmp_path / "out" / "stats"))
    dry = ingest_dry_run(config)
    assert (dry.output, dry.rows, dry.todo_rows) == ("resume", 20, 8) and dry.plan is not None
    assert sorted(os.listdir(tmp_path / "out" / "stats")) == before and not (tmp_path / "out" / "manifest.json").exists()
