"""Re-clustering inside a run: embed the training set with the current backbone (the embed stage, into
``RUN/features/epochNNN``), cluster it (the cluster stage, the named clustering ``epochNNN`` of that store)
and read back the targets; only the stores of the current and the previous clustering are kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from indexes.distributed import barrier, reducer
from trainer.config import TrainConfig
from trainer.labels import Labels
from trainer.run_folder import RunFolder

FEATURES = "features"


def clustering_name(epoch: int) -> str:
    return f"epoch{epoch:03d}"


class Reclusterer:
    """The re-clusterings of one run (every rank holds one; rank 0 writes the shared files)."""

    def __init__(self, config: TrainConfig, rank: int, milestone: Callable[[str], None],
                 folder: RunFolder | None = None) -> None:
        self.config = config
        self.folder = folder or RunFolder(config.out, config.data.storage_options)
        self.rank = rank
        self.milestone = milestone

    def store_url(self, name: str) -> str:
        return self.folder.child(FEATURES, name)

    @staticmethod
    def backbone_file(name: str) -> str:
        return f"backbone-{name}.pt"

    def labels_of(self, name: str) -> Labels:
        from dataengine.store import open_store

        store = open_store(self.store_url(name), self.folder.storage_options)
        return Labels.from_store(store, name, self.config.mode)

    def run(self, epoch: int, backbone: nn.Module, feature_dim: int) -> Labels:
        """Embed the training set with ``backbone`` (ClusterFit: with the given network) and cluster it."""
        from dataengine.cluster import ClusterConfig, run_cluster
        from dataengine.embed import EmbedConfig, run_embed
        from dataengine.pretrained import names_pretrained_model

        config = self.config
        name = clustering_name(epoch)
        checkpoint = config.features_checkpoint if config.mode == "clusterfit" else None
        model = None
        if checkpoint is not None and names_pretrained_model(checkpoint):
            model, checkpoint = checkpoint, None  # a pretrained network named as embed's --model
        elif checkpoint is None:
            checkpoint = self.folder.child(self.backbone_file(name))
            if self.rank == 0:
                self.folder.save(self.backbone_file(name), {"arch": config.model.arch, "sobel": config.model.sobel,
                                                             "backbone": backbone.state_dict()})
            barrier()
            self.milestone("recluster.backbone_saved")
        store = self.store_url(name)
        data, clustering, threads = config.data, config.clustering, config.distributed.num_threads
        run_embed(EmbedConfig(shards=data.shards, out=store, model=model, checkpoint=checkpoint,
                              image_size=data.image_size, resize_size=data.resolved_resize, workers=data.workers,
                              dtype="float32", seed=config.seed, storage_options=data.storage_options,
                              num_threads=threads),
                  progress=lambda _rows: self.milestone("recluster.embed_block"))
        self.milestone("recluster.embedded")
        pca_dim = min(clustering.pca_dim or feature_dim, feature_dim)
        run_cluster(ClusterConfig(store=store, name=name, levels=tuple(clustering.levels), pca_dim=pca_dim,
                                  whiten=clustering.whiten,
                                  num_iterations=clustering.kmeans_iterations, seed=config.seed + epoch,
                                  sample_per_centroid=clustering.sample_per_centroid,
                                  max_sample_rows=clustering.max_sample_rows,
                                  neighbor_index=False, overwrite=True, num_threads=threads,
                                  storage_options=data.storage_options),
                    reducer=reducer())
        self.milestone("recluster.clustered")
        return self.labels_of(name)

    def metrics(self, labels: Labels, previous: Labels | None) -> dict[str, Any]:
        """NMI of the clustering against the metadata and against the previous clustering."""
        from trainer.monitor import clustering_nmi

        previous_url = self.store_url(previous.name) if previous else None
        return clustering_nmi(self.store_url(labels.name), labels.name, previous_url,
                              previous.name if previous else None, average_method=self.config.clustering.nmi_average,
                              storage_options=self.folder.storage_options)

    def drop_unused(self, keep: set[str]) -> None:
        """Remove the feature stores (N x d floats each) and backbone snapshots of every clustering not named in
        ``keep`` (rank 0), leftovers of an interrupted removal included. Call only once a checkpoint that names
        no other clustering is on disk."""
        if self.rank != 0:
            return
        stores = set(self.folder.listdir(FEATURES))
        snapshots = {name[len("backbone-"):-len(".pt")] for name in self.folder.listdir()
                     if name.startswith("backbone-") and name.endswith(".pt")}
        for name in sorted((stores | snapshots) - keep):
            self.folder.remove_tree(f"{FEATURES}/{name}")
            self.milestone("recluster.dropping")
            self.folder.remove(self.backbone_file(name))
