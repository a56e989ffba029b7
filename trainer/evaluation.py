"""Evaluation of frozen features: a linear probe and a k-NN classifier on a labelled train/test split.

:func:`run_eval` embeds two ingest outputs (made from class folders, so that every sample has a ``label``)
with the embed stage: the backbone's default feature (:data:`dataengine.models.DEFAULT_LAYERS`, or
``layer``), stored as float32, from a trainer checkpoint or a seeded random initialisation (the baseline a
trained network must beat). Labels of both splits are mapped to one class index by name (the sorted train
classes), and it reports top-1 accuracy on the test split of:

* a **linear probe**: features standardised with the train split's mean and std, then an L2-regularised
  multinomial logistic regression (one linear layer, cross-entropy + ``weight_decay / 2 * ||W||^2``) fitted
  full batch by L-BFGS from zero weights: a convex problem, so no seed, learning rate or batch order;
* a **weighted k-NN** classifier: cosine similarity of l2-normalised features (not standardised), the ``k``
  most similar train rows vote with weight ``exp(similarity / T)`` (``T = 0.07``, the weighted vote of Wu et
  al. 2018 and DINO); the class with the largest total wins (ties: the smaller class index).

Rows whose image could not be decoded (``valid`` False in the store) or that have no label are left out of
their split and counted. Test rows whose class is absent from the train split stay in: no classifier can
predict them, so they count as errors (their classes are reported). A test split sharing no class with the
train split, or a train split with fewer than two classes, is an error; it is detected from the ingests'
``metadata.parquet`` before anything is embedded.

With ``out`` the two feature stores live in ``OUT/features/train`` and ``OUT/features/test`` (a re-run with
the same model reuses them: the embed stage skips complete stores) and the result is written to
``OUT/eval.json``; without it they go to a temporary folder removed at the end. On CPU the result is
deterministic for a given seed, thread count and input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataengine.models import ARCHS, resolve_device

logger = logging.getLogger(__name__)

# Largest (test rows x train rows) similarity block the k-NN computes at once (float32: 128 MiB).
KNN_BLOCK_ELEMENTS = 1 << 25
# Feature dimensions whose train std is below this are constant: they are centred but not scaled.
MIN_STD = 1e-6


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Configuration of one evaluation (linear probe + k-NN) of a network's frozen features."""

    train: str
    """Labelled ingest output the classifiers are fitted on (local path or fsspec URL)."""
    test: str
    """Labelled ingest output the top-1 accuracies are measured on."""
    checkpoint: str | None = None
    """Trainer checkpoint file (or run folder holding ``checkpoint.pt``); exclusive with ``random``."""
    random: bool = False
    """Evaluate a randomly initialised network (seeded with ``seed``) instead of a checkpoint."""
    arch: str | None = None
    """Architecture; ``None`` = the checkpoint's, or ``small`` with ``random``. Any ``--model`` of embed
    (:mod:`dataengine.pretrained`) is accepted: a pretrained one (``resnet50:IMAGENET1K_V2``, a TorchScript
    file, ``module:function``) is evaluated as it is, without ``checkpoint`` or ``random``."""
    sobel: bool = False
    """Random init: put the fixed grayscale + Sobel layer in front (a checkpoint says for itself)."""
    layer: str | None = None
    """Feature layer (global-average-pooled when 4-D); ``None`` = the architecture's default feature."""
    image_size: int = 224
    """Side of the square center crop fed to the network."""
    resize_size: int | None = None
    """Shorter side before the crop; ``None`` = ``image_size`` up to 64 px, else ``image_size * 256 / 224``
    (the rule the trainer's embeddings use)."""
    out: str | None = None
    """Folder for the feature stores and ``eval.json``; ``None`` = a temporary folder, removed at the end."""
    batch_size: int | None = None
    """Images per forward pass when embedding; ``None`` = the embed stage's automatic choice."""
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    """DataLoader worker processes decoding images; 0 decodes in the main process."""
    seed: int = 0
    """Seed of the random initialisation (the classifiers themselves use no randomness)."""
    weight_decay: float = 5e-3
    """L2 penalty on the linear probe's weights (its only hyper-parameter)."""
    probe_iterations: int = 300
    """L-BFGS iterations of the linear probe at most (it stops earlier once converged)."""
    knn_k: int = 20
    """Neighbours voting in the k-NN classifier."""
    knn_temperature: float = 0.07
    """Temperature ``T`` of the k-NN vote weights ``exp(similarity / T)``."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available): embedding and classifiers."""
    num_threads: int | None = None
    """torch intra-op threads; ``None`` leaves torch's default."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for remote ingests and stores (``endpoint_url``, ``key``, ``secret``...)."""
    overwrite: bool = False
    """Replace feature stores in ``out`` made by another model or configuration instead of raising."""

    def __post_init__(self) -> None:
        from dataengine.pretrained import parse_model_spec

        pretrained = self.arch is not None and self.arch not in ARCHS and parse_model_spec(self.arch).pretrained
        if bool(self.checkpoint) + self.random + pretrained != 1:
            raise ValueError("give exactly one of checkpoint=CKPT, random=True or a pretrained arch (got "
                             f"checkpoint={self.checkpoint!r}, random={self.random}, arch={self.arch!r})")
        for name in ("image_size", "probe_iterations", "knn_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None for automatic), got {getattr(self, name)}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature must be > 0, got {self.knn_temperature}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    @property
    def resolved_resize_size(self) -> int:
        """``resize_size``, or the trainer's rule: no resize margin for small images, 256/224 otherwise."""
        if self.resize_size is not None:
            return self.resize_size
        return self.image_size if self.image_size <= 64 else round(self.image_size * 256 / 224)

    def to_dict(self) -> dict[str, Any]:
        """The configuration without ``storage_options`` (they may hold secrets)."""
        values = dataclasses.asdict(self)
        values.pop("storage_options")
        return values


@dataclass
class EvalResult:
    """Accuracies and counts of one evaluation."""

    linear_top1: float
    """Top-1 accuracy of the linear probe on the test split."""
    knn_top1: float
    """Top-1 accuracy of the weighted k-NN classifier on the test split."""
    linear_train_top1: float
    """Top-1 accuracy of the linear probe on its own train split (to spot under/over-fitting)."""
    num_train: int
    """Train rows used (valid and labelled)."""
    num_test: int
    """Test rows scored (valid and labelled, unseen classes included)."""
    num_classes: int
    """Classes of the train split (the classifiers' outputs)."""
    feature_dim: int
    """Dimension of the evaluated features."""
    num_skipped_train: int
    """Train rows left out: undecodable image or no label."""
    num_skipped_test: int
    """Test rows left out: undecodable image or no label."""
    num_test_unseen: int
    """Test rows whose class is absent from the train split (counted as errors)."""
    unseen_classes: list[str]
    """Those classes."""
    model: dict[str, Any]
    """Architecture, Sobel layer, feature layer and initialisation (as recorded by the embed stage)."""
    knn_k: int
    """Neighbours voting."""
    seconds: float
    """Wall-clock time of the whole evaluation."""
    embed_seconds: float
    """Of which embedding both splits (near 0 when ``out`` already held complete stores)."""
    linear_seconds: float
    """Of which training and applying the linear probe."""
    knn_seconds: float
    """Of which the k-NN classification."""
    out: str | None = None
    """Folder holding the feature stores and ``eval.json`` (``None`` when temporary)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelledFeatures:
    """The usable rows of one split.

    Attributes:
        features: ``(n, d)`` float32.
        labels: ``(n,)`` class names (object array of str).
        num_skipped: rows left out (undecodable image or no label).
    """

    features: np.ndarray
    labels: np.ndarray
    num_skipped: int


def ingest_labels(url: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """The distinct non-null ``label`` values of an ingest output (read from its ``metadata.parquet``).

    Raises:
        ValueError: the ingest has no labels (it was not made from class folders).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dataengine.fs import open_input
    from dataengine.shards import load_shard_set

    shard_set = load_shard_set(url, storage_options)
    with open_input(shard_set.metadata_url, shard_set.storage_options) as handle:
        labels = pq.read_table(handle, columns=["label"]).column("label")  # every ingest has it (null for YFCC)
    names = {v for v in pc.unique(labels).to_pylist() if v is not None}
    if not names:
        raise ValueError(f"{url} has no labels: evaluation needs an ingest of class folders "
                         "(`dataengine ingest --images ROOT` with one sub-folder per class)")
    return names


def check_classes(train: set[str], test: set[str]) -> tuple[list[str], list[str]]:
    """Check that a train/test pair of class sets can be evaluated.

    Returns:
        ``(classes, unseen)``: the sorted train classes (class ``i`` is ``classes[i]``) and the sorted test
        classes absent from the train split.

    Raises:
        ValueError: fewer than two train classes, or no test class among the train classes.
    """
    classes = sorted(train)
    if len(classes) < 2:
        raise ValueError(f"the train split has {len(classes)} class ({', '.join(classes)}); a classifier needs "
                         "at least 2")
    unseen = sorted(test - train)
    if len(unseen) == len(test):
        raise ValueError(f"label mismatch: none of the test classes ({_few(sorted(test))}) is a train class "
                         f"({_few(classes)}); evaluate splits of the same label set")
    if unseen:
        logger.warning("%d test classes are absent from the train split (their rows count as errors): %s",
                       len(unseen), _few(unseen))
    return classes, unseen


def _few(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_labelled_features(url: str, storage_options: dict[str, Any] | None = None) -> LabelledFeatures:
    """The valid, labelled rows of a complete feature store, as float32 features and class names.

    Raises:
        ValueError: the store has no ``label`` column.
    """
    from dataengine.store import open_store

    store = open_store(url, storage_options)
    try:
        column = store.metadata("label")
    except KeyError:
        raise ValueError(f"{url} has no label column: evaluation needs an ingest of class folders") from None
    keep = store.valid & (column.codes >= 0)
    features = np.asarray(store.features[:], dtype=np.float32)[keep]
    labels = np.asarray(column.vocab, dtype=object)[column.codes[keep]]
    num_skipped = int(len(keep) - keep.sum())
    if num_skipped:
        logger.info("%s: %d of %d rows left out (undecodable image or no label)", url, num_skipped, len(keep))
    return LabelledFeatures(features, labels, num_skipped)


def class_targets(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """Class index of every label; ``-1`` for labels outside ``classes`` (never predicted: always an error)."""
    index = {name: i for i, name in enumerate(classes)}
    return np.asarray([index.get(name, -1) for name in labels.tolist()], dtype=np.int64)


# --------------------------------------------------------------------------------------------- classifiers


@dataclass
class LinearProbe:
    """A linear classifier on standardised features: ``logits = W ((x - mean) / std) + b``."""

    mean: torch.Tensor
    std: torch.Tensor
    layer: nn.Linear

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted class of every row of ``features`` (``(n, d)`` float32)."""
        device = self.mean.device
        predictions = []
        with torch.no_grad():
            for start in range(0, len(features), 65536):
                x = torch.from_numpy(features[start:start + 65536]).to(device)
                predictions.append(self.layer((x - self.mean) / self.std).argmax(dim=1).cpu())
        return torch.cat(predictions).numpy() if predictions else np.zeros(0, np.int64)


def train_linear_probe(features: np.ndarray, targets: np.ndarray, num_classes: int, *,
                       weight_decay: float = 5e-3, max_iterations: int = 300,
                       device: str | torch.device = "cpu") -> LinearProbe:
    """Fit an L2-regularised multinomial logistic regression on standardised features, full batch, by L-BFGS.

    Minimises ``mean cross-entropy + weight_decay / 2 * ||W||^2`` (bias not penalised) from zero weights. The
    problem is convex, so the result depends on the data and ``weight_decay`` only (not on a seed, a learning
    rate or a batch order), and full-batch steps keep the cost in a few hundred large matrix products.

    Args:
        features: ``(n, d)`` float32 train features (held in memory, with one standardised copy).
        targets: ``(n,)`` int64 class indices in ``[0, num_classes)``.
        num_classes: outputs of the classifier.
        weight_decay: L2 penalty on the weights.
        max_iterations: L-BFGS iterations at most (it stops earlier once converged).
        device: where to train.
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64)).to(device)
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    std = torch.where(std > MIN_STD, std, torch.ones_like(std))
    x = (x - mean) / std
    layer = nn.Linear(x.shape[1], num_classes).to(device)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    _lbfgs(layer, x, y, weight_decay=weight_decay, max_iterations=max_iterations)
    return LinearProbe(mean, std, layer.eval())


def _lbfgs(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float, max_iterations: int) -> None:
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iterations, history_size=10,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state_dict()["state"][0]
    logger.info("linear probe: %d L-BFGS iterations (at most %d), %d evaluations", state["n_iter"], max_iterations,
                state["func_evals"])


def knn_predict(train_features: np.ndarray, train_targets: np.ndarray, test_features: np.ndarray,
                num_classes: int, *, k: int = 20, temperature: float = 0.07,
                device: str | torch.device = "cpu") -> np.ndarray:
    """Weighted k-NN vote on cosine similarity (see the module docstring).

    Args:
        train_features: ``(n, d)`` float32.
        train_targets: ``(n,)`` int64 class indices in ``[0, num_classes)``.
        test_features: ``(m, d)`` float32.
        num_classes: classes voted for.
        k: neighbours per test row (at most ``n``).
        temperature: vote weight ``exp(similarity / temperature)``.
        device: where to compute.

    Returns:
        ``(m,)`` int64 predicted classes.
    """
    if not 1 <= k <= len(train_features):
        raise ValueError(f"knn k must be within [1, {len(train_features)}] (the train rows), got {k}")
    train = F.normalize(torch.from_numpy(np.ascontiguousarray(train_features, dtype=np.float32)).to(device), dim=1)
    targets = torch.from_numpy(np.asarray(train_targets, dtype=np.int64)).to(device)
    rows = max(1, KNN_BLOCK_ELEMENTS // len(train))
    predictions = []
    for start in range(0, len(test_features), rows):
        test = torch.from_numpy(np.ascontiguousarray(test_features[start:start + rows], dtype=np.float32))
        similarity, neighbours = (F.normalize(test.to(device), dim=1) @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes, device=train.device)
        votes.scatter_add_(1, targets[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1).cpu())  # argmax takes the first maximum: ties -> smaller class
    return torch.cat(predictions).numpy() if predictions else np.zeros(0, np.int64)


def top1(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of rows whose prediction equals the target (targets ``-1`` are always wrong)."""
    if len(targets) == 0:
        raise ValueError("no rows to score")
    return float(np.mean(np.asarray(predictions) == np.asarray(targets)))


# --------------------------------------------------------------------------------------------- run


def run_eval(config: EvalConfig, progress: Callable[[int], None] | None = None) -> EvalResult:
    """Embed both splits, fit the linear probe and the k-NN classifier on ``train``, score them on ``test``.

    Args:
        config: what to evaluate and how.
        progress: called with the number of rows of each embedded block (both splits, train first).

    Raises:
        ValueError: bad labels (see :func:`check_classes`), or a checkpoint that does not fit ``arch``.
        IncompleteOutputError: an ingest output has no manifest.
        OutputExistsError: ``out`` holds feature stores of another model (and not ``overwrite``).
        WeightsMismatchError: the checkpoint cannot be loaded.
    """
    start = time.perf_counter()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    classes, unseen = check_classes(ingest_labels(config.train, config.storage_options),
                                    ingest_labels(config.test, config.storage_options))
    with _work_dir(config.out) as work:
        stores = {split: _embed_split(config, split, work, progress) for split in ("train", "test")}
        embed_seconds = time.perf_counter() - start
        train, test = (load_labelled_features(stores[s], config.storage_options) for s in ("train", "test"))
        model = _model_info(stores["train"], config.storage_options)
    result = _classify(config, train, test, classes, unseen, model)
    result.embed_seconds = embed_seconds
    result.seconds = time.perf_counter() - start
    if config.out:
        _write_result(config, result)
    logger.info("linear top-1 %.4f, k-NN top-1 %.4f (%d train, %d test rows, %d classes)", result.linear_top1,
                result.knn_top1, result.num_train, result.num_test, result.num_classes)
    return result


@contextlib.contextmanager
def _work_dir(out: str | None) -> Iterator[str]:
    if out:
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="dataengine-eval-") as folder:
        yield folder


def _embed_split(config: EvalConfig, split: str, work: str, progress: Callable[[int], None] | None) -> str:
    """Embed one split into ``WORK/features/<split>`` (float32); returns the store's URL."""
    from dataengine.embed import EmbedConfig, run_embed
    from dataengine.fs import join

    store = join(work, "features", split)
    embed_config = EmbedConfig(
        shards=getattr(config, split), out=store, model=config.arch or (None if config.checkpoint else "small"),
        sobel=config.sobel, checkpoint=config.checkpoint, layer=config.layer, image_size=config.image_size,
        resize_size=config.resolved_resize_size, batch_size=config.batch_size, workers=config.workers,
        dtype="float32", seed=config.seed, device=config.device, num_threads=config.num_threads,
        storage_options=config.storage_options, overwrite=config.overwrite)
    result = run_embed(embed_config, progress=progress)
    logger.info("%s split: %d rows embedded in %.1f s (%d invalid)", split, result.computed_rows, result.seconds,
                result.num_invalid)
    return store


def _model_info(store_url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    from dataengine.store import open_store

    attrs = open_store(store_url, storage_options).attrs
    return dict(attrs["model"], layer=attrs["layer"])


def _classify(config: EvalConfig, train: LabelledFeatures, test: LabelledFeatures, classes: list[str],
              unseen: list[str], model: dict[str, Any]) -> EvalResult:
    """Fit and score both classifiers on the loaded splits (timings of the embedding filled in by the caller)."""
    device = resolve_device(config.device)
    train_y, test_y = class_targets(train.labels, classes), class_targets(test.labels, classes)
    clock = time.perf_counter()
    probe = train_linear_probe(train.features, train_y, len(classes), weight_decay=config.weight_decay,
                               max_iterations=config.probe_iterations, device=device)
    linear_top1 = top1(probe.predict(test.features), test_y)
    linear_train_top1 = top1(probe.predict(train.features), train_y)
    linear_seconds, clock = time.perf_counter() - clock, time.perf_counter()
    knn = knn_predict(train.features, train_y, test.features, len(classes), k=config.knn_k,
                      temperature=config.knn_temperature, device=device)
    return EvalResult(
        linear_top1=linear_top1, knn_top1=top1(knn, test_y), linear_train_top1=linear_train_top1,
        num_train=len(train_y), num_test=len(test_y), num_classes=len(classes),
        feature_dim=int(train.features.shape[1]), num_skipped_train=train.num_skipped,
        num_skipped_test=test.num_skipped, num_test_unseen=int((test_y < 0).sum()), unseen_classes=unseen,
        model=model, knn_k=config.knn_k, seconds=0.0, embed_seconds=0.0, linear_seconds=linear_seconds,
        knn_seconds=time.perf_counter() - clock, out=config.out)


def _write_result(config: EvalConfig, result: EvalResult) -> None:
    """``OUT/eval.json``: the result with the configuration that produced it."""
    from dataengine.fs import Location

    Location(config.out, config.storage_options).write_json(
        "eval.json", {"format": "trainer.eval", "version": 1, "config": config.to_dict(), "result": result.to_dict()})
