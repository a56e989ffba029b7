"""``--dry-run`` of ingest, embed and cluster: check the inputs and the output as the run would, resolve the
configuration, and plan the stage with :mod:`dataengine.plan`'s model, writing nothing (no folder, no scratch,
no lock). The trainer's dry run, which needs the trainer, lives in the application layer.

Each check is the one the run itself makes before it writes, so a dry run fails with the error the run would
fail with, and a dry run that passes leaves only failures met while running (a corrupt photo, a full disk).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from dataengine.errors import OutputExistsError
from dataengine.plan import MODEL_DIMS, PlanConfig, StagePlan, load_calibration, plan_cluster, plan_embed, plan_ingest


@dataclass
class DryRun:
    """What a run would do."""

    stage: str
    config: dict[str, Any]
    """The resolved configuration (no credentials)."""
    rows: int | None
    """Input rows (``None``: unknown without reading the whole input)."""
    output: str
    """What the output holds: ``new``, ``resume`` (a partial run of this configuration), ``complete`` (nothing
    to do) or ``replace`` (another configuration, replaced because of ``overwrite``)."""
    todo_rows: int | None
    """Rows the run would process (a resumed run skips those done)."""
    plan: StagePlan | None
    """The stage's expected cost for ``todo_rows`` (``None`` when there is nothing to do or no row count)."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["plan"] = self.plan.to_dict() if self.plan else None
        return dict(values, dry_run=True)


def plan_config(rows: int, **overrides: Any) -> PlanConfig:
    """The :class:`~dataengine.plan.PlanConfig` of a run over ``rows`` rows on this machine."""
    return PlanConfig(num_images=max(rows, 1), cores=os.cpu_count() or 1, **overrides)


def _storage(url: str) -> str:
    from dataengine.fs import is_remote

    return "s3" if is_remote(url) else "local"


def _config_dict(config: Any) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    values.pop("storage_options", None)
    return values


def ingest_dry_run(config: Any, calibration: str | None = None) -> DryRun:
    """Check an ingest's inputs and output (:class:`~dataengine.ingest.IngestConfig`), count its rows, plan it.

    Raises:
        InputUnusableError / InputCorruptError: as the run would, for a missing or broken input.
        OutputExistsError: ``out`` holds an ingest of another configuration (and not ``overwrite``), or is a file.
    """
    from dataengine.fs import Location
    from dataengine.ingest.inputs import count_input_rows, pending_rows
    from dataengine.ingest.resume import check_output
    from dataengine.sources import check_inputs

    _check_not_a_file(config.out)
    out = Location(config.out, config.storage_options)
    found = check_output(out, config)
    if found != "complete":
        check_inputs(config.yfcc, config.images, config.download, config.storage_options, config.url_list_spec)
    rows = count_input_rows(config.yfcc, config.images, config.storage_options, config.url_list_spec)
    todo = pending_rows(config, rows)
    todo_rows = None if todo is None else todo[0]
    notes = [] if rows is not None else ["the input's rows are unknown without reading it all (compressed or "
                                         "remote, or a csv, tsv or json URL list): no plan"]
    plan = None
    if todo_rows:
        rates = load_calibration(calibration)["stages"]["ingest"]
        plan = plan_ingest(plan_config(todo_rows, nodes=config.num_nodes, storage=_storage(config.out)), rates)
    state = {"partial": "resume", "new": "new", "complete": "complete", "replace": "replace"}[found]
    return DryRun(stage="ingest", config=_config_dict(config) | config.output_config(), rows=rows,
                  output=state, todo_rows=todo_rows, plan=plan, notes=notes)


