"""dataengine: a streaming data engine for uncurated web images.

Stages: ``ingest`` (photos + YFCC100M metadata -> webdataset shards), ``embed`` (shards -> Zarr feature
store), ``cluster`` (PCA-whitening + hierarchical k-means), ``report`` (cluster quality against metadata)
and ``train`` (DeeperCluster). The command line lives in :mod:`dataengine.app`.
"""

__version__ = "0.1.0"
