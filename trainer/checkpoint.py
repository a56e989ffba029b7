"""The run's checkpoint file: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint (``RUN/checkpoint.pt``) is a flat dict of tensors and plain values: the backbone's and the head's
state dicts, the optimizer's, ``epoch``/``step``/``total_steps``, the names of the clustering in use and of
the previous one, the torch RNG state, the seconds of the budget spent, the metrics so far and the run's
configuration (both as JSON), and ``arch``/``sobel`` so that ``dataengine embed --checkpoint RUN`` can build
the backbone.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from trainer.config import TrainConfig

CHECKPOINT_FORMAT = "trainer.checkpoint"
CHECKPOINT_VERSION = 2
"""2: the configuration by section (:meth:`TrainConfig.to_dict`); 1: one flat mapping (still read)."""


def checkpoint_path(out: str) -> str:
    return os.path.join(out, "checkpoint.pt")


def replace_durably(path: str, write: Callable[[BinaryIO], None],
                    before_rename: Callable[[], None] | None = None) -> None:
    """Write a file through ``write(handle)`` so that, whenever the process or the machine stops, ``path`` holds
    the old file or the whole new one, and once this returns the new one survives a power loss: a temporary
    in the same folder, flushed to disk, renamed over ``path``, then the folder's entry flushed too.

    ``before_rename`` is called once the temporary is on disk (tests stop the process there).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_atomic(obj: Any, path: str, before_rename: Callable[[], None] | None = None) -> None:
    """``torch.save`` ``obj`` to ``path`` through :func:`replace_durably`."""
    replace_durably(path, lambda handle: torch.save(obj, handle), before_rename)


def remove_stale_temporaries(folder: str) -> int:
    """Remove the temporaries :func:`replace_durably` leaves in ``folder`` when a process is killed before its
    rename (call with no writer running there); returns how many."""
    names = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")] \
        if os.path.isdir(folder) else []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    return len(names)


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