def embed_dry_run(config: Any, calibration: str | None = None) -> DryRun:
    """Check an embedding's input shards, model (built, weights loaded: nothing written) and output store
    (:class:`~dataengine.embed.EmbedConfig`), resolve the stored configuration, plan it.

    Raises:
        IncompleteOutputError / InputUnusableError: no usable ingest output.
        WeightsMismatchError / ValueError: a model that cannot be built as named.
        OutputExistsError: ``out`` holds another store (and not ``overwrite``), or is not a store.
    """
    from dataengine.embed.model import build_model
    from dataengine.embed.output import resolve_config
    from dataengine.shards import load_shard_set
    from dataengine.store import inspect_existing

    _check_not_a_file(config.out)
    shard_set = load_shard_set(config.shards, config.storage_options)
    model = build_model(config)
    recorded = inspect_existing(config.out, config.storage_options)
    wanted = resolve_config(config, model, recorded)
    state = "new"
    if recorded is not None and recorded.get("state") != "initializing":
        same = recorded.get("config") == wanted and recorded.get("source", {}).get("digest") == shard_set.digest
        if same:
            state = "complete" if recorded.get("complete") else "resume"
        elif config.overwrite:
            state = "replace"
        else:
            raise OutputExistsError(f"{config.out} holds features made with another configuration or input "
                                    f"({recorded.get('config')}); use another --out or --overwrite")
    rows = shard_set.num_samples
    arch = model.arch if model.arch in MODEL_DIMS else "resnet18"
    notes = [] if arch == model.arch else [f"no measured rate for {model.arch}: planned as resnet18"]
    plan = None
    if state != "complete":
        rates = load_calibration(calibration)["stages"]["embed"]
        plan = plan_embed(plan_config(rows, model=arch, image_size=config.image_size, dim=model.dim,
                                      storage=_storage(config.out)), rates)
    return DryRun(stage="embed", config=dict(_config_dict(config), resolved=wanted), rows=rows, output=state,
                  todo_rows=0 if state == "complete" else rows, plan=plan, notes=notes)


def cluster_dry_run(config: Any, calibration: str | None = None) -> DryRun:
    """Check a clustering's store and name (:class:`~dataengine.cluster.ClusterConfig`), plan it.

    Raises:
        FileNotFoundError / IncompleteOutputError: no complete feature store at ``config.store``.
        OutputExistsError: a complete clustering of that name with another configuration (and no overwrite).
        ValueError: a PCA dimension above the feature dimension.
    """
    from dataengine.cluster import _finished, size_warnings
    from dataengine.clustering import clustering_attrs
    from dataengine.store import open_store

    store = open_store(config.store, config.storage_options)
    done = _finished(store, config)
    if config.pca_dim is not None and config.pca_dim > store.dim:
        raise ValueError(f"pca_dim={config.pca_dim} is larger than the feature dimension {store.dim}; "
                         f"use --pca {store.dim} or less")
    state = "complete" if done is not None else "replace" if clustering_attrs(store, config.name) else "new"
    plan = None
    if done is None:
        rates = load_calibration(calibration)["stages"]["cluster"]
        planned = plan_config(store.num_rows, dim=store.dim, levels=tuple(config.levels), pca_dim=config.pca_dim,
                              num_iterations=config.num_iterations,
                              sample_per_centroid=max(config.level_sample_per_centroid(1), 1),
                              neighbor_index=config.neighbor_index, index_memory_bytes=config.index_memory_bytes,
                              storage=_storage(config.store))
        plan = plan_cluster(planned, rates)
    return DryRun(stage="cluster", config=config.resolved(), rows=store.num_rows, output=state,
                  todo_rows=0 if done is not None else store.num_rows, plan=plan,
                  notes=size_warnings(config.levels, store.num_rows))


def _check_not_a_file(url: str) -> None:
    from dataengine.fs import is_remote

    path = url.removeprefix("file://")
    if not is_remote(url) and os.path.isfile(path):
        raise OutputExistsError(f"{url} is a file, not an output folder; choose another --out")


def train_plan(rows: int, *, epochs: int, reassign_every: int, arch: str, image_size: int, levels: tuple[int, ...],
               out: str, calibration: str | None = None) -> StagePlan:
    """The trainer's plan over ``rows`` samples (its dry run's; the trainer checks its own config)."""
    planned = plan_config(rows, epochs=max(epochs, 1), reassign_every=reassign_every,
                          train_arch=arch if arch in MODEL_DIMS else "resnet18", train_image_size=image_size,
                          levels=levels, storage=_storage(out))
    from dataengine.plan import plan_train

    return plan_train(planned, load_calibration(calibration))
