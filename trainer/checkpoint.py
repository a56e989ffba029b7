"""The run's checkpoint file: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint (``RUN/checkpoint.pt``) is a flat dict of tensors and plain values: the backbone's and the head's
state dicts, the optimizer's, ``epoch``/``step``/``total_steps``, the names of the clustering in use and of
the previous one, the torch RNG state, the seconds of the budget spent, the metrics so far and the run's
configuration (both as JSON), and ``arch``/``sobel`` so that ``dataengine embed --checkpoint RUN`` can build
the backbone.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from trainer.config import TrainConfig

CHECKPOINT_FORMAT = "trainer.checkpoint"
CHECKPOINT_VERSION = 2
"""2: the configuration by section (:meth:`TrainConfig.to_dict`); 1: one flat mapping (still read)."""


def checkpoint_path(out: str) -> str:
    return os.path.join(out, "checkpoint.pt")


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary then rename: a kill never leaves a torn file under ``path``."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def config_json(config: TrainConfig) -> str:
    """The configuration as the checkpoint stores it (tuples become lists)."""
    return json.dumps(config.to_dict())


def read_checkpoint_state(path: str, config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (``None`` when there is none), checked to belong to a run of ``config``.

    Raises:
        ValueError: the file is not a trainer checkpoint, or was written by another configuration.
    """
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a trainer checkpoint; use another --out")
    if _stored_config(state, path) != json.loads(config_json(config)):
        raise ValueError(f"{path} was written by another configuration; use another --out")
    return state


def _stored_config(state: dict[str, Any], path: str) -> dict[str, Any]:
    """The checkpoint's configuration by section, as :func:`config_json` writes it (a version-1 checkpoint's
    flat mapping is read into sections)."""
    stored = json.loads(state["config"])
    version = state.get("version", 1)
    if version == CHECKPOINT_VERSION:
        return stored
    if version != 1:
        raise ValueError(f"{path} is a trainer checkpoint of version {version}; this trainer reads versions 1 "
                         f"and {CHECKPOINT_VERSION}")
    try:
        return json.loads(config_json(TrainConfig.from_flat(stored)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the stored configuration (checkpoint version 1, one flat mapping) cannot be "
                         f"read ({exc}); use another --out") from exc
