"""Pure algorithms: k-means, hierarchical k-means, FAISS indices and distributed reductions.

This package knows no file formats and imports neither :mod:`dataengine` nor :mod:`trainer`.
"""
