"""Feature extractors: torchvision backbones, a small CPU-friendly convnet, an optional fixed Sobel input layer.

Backbones (:func:`build_backbone`) are shared with the trainer. A :class:`Backbone` takes normalised float
images ``(B, 3, H, W)`` (ImageNet mean/std) and returns ``(B, feature_dim)``. Its parameters live under
``sobel.*`` (fixed, only when ``sobel=True``) and ``body.*`` (the torchvision model without its classifier
head, or the small convnet).

Default feature per architecture (the tensor written by ``dataengine embed`` without ``--layer``):

========== =================== ===== ================================================================
arch       layer name          dim   tensor
========== =================== ===== ================================================================
vgg16_bn   ``classifier.3``    4096  fc7 *before* its ReLU (torchvision ``classifier[3]``'s output)
resnet18   ``flatten``         512   global-average-pooled output of ``layer4`` (the penultimate layer)
resnet50   ``flatten``         2048  global-average-pooled output of ``layer4`` (the penultimate layer)
small      ``flatten``         256   global-average-pooled output of the last conv block (after ReLU)
========== =================== ===== ================================================================

``--layer NAME`` picks any node of the body's graph instead (names as listed by :func:`layer_names`, e.g.
``layer3`` or ``features.32``); a 4-D output is global-average-pooled to ``(B, C)``.

The Sobel layer (DeepCluster): a 1x1 convolution to grayscale (weights 1/3) then two fixed 3x3 Sobel
filters (horizontal and vertical gradients), so the body's first convolution has 2 input channels.

Weights:

* ``--weights FILE``: a state dict saved with ``torch.save``, loaded with ``torch.load(weights_only=True)``.
  Either torchvision's layout (``conv1.weight``..., e.g. ``resnet18-f37072fd.pth``; the classifier head
  ``fc.*`` / ``classifier.6.*`` is ignored) or a :class:`Backbone`'s own ``state_dict()`` (``body.*``).
* ``--checkpoint FILE`` (written by the trainer): a dict ``{"arch": str, "sobel": bool, "backbone":
  Backbone.state_dict()}`` plus any other entries (ignored here), also loaded with ``weights_only=True``.

Any missing, unexpected or wrongly shaped tensor raises :class:`WeightsMismatchError` naming them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Any

import torch
from torch import nn

from dataengine.fs import is_remote, join, url_to_fs

logger = logging.getLogger(__name__)

ARCHS = ("vgg16_bn", "resnet18", "resnet50", "small")
DEFAULT_LAYERS = {"vgg16_bn": "classifier.3", "resnet18": "flatten", "resnet50": "flatten", "small": "flatten"}
OUTPUT_LAYER = "output"
# torchvision classifier heads, dropped from backbones and ignored in torchvision weight files.
_HEAD_PREFIXES = {"vgg16_bn": ("classifier.6.",), "resnet18": ("fc.",), "resnet50": ("fc.",), "small": ()}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsMismatchError(ValueError):
    """A weights file or checkpoint does not fit the requested architecture."""


def resolve_device(name: str) -> torch.device:
    """The torch device named ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (this process's current CUDA device
    when CUDA is available, else the CPU).

    Raises:
        ValueError: a CUDA device is asked for but CUDA is not available.
    """
    if name == "auto":
        name = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


class SobelFilter(nn.Module):
    """Fixed grayscale + Sobel input layer: ``(B, 3, H, W)`` -> ``(B, 2, H, W)`` gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.grayscale = nn.Conv2d(3, 1, kernel_size=1)
        self.sobel = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        with torch.no_grad():
            self.grayscale.weight.fill_(1.0 / 3.0)
            self.grayscale.bias.zero_()
            gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
            self.sobel.weight.copy_(torch.stack([gx, gx.t()]).unsqueeze(1))
            self.sobel.bias.zero_()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sobel(self.grayscale(x))


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU blocks (32, 64, 128, 256 channels, max-pooling after the first three) and a global
    average pool: ~0.4 M parameters, about 15 MFLOPs per 32x32 image, for fast CPU runs and tests."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            if index < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


