"""What ``--model`` names: an architecture, torchvision's pretrained weights, a TorchScript file, or a Python
entry point returning a model; and how each becomes a feature extractor with a record of what was used.

Forms of ``--model`` (:func:`parse_model_spec`), tried in this order:

======================================= ==================================================================
``resnet18`` (``small``, ``resnet50``,  one of :data:`dataengine.models.ARCHS`: randomly initialised (seeded) unless
``vgg16_bn``)                           ``--weights FILE`` (a local state dict) or ``--checkpoint RUN`` is given
``resnet50:IMAGENET1K_V2``              torchvision weights (``ARCH:WEIGHTS``, any torchvision classification model
                                        and any member of its weights enum, or ``DEFAULT``), read from the torch hub
                                        cache only: ``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``
                                        (``~/.cache/torch`` by default). Nothing is downloaded: when the file is
                                        absent, a one-line error names the expected path and the URL to fetch it
                                        from elsewhere. A torchvision model name alone (``vit_b_16``) is that
                                        model randomly initialised.
``path/to/model.pt``                    a TorchScript file (``torch.jit.save``), loaded with ``torch.jit.load``
``package.module:function``             a Python entry point: ``function()`` is called once and returns a
                                        ``torch.nn.Module`` (DINOv2, CLIP, ... models the user installed)
======================================= ==================================================================

``NAME:X`` is read as torchvision weights whenever ``NAME`` is a torchvision model (an unknown ``X`` is an error
listing its weights); anything else with a colon is an entry point, so a module named like a torchvision model
cannot be an entry point.

Contract of TorchScript and entry-point models (the network sees what dataengine's own models see):

* Input: float32 ``(B, 3, H, W)`` RGB, ``H = W = --image-size`` after resizing the shorter side to
  ``--resize-size`` and center-cropping, normalised as ``(pixels / 255 - mean) / std`` with ImageNet's
  mean/std, unless the module has attributes ``input_mean`` and ``input_std`` (three floats each, in the
  ``[0, 1]`` pixel scale: CLIP's are ``(0.4815, 0.4578, 0.4082)`` / ``(0.2686, 0.2613, 0.2758)``). A traced
  TorchScript module loses its Python attributes: save it with
  ``torch.jit.save(m, path, _extra_files={"dataengine.json": '{"input_mean": [...], "input_std": [...]}'})``.
* Output: ``(B, D)`` features, used as they are, or ``(B, C, h, w)``, global-average-pooled to ``(B, C)``.
  The feature is whatever the module returns (its "layer" is recorded as ``output``); ``--layer`` and
  ``--sobel`` apply to dataengine's architectures and torchvision models only. For DINOv2 the hub model
  returns the final-norm CLS token (``(B, 384)`` for ViT-S/14); for CLIP return ``model.visual`` (the image
  embedding, before the text projection is applied to texts). Sizes must suit the model (multiples of 14 for
  DINOv2 ViT-*/14, 224 for CLIP ViT-B/32).
* The module runs in ``eval()`` mode under ``torch.inference_mode`` on the embed device.

Every built model comes with a :class:`ModelRecord` (name, kind, source, sha256 of the weights as tensors
and of the weights file when there is one), stored in the feature store's ``model`` attribute.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dataengine.models import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    build_backbone,
    load_weights,
    weights_digest,
)

logger = logging.getLogger(__name__)

KINDS = ("arch", "torchvision", "torchscript", "entry")
_ENTRY = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_EXTRA_FILE = "dataengine.json"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value.

    Attributes:
        text: the value as given.
        kind: one of :data:`KINDS`.
        arch: architecture (dataengine's or torchvision's) for ``arch``/``torchvision``.
        weights: torchvision weights enum member (``IMAGENET1K_V2``), ``None`` for a random init.
        path: TorchScript file.
        entry: ``module:function``.
    """

    text: str
    kind: str
    arch: str | None = None
    weights: str | None = None
    path: str | None = None
    entry: str | None = None

    @property
    def pretrained(self) -> bool:
        """True when the spec itself names weights (torchvision weights, TorchScript, entry point)."""
        return self.kind in ("torchscript", "entry") or (self.kind == "torchvision" and self.weights is not None)


