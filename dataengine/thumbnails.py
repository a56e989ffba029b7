"""Random access to the JPEG of any sample of an ingest output, and 3x3 thumbnail grids of them.

Ingest records, for every row of ``metadata.parquet``, the shard holding the sample and the byte ``offset``
and ``size`` of its ``.jpg`` member inside that tar (see the ingest contract). So one photo costs one
ranged read (``fs.cat_file(path, start=offset, end=offset + size)``, fsspec's ``cat_ranges`` for a batch),
never a scan of its shard, locally as on ``s3://``. The row -> (shard, offset, size) index is
``metadata.parquet`` itself: ingest writes one row group per shard, so locating a few rows reads only the
row groups holding them (four narrow columns); looking samples up by key builds a key -> row map lazily.

Per-sample problems (a short read, bytes that do not decode, a key that does not match) are recorded as
:class:`ThumbnailFailure` and the tile is drawn as a grey placeholder; I/O errors (a missing shard, a network
failure) are raised, as everywhere in dataengine: they call for a retry, not for a silently grey report.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.fs import open_input, url_to_fs
from dataengine.shards import ShardSet, load_shard_set

logger = logging.getLogger(__name__)

_LOCATION_COLUMNS = ["key", "shard", "offset", "size"]
PLACEHOLDER_RGB = (200, 200, 200)
"""Colour of the tile drawn for a photo that could not be read or decoded."""
_GAP = 2  # pixels between tiles


@dataclass(frozen=True)
class SampleLocation:
    """Where the JPEG of one row lies.

    Attributes:
        row: row of ``metadata.parquet`` (and of a feature store made from it).
        key: the sample key.
        shard: index of the shard in the manifest.
        path: protocol-less path of the shard tar on the reader's filesystem.
        offset: byte offset of the ``.jpg`` member's data inside the tar.
        size: its length in bytes.
    """

    row: int
    key: str
    shard: int
    path: str
    offset: int
    size: int


@dataclass(frozen=True)
class ThumbnailFailure:
    """A photo that could not be shown (recorded, and drawn as a placeholder)."""

    row: int
    key: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "key": self.key, "error": self.error}


class ShardImageReader:
    """Random access to the stored JPEG of any row of an ingest output (local folder or fsspec URL).

    Args:
        shards_url: the ingest output folder (holding ``manifest.json`` and ``metadata.parquet``).
        storage_options: fsspec options (``endpoint_url``, ``key``, ``secret``...).

    Use it as a context manager, or call :meth:`close`, to release the open ``metadata.parquet``.
    """

    def __init__(self, shards_url: str, storage_options: dict[str, Any] | None = None) -> None:
        import pyarrow.parquet as pq

        self.shard_set: ShardSet = load_shard_set(shards_url, storage_options)
        self.fs, _ = url_to_fs(self.shard_set.shards[0].url, storage_options)
        self._shard_paths = [url_to_fs(shard.url, storage_options)[1] for shard in self.shard_set.shards]
        # metadata.parquet may lie elsewhere than the shards (the local index of shards another tool wrote).
        self._handle = open_input(self.shard_set.metadata_url, storage_options)
        self._parquet = pq.ParquetFile(self._handle)
        sizes = [self._parquet.metadata.row_group(i).num_rows for i in range(self._parquet.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        if self._group_starts[-1] != self.shard_set.num_samples:
            raise ValueError(f"{self.shard_set.metadata_url} has {self._group_starts[-1]} rows but the manifest "
                             f"lists {self.shard_set.num_samples} samples")
        self._rows_of_keys: dict[str, int] | None = None

    @property
    def num_rows(self) -> int:
        """Samples in the ingest output."""
        return int(self._group_starts[-1])

    @property
    def digest(self) -> str:
        """sha256 of the manifest (what a feature store records as its ``source.digest``)."""
        return self.shard_set.digest

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> ShardImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def locate(self, rows: Sequence[int]) -> list[SampleLocation]:
        """Shard, offset and size of each row, reading only the row groups that hold them.

        Raises:
            IndexError: a row outside ``[0, num_rows)``.
        """
        wanted = np.asarray(rows, dtype=np.int64)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= self.num_rows):
            raise IndexError(f"rows must lie in [0, {self.num_rows}), got {wanted.min()}..{wanted.max()}")
        groups = np.searchsorted(self._group_starts, wanted, side="right") - 1
        found: dict[int, SampleLocation] = {}
        for group in np.unique(groups).tolist():
            table = self._parquet.read_row_group(group, columns=_LOCATION_COLUMNS).to_pydict()
            for row in wanted[groups == group].tolist():
                i = row - int(self._group_starts[group])
                shard = int(table["shard"][i])
                found[row] = SampleLocation(row=row, key=table["key"][i], shard=shard,
                                            path=self._shard_paths[shard], offset=int(table["offset"][i]),
                                            size=int(table["size"][i]))
        return [found[row] for row in wanted.tolist()]

    def rows_of_keys(self, keys: Sequence[str]) -> list[int]:
        """Rows of sample keys (the key -> row map is built on first use from the ``key`` column).

        Raises:
            KeyError: a key that is not in the ingest output.
        """
        if self._rows_of_keys is None:
            column = self._parquet.read(columns=["key"]).column("key").to_pylist()
            self._rows_of_keys = {key: row for row, key in enumerate(column)}
        missing = [key for key in keys if key not in self._rows_of_keys]
        if missing:
            raise KeyError(f"keys not in {self.shard_set.url}: {missing[:5]}")
        return [self._rows_of_keys[key] for key in keys]

    def read(self, rows: Sequence[int]) -> list[bytes]:
        """The stored JPEG bytes of each row: one ranged read per image (issued concurrently on object stores).

        Raises:
            OSError: a shard cannot be read.
        """
        return self._read(self.locate(rows))

    def _read(self, locations: list[SampleLocation]) -> list[bytes]:
        if not locations:
            return []
        return self.fs.cat_ranges([loc.path for loc in locations], [loc.offset for loc in locations],
                                  [loc.offset + loc.size for loc in locations], on_error="raise")

    def read_by_key(self, keys: Sequence[str]) -> list[bytes]:
        """The stored JPEG bytes of each sample key."""
        return self.read(self.rows_of_keys(keys))

    def thumbnails(self, rows: Sequence[int], tile: int,
                   expected_keys: Sequence[str] | None = None) -> tuple[list[Any], list[ThumbnailFailure]]:
        """Square ``tile`` x ``tile`` PIL thumbnails of the rows (``None`` where a photo failed) and the failures.

        Args:
            rows: rows to show.
            tile: side of each thumbnail in pixels.
            expected_keys: the keys the caller believes these rows hold (e.g. a feature store's); a row whose
                key differs is a failure rather than the wrong photo.
        """
        locations = self.locate(rows)
        data = self._read(locations)
        images: list[Any] = []
        failures: list[ThumbnailFailure] = []
        for index, (location, payload) in enumerate(zip(locations, data)):
            expected = None if expected_keys is None else expected_keys[index]
            image, error = _checked_thumbnail(location, payload, tile, expected)
            images.append(image)
            if error is not None:
                logger.warning("thumbnail of row %d (key %s): %s", location.row, location.key, error)
                failures.append(ThumbnailFailure(location.row, location.key, error))
        return images, failures


def _checked_thumbnail(location: SampleLocation, payload: bytes, tile: int,
                       expected_key: str | None) -> tuple[Any, str | None]:
    """The thumbnail of one photo, or ``(None, reason)`` for a per-sample problem."""
    from PIL import Image, UnidentifiedImageError

    if expected_key is not None and expected_key != location.key:
        return None, f"key mismatch: the store says {expected_key!r}, metadata.parquet {location.key!r}"
    if len(payload) != location.size:
        return None, f"short read: {len(payload)} of {location.size} bytes at offset {location.offset}"
    try:
        return square_thumbnail(Image.open(io.BytesIO(payload)), tile), None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # The bytes are already in memory, so an OSError here is PIL's "cannot decode", not I/O.
        return None, f"undecodable JPEG: {type(exc).__name__}: {exc}"


def square_thumbnail(image: Any, tile: int) -> Any:
    """Centre-crop a PIL image to a square and resize it to ``tile`` x ``tile`` RGB."""
    from PIL import Image

    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((tile, tile), Image.Resampling.BILINEAR)


def make_grid(images: Sequence[Any], tile: int, columns: int = 3) -> Any:
    """A grid of square ``tile`` thumbnails, ``columns`` per row, on white; ``None`` entries become grey tiles."""
    from PIL import Image

    if columns < 1 or tile < 1:
        raise ValueError(f"columns and tile must be >= 1, got {columns} and {tile}")
    rows = max(1, -(-len(images) // columns))
    width, height = columns * tile + (columns - 1) * _GAP, rows * tile + (rows - 1) * _GAP
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        box = (column * (tile + _GAP), row * (tile + _GAP))
        grid.paste(image if image is not None else Image.new("RGB", (tile, tile), PLACEHOLDER_RGB), box)
    return grid


def encode_jpeg(image: Any, quality: int = 85) -> bytes:
    """JPEG bytes of a PIL image (photo grids: a fraction of the size of PNG, which suits plots)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
