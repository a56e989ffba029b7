"""How many input rows an ingest has, and how many of them a run of this node still has to process, found
without reading any image: for progress bars (a total, hence an ETA), ``--dry-run`` and ``dataengine plan``.

Counting reads what listing the input reads anyway: a folder's listing, a local tar's headers, a local
uncompressed metadata file's lines (100M YFCC lines: ~20 s, against hours of ingest). A compressed or remote
metadata file or tar would have to be read (and decompressed) in full: its count is unknown (``None``).
"""

from __future__ import annotations

import os
from typing import Any

from dataengine.fs import Location, compression_of, is_remote, url_to_fs
from dataengine.ingest.config import IngestConfig
from dataengine.ingest.resume import check_output, done_stats
from dataengine.sources import is_image_name
from dataengine.url_lists import UrlList


def count_input_rows(yfcc: str | None, images: str | None, storage_options: dict[str, Any] | None = None,
                     url_list: UrlList | None = None) -> int | None:
    """The input rows of an ingest of ``yfcc`` metadata (else of the ``images`` folder or tar, or the
    ``url_list``), or ``None`` when counting them would read the whole input (compressed or remote metadata,
    tars and URL lists; csv, tsv and json URL lists, whose rows are not lines; a parquet list's count is in its
    footer)."""
    storage_options = storage_options or {}
    if url_list is not None:
        return _count_url_list(url_list, storage_options)
    if yfcc:
        if is_remote(yfcc) or compression_of(yfcc) or not os.path.isfile(_local(yfcc)):
            return None
        with open(_local(yfcc), "rb") as handle:
            return sum(1 for line in handle if line.strip())  # blank lines are not rows (sources.iter_rows)
    if not images:
        return None
    if images.lower().endswith((".tar", ".tar.gz", ".tgz")):
        return _count_tar(images)
    fs, root = url_to_fs(images, storage_options)
    if not fs.isdir(root):
        return None
    return sum(1 for path in fs.find(root) if is_image_name(path))


def _count_url_list(url_list: UrlList, storage_options: dict[str, Any]) -> int | None:
    if url_list.format == "parquet":
        import pyarrow.parquet as pq

        from dataengine.fs import open_input

        with open_input(url_list.url, storage_options) as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    url = url_list.url
    if url_list.format not in ("txt", "jsonl") or is_remote(url) or compression_of(url) or not os.path.isfile(
            _local(url)):
        return None
    with open(_local(url), "rb") as handle:
        return sum(1 for line in handle if line.strip())  # blank lines are not rows (url_lists.iter_url_rows)


def _count_tar(url: str) -> int | None:
    from dataengine.foreign_shards import _tar_samples, webdataset_tar_samples
    from dataengine.sources import MAX_FILE_BYTES
    from dataengine.tario import scan_tar

    if is_remote(url) or not url.lower().endswith(".tar") or not os.path.isfile(_local(url)):
        return None
    if webdataset_tar_samples(url, None, MAX_FILE_BYTES) is not None:  # one row per sample, headers only
        return sum(1 for _ in _tar_samples(url, None, MAX_FILE_BYTES))
    return sum(1 for name, _, _ in scan_tar(_local(url)) if is_image_name(name))


def pending_rows(config: IngestConfig, total: int | None) -> tuple[int, int] | None:
    """``(rows this node processes in this run, rows of this node already done by an earlier run)`` of an
    input of ``total`` rows, from the done shards under ``config.out`` (nothing written); ``None`` when the
    total is unknown.

    Raises:
        OutputExistsError: ``config.out`` holds an ingest of another configuration (and not ``overwrite``).
    """
    if total is None:
        return None
    out = Location(config.out, config.storage_options)
    found = check_output(out, config)
    if found == "complete":
        owned = _owned(config, 0, total)
        return 0, owned
    stats = done_stats(out, config.shard_prefix) if found == "partial" else []
    start = stats[-1]["input_end"] if stats else 0
    return _owned(config, start, total), _owned(config, 0, min(start, total))


def _owned(config: IngestConfig, start: int, stop: int) -> int:
    """Rows in ``[start, stop)`` that ``config``'s node owns (blocks of ``split_rows`` dealt round-robin)."""
    if config.num_nodes == 1:
        return max(0, stop - start)
    count, size = 0, config.split_rows
    for block in range(start // size, -(-stop // size)):
        if block % config.num_nodes == config.node_rank:
            count += max(0, min(stop, (block + 1) * size) - max(start, block * size))
    return count


def _local(url: str) -> str:
    return url.removeprefix("file://")
