"""--model forms: torchvision weights from the torch hub cache, TorchScript files, module:function entry points;
the offline error; the record of what was used in the store; the warning when the network is random."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from dataengine.embed import EmbedConfig, run_embed
from dataengine.models import weights_digest
from dataengine.pretrained import build_arch_backbone, hub_cache_path, parse_model_spec
from dataengine.store import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = dict(image_size=32, resize_size=32, batch_size=4, chunk_rows=8, workers=0, num_threads=1, dtype="float32")


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> str:
    from dataengine.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("pretrained")
    for i in range(6):
        (root / "imgs").mkdir(exist_ok=True)
        (root / "imgs" / f"{i}.jpg").write_bytes(_jpeg(i))
    run_ingest(IngestConfig(images=str(root / "imgs"), out=str(root / "ingest"), workers=0, image_size=32))
    return str(root / "ingest")


def _images(store_url: str, ingested: str) -> torch.Tensor:
    """The uint8 crops embed fed the model, rebuilt from the shards (resize 32 + center crop 32)."""
    import torchvision.transforms as T

    from dataengine.shards import load_shard_set, sample_stream

    order = [str(k) for k in open_store(store_url).keys[:]]
    samples = {s["__key__"]: s["jpg"] for s in sample_stream(load_shard_set(ingested).urls())}
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.PILToTensor()])
    return torch.stack([transform(Image.open(io.BytesIO(samples[k])).convert("RGB")) for k in order])


def _normalise(images: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    return (images.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _fake_hub(tmp_path, monkeypatch, spec: str, state: dict) -> str:
    """A torch hub cache under TORCH_HOME holding ``state`` under the file name torchvision's weights URL has."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path, url = hub_cache_path(parse_model_spec(spec))
    assert path == str(tmp_path / "torch-home" / "hub" / "checkpoints" / os.path.basename(url))
    os.makedirs(os.path.dirname(path))
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------------------ torchvision


def test_torchvision_weights_come_from_the_hub_cache_and_are_recorded(ingested, tmp_path, monkeypatch):
    torch.manual_seed(11)
    state = torchvision.models.resnet18().state_dict()
    path = _fake_hub(tmp_path, monkeypatch, "resnet18:IMAGENET1K_V1", state)
    store = str(tmp_path / "hub.zarr")
    run_embed(EmbedConfig(shards=ingested, out=store, model="resnet18:IMAGENET1K_V1", **TINY))
    # The same file given as a local state dict embeds the same features: the hub file was the one used.
    reference = str(tmp_path / "file.zarr")
    run_embed(EmbedConfig(shards=ingested, out=reference, model="resnet18", weights=path, **TINY))
    features = open_store(store).features[:]
    np.testing.assert_array_equal(features, open_store(reference).features[:])
    full = torchvision.models.resnet18()
    full.load_state_dict(state)
    model = nn.Sequential(*list(full.children())[:-1], nn.Flatten()).eval()
    with torch.inference_mode():
        expected = model(_normalise(_images(store, ingested))).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    record = open_store(store).attrs["model"]
    with open(path, "rb") as handle:
        file_sha = hashlib.sha256(handle.read()).hexdigest()
    assert record["name"] == "resnet18:IMAGENET1K_V1" and record["kind"] == "torchvision"
    assert record["source"] == path and record["file_sha256"] == file_sha and record["init"] == "weights"
    assert record["weights_sha256"] == open_store(reference).attrs["model"]["weights_sha256"]


def test_other_torchvision_models_give_the_input_of_their_classifier(tmp_path, monkeypatch):
    """Any torchvision classifier: the feature is the input of its last linear layer (shufflenet: 1024-d)."""
    torch.manual_seed(3)
    reference = torchvision.models.shufflenet_v2_x0_5()
    _fake_hub(tmp_path, monkeypatch, "shufflenet_v2_x0_5:DEFAULT", reference.state_dict())
    backbone, record = build_arch_backbone(parse_model_spec("shufflenet_v2_x0_5:DEFAULT"), sobel=False, seed=0)
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(backbone.eval()(x).numpy(), reference.eval()(x).numpy(), rtol=1e-5, atol=1e-6)
    assert backbone.feature_dim == 1024 and record.weights_sha256 == weights_digest(backbone)


def test_absent_weights_fail_offline_with_the_expected_path(ingested, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dataengine.app import app

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["embed", ingested, "--out", str(tmp_path / "s.zarr"), "--model",
                                      "resnet50:IMAGENET1K_V2"])
    expected = str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "s.zarr")


