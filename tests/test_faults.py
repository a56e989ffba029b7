"""Object-storage fault suite: ingest, embed and train against moto through :class:`faultproxy.FaultProxy`
(loopback TCP, seeded faults on 16% of the exchanges, the link cut at a chosen request) give a clean run's
output, and the network policy of ``dataengine.fs`` that makes them survive.

What "the same output" means here, per stage:

* ingest to ``s3://``: the same set of object names under the output prefix and the same sha256 of every
  object (shards, per-shard stats/ledger/metadata parts, ``ledger.jsonl``, ``metadata.parquet``,
  ``manifest.json``, ``ingest_config.json``);
* embed from ``s3://`` shards to an ``s3://`` store: the same array names and every array equal element for
  element (``np.array_equal``, dtype and shape included), and the same store attributes;
* train reading ``s3://`` shards (cut mid-run: resumed from its last checkpoint): the same checkpoint tensors
  (``torch.equal``, backbone and head) and the same ``metrics.jsonl`` lines less their timing fields
  (``seconds``, ``samples_per_second``, at any depth).

The clean runs talk to moto directly; the faulty ones through the proxy, with one-second per-attempt timeouts
so that a stalled reply costs a second, not the product's default.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 16% of the exchanges get a fault: delayed, reset before the server, cut mid-reply, or never answered. A cut
# comes within the first 600 bytes of the reply, so that it also hits the short answers to PUTs (the server
# has stored the object, the client does not know).
FAULTS = dict(delay=0.06, reset=0.04, cut=0.04, stall=0.02, delay_s=(0.02, 0.15), cut_bytes=(0, 600))
# One-second attempts keep a stalled reply cheap here (the product's timeouts are in dataengine.fs).
FAST = {"connect_timeout": 1, "read_timeout": 1}
# While the link is down: give up after two attempts of each request, so that the failed run ends quickly.
GIVE_UP = {"config_kwargs": {**FAST, "retries": {"total_max_attempts": 2}}}
TIMING = ("seconds", "samples_per_second")
EMBED = dict(model="small", image_size=32, resize_size=36, batch_size=4, chunk_rows=6, workers=0, num_threads=1)
TRAIN = dict(mode="deepercluster", arch="small", image_size=32, epochs=1, reassign_every=1, levels=[2, 3],
             pca_dim=8, kmeans_iterations=2, batch_size=8, workers=0, buffer_size=32, num_threads=1,
             checkpoint_every=1)


def _through(proxy, config_kwargs=FAST) -> dict:
    return {**proxy.storage_options, "config_kwargs": dict(config_kwargs)}


def _faults(proxy) -> int:
    return sum(proxy.stats[action] for action in ("delay", "reset", "cut", "stall"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from dataengine.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("faults") / "synth"
    generate_corpus(str(root), SynthConfig(num_images=24, num_classes=3, seed=3, anomalies=False,
                                           min_image_size=32, max_image_size=40))
    return root


def _ingest(corpus, out, options):
    from dataengine.ingest import IngestConfig, run_ingest

    return run_ingest(IngestConfig(yfcc=str(corpus / "metadata.tsv"), images=str(corpus / "images"), out=out,
                                   shard_size=6, workers=0, storage_options=options))


def _embed(shards, out, options):
    from dataengine.embed import EmbedConfig, run_embed

    return run_embed(EmbedConfig(shards=shards, out=out, storage_options=options, **EMBED))


def _objects(fs, url) -> dict[str, str]:
    """sha256 of every object under ``url``, by name relative to it."""
    root = url.removeprefix("s3://")
    fs.invalidate_cache()
    return {path[len(root) + 1:]: hashlib.sha256(fs.cat_file(path)).hexdigest() for path in fs.find(root)}


def _store(url, options) -> dict:
    import zarr

    from dataengine.store import zarr_store

    group = zarr.open_group(zarr_store(url, options, read_only=True), mode="r")
    return {"attrs": dict(group.attrs), "arrays": {name: np.asarray(array[...]) for name, array in group.arrays()}}


def _assert_same_store(got, expected):
    assert got["attrs"] == expected["attrs"]
    assert got["arrays"].keys() == expected["arrays"].keys()
    for name, array in expected["arrays"].items():
        other = got["arrays"][name]
        assert (other.dtype, other.shape) == (array.dtype, array.shape), name
        assert np.array_equal(other, array, equal_nan=array.dtype.kind == "f"), name


@pytest.fixture(scope="module")
def clean(corpus, s3_server):
    """A clean ingest straight to moto: ``{"bucket", "fs", "ingest": {name: sha256}}``."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    bucket = "s3://faults-clean"
    fs.mkdir(bucket)
    _ingest(corpus, f"{bucket}/ingest", s3_server)
    return {"bucket": bucket, "fs": fs, "ingest": _objects(fs, f"{bucket}/ingest")}


