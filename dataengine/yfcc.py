"""Parser for YFCC100M metadata lines (the public ``yfcc100m_dataset`` file and the Webscope release).

Two layouts exist: the public dataset file has 25 TAB-separated fields (line number, photo id, photo hash,
...); the original Webscope release has 23 (the same without the line number and the hash). The layout is
detected per line from the field count. Text fields are URL-encoded with ``+`` for spaces; each tag is
decoded separately. :func:`parse_line` never raises: a line it cannot use gives a :class:`BadLine` with the
reason, which the caller records.

Integers are accepted only in canonical ASCII form (``[0-9]+``, a leading ``-`` where negatives make sense,
no sign ``+``, no spaces, no other digits, no leading zeros) and only within the range of the column that
stores them (:data:`INT_RANGES`): a photo id outside it makes the line bad (the id is the sample's key),
any other integer outside it is a missing value, like an unparseable one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

FIELDS_25 = (
    "line_number",
    "photo_id",
    "photo_hash",
    "user_nsid",
    "user_nickname",
    "date_taken",
    "date_uploaded",
    "device",
    "title",
    "description",
    "user_tags",
    "machine_tags",
    "longitude",
    "latitude",
    "accuracy",
    "page_url",
    "download_url",
    "license_name",
    "license_url",
    "server_id",
    "farm_id",
    "secret",
    "secret_original",
    "extension_original",
    "marker",
)
FIELDS_23 = tuple(f for f in FIELDS_25 if f not in ("line_number", "photo_hash"))

# Years outside this range are bogus camera clocks (YFCC has 1900s, 2030s...); the date is kept raw only.
MIN_PLAUSIBLE_YEAR = 1970
MAX_PLAUSIBLE_YEAR = 2015
_DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.\d+)?$")
MAX_LINE_BYTES = 1 << 20
"""Longest line parsed; a longer one is a :class:`BadLine` (readers skip its rest without holding it)."""
_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,18})", re.ASCII)  # at most 19 digits: int64 or less

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
INT_RANGES = {
    "photo_id": (0, _INT64[1]),  # metadata.parquet: int64
    "line_number": (0, _INT64[1]),
    "date_uploaded": _INT64,  # int64
    "accuracy": (0, _INT32[1]),  # int32
    "marker": (0, 1),
}
"""Accepted range of every integer field, from the type of the column that stores it."""


@dataclass
class YfccRecord:
    """One parsed photo or video. Text is URL-decoded; missing values are ``None`` (or empty lists)."""

    photo_id: int
    line_number: int | None = None
    photo_hash: str | None = None
    user: str | None = None
    nickname: str | None = None
    date_taken: str | None = None
    date_taken_raw: str | None = None
    date_uploaded: int | None = None
    device: str | None = None
    title: str = ""
    description: str = ""
    tags: list[str] = field(default_factory=list)
    machine_tags: list[str] = field(default_factory=list)
    lon: float | None = None
    lat: float | None = None
    accuracy: int | None = None
    page_url: str | None = None
    download_url: str | None = None
    license: str | None = None
    license_url: str | None = None
    server_id: str | None = None
    farm_id: str | None = None
    secret: str | None = None
    secret_original: str | None = None
    extension_original: str | None = None
    marker: int = 0

    @property
    def is_video(self) -> bool:
        return self.marker == 1

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-able dict (the sample's metadata in the shards).

        A shallow copy with copied lists: ``dataclasses.asdict`` deep-copies every field, which was half the
        CPU time of parsing a line."""
        values = dict(self.__dict__)
        values["tags"], values["machine_tags"] = list(self.tags), list(self.machine_tags)
        return values


@dataclass(frozen=True)
class BadLine:
    """A metadata line that could not be used, with the reason."""

    reason: str
    photo_id: int | None = None


def _text(value: str) -> str:
    if "%" not in value:  # most fields: unquote_plus would only turn "+" into spaces, at 10x the cost
        return value.replace("+", " ")
    return unquote_plus(value)


def _optional_text(value: str) -> str | None:
    decoded = _text(value).strip()
    return decoded or None


def _tag_list(value: str) -> list[str]:
    tags = (_text(t).strip() for t in value.split(",")) if value else ()
    return [t for t in tags if t]