@dataclass(frozen=True)
class ModelRecord:
    """What a feature extractor was built from (the feature store's ``model`` attribute)."""

    name: str
    """The ``--model`` value (``resnet50:IMAGENET1K_V2``, a file, ``module:function``)."""
    kind: str
    """``arch``, ``torchvision``, ``torchscript`` or ``entry``."""
    source: str
    """Where the weights came from: a file path, ``module:function``, or ``random init (seed S)``."""
    weights_sha256: str
    """sha256 of the weights as tensors (names, dtypes, shapes, values): :func:`models.weights_digest`."""
    file_sha256: str | None = None
    """sha256 of the weights file, when they came from one."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models (``resnet50``, ``vit_b_16``, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def parse_model_spec(text: str) -> ModelSpec:
    """Parse a ``--model`` value without loading anything (see the module docstring for the forms).

    Raises:
        ValueError: the value names nothing dataengine can build (the message lists the forms).
        FileNotFoundError: it looks like a model file that does not exist.
    """
    text = text.strip()
    if text in ARCHS:
        return ModelSpec(text, "arch", arch=text)
    name, colon, weights = text.partition(":")
    if name in torchvision_models():
        if not colon:
            return ModelSpec(text, "torchvision", arch=name)
        if weights in _weight_names(name):
            return ModelSpec(text, "torchvision", arch=name, weights=weights)
        raise ValueError(f"--model {text!r}: {name} has weights {', '.join(_weight_names(name)) or '(none)'}")
    if os.path.isfile(text):
        return ModelSpec(text, "torchscript", path=text)
    if _ENTRY.match(text):
        return ModelSpec(text, "entry", entry=text)
    if text.endswith((".pt", ".pth", ".ts", ".jit")) or os.sep in text:
        raise FileNotFoundError(f"model file not found: {text}")
    raise ValueError(f"--model {text!r} is not an architecture ({', '.join(ARCHS)}), torchvision weights "
                     "(ARCH:WEIGHTS), a TorchScript file or a module:function entry point")


def names_pretrained_model(text: str) -> bool:
    """True when ``text`` is a pretrained ``--model`` (torchvision weights, a TorchScript file, an entry point)
    rather than a trainer checkpoint (a run folder, or a file that is not TorchScript)."""
    if os.path.isdir(text):
        return False
    if os.path.isfile(text):
        return _is_torchscript(text)
    try:
        return parse_model_spec(text).pretrained
    except (ValueError, FileNotFoundError):
        return False


def _weight_names(arch: str) -> list[str]:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:  # a model without pretrained weights
        return []
    return ["DEFAULT"] + [member.name for member in enum]


def _weights_enum(spec: ModelSpec) -> Any:
    import torchvision

    enum = torchvision.models.get_model_weights(spec.arch)
    return enum.DEFAULT if spec.weights == "DEFAULT" else enum[spec.weights]


def hub_cache_path(spec: ModelSpec) -> tuple[str, str]:
    """``(expected path in the torch hub cache, download URL)`` of a torchvision weights spec."""
    url = _weights_enum(spec).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0])), url


# --------------------------------------------------------------------------------------------- building


class ExternalExtractor(nn.Module):
    """A TorchScript or entry-point model behind dataengine's input contract: uint8 ``(B, 3, H, W)`` in,
    normalised inside (``input_mean``/``input_std`` of the model, else ImageNet's), ``(B, D)`` out."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.layer = "output"
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model((images.float() - self.mean) / self.std)
        if isinstance(out, (tuple, list)):
            raise ValueError(f"the model returned a {type(out).__name__}; it must return one tensor (B, D)")
        if out.dim() == 4:
            out = out.mean(dim=(2, 3))
        elif out.dim() != 2:
            raise ValueError(f"the model returned a {out.dim()}-D tensor; it must return (B, D) or (B, C, h, w)")
        return out


def build_arch_backbone(spec: ModelSpec, sobel: bool, seed: int,
                        weights_file: str | None = None) -> tuple[Backbone, ModelRecord]:
    """A :class:`Backbone` for an ``arch`` or ``torchvision`` spec, with its record.

    Args:
        spec: a parsed spec of kind ``arch`` or ``torchvision``.
        sobel: the fixed grayscale + Sobel input layer (random or ``weights_file`` init only).
        seed: torch's RNG is seeded with it before building (reproducible random init).
        weights_file: a local state dict (``--weights``), for a spec without weights of its own.

    Raises:
        FileNotFoundError: torchvision weights absent from the hub cache (the message names the path).
        ValueError: ``sobel`` or ``weights_file`` together with pretrained torchvision weights.
        dataengine.models.WeightsMismatchError: a weights file that does not fit the architecture.
    """
    if spec.kind not in ("arch", "torchvision"):
        raise ValueError(f"{spec.text} is a {spec.kind} model, not an architecture")
    if spec.weights and (sobel or weights_file):
        raise ValueError(f"{spec.text} names its weights: drop " + ("--sobel (they take RGB input)" if sobel
                                                                    else "--weights"))
    torch.manual_seed(seed)
    backbone = build_backbone(spec.arch, sobel)[0] if spec.arch in ARCHS else _torchvision_backbone(spec, sobel)
    path = weights_file
    if spec.weights:
        path, url = hub_cache_path(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{spec.text}: weights not in the torch hub cache, expected {path} (nothing is "
                                    f"downloaded: fetch {url} elsewhere and copy it there, or set TORCH_HOME)")
    if path is None:
        return backbone, ModelRecord(spec.text, spec.kind, f"random init (seed {seed})", weights_digest(backbone))
    load_weights(backbone, path)
    file_sha = file_sha256(path)
    if spec.weights:
        _check_hash_prefix(path, file_sha)
    return backbone, ModelRecord(spec.text, spec.kind, os.path.abspath(path), weights_digest(backbone), file_sha)


def _torchvision_backbone(spec: ModelSpec, sobel: bool) -> Backbone:
    """Any torchvision classification model with its last linear layer (the classifier) made an identity: the
    feature is that layer's input, the penultimate representation."""
    import torchvision

    if sobel:
        raise ValueError(f"--sobel works with {', '.join(ARCHS)} only, not {spec.arch}")
    model = torchvision.models.get_model(spec.arch, weights=None)
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{spec.arch} ends without a linear classifier; pick a feature with --layer on one of "
                         f"{', '.join(ARCHS)}, or wrap it in a module:function entry point")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    dim = parent.get_submodule(child).in_features
    setattr(parent, child, nn.Identity())
    return Backbone(spec.arch, model, dim, sobel=False, head_prefixes=(f"{last}.",))


def _check_hash_prefix(path: str, sha: str) -> None:
    """torchvision file names end with the first hex digits of the file's sha256; say when they differ."""
    match = re.search(r"-([0-9a-f]{6,})\.", os.path.basename(path))
    if match and not sha.startswith(match.group(1)):
        logger.warning("%s: sha256 %s... does not start with the %s its name announces (a replaced or corrupt "
                       "file?)", path, sha[:12], match.group(1))


def build_external(spec: ModelSpec) -> tuple[ExternalExtractor, ModelRecord]:
    """The extractor and record of a ``torchscript`` or ``entry`` spec.

    Raises:
        ValueError: the entry point cannot be imported or called, or does not return a module; the file is
            not TorchScript.
    """
    if spec.kind == "torchscript":
        model, extra = _load_torchscript(spec.path)
        source, file_sha = os.path.abspath(spec.path), file_sha256(spec.path)
    elif spec.kind == "entry":
        model, extra, source, file_sha = _call_entry(spec.entry), {}, spec.entry, None
    else:
        raise ValueError(f"{spec.text} is a {spec.kind} model; build it with build_arch_backbone")
    mean = _triple(spec, "input_mean", getattr(model, "input_mean", extra.get("input_mean")), IMAGENET_MEAN)
    std = _triple(spec, "input_std", getattr(model, "input_std", extra.get("input_std")), IMAGENET_STD)
    extractor = ExternalExtractor(model, mean, std)
    return extractor, ModelRecord(spec.text, spec.kind, source, weights_digest(model), file_sha)


def _triple(spec: ModelSpec, name: str, value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    if value is None:
        return tuple(default)
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise ValueError(f"{spec.text}: {name} must be three floats (R, G, B in the [0, 1] scale), got {value!r}")
    return values


def _load_torchscript(path: str) -> tuple[nn.Module, dict[str, Any]]:
    if not _is_torchscript(path):
        raise ValueError(f"{path} is not a TorchScript file (torch.jit.save); a state dict goes to --weights FILE "
                         "with --model ARCH")
    extra = {_EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; its files still load
            model = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError and others for unusable archives
        raise ValueError(f"{path} cannot be loaded as TorchScript: {type(exc).__name__}: {exc}") from exc
    try:
        meta = json.loads(extra[_EXTRA_FILE] or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its {_EXTRA_FILE} is not JSON: {exc}") from exc
    return model, meta if isinstance(meta, dict) else {}


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip holding ``<name>/code/``; a ``torch.save`` file has no code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _call_entry(entry: str) -> nn.Module:
    module_name, _, function_name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {entry}: cannot import {module_name!r} ({exc}); install it or put it on "
                         "PYTHONPATH") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--model {entry}: {module_name} has no function {function_name!r}")
    try:
        model = function()
    except Exception as exc:  # the user's code: report it on one line rather than as a traceback
        raise ValueError(f"--model {entry}: {function_name}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {entry}: {function_name}() returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
