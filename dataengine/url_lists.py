"""URL lists as ingest input, in img2dataset's formats: one row per URL, with a caption and extra columns.

Formats (:data:`FORMATS`, from the file name's suffix unless given; ``.gz``/``.bz2`` are decompressed):

* ``txt``: one URL per line (blank lines are not rows);
* ``csv`` / ``tsv``: a header line naming the columns, then one row per line (quoted fields may span lines);
* ``json``: one array of objects; ``jsonl``: one object per line;
* ``parquet``: read in record batches of the needed columns only.

Each row's URL is read from ``url_col``, its caption from ``caption_col`` and ``additional_columns`` are kept
as they are: the sample's ``.json`` holds ``url``, ``caption`` and the additional columns (img2dataset's field
names), the caption is also the sample's ``.txt``, and ``metadata.parquet`` has a column for each. The key of
a row is its input line number, zero-padded to 9 digits (``000000042``): stable across re-runs and resumes.

A row that cannot be used is a per-row ``bad_metadata`` status, never a stop: no URL in the column, a JSON
line that does not parse or is not an object, a CSV line with a field over :data:`MAX_FIELD_BYTES`, a line
of a text format over :data:`MAX_LINE_BYTES`. Only a missing column that the header or schema shows (csv,
tsv, parquet) is refused before anything is written, as one error naming the columns that exist.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dataengine.errors import InputUnusableError
from dataengine.fs import iter_lines, open_input

FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")
MAX_LINE_BYTES = 1 << 20
"""Longest line of a txt or jsonl list; longer lines are a ``bad_metadata`` row, read no further."""
MAX_FIELD_BYTES = 1 << 20
"""Longest CSV/TSV field."""
KEY_DIGITS = 9


@dataclass(frozen=True, kw_only=True)
class UrlList:
    """Where a URL list is and which of its columns are read."""

    url: str
    """The list file, local or fsspec URL (``s3://...``)."""
    input_format: str | None = None
    """One of :data:`FORMATS`; ``None``: from the file name (``urls.csv.gz`` is csv)."""
    url_col: str = "url"
    """Column holding the image URL (ignored for txt)."""
    caption_col: str | None = None
    """Column holding the caption, kept as ``caption`` (none by default)."""
    additional_columns: tuple[str, ...] = ()
    """Other columns kept under their own names."""

    def __post_init__(self) -> None:
        if self.input_format is not None and self.input_format not in FORMATS:
            raise ValueError(f"input format must be one of {', '.join(FORMATS)}, got {self.input_format!r}")
        self.format  # noqa: B018 (raises on a name without a known suffix)
        if self.format == "txt" and (self.caption_col or self.additional_columns):
            raise ValueError("a txt URL list has one URL per line and no columns: use csv, tsv, json(l) or parquet "
                             "for --caption-col and --save-additional-columns")
        named = [self.url_col, *([self.caption_col] if self.caption_col else []), *self.additional_columns]
        if len(set(named)) < len(named):
            raise ValueError(f"a column is named twice among url, caption and additional columns: {named}")

    @property
    def format(self) -> str:
        """The input format, given or from the file name."""
        if self.input_format:
            return self.input_format
        name = self.url.lower()
        for suffix in (".gz", ".bz2"):
            name = name.removesuffix(suffix)
        extension = name.rsplit(".", 1)[-1] if "." in name.rsplit("/", 1)[-1] else ""
        extension = "jsonl" if extension == "ndjson" else extension
        if extension not in FORMATS:
            raise ValueError(f"cannot tell the format of URL list {self.url} from its name: give --input-format "
                             f"({', '.join(FORMATS)})")
        return extension

    @property
    def columns(self) -> list[str]:
        return [self.url_col, *([self.caption_col] if self.caption_col else []), *self.additional_columns]


@dataclass(frozen=True)
class UrlRow:
    """What a worker needs of one URL-list row (``error``: why the row is unusable as read)."""

    key: str
    url: Any = None
    caption: Any = None
    extras: tuple[tuple[str, Any], ...] = ()
    error: str | None = None


def row_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def check_url_list(spec: UrlList, storage_options: dict[str, Any]) -> None:
    """Refuse, before anything is written, a list whose header or schema lacks a named column.

    Raises:
        InputUnusableError: a named column is not in the header (csv, tsv) or the schema (parquet).
    """
    if spec.format in ("csv", "tsv"):
        with _text(spec, storage_options) as handle:
            header = next(csv.reader(handle, delimiter=_delimiter(spec)), None)
        _check_columns(spec, header or [])
    elif spec.format == "parquet":
        import pyarrow.parquet as pq

        with open_input(spec.url, storage_options) as handle:
            _check_columns(spec, pq.ParquetFile(handle).schema_arrow.names)


def _check_columns(spec: UrlList, names: list[str]) -> None:
    missing = [name for name in spec.columns if name not in names]
    if missing:
        raise InputUnusableError(f"URL list {spec.url} has no column {', '.join(map(repr, missing))} (its columns: "
                                 f"{', '.join(names[:20]) or 'none'}); name the URL column with --url-col")


def iter_url_rows(spec: UrlList, storage_options: dict[str, Any]) -> Iterator[UrlRow]:
    """The rows of the list in input order."""
    reader = {"txt": _txt_rows, "csv": _csv_rows, "tsv": _csv_rows, "json": _json_rows, "jsonl": _jsonl_rows,
              "parquet": _parquet_rows}[spec.format]
    for index, item in enumerate(reader(spec, storage_options)):
        if isinstance(item, str):
            yield UrlRow(row_key(index), error=item)
        else:
            yield _row(spec, index, item)


def _row(spec: UrlList, index: int, record: dict[str, Any]) -> UrlRow:
    key = row_key(index)
    url = record.get(spec.url_col)
    if url is not None and not isinstance(url, str):
        url = str(url)
    url = url.strip() if url else url
    caption = record.get(spec.caption_col) if spec.caption_col else None
    if caption is not None and not isinstance(caption, str):
        caption = json.dumps(_plain(caption), ensure_ascii=False) if isinstance(caption, (list, dict)) else str(caption)
    extras = tuple((name, _plain(record.get(name))) for name in spec.additional_columns)
    error = None if url else f"no URL in column {spec.url_col!r}"
    return UrlRow(key, url or None, caption, extras, error)


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: NaN/inf floats become null, other non-JSON types their text."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)  # dates, decimals...


def _txt_rows(spec: UrlList, storage_options: dict[str, Any]) -> Iterator[dict[str, Any] | str]:
    for line in iter_lines(spec.url, storage_options, max_bytes=MAX_LINE_BYTES):
        if len(line) > MAX_LINE_BYTES:
            yield f"line longer than {MAX_LINE_BYTES} bytes"
        elif line.strip():
            yield {spec.url_col: line.decode("utf-8", "replace")}


def _jsonl_rows(spec: UrlList, storage_options: dict[str, Any]) -> Iterator[dict[str, Any] | str]:
    for line in iter_lines(spec.url, storage_options, max_bytes=MAX_LINE_BYTES):
        if len(line) > MAX_LINE_BYTES:
            yield f"line longer than {MAX_LINE_BYTES} bytes"
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield f"not JSON: {exc}"
            continue
        yield record if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"


def _json_rows(spec: UrlList, storage_options: dict[str, Any]) -> Iterator[dict[str, Any] | str]:
    with open_input(spec.url, storage_options) as handle:
        try:
            records = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputUnusableError(f"URL list {spec.url} is not JSON ({exc}); one object per line is jsonl")
    if not isinstance(records, list):
        raise InputUnusableError(f"URL list {spec.url} holds a JSON {type(records).__name__}, not an array of "
                                 "objects")
    for record in records:
        yield record if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"


def _delimiter(spec: UrlList) -> str:
    return "\t" if spec.format == "tsv" else ","


def _text(spec: UrlList, storage_options: dict[str, Any]) -> io.TextIOWrapper:
    return io.TextIOWrapper(open_input(spec.url, storage_options), encoding="utf-8", errors="replace", newline="")


def _csv_rows(spec: UrlList, storage_options: dict[str, Any]) -> Iterator[dict[str, Any] | str]:
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        with _text(spec, storage_options) as handle:
            reader = csv.reader(handle, delimiter=_delimiter(spec))
            header = next(reader, None) or []
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:  # one malformed line (a field over the limit): that row only
                    yield f"unreadable {spec.format} line: {exc}"
                    continue
                if values:
                    yield dict(zip(header, values))
    finally:
        csv.field_size_limit(limit)


def _parquet_rows(spec: UrlList, storage_options: dict[str, Any]) -> Iterator[dict[str, Any] | str]:
    import pyarrow.parquet as pq

    with open_input(spec.url, storage_options) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096, columns=spec.columns):
            yield from batch.to_pylist()
