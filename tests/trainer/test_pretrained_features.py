"""ClusterFit on the features of a pretrained model named as embed's ``--model`` (here an entry point)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from dataengine.ingest import IngestConfig, run_ingest
from dataengine.store import open_store
from trainer.config import TrainConfig
from trainer.loop import run_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clusterfit_clusters_the_features_of_an_entry_point(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    for i in range(12):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(i).integers(0, 255, (36, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG")
        (tmp_path / "images" / f"{i}.jpg").write_bytes(buffer.getvalue())
    run_ingest(IngestConfig(images=str(tmp_path / "images"), out=str(tmp_path / "ingest"), workers=0))
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "fit_models.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef pooled():\n    torch.manual_seed(1)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    monkeypatch.syspath_prepend(str(tmp_path / "entry"))
    config = TrainConfig.from_flat(dict(
        shards=str(tmp_path / "ingest"), out=str(tmp_path / "run"), mode="clusterfit", arch="small", image_size=32,
        epochs=1, levels=(2,), pca_dim=4, kmeans_iterations=2, batch_size=4, workers=0, buffer_size=8,
        num_threads=1, features_from="fit_models:pooled"))
    result = run_train(config)
    assert result.steps > 0
    attrs = open_store(str(tmp_path / "run" / "features" / "epoch000")).attrs
    assert attrs["model"]["kind"] == "entry" and attrs["model"]["source"] == "fit_models:pooled" and attrs["dim"] == 8


def test_training_starts_from_torchvision_weights_in_the_hub_cache(tmp_path, monkeypatch):
    import torch
    import torchvision

    from dataengine.pretrained import hub_cache_path, parse_model_spec
    from trainer.loop import Trainer

    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.jpg")
    run_ingest(IngestConfig(images=str(tmp_path / "images"), out=str(tmp_path / "ingest"), workers=0))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path, _ = hub_cache_path(parse_model_spec("resnet18:IMAGENET1K_V1"))
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(9)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, path)
    flat = dict(shards=str(tmp_path / "ingest"), out=str(tmp_path / "run"), mode="rotnet", arch="resnet18",
                sobel=False, image_size=32, epochs=1, batch_size=2, workers=0, num_threads=1,
                init="resnet18:IMAGENET1K_V1")
    backbone = Trainer(TrainConfig.from_flat(flat)).network.backbone.state_dict()
    assert all(torch.equal(backbone[f"body.{k}"], v) for k, v in weights.items() if not k.startswith("fc."))
    with pytest.raises(ValueError, match="drop --sobel"):
        Trainer(TrainConfig.from_flat(dict(flat, sobel=True)))
    with pytest.raises(ValueError, match="torchvision weights of --arch small"):
        Trainer(TrainConfig.from_flat(dict(flat, arch="small")))