def _int_field(values: dict[str, str], name: str) -> int | None:
    """The canonical integer in field ``name`` when it lies in :data:`INT_RANGES`, else ``None``."""
    value = values.get(name, "")
    if not _CANONICAL_INT.fullmatch(value) or value == "-0":
        return None
    number = int(value)
    low, high = INT_RANGES[name]
    return number if low <= number <= high else None


def _normalise_date(raw: str) -> str | None:
    """``YYYY-MM-DD HH:MM:SS`` when the date is well-formed with a plausible year, else ``None``."""
    match = _DATE_RE.match(raw)
    if not match:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    if not (MIN_PLAUSIBLE_YEAR <= year <= MAX_PLAUSIBLE_YEAR) or not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    if hour > 23 or minute > 59 or second > 59:
        return None
    return f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"


def _geo(values: dict[str, str]) -> tuple[float | None, float | None, int | None] | str:
    """(lon, lat, accuracy), all ``None`` when not geotagged; a reason string when malformed."""
    lon_s, lat_s = values["longitude"].strip(), values["latitude"].strip()
    if not lon_s and not lat_s:
        return None, None, None
    try:
        lon, lat = float(lon_s), float(lat_s)
    except ValueError:
        return f"unparseable coordinates {lon_s!r},{lat_s!r}"
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        return f"coordinates out of range {lon_s},{lat_s}"
    return lon, lat, _int_field(values, "accuracy")


def _fields(line: bytes | str) -> list[str] | BadLine:
    if len(line) > MAX_LINE_BYTES:
        return BadLine(f"line longer than {MAX_LINE_BYTES} bytes")
    text = line.decode("utf-8", errors="replace") if isinstance(line, (bytes, bytearray)) else line
    text = text.rstrip("\r\n").removeprefix("\ufeff")  # a byte-order mark opens some exported files
    parts = text.split("\t")
    if len(parts) not in (len(FIELDS_25), len(FIELDS_23)):
        return BadLine(f"expected {len(FIELDS_25)} or {len(FIELDS_23)} tab-separated fields, got {len(parts)}")
    return parts


def parse_line(line: bytes | str) -> YfccRecord | BadLine:
    """Parse one metadata line of either layout. Never raises; returns :class:`BadLine` on bad input."""
    parts = _fields(line)
    if isinstance(parts, BadLine):
        return parts
    values = dict(zip(FIELDS_25 if len(parts) == len(FIELDS_25) else FIELDS_23, parts))
    photo_id = _int_field(values, "photo_id")
    if photo_id is None:
        return BadLine(f"bad photo id {values['photo_id'][:40]!r} (canonical digits, at most {2**63 - 1})")
    geo = _geo(values)
    if isinstance(geo, str):
        return BadLine(geo, photo_id)
    marker = _int_field(values, "marker")
    if marker not in (0, 1):
        return BadLine(f"bad marker {values['marker'][:10]!r}", photo_id)
    date_raw = _text(values["date_taken"]).strip()
    return YfccRecord(
        photo_id=photo_id,
        line_number=_int_field(values, "line_number"),
        photo_hash=values.get("photo_hash", "").strip() or None,
        user=_optional_text(values["user_nsid"]),
        nickname=_optional_text(values["user_nickname"]),
        date_taken=_normalise_date(date_raw),
        date_taken_raw=date_raw or None,
        date_uploaded=_int_field(values, "date_uploaded"),
        device=_optional_text(values["device"]),
        title=_text(values["title"]),
        description=_text(values["description"]),
        tags=_tag_list(values["user_tags"]),
        machine_tags=_tag_list(values["machine_tags"]),
        lon=geo[0],
        lat=geo[1],
        accuracy=geo[2],
        page_url=_optional_text(values["page_url"]),
        download_url=_optional_text(values["download_url"]),
        license=_optional_text(values["license_name"]),
        license_url=_optional_text(values["license_url"]),
        server_id=values["server_id"].strip() or None,
        farm_id=values["farm_id"].strip() or None,
        secret=values["secret"].strip() or None,
        secret_original=values["secret_original"].strip() or None,
        extension_original=values["extension_original"].strip() or None,
        marker=marker,
    )


def iter_records(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[YfccRecord | BadLine]:
    """Parse every line of a (plain, .gz or .bz2; local or remote) metadata file, in file order."""
    from dataengine.fs import iter_lines

    for line in iter_lines(url, storage_options, max_bytes=MAX_LINE_BYTES):
        yield parse_line(line)
