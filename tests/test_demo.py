"""`dataengine demo` end to end on a small corpus: every stage runs and reports where its output is."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "dataengine", "--quiet", "demo", "--out", str(out), "--num-images", "150",
               "--workers", "1", "--json"]
    result = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["stages"]) == {"synth", "ingest", "embed", "cluster", "report", "train", "curate"}
    assert summary["stages"]["ingest"]["counts"]["ok"] > 100
    assert os.path.exists(summary["stages"]["report"]["path"])
    assert os.path.exists(summary["stages"]["train"]["checkpoint"])
    assert "report:" in result.stderr
    curated = summary["stages"]["curate"]  # the demo ends with a balanced, deduplicated subset and its summary
    assert curated["num_selected"] == 50 and curated["counts"]["near_duplicate"] > 0
    assert os.path.exists(os.path.join(curated["path"], "manifest.json"))
    assert "curate: 50 of" in result.stderr and "original and curated" in result.stderr