def test_bad_model_names_are_refused_before_any_work():
    with pytest.raises(ValueError, match="resnet50 has weights DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        parse_model_spec("resnet50:IMAGENET9K")
    with pytest.raises(ValueError, match="not an architecture"):
        parse_model_spec("no-such-model")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        parse_model_spec("missing/model.pt")
    with pytest.raises(ValueError, match="names its own weights"):
        EmbedConfig(shards="x", out="y", model="resnet50:IMAGENET1K_V2", weights="w.pth")


# ------------------------------------------------------------------------------------------ TorchScript


class _Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.input_mean = (0.5, 0.5, 0.5)
        self.input_std = (0.25, 0.25, 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # 4-D: embed pools it


def test_torchscript_file_with_its_own_normalisation(ingested, tmp_path):
    torch.manual_seed(4)
    module = _Scripted().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, TorchScript files are not
        scripted = torch.jit.script(module)
    path = str(tmp_path / "model.pt")
    torch.jit.save(scripted, path)
    store = str(tmp_path / "ts.zarr")
    run_embed(EmbedConfig(shards=ingested, out=store, model=path, **TINY))
    with torch.inference_mode():
        expected = module(_normalise(_images(store, ingested), (0.5,) * 3, (0.25,) * 3)).mean(dim=(2, 3)).numpy()
    opened = open_store(store)
    np.testing.assert_allclose(opened.features[:], expected, rtol=1e-5, atol=1e-5)
    attrs = opened.attrs
    assert attrs["model"]["kind"] == "torchscript" and attrs["layer"] == "output"
    assert attrs["model"]["file_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert attrs["preprocessing"]["mean"] == [0.5] * 3 and attrs["preprocessing"]["std"] == [0.25] * 3
    torch.save(module.state_dict(), str(tmp_path / "state.pt"))
    with pytest.raises(ValueError, match="not a TorchScript file"):
        run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "x.zarr"), model=str(tmp_path / "state.pt"), **TINY))


# ------------------------------------------------------------------------------------------ entry points


ENTRY_MODULE = """
import torch
from torch import nn


def tiny():
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def not_a_model():
    return 42


def broken():
    raise RuntimeError("weights server unreachable")
"""


def test_module_function_entry_point(ingested, tmp_path, monkeypatch):
    (tmp_path / "user_models").mkdir()
    (tmp_path / "user_models" / "my_backbones.py").write_text(textwrap.dedent(ENTRY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path / "user_models"))
    store = str(tmp_path / "entry.zarr")
    run_embed(EmbedConfig(shards=ingested, out=store, model="my_backbones:tiny", **TINY))
    sys.modules.pop("my_backbones", None)
    import my_backbones

    model = my_backbones.tiny().eval()
    with torch.inference_mode():
        expected = model(_normalise(_images(store, ingested))).numpy()
    opened = open_store(store)
    np.testing.assert_allclose(opened.features[:], expected, rtol=1e-5, atol=1e-6)
    record = opened.attrs["model"]
    assert record["kind"] == "entry" and record["source"] == "my_backbones:tiny"
    assert record["weights_sha256"] == weights_digest(model) and record["file_sha256"] is None
    for entry, message in (("my_backbones:not_a_model", "returned a int, not a torch.nn.Module"),
                           ("my_backbones:broken", "raised RuntimeError: weights server unreachable"),
                           ("my_backbones:absent", "has no function 'absent'"),
                           ("no_such_package.models:vit", "cannot import 'no_such_package.models'")):
        with pytest.raises(ValueError, match=message):
            run_embed(EmbedConfig(shards=ingested, out=str(tmp_path / "bad.zarr"), model=entry, **TINY))


# ------------------------------------------------------------------------------------------ random default


def test_cli_says_once_when_the_network_is_random(ingested, tmp_path):
    from typer.testing import CliRunner

    from dataengine.app import app

    args = ["--quiet", "embed", ingested, "--image-size", "32", "--resize-size", "32", "--workers", "0",
            "--model", "small"]
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "random.zarr")])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "randomly initialised" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: no pretrained weights"), result.stderr
    assert open_store(str(tmp_path / "random.zarr")).attrs["model"]["init"] == "random (seed 0)"
    checkpoint = str(tmp_path / "ckpt.pt")
    from dataengine.models import build_backbone

    torch.save({"arch": "small", "sobel": False, "backbone": build_backbone("small")[0].state_dict()}, checkpoint)
    quiet = CliRunner().invoke(app, ["--quiet", "embed", ingested, "--image-size", "32", "--resize-size", "32",
                                     "--workers", "0", "--checkpoint", checkpoint, "--out", str(tmp_path / "c.zarr")])
    assert quiet.exit_code == 0, quiet.output
    assert "randomly initialised" not in quiet.stderr
