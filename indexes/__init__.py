"""Pure algorithms: k-means, hierarchical k-means, FAISS indices, subsets and near-duplicates, and what crosses ranks.

This package knows no file formats and imports neither :mod:`dataengine` nor :mod:`trainer`.

Modules: :mod:`indexes.data` (the row interface the algorithms read), :mod:`indexes.pca` (PCA-whitening),
:mod:`indexes.assign` (nearest-centroid assignment and float64 sums, with compiled loops in
:mod:`indexes.kernels`), :mod:`indexes.kmeans` (Lloyd's k-means), :mod:`indexes.hierarchical` (multi-level
k-means), :mod:`indexes.distributed` (the process group and everything that crosses ranks),
:mod:`indexes.sampling` (seeded samples), :mod:`indexes.faiss_index` (FAISS indices as bytes),
:mod:`indexes.selection` (seeded subsets of clustered rows), :mod:`indexes.dedup` (near-duplicates within a
cluster), :mod:`indexes.threads` (thread counts of BLAS, torch and faiss).
"""