@pytest.fixture(scope="module")
def clean_store(clean, s3_server, tmp_path_factory):
    """Attributes and arrays of a clean embed of the clean ingest, read straight from moto into a local store
    (an ``s3://`` store holds the same arrays and attributes, and costs far more requests)."""
    store = str(tmp_path_factory.mktemp("faults-clean") / "store.zarr")
    _embed(f"{clean['bucket']}/ingest", store, s3_server)
    return _store(store, None)


# ------------------------------------------------------------------------------------------ ingest


def test_ingest_through_faults_and_a_short_outage_writes_the_clean_objects(corpus, clean, s3_bucket, fault_proxy):
    # Besides the drawn faults: the upload of shard 1 is cut after the server stored it (the retry puts it
    # again), the manifest's PUT is reset, and the link is down for a second from shard 3's upload on.
    bucket = s3_bucket.removeprefix("s3://")
    proxy = fault_proxy(seed=1, outage_on=rf"PUT /{bucket}/ingest/shards/shard-000003.tar", outage_s=1.0,
                        targets=((rf"PUT /{bucket}/ingest/shards/shard-000001.tar", "cut"),
                                 (rf"PUT /{bucket}/ingest/manifest.json", "reset")), **FAULTS)
    _ingest(corpus, f"{s3_bucket}/ingest", _through(proxy))
    assert _objects(clean["fs"], f"{s3_bucket}/ingest") == clean["ingest"]
    assert proxy.stats["targeted"] == 2 and proxy.stats["outages"] == 1 and _faults(proxy) >= 4, proxy.stats
    assert proxy.stats["cut_fired"] >= 1, proxy.stats


def test_ingest_link_cut_mid_run_fails_then_resumes_to_the_clean_objects(corpus, clean, s3_bucket, fault_proxy):
    bucket = s3_bucket.removeprefix("s3://")
    proxy = fault_proxy(seed=2, outage_on=rf"PUT /{bucket}/ingest/shards/shard-000002.tar", **FAULTS)
    with pytest.raises(Exception):  # noqa: B017 (whatever the client raises once it gives up)
        _ingest(corpus, f"{s3_bucket}/ingest", _through(proxy, GIVE_UP["config_kwargs"]))
    assert proxy.stats["outages"] == 1
    assert len(clean["fs"].find(f"{s3_bucket}/ingest/stats")) == 2  # shards 0 and 1 were done
    proxy.heal()
    _ingest(corpus, f"{s3_bucket}/ingest", _through(proxy))
    assert _objects(clean["fs"], f"{s3_bucket}/ingest") == clean["ingest"]


