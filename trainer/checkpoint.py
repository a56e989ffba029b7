"""The run's checkpoint: files written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is ``RUN/checkpoint.pt``, a flat dict of tensors and plain values: the backbone's and the
replicated head's state dicts and their optimizers' (``optimizer``: the backbone's, ``head_optimizer``),
``epoch``/``step``/``total_steps``, the names of the clustering in use and of the previous one, the torch RNG
states, the seconds of the budget spent, the metrics so far and the run's configuration (both as JSON),
``arch``/``sobel`` so that ``dataengine embed --checkpoint RUN`` can build the backbone, and ``sub_heads``
(DeeperCluster): where the sub-class heads are. Those are sharded over the ranks; every rank writes its shard
(weights and momentum, with the super-classes it holds) to ``RUN/sub_heads/<tag>/rank<r>.pt`` before rank 0
writes ``checkpoint.pt`` naming ``<tag>``, and the previous tag is removed only once the new checkpoint is on
disk. A resume reads the rows of the super-classes it holds from whichever shards hold them, so a run may
resume with another number of ranks. Checkpoints of earlier versions (one optimizer, the whole head in
``checkpoint.pt``) are read too (:func:`split_legacy_state`).
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
CHECKPOINT_VERSION = 3
"""3: sharded sub-class heads, one optimizer for the backbone and one per head; 2: the configuration by section
(:meth:`TrainConfig.to_dict`); 1: one flat mapping (both still read)."""
SUB_HEADS = "sub_heads"
"""Folder of the run that holds the sub-class head shards, one sub-folder per checkpoint."""


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
    if version not in (1, 2, CHECKPOINT_VERSION):
        raise ValueError(f"{path} is a trainer checkpoint of version {version}; this trainer reads versions 1 "
                         f"to {CHECKPOINT_VERSION}")
    if version > 1:  # by section; options added since take their defaults, the old behaviour's
        stored = {key: value for section in stored.values() if isinstance(section, dict)
                  for key, value in section.items()} | {key: stored[key] for key in ("out", "mode", "seed")}
    try:
        return json.loads(config_json(TrainConfig.from_flat(_before_options_added(stored, version))))
    except (TypeError, ValueError) as exc:
        layout = "checkpoint version 1, one flat mapping" if version == 1 else f"checkpoint version {version}"
        raise ValueError(f"{path}: the stored configuration ({layout}) cannot be read ({exc}); use another --out"
                         ) from exc


def _before_options_added(stored: dict[str, Any], version: int) -> dict[str, Any]:
    """A stored flat configuration with the options added after its version set to what that version did."""
    if version < 3:
        stored = {"sub_head_grad_mean": "batch"} | stored
    return stored


def sub_heads_file(tag: str, rank: int) -> str:
    """The run folder's file of rank ``rank``'s shard of the sub-class heads of the checkpoint ``tag``."""
    return f"{SUB_HEADS}/{tag}/rank{rank}.pt"


def save_sub_heads(folder: RunFolder, tag: str, rank: int, shard: dict[str, Any]) -> None:
    """Write this rank's shard of the sub-class heads for the checkpoint ``tag`` whole (:meth:`RunFolder.save`)."""
    folder.save(sub_heads_file(tag, rank), shard)


def remove_sub_heads(folder: RunFolder, keep: str | None = None, only: str | None = None) -> None:
    """Remove the sub-class head shards of the checkpoint tag ``only``, or of every tag but ``keep``."""
    tags = [only] if only else sorted(folder.listdir(SUB_HEADS))
    for tag in tags:
        if tag and tag != keep:
            folder.remove_tree(f"{SUB_HEADS}/{tag}")


def load_sub_heads(folder: RunFolder, reference: dict[str, Any], first: int, stop: int) -> dict[str, Any]:
    """The rows of super-classes ``[first, stop)`` of the sub-class heads a checkpoint names (``reference``, its
    ``sub_heads`` entry): ``weight``, ``bias`` and their momentum buffers (``None`` before any step), read from
    the shards that hold them, whatever number of ranks wrote them."""
    counts = reference["sub_counts"]
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    parts: dict[str, list[torch.Tensor]] = {}
    bounds = reference["bounds"]
    for rank in range(len(bounds) - 1):
        low, high = max(first, bounds[rank]), min(stop, bounds[rank + 1])
        if low >= high:
            continue
        shard = reference["shards"][rank] if "shards" in reference else folder.load(
            sub_heads_file(reference["tag"], rank))
        if shard is None:
            raise ValueError(f"{folder.child(sub_heads_file(reference['tag'], rank))} is missing: the checkpoint "
                             "names sub-class head shards that are not there; use another --out")
        rows = slice(offsets[low] - offsets[shard["first"]], offsets[high] - offsets[shard["first"]])
        for key in ("weight", "bias", "momentum_weight", "momentum_bias"):
            if shard[key] is not None:
                parts.setdefault(key, []).append(shard[key][rows])
    return {key: torch.cat(parts[key]) if key in parts else None
            for key in ("weight", "bias", "momentum_weight", "momentum_bias")}


def split_legacy_state(state: dict[str, Any], backbone_parameters: list[torch.nn.Parameter], mode: str,
                       sub_counts: list[int] | None) -> dict[str, Any]:
    """A checkpoint of version 1 or 2 (one optimizer over the backbone's then the head's parameters, the whole
    head in ``head``) in the layout of version 3: the backbone's optimizer, the replicated head and its optimizer,
    and the sub-class heads as one shard (``sub_heads`` with the shard inside)."""
    optimizer = state["optimizer"]
    momentum = {index: entry.get("momentum_buffer") for index, entry in optimizer["state"].items()}
    trained = [index for index, parameter in enumerate(backbone_parameters) if parameter.requires_grad]
    group = {key: value for key, value in optimizer["param_groups"][0].items() if key != "params"}

    def optimizer_of(indices: list[int]) -> dict[str, Any]:
        entries = {new: {"momentum_buffer": momentum[old]} for new, old in enumerate(indices)
                   if momentum.get(old) is not None}
        return {"state": entries, "param_groups": [dict(group, params=list(range(len(indices))))]}

    first_head = len(backbone_parameters)
    head = state["head"]
    upgraded = dict(state, optimizer=optimizer_of(trained), head_optimizer=optimizer_of([first_head, first_head + 1]))
    if mode != "deepercluster" or not sub_counts:
        return upgraded
    upgraded["head"] = {"classifier.weight": head["super_classifier.weight"],
                        "classifier.bias": head["super_classifier.bias"]}
    shard = {"first": 0, "stop": len(sub_counts), "weight": head["sub_weight"], "bias": head["sub_bias"],
             "momentum_weight": momentum.get(first_head + 2), "momentum_bias": momentum.get(first_head + 3)}
    upgraded["sub_heads"] = {"bounds": [0, len(sub_counts)], "sub_counts": sub_counts, "shards": [shard]}
    return upgraded