class Backbone(nn.Module):
    """Optional fixed Sobel layer followed by a feature body; output ``(B, feature_dim)``."""

    def __init__(self, arch: str, body: nn.Module, feature_dim: int, sobel: bool,
                 head_prefixes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.arch = arch
        # Keys of a torchvision weights file that belong to the dropped classifier head (ignored on load).
        self.head_prefixes = head_prefixes
        self.has_sobel = sobel
        self.feature_dim = feature_dim
        self.sobel = SobelFilter() if sobel else nn.Identity()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.sobel(x))


def build_backbone(arch: str, sobel: bool = False) -> tuple[Backbone, int]:
    """Build a randomly initialised backbone (seed torch's RNG first for a reproducible init).

    Args:
        arch: one of :data:`ARCHS`.
        sobel: put the fixed grayscale + Sobel layer in front (the body's first conv then takes 2 channels).

    Returns:
        The backbone and its output dimension (the default feature's dimension except for ``vgg16_bn``,
        whose default feature is fc7 before the ReLU that ends the backbone; both are 4096-d).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    in_channels = 2 if sobel else 3
    if arch == "small":
        body: nn.Module = SmallConvNet(in_channels)
        dim = body.out_dim
    elif arch == "vgg16_bn":
        body, dim = _vgg16_bn_body(in_channels), 4096
    else:
        body, dim = _resnet_body(arch, in_channels)
    return Backbone(arch, body, dim, sobel, _HEAD_PREFIXES[arch]), dim


def _vgg16_bn_body(in_channels: int) -> nn.Module:
    import torchvision

    model = torchvision.models.vgg16_bn(weights=None)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    # Keep fc6, ReLU, Dropout, fc7, ReLU, as DeeperCluster's VGG-16 does: no dropout after fc7 (torchvision's
    # classifier[5]); the trainer puts its own head on top, with a dropout only when asked (--dropout).
    model.classifier = model.classifier[:5]
    return model


def _resnet_body(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim


def layer_names(backbone: Backbone) -> list[str]:
    """Names usable as ``layer``: the body's graph nodes (``layer4.1.relu_1``, ``classifier.3``, ``flatten``)
    and its modules (``layer3``: the output of the module's last node)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, nodes = get_graph_node_names(backbone.eval())
    names = [name[len("body."):] for name in nodes if name.startswith("body.")]
    known = set(names)
    return names + [name for name, _ in backbone.body.named_modules() if name and name not in known]


# --------------------------------------------------------------------------------------------- weights


def _torch_load(path: str, storage_options: dict[str, Any] | None = None) -> Any:
    source: Any = path
    if is_remote(path):
        fs, remote_path = url_to_fs(path, storage_options)
        if not fs.isfile(remote_path):
            raise FileNotFoundError(f"weights file not found: {path}")
        source = io.BytesIO(fs.cat_file(remote_path))
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError/EOFError for unusable files
        raise WeightsMismatchError(f"{path} cannot be loaded as tensors with weights_only=True: "
                                   f"{type(exc).__name__}: {exc}") from exc


def load_weights(backbone: Backbone, path: str) -> None:
    """Load a state dict file (torchvision layout or ``Backbone.state_dict()``) into ``backbone``.

    Raises:
        WeightsMismatchError: the file is not a state dict, or its tensors do not match the backbone.
    """
    state = _torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path} is not a state dict of tensors (for a trainer checkpoint use "
                                   "--checkpoint)")
    if not any(key.startswith("body.") for key in state):
        state = {f"body.{k}": v for k, v in state.items() if not k.startswith(backbone.head_prefixes)}
        if backbone.has_sobel:
            state.update({k: v for k, v in backbone.state_dict().items() if k.startswith("sobel.")})
    _load_exact(backbone, state, path)


