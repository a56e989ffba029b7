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
from collections.abc import Callable
from typing import Any

import torch

from trainer.config import SECTIONS, TrainConfig
from trainer.run_folder import RunFolder, remove_stale_temporaries, replace_durably

__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "checkpoint_path", "config_json",
           "read_checkpoint_state", "remove_stale_temporaries", "replace_durably", "save_atomic", "save_checkpoint"]

CHECKPOINT_FORMAT = "trainer.checkpoint"
CHECKPOINT_VERSION = 2
"""2: the configuration by section (:meth:`TrainConfig.to_dict`); 1: one flat mapping (still read)."""


CHECKPOINT_FILE = "checkpoint.pt"
IDENTITY_EXEMPT = ("out",)
"""Options that may differ between the run that wrote a checkpoint and the run that resumes it: the run folder
itself (a folder moved or copied elsewhere resumes there)."""


def checkpoint_path(out: str) -> str:
    """``RUN/checkpoint.pt`` of a local run folder."""
    return os.path.join(out, CHECKPOINT_FILE)


def save_atomic(obj: Any, path: str, before_rename: Callable[[], None] | None = None) -> None:
    """``torch.save`` ``obj`` to the local file ``path`` through :func:`replace_durably`."""
    replace_durably(path, lambda handle: torch.save(obj, handle), before_rename)


def save_checkpoint(folder: RunFolder, state: dict[str, Any], before_publish: Callable[[], None] | None = None,
                    on_part: Callable[[], None] | None = None) -> None:
    """Write ``RUN/checkpoint.pt`` whole (see :mod:`trainer.run_folder`)."""
    folder.save(CHECKPOINT_FILE, state, before_publish, on_part)


def config_json(config: TrainConfig) -> str:
    """The configuration as the checkpoint stores it (tuples become lists)."""
    return json.dumps(config.to_dict())


def read_checkpoint_state(folder: RunFolder, config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint of the run folder (``None`` when there is none), checked to belong to a run of ``config``
    (options in :data:`IDENTITY_EXEMPT` aside).

    Raises:
        ValueError: the file is not a trainer checkpoint, or was written by another configuration.
    """
    path = folder.child(CHECKPOINT_FILE)
    state = folder.load(CHECKPOINT_FILE)
    if state is None:
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a trainer checkpoint; use another --out")
    stored, wanted = _flat(_stored_config(state, path)), _flat(json.loads(config_json(config)))
    differ = sorted(key for key in set(stored) | set(wanted)
                    if key not in IDENTITY_EXEMPT and stored.get(key, "?") != wanted.get(key, "?"))
    if differ:
        raise ValueError(f"{path} was written by another configuration (differs in {', '.join(differ)}); "
                         "use another --out")
    return state


def _flat(by_section: dict[str, Any]) -> dict[str, Any]:
    """The stored configuration as one mapping of field names (they are unique over the sections)."""
    flat = {key: value for key, value in by_section.items() if key not in SECTIONS}
    for section in SECTIONS:
        flat.update(by_section.get(section) or {})
    return flat


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
