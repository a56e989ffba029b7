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


@pytest.fixture(scope="session")
def spawn_ranks():
    """``spawn_ranks(worker, world, *args, timeout=300)``: run ``worker(rank, world, *args)`` in ``world`` spawned
    processes and wait for all of them; a rank stuck in a collective fails the test instead of hanging it."""
    import time

    import torch.multiprocessing as mp

    def run(worker, world: int, *args, timeout: float = 300.0) -> None:
        context = mp.spawn(worker, args=(world, *args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        # join() returns False whenever one process ends while another still runs: wait until all are done.
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s")

    return run
