"""``dataengine eval``: linear probe and k-NN on frozen features of labelled synthetic class folders.

Random-init small convnet at 32 px on four visually distinct synthetic classes: both classifiers beat chance,
results are deterministic for a seed, a checkpoint file gives exactly what the same weights give in-process,
and label problems are refused before anything is embedded.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dataengine.ingest import IngestConfig, run_ingest
from dataengine.models import build_backbone
from dataengine.store import open_store
from dataengine.synth import render_image
from trainer.evaluation import EvalConfig, check_classes, knn_predict, run_eval, top1, train_linear_probe

CLASSES = ("disc", "stripes", "checkerboard", "ring")
TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 8
TIMINGS = ("seconds", "embed_seconds", "linear_seconds", "knn_seconds", "out")
# Tiny and fast: one thread, decoding in the main process, small batches.
FAST = dict(arch="small", image_size=32, workers=0, num_threads=1, batch_size=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_split(root, classes, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(render_image(name, rng, 32, 32)).save(root / name / f"{i}.jpg", quality=95)


def _ingest(tmp_path_factory, name: str, classes, per_class: int, seed: int) -> str:
    root = tmp_path_factory.mktemp(name)
    _write_split(root / "images", classes, per_class, seed)
    run_ingest(IngestConfig(images=str(root / "images"), out=str(root / "ingest"), workers=0))
    return str(root / "ingest")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, str]:
    """Ingests of class folders: train and test of the same four classes, a test split of other classes, one
    mixing seen and unseen classes, and images without class folders."""
    unlabelled = tmp_path_factory.mktemp("unlabelled")
    (unlabelled / "images").mkdir()
    for i in range(3):
        Image.fromarray(render_image("disc", np.random.default_rng(i), 32, 32)).save(unlabelled / "images" / f"{i}.jpg")
    run_ingest(IngestConfig(images=str(unlabelled / "images"), out=str(unlabelled / "ingest"), workers=0))
    return {
        "train": _ingest(tmp_path_factory, "train", CLASSES, TRAIN_PER_CLASS, seed=1),
        "test": _ingest(tmp_path_factory, "test", CLASSES, TEST_PER_CLASS, seed=2),
        "other": _ingest(tmp_path_factory, "other", ("triangle", "cross"), 4, seed=3),
        "mixed": _ingest(tmp_path_factory, "mixed", ("disc", "stripes", "triangle"), TEST_PER_CLASS, seed=4),
        "unlabelled": str(unlabelled / "ingest"),
    }


def _scores(result) -> dict:
    return {k: v for k, v in result.to_dict().items() if k not in TIMINGS}


def test_random_init_beats_chance_and_is_deterministic(splits, tmp_path):
    # The Sobel layer (the trainer's default) makes random features see shapes rather than the random colours.
    config = EvalConfig(train=splits["train"], test=splits["test"], random=True, sobel=True, seed=0,
                        out=str(tmp_path / "a"), **FAST)
    first = run_eval(config)
    chance = 1 / len(CLASSES)
    assert first.linear_top1 >= chance + 0.25 and first.knn_top1 >= chance + 0.2, first
    assert (first.num_train, first.num_test, first.num_classes, first.feature_dim) == (64, 32, 4, 256)
    assert first.num_skipped_train == first.num_skipped_test == first.num_test_unseen == 0
    assert first.model["arch"] == "small" and first.model["sobel"] and first.model["init"] == "random (seed 0)"
    # Same seed, fresh feature stores: the same numbers; same folder again: the stores are reused.
    second = run_eval(dataclasses.replace(config, out=str(tmp_path / "b")))
    assert _scores(second) == _scores(first)
    again = run_eval(config)
    assert _scores(again) == _scores(first)
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert saved["result"]["linear_top1"] == first.linear_top1 and saved["config"]["random"] is True
    other_seed = run_eval(dataclasses.replace(config, seed=1, out=None))
    assert other_seed.model["init"] == "random (seed 1)" and other_seed.out is None


def test_cli_checkpoint_equals_the_same_weights_in_process(splits, tmp_path):
    torch.manual_seed(3)  # what a random init with seed 3 builds (the embed stage seeds torch the same way)
    backbone, _ = build_backbone("small", sobel=False)
    path = tmp_path / "ckpt.pt"
    torch.save({"arch": "small", "sobel": False, "backbone": backbone.state_dict()}, path)
    command = [sys.executable, "-m", "dataengine", "--quiet", "eval", "--checkpoint", str(path), "--arch",
               "small", "--image-size", "32", "--train", splits["train"], "--test", splits["test"], "--seed", "3",
               "--batch-size", "16", "--workers", "0", "--threads", "1", "--out",
               str(tmp_path / "cli"), "--json"]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
    summary = json.loads(lines[-1])
    in_process = run_eval(EvalConfig(train=splits["train"], test=splits["test"], random=True, seed=3,
                                     out=str(tmp_path / "mem"), **FAST))
    for key in ("linear_top1", "knn_top1", "linear_train_top1", "num_train", "num_test", "num_classes"):
        assert summary[key] == getattr(in_process, key), key
    # The checkpoint was the one loaded (its digest is recorded), and its features are the in-process ones.
    from dataengine.models import weights_digest

    assert summary["model"]["checkpoint"] == {"name": "ckpt.pt", "weights_sha256": weights_digest(backbone)}
    for split in ("train", "test"):
        from_file = open_store(str(tmp_path / "cli" / "features" / split)).features[:]
        built = open_store(str(tmp_path / "mem" / "features" / split)).features[:]
        assert np.array_equal(from_file, built)


def test_label_problems_are_refused_before_embedding(splits, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="label mismatch"):
        run_eval(EvalConfig(train=splits["train"], test=splits["other"], random=True, out=str(out), **FAST))
    with pytest.raises(ValueError, match="no labels"):
        run_eval(EvalConfig(train=splits["unlabelled"], test=splits["test"], random=True, out=str(out), **FAST))
    assert not out.exists()
    with pytest.raises(ValueError, match="at least 2"):
        check_classes({"disc"}, {"disc"})


def test_test_classes_absent_from_train_count_as_errors(splits):
    result = run_eval(EvalConfig(train=splits["train"], test=splits["mixed"], random=True, sobel=True, **FAST))
    assert result.unseen_classes == ["triangle"] and result.num_test_unseen == TEST_PER_CLASS
    assert result.num_test == 3 * TEST_PER_CLASS and result.num_classes == len(CLASSES)
    assert result.linear_top1 <= 2 / 3 and result.knn_top1 <= 2 / 3, result
    assert result.linear_top1 > 1 / 3, result  # the seen classes are still recognised (chance: 1/6)


def test_config_is_checked():
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(train="a", test="b")
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(train="a", test="b", random=True, checkpoint="c.pt")
    with pytest.raises(ValueError, match="arch"):
        EvalConfig(train="a", test="b", random=True, arch="vit")
    with pytest.raises(ValueError, match="knn_k"):
        EvalConfig(train="a", test="b", random=True, knn_k=0)
    assert EvalConfig(train="a", test="b", random=True, image_size=32).resolved_resize_size == 32
    assert EvalConfig(train="a", test="b", random=True, image_size=224).resolved_resize_size == 256


def test_knn_is_a_weighted_vote():
    # One very similar neighbour of class 1 outweighs two less similar ones of class 0 (a majority vote would
    # say 0): exp(1 / 0.07) > 2 exp(0.8 / 0.07).
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]], np.float32)
    targets = np.array([1, 0, 0, 2])
    test = np.array([[3.0, 0.0]], np.float32)  # the scale does not matter: cosine similarity
    assert knn_predict(train, targets, test, 3, k=3).tolist() == [1]
    assert knn_predict(train, targets, test, 3, k=3, temperature=100.0).tolist() == [0]
    with pytest.raises(ValueError, match="knn k"):
        knn_predict(train, targets, test, 3, k=5)


def test_linear_probe_separates_blobs_and_ignores_constant_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4
    targets = np.repeat(np.arange(3), 50)
    features = (centers[targets] + rng.normal(size=(150, 8))).astype(np.float32)
    features[:, 0] = 7.0  # a dead unit: zero std must not turn into NaN
    probe = train_linear_probe(features, targets, 3)
    assert top1(probe.predict(features), targets) == 1.0
    assert torch.isfinite(probe.layer.weight).all() and probe.std[0] == 1.0
    again = train_linear_probe(features, targets, 3)
    assert torch.equal(probe.layer.weight, again.layer.weight)


def test_a_pretrained_model_is_evaluated_without_checkpoint_or_random(splits, tmp_path, monkeypatch):
    """``arch`` may be any model embed takes: an entry point building the seed-0 small convnet scores what the
    seed-0 random init scores."""
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "eval_models.py").write_text(
        "import torch\nfrom dataengine.models import build_backbone\n\n\n"
        "def small_seed0():\n    torch.manual_seed(0)\n    return build_backbone('small')[0]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "entry"))
    fast = dict(FAST, arch="eval_models:small_seed0")
    pretrained = run_eval(EvalConfig(train=splits["train"], test=splits["test"], **fast))
    random = run_eval(EvalConfig(train=splits["train"], test=splits["test"], random=True, seed=0, **FAST))
    scores = ("linear_top1", "knn_top1", "linear_train_top1", "num_train", "num_test", "feature_dim")
    assert [getattr(pretrained, k) for k in scores] == [getattr(random, k) for k in scores]
    assert pretrained.model["kind"] == "entry" and pretrained.model["init"] == "weights"
    with pytest.raises(ValueError, match="exactly one"):
        EvalConfig(train="a", test="b", random=True, **fast)
