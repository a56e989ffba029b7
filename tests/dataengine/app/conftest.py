"""Fixtures of the command-line tests: one small finished pipeline per test module."""

from __future__ import annotations

import pytest

from dataengine.cluster import ClusterConfig, run_cluster
from dataengine.embed import EmbedConfig, run_embed
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.synth import SynthConfig, generate_corpus


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A 60-photo corpus, its ingest output, and a feature store holding clustering ``c`` (levels 2,3)."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "corpus"
    generate_corpus(str(corpus), SynthConfig(num_images=60, seed=1, anomalies=False))
    run_ingest(IngestConfig(yfcc=str(corpus / "metadata.tsv"), images=str(corpus / "images"), out=str(root / "ingest"),
                            workers=0))
    run_embed(EmbedConfig(shards=str(root / "ingest"), out=str(root / "store"), model="small", image_size=32,
                          workers=0, num_threads=1))
    run_cluster(ClusterConfig(store=str(root / "store"), name="c", levels=(2, 3), pca_dim=8, num_threads=1))
    return {"root": root, "corpus": str(corpus), "yfcc": str(corpus / "metadata.tsv"),
            "images": str(corpus / "images"), "ingest": str(root / "ingest"), "store": str(root / "store")}
