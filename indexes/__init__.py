"""Pure algorithms: k-means, hierarchical k-means, FAISS indices and distributed reductions.

This package knows no file formats and imports neither :mod:`dataengine` nor :mod:`trainer`.

Modules: :mod:`indexes.data` (the row interface the algorithms read), :mod:`indexes.pca` (PCA-whitening),
:mod:`indexes.assign` (nearest-centroid assignment and float64 sums), :mod:`indexes.kmeans` (Lloyd's
k-means), :mod:`indexes.hierarchical` (multi-level k-means), :mod:`indexes.distributed` (reductions across
ranks), :mod:`indexes.sampling` (seeded samples), :mod:`indexes.faiss_index` (FAISS indices as bytes),
:mod:`indexes.threads` (thread counts of BLAS, torch and faiss).
"""