@pytest.mark.slow
def test_ingest_from_s3_inputs_through_faults_writes_the_clean_objects(corpus, s3_server, s3_bucket, fault_proxy):
    # The metadata and every image are read through the faults too (listing, metadata stream, image GETs).
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(corpus / "images"), f"{s3_bucket}/in/images", recursive=True)
    fs.put_file(str(corpus / "metadata.tsv"), f"{s3_bucket}/in/metadata.tsv")

    def ingest(out, options):
        from dataengine.ingest import IngestConfig, run_ingest

        run_ingest(IngestConfig(yfcc=f"{s3_bucket}/in/metadata.tsv", images=f"{s3_bucket}/in/images", out=out,
                                shard_size=6, workers=0, storage_options=options))

    ingest(f"{s3_bucket}/clean", s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    proxy = fault_proxy(seed=7, targets=((rf"GET /{bucket}/in/metadata.tsv", "cut"),
                                         (rf"GET /{bucket}/in/images/", "stall")), **FAULTS)
    ingest(f"{s3_bucket}/faulty", _through(proxy))
    assert _objects(fs, f"{s3_bucket}/faulty") == _objects(fs, f"{s3_bucket}/clean")
    assert proxy.stats["targeted"] == 2 and _faults(proxy) >= 4, proxy.stats


# ------------------------------------------------------------------------------------------ embed


@pytest.mark.slow
def test_embed_through_faults_and_a_cut_link_resumes_to_the_clean_arrays(clean, clean_store, s3_bucket, fault_proxy):
    # Besides the drawn faults: a shard's download is cut mid-body and another's stalls; then the link goes
    # down for good at the write of block 1's features, the run fails, and the re-run resumes.
    shards = f"{clean['bucket']}/ingest"
    bucket = s3_bucket.removeprefix("s3://")
    proxy = fault_proxy(seed=4, outage_on=rf"PUT /{bucket}/store.zarr/features/c/1",
                        targets=((r"GET /faults-clean/ingest/shards/shard-000000.tar", "cut"),
                                 (r"GET /faults-clean/ingest/shards/shard-000001.tar", "stall")),
                        **{**FAULTS, "cut_bytes": (2000, 2000)})
    with pytest.raises(Exception):  # noqa: B017
        _embed(shards, f"{s3_bucket}/store.zarr", _through(proxy, GIVE_UP["config_kwargs"]))
    assert proxy.stats["outages"] == 1 and proxy.stats["cut_fired"] >= 1 and proxy.stats["targeted"] == 2
    proxy.heal()
    result = _embed(shards, f"{s3_bucket}/store.zarr", _through(proxy))
    assert result.resumed_blocks == 1 and result.complete
    _assert_same_store(_store(f"{s3_bucket}/store.zarr", proxy.storage_options), clean_store)
    assert _faults(proxy) >= 4, proxy.stats


# ------------------------------------------------------------------------------------------ train


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    return value


def _train(shards, out, options) -> None:
    from trainer.config import TrainConfig
    from trainer.loop import run_train

    run_train(TrainConfig.from_flat(dict(shards=shards, out=str(out), storage_options=options, **TRAIN)))


def _outcome(out) -> dict:
    import torch

    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        metrics = [_without_timing(json.loads(line)) for line in handle]
    return {"weights": {**state["backbone"], **{f"head.{k}": v for k, v in state["head"].items()}},
            "metrics": metrics}


def _assert_same_run(got, expected):
    import torch

    assert got["metrics"] == expected["metrics"]
    assert got["weights"].keys() == expected["weights"].keys()
    for name, tensor in expected["weights"].items():
        assert torch.equal(tensor, got["weights"][name]), name


@pytest.mark.slow
def test_train_reading_s3_shards_through_faults_and_a_cut_link_gives_the_clean_run(clean, tmp_path, fault_proxy):
    shards = f"{clean['bucket']}/ingest"
    counter = fault_proxy()  # no faults: counts the clean run's requests
    _train(shards, tmp_path / "clean", _through(counter))
    expected = _outcome(tmp_path / "clean")
    # Drawn faults, and two shard downloads cut mid-body or never answered.
    proxy = fault_proxy(seed=6, targets=((r"GET /faults-clean/ingest/shards/shard-00000[0-3].tar", "cut"),
                                         (r"GET /faults-clean/ingest/shards/shard-00000[0-3].tar", "stall")),
                        **{**FAULTS, "cut_bytes": (2000, 2000)})
    _train(shards, tmp_path / "faulty", _through(proxy))
    _assert_same_run(_outcome(tmp_path / "faulty"), expected)
    assert proxy.stats["cut_fired"] >= 1 and proxy.stats["targeted"] == 2 and _faults(proxy) >= 4, proxy.stats
    # The link goes down for good three quarters into the run (by its requests): the run fails, the re-run
    # resumes from the last checkpoint.
    cut = fault_proxy(outage_after=counter.stats["exchanges"] * 3 // 4)
    with pytest.raises(Exception):  # noqa: B017
        _train(shards, tmp_path / "cut", _through(cut, GIVE_UP["config_kwargs"]))
    assert cut.stats["outages"] == 1
    cut.heal()
    _train(shards, tmp_path / "cut", _through(cut))
    _assert_same_run(_outcome(tmp_path / "cut"), expected)


# ------------------------------------------------------------------------------------------ network policy


def test_s3_filesystems_get_bounded_timeouts_and_retries_unless_the_caller_sets_them(s3_server):
    from dataengine.fs import S3_RETRIES, S3_TIMEOUTS, url_to_fs, with_storage_defaults
    from dataengine.s3http import S3HTTPSession

    config = with_storage_defaults("s3://b/k", s3_server)["config_kwargs"]
    assert config == {**S3_TIMEOUTS, "retries": S3_RETRIES, "http_session_cls": S3HTTPSession}
    assert S3_TIMEOUTS["read_timeout"] < 60 and S3_RETRIES["total_max_attempts"] > 1  # botocore's: 60 s, legacy
    mine = {**s3_server, "config_kwargs": {"read_timeout": 3, "retries": {"total_max_attempts": 2}}}
    config = with_storage_defaults("s3://b/k", mine)["config_kwargs"]
    assert config["read_timeout"] == 3 and config["retries"] == {"mode": "standard", "total_max_attempts": 2}
    assert mine["config_kwargs"]["retries"] == {"total_max_attempts": 2}  # the caller's dict is not changed
    assert with_storage_defaults("memory://x", {"a": 1}) == {"a": 1}
    fs, _ = url_to_fs("s3://b/k", s3_server)
    assert fs.config_kwargs["read_timeout"] == S3_TIMEOUTS["read_timeout"]


def test_a_put_whose_answer_is_lost_is_retried_not_waited_for_forever(s3_bucket, fault_proxy):
    """botocore sends file-like PUT bodies with ``Expect: 100-continue`` and aiohttp waits for the ``100
    Continue`` with no timeout: a lost answer hung the command for good (the proxy stalls the first PUT's
    reply). Without the header, the read timeout ends the attempt and the retry succeeds."""
    from dataengine.fs import Location

    bucket = s3_bucket.removeprefix("s3://")
    proxy = fault_proxy(targets=((rf"PUT /{bucket}/out/lost.json", "stall"),))
    out = Location(f"{s3_bucket}/out", _through(proxy))
    writer = threading.Thread(target=out.write_json, args=("lost.json", {"a": 1}), daemon=True)
    writer.start()
    writer.join(60)
    assert not writer.is_alive(), "the PUT waited for an answer that never came"
    assert out.read_json("lost.json") == {"a": 1} and proxy.stats["stall"] == 1