def checkpoint_file(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """The checkpoint file of ``path`` (local or remote): the path itself, or ``checkpoint.pt`` inside a run
    folder."""
    if is_remote(path):
        fs, remote_path = url_to_fs(path, storage_options)
        return join(path, "checkpoint.pt") if fs.isdir(remote_path) else path
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


def read_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> tuple[str, bool, dict[str, torch.Tensor]]:
    """Read a trainer checkpoint (a file, or a run folder holding ``checkpoint.pt``; local or remote).

    Returns:
        ``(arch, sobel, backbone_state_dict)``.
    """
    path = checkpoint_file(path, storage_options)
    checkpoint = _torch_load(path, storage_options)
    if not isinstance(checkpoint, dict) or not {"arch", "sobel", "backbone"} <= set(checkpoint):
        raise WeightsMismatchError(f"{path} is not a trainer checkpoint: expected a dict with 'arch', 'sobel' "
                                   "and 'backbone' (a plain state dict goes to --weights)")
    arch, sobel = checkpoint["arch"], bool(checkpoint["sobel"])
    if arch not in ARCHS:
        raise WeightsMismatchError(f"{path}: unknown architecture {arch!r}")
    return arch, sobel, checkpoint["backbone"]


def load_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> Backbone:
    """Build the backbone described by a trainer checkpoint (local or remote) and load its weights."""
    arch, sobel, state = read_checkpoint(path, storage_options)
    backbone, _ = build_backbone(arch, sobel)
    _load_exact(backbone, state, path)
    return backbone


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's weights (names, dtypes, shapes and values), independent of the file they came from
    (a trainer checkpoint also holds optimizer state, epoch and metrics, which change what it hashes to)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_exact(backbone: Backbone, state: dict[str, torch.Tensor], path: str) -> None:
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        details = "; ".join(part for part in (
            f"missing {_few(missing)}" if missing else "",
            f"unexpected {_few(unexpected)}" if unexpected else "",
            f"wrong shapes {_few(shapes)}" if shapes else "") if part)
        raise WeightsMismatchError(f"{path} does not match {backbone.arch} (sobel={backbone.has_sobel}): {details}")
    backbone.load_state_dict(state, strict=True)


def _few(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------- extractor


class FeatureExtractor(nn.Module):
    """uint8 images ``(B, 3, H, W)`` -> float features ``(B, dim)`` at a named layer of a backbone.

    Normalisation (``/255``, ImageNet mean/std) happens inside, so decoding workers ship compact uint8
    tensors. A 4-D layer output is global-average-pooled. Default layers run the backbone directly; other
    layers use a torch.fx graph truncated after the layer (torchvision's ``create_feature_extractor``).
    """

    def __init__(self, backbone: Backbone, layer: str | None = None) -> None:
        super().__init__()
        self.layer = layer or default_layer(backbone.arch)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.trunk = _truncate(backbone.eval(), self.layer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        out = self.trunk(x)
        if out.dim() == 4:
            out = out.mean(dim=(2, 3))
        elif out.dim() != 2:
            raise ValueError(f"layer {self.layer!r} gives a {out.dim()}-D tensor; pick a 2-D or 4-D layer")
        return out


class _VggFc7(nn.Module):
    """A vgg16_bn backbone up to fc7, before its ReLU (the default VGG feature, as in DeepCluster)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.backbone.body
        x = torch.flatten(body.avgpool(body.features(self.backbone.sobel(x))), 1)
        return body.classifier[:4](x)


class _GraphLayer(nn.Module):
    """The backbone's fx graph cut after ``layer``."""

    def __init__(self, backbone: Backbone, layer: str) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        self.graph = create_feature_extractor(backbone, return_nodes={f"body.{layer}": "feature"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)["feature"]


def default_layer(arch: str) -> str:
    """The default feature's layer name: :data:`DEFAULT_LAYERS`, or ``output`` (the backbone's output, the input of
    the dropped classifier) for other torchvision models."""
    return DEFAULT_LAYERS.get(arch, OUTPUT_LAYER)


def _truncate(backbone: Backbone, layer: str) -> nn.Module:
    if layer == default_layer(backbone.arch):
        return _VggFc7(backbone) if backbone.arch == "vgg16_bn" else backbone
    names = layer_names(backbone)
    if layer not in names:
        raise ValueError(f"unknown layer {layer!r} for {backbone.arch}; choose one of: {', '.join(names)}")
    return _GraphLayer(backbone, layer)


def feature_dim(extractor: FeatureExtractor, image_size: int) -> int:
    """Dimension of the extractor's output for ``image_size`` inputs (one dry run on a zero image)."""
    device = extractor.mean.device
    with torch.inference_mode():
        return int(extractor(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)).shape[1])
