"""Backbones, default and named feature layers, the Sobel input layer, weights and checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dataengine import models
from dataengine.models import FeatureExtractor, WeightsMismatchError, build_backbone


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def _normalized(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@pytest.mark.parametrize("arch, dim", [("small", 256), ("resnet18", 512), ("resnet50", 2048), ("vgg16_bn", 4096)])
def test_default_feature_is_the_documented_tensor(arch, dim):
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone(arch)
    assert feature_dim == dim
    extractor = FeatureExtractor(backbone).eval()
    images = _images()
    with torch.inference_mode():
        features = extractor(images)
        x = _normalized(images)
        body = backbone.body
        if arch == "vgg16_bn":  # fc7 before its ReLU
            expected = body.classifier[3](body.classifier[:3](torch.flatten(body.avgpool(body.features(x)), 1)))
        elif arch == "small":
            expected = body.features(x).mean(dim=(2, 3))
        else:  # global-average-pooled layer4
            stem = body.maxpool(body.relu(body.bn1(body.conv1(x))))
            expected = body.layer4(body.layer3(body.layer2(body.layer1(stem)))).mean(dim=(2, 3))
    assert features.shape == (2, dim)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    if arch == "vgg16_bn":
        assert (features < 0).any(), "fc7 is taken before the ReLU, so it has negative values"
        # As DeeperCluster's VGG-16: fc6, ReLU, Dropout, fc7, ReLU, and no dropout after fc7.
        kinds = [type(layer).__name__ for layer in backbone.body.classifier]
        assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU"]


def test_named_layer_is_global_average_pooled():
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18")
    assert {"layer3", "layer4", "flatten"} <= set(models.layer_names(backbone))
    extractor = FeatureExtractor(backbone, layer="layer3").eval()
    images = _images()
    captured = {}
    backbone.body.layer3.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out))
    with torch.inference_mode():
        features = extractor(images)
        backbone(_normalized(images))
    assert features.shape == (2, 256)
    torch.testing.assert_close(features, captured["out"].mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    assert models.feature_dim(extractor, 32) == 256
    with pytest.raises(ValueError, match="unknown layer 'nope'.*layer4"):
        FeatureExtractor(backbone, layer="nope")
    with pytest.raises(ValueError, match="architecture"):
        build_backbone("alexnet")


def test_sobel_layer_is_fixed_grayscale_gradients():
    sobel = models.SobelFilter()
    assert not any(p.requires_grad for p in sobel.parameters())
    ramp = torch.arange(8.0).repeat(8, 1)  # intensity grows along x by 1 per pixel
    image = ramp.expand(1, 3, 8, 8)
    out = sobel(image)
    assert out.shape == (1, 2, 8, 8)
    interior = out[0, :, 1:-1, 1:-1]
    # Kernel [[1, 0, -1], [2, 0, -2], [1, 0, -1]] (cross-correlation) on a unit ramp: -(1 + 2 + 1) * 2 = -8.
    torch.testing.assert_close(interior[0], torch.full_like(interior[0], -8.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(interior[1], torch.zeros_like(interior[1]), rtol=0, atol=1e-5)
    backbone, dim = build_backbone("small", sobel=True)
    assert backbone.body.features[0].in_channels == 2 and dim == 256
    assert {"sobel.grayscale.weight", "sobel.sobel.weight"} <= set(backbone.state_dict())
    with torch.inference_mode():
        assert FeatureExtractor(backbone).eval()(_images()).shape == (2, 256)


def test_torchvision_weights_load_and_mismatches_fail_clearly(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")  # torchvision layout, with its fc head
    backbone, _ = build_backbone("resnet18")
    models.load_weights(backbone, str(tmp_path / "resnet18.pth"))
    images = _images()
    reference.fc = nn.Identity()
    with torch.inference_mode():
        torch.testing.assert_close(FeatureExtractor(backbone).eval()(images), reference(_normalized(images)),
                                   rtol=1e-4, atol=1e-5)
    wrong_arch, _ = build_backbone("small")
    with pytest.raises(WeightsMismatchError, match="missing .*unexpected"):
        models.load_weights(wrong_arch, str(tmp_path / "resnet18.pth"))
    sobel_backbone, _ = build_backbone("resnet18", sobel=True)
    with pytest.raises(WeightsMismatchError, match=r"body\.conv1\.weight: file \(64, 3, 7, 7\) vs model \(64, 2"):
        models.load_weights(sobel_backbone, str(tmp_path / "resnet18.pth"))
    torch.save({"optimizer": object.__new__(nn.Module)}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsMismatchError, match="weights_only"):
        models.load_weights(backbone, str(tmp_path / "pickled.pth"))
    with pytest.raises(FileNotFoundError):
        models.load_weights(backbone, str(tmp_path / "absent.pth"))


def test_trainer_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    backbone, _ = build_backbone("small", sobel=True)
    torch.save({"arch": "small", "sobel": True, "backbone": backbone.state_dict(), "epoch": 3},
               tmp_path / "checkpoint.pt")
    loaded = models.load_checkpoint(str(tmp_path))  # a run folder holding checkpoint.pt
    assert loaded.arch == "small" and loaded.has_sobel
    images = _images()
    with torch.inference_mode():
        torch.testing.assert_close(FeatureExtractor(loaded).eval()(images), FeatureExtractor(backbone).eval()(images))
    torch.save({"arch": "small", "sobel": False, "backbone": backbone.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(WeightsMismatchError, match="unexpected sobel"):
        models.load_checkpoint(str(tmp_path / "bad.pt"))
    torch.save(backbone.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(WeightsMismatchError, match="not a trainer checkpoint"):
        models.load_checkpoint(str(tmp_path / "plain.pt"))


def test_resolve_device_names_the_device_or_refuses_missing_cuda():
    assert models.resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert models.resolve_device("auto").type == "cuda"
    else:
        assert models.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.resolve_device("cuda:0")
