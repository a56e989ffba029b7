"""Fixtures of the trainer tests: one small synthetic ingest shared by every training test of the session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> str:
    """An ingest of 160 synthetic photos (40-48 px, 4 shards of 40), with users, devices, GPS and tags."""
    from dataengine.ingest import IngestConfig, run_ingest
    from dataengine.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("train")
    generate_corpus(str(root / "corpus"), SynthConfig(num_images=160, seed=2, anomalies=False,
                                                      min_image_size=40, max_image_size=48))
    run_ingest(IngestConfig(yfcc=str(root / "corpus" / "metadata.tsv"), images=str(root / "corpus" / "images"),
                            out=str(root / "ingest"), shard_size=40, workers=0))
    return str(root / "ingest")
