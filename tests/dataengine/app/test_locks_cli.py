"""Every command that writes an output holds its lock: a second writer fails at once with one line; two
concurrent ingests into one folder leave one consistent output; s3 scratch never follows a planted symlink."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from dataengine.locks import OutputLock
from dataengine.synth import SynthConfig, generate_corpus


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataengine", "--quiet", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """The command in this process: its lock is a second open file, which flock tells apart like a process."""
    from typer.testing import CliRunner

    from dataengine.app import app

    result = CliRunner().invoke(app, ["--quiet", *args])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _commands(p: dict, out: str) -> dict[str, tuple[list[str], str]]:
    """Per command: its arguments writing into ``out`` (or into the store it writes), and what it locks."""
    other = str(p["root"] / "other-store")
    return {
        "ingest": (["ingest", "--yfcc", f"{p['corpus']}/metadata.tsv", "--images", f"{p['corpus']}/images", "--out",
                    out, "--workers", "0"], out),
        "embed": (["embed", p["ingest"], "--out", out, "--model", "small", "--image-size", "32", "--workers", "0"],
                  out),
        "cluster": (["cluster", p["store"], "--clustering", "again", "--levels", "2,3", "--pca", "8"], p["store"]),
        "assign": (["assign", p["store"], "--clustering", "c", "--features", other], other),
        "report": (["report", p["store"], "--clustering", "c", "--out", out, "--no-thumbnails"], out),
        "train": (["train", p["ingest"], "--out", out, "--arch", "small", "--image-size", "32", "--epochs", "1",
                   "--levels", "2,3", "--pca", "8", "--workers", "0"], out),
        "synth": (["synth", out, "--num-images", "50"], out),
        "curate": (["curate", p["store"], "--clustering", "c", "--out", out, "--total", "10"], out),
        "export": (["export", p["store"], "--clustering", "c", "--out", out + ".parquet"], out + ".parquet"),
    }


@pytest.mark.parametrize("command", ["ingest", "embed", "cluster", "assign", "report", "train", "synth", "curate",
                                     "export"])
def test_every_command_fails_at_once_on_a_locked_output(pipeline, tmp_path, command):
    import shutil

    if command == "assign":
        shutil.copytree(pipeline["store"], pipeline["root"] / "other-store", dirs_exist_ok=True)
    out = str(tmp_path / "out")
    args, locked = _commands(pipeline, out)[command]
    with OutputLock(locked):
        done = cli_here(*args)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"is being written by pid {os.getpid()} " in \
        lines[0], done.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".parquet")  # nothing made by a run that cannot start


# ------------------------------------------------------------------------------------------ racing ingests


def _check_consistent(out: str) -> dict:
    """The manifest, metadata.parquet, ledger and shards of an ingest output agree; every sha256 matches."""
    import pyarrow.parquet as pq

    manifest = json.load(open(os.path.join(out, "manifest.json")))
    shard_files = sorted(os.listdir(os.path.join(out, "shards")))
    assert shard_files == sorted(os.path.basename(s["name"]) for s in manifest["shards"])
    for shard in manifest["shards"]:
        data = open(os.path.join(out, shard["name"]), "rb").read()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"], shard["name"]
    table = pq.read_table(os.path.join(out, "metadata.parquet"))
    assert table.num_rows == manifest["num_samples"] == sum(s["num_samples"] for s in manifest["shards"])
    ledger = [json.loads(line) for line in open(os.path.join(out, "ledger.jsonl"))]
    assert len(ledger) == sum(manifest["counts"].values())
    assert sum(entry["status"] == "ok" for entry in ledger) == manifest["num_samples"]
    assert {entry["shard"] for entry in ledger if entry["shard"]} == {s["name"] for s in manifest["shards"]}
    return manifest


def test_two_concurrent_ingests_into_one_folder(tmp_path):
    corpus = tmp_path / "corpus"
    generate_corpus(str(corpus), SynthConfig(num_images=400, seed=2, anomalies=False))
    out = str(tmp_path / "out")
    args = [sys.executable, "-m", "dataengine", "--quiet", "ingest", "--yfcc", str(corpus / "metadata.tsv"),
            "--images", str(corpus / "images"), "--out", out, "--workers", "1", "--shard-size"]
    runs = [subprocess.Popen(args + [size], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for size in ("50", "70")]
    ended: dict[int, float] = {}
    while len(ended) < 2:
        for index, run in enumerate(runs):
            if index not in ended and run.poll() is not None:
                ended[index] = time.monotonic()
        time.sleep(0.05)
    codes = [run.returncode for run in runs]
    errors = [run.stderr.read() for run in runs]
    assert sorted(codes) == [0, 1] or sorted(codes) == [0, 2], (codes, errors)
    loser, winner = codes.index(max(codes)), codes.index(0)
    assert ended[loser] <= ended[winner], "the second writer must fail at once, not after the first finished"
    line = errors[loser].strip().splitlines()
    # the loser either read the winner's lock record or came while the winner was still writing it
    refusals = ("is being written by pid", "is being written by another run", "another configuration")
    assert len(line) == 1 and any(refusal in line[0] for refusal in refusals), errors
    manifest = _check_consistent(out)
    assert manifest["config"]["shard_size"] == (50, 70)[winner]
    assert not os.path.exists(out + ".lock") and not os.path.exists(os.path.join(out, ".tmp"))


# ------------------------------------------------------------------------------------------ private scratch


def test_s3_ingest_scratch_ignores_symlinks_planted_at_predictable_names(pipeline, tmp_path, s3_server, s3_bucket):
    """The scratch folder of an s3 output was TMPDIR/dataengine-<sha1 of the URL>: another local user could plant
    symlinks there and make the run overwrite any file it can write. Now it is a fresh private folder."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = f"{s3_bucket}/ingest"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = tmpdir / f"dataengine-{hashlib.sha1(out.encode()).hexdigest()[:12]}"
    planted.mkdir(mode=0o777)
    for name in ("shard-000000.tar.partial", "metadata.parquet.partial", "ledger.jsonl.partial"):
        os.symlink(victim, planted / name)
    env = dict(os.environ, TMPDIR=str(tmpdir))
    done = cli("ingest", "--yfcc", f"{pipeline['corpus']}/metadata.tsv", "--images", f"{pipeline['corpus']}/images",
               "--out", out, "--workers", "0", "--storage-options", json.dumps(s3_server), env=env)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(tmpdir)) == [planted.name]  # the run's own scratch is gone too
