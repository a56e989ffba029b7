"""Minimal, fast tar reading and writing: member headers parsed and packed directly.

``tarfile`` spends tens of microseconds per member in Python header parsing; for webdataset shards of small
images (two members per sample) that was most of the per-sample cost of streaming (158 us of the trainer's
per-sample budget on 32-pixel CIFAR shards). The two readers here parse only what a shard reader needs:

- :func:`scan_tar`: ``(name, data offset, size)`` of a local tar's files, reading the headers only (ingest
  reads member bytes by offset in its workers);
- :func:`iter_members`: ``(name, bytes)`` of any sequential byte stream (local file, fsspec/S3 file, a
  decompressing stream), front to back, without seeking, so it works on object storage.

Both verify header checksums and sizes and raise :class:`tarfile.ReadError` on a corrupt header and on an
archive that ends inside a member, the errors :mod:`tarfile` itself raises, so callers keep one error
vocabulary. Unlike ``tarfile``, they never stop silently at a corrupt header after the first member, and a
forged size costs no more time or memory than the bytes actually present (``tarfile``'s stream mode spins
for ever skipping a member that claims 2**60 bytes).

The writing side packs deterministic USTAR headers (:func:`ustar_header`: fixed mtime, owner and mode) and
builds a tar in a local file (:class:`TarWriter`) from members that are already packed: what ingest's
workers and its single shard writer need (see :mod:`dataengine.shards` for the shard layout on top).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from typing import IO

from dataengine.fs import create_private

BLOCK = 512
MAX_EXTENDED_BYTES = 1 << 20
"""Largest GNU long-name or pax header accepted (real ones hold a path of a few hundred bytes)."""
_REGULAR = (b"0", b"\0", b"7")
_EXTENDED = (b"L", b"x")
_ZERO_BLOCK = b"\0" * BLOCK
_READ_CHUNK = 16 << 20  # member data is read in pieces: a forged size allocates nothing it does not read


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal digits (NUL/space padded) or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value  # 0xff: two's complement
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits.strip(b"01234567"):
        raise tarfile.ReadError(f"invalid {what} field {field!r} in a tar header")
    return int(digits, 8) if digits else 0


def _check(header: bytes) -> None:
    stored = _number(header[148:156], "checksum")
    # The checksum is the byte sum of the header with its own field read as eight spaces; some old writers
    # summed signed chars (tarfile accepts both, so do we).
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:]):
        raise tarfile.ReadError("bad checksum in a tar header (corrupt or not a tar)")


def _parse(header: bytes) -> tuple[int, bytes] | None:
    """``(member size, type flag)`` of a checked header block; ``None`` at the end of the archive.

    Of the numeric fields only the checksum and the size are interpreted (mode, owner and times never
    reach a caller); a size must be a non-negative number.
    """
    if not header or header == _ZERO_BLOCK:
        return None
    if len(header) < BLOCK:
        raise tarfile.ReadError(f"truncated tar header ({len(header)} bytes)")
    _check(header)
    size = _number(header[124:136], "size")
    if size < 0:
        raise tarfile.ReadError(f"negative member size {size} in a tar header")
    return size, header[156:157]


def _headers(stream: IO[bytes]) -> Iterator[tuple[bytes, int, bytes]]:
    """``(header block, member size, type flag)`` of each checked header read from ``stream``, until the end
    of the archive; the caller moves ``stream`` past each member's data before asking for the next."""
    while True:
        header = stream.read(BLOCK)
        parsed = _parse(header)
        if parsed is None:
            return
        yield header, *parsed


def _extended_size(size: int) -> int:
    if size > MAX_EXTENDED_BYTES:
        raise tarfile.ReadError(f"extended tar header of {size} bytes (more than {MAX_EXTENDED_BYTES})")
    return size


class _Extended:
    """What GNU long-name and pax headers say about the next member: its path, and (pax) its size."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.size: int | None = None

    def read(self, data: bytes, kind: bytes) -> None:
        if kind == b"L":
            self.name = data.split(b"\0", 1)[0].decode("utf-8", "replace") or self.name
            return
        for record in data.split(b"\n"):  # pax: "<len> key=value"
            _, _, keyvalue = record.partition(b" ")
            if keyvalue.startswith(b"path="):
                self.name = keyvalue[5:].decode("utf-8", "replace") or self.name
            elif keyvalue.startswith(b"size="):
                value = keyvalue[5:]
                if not value.isdigit() or not value.isascii():
                    raise tarfile.ReadError(f"invalid pax size record {value[:40]!r}")
                self.size = int(value)

    def member(self, header: bytes, size: int) -> tuple[str, int]:
        """The next member's name and size; forgets them (they apply to one member)."""
        name, self.name = self.name or _ustar_name(header), None
        if self.size is not None:
            size, self.size = self.size, None
        return name, size


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def _read_exact(stream: IO[bytes], size: int, keep: bool = True) -> bytes:
    """``size`` bytes of ``stream`` (or, without ``keep``, skip them: read in pieces and dropped)."""
    if keep and size <= _READ_CHUNK:
        data = stream.read(size)
        got = len(data)
    else:  # in pieces: a forged size runs into the end of the stream before it allocates much
        pieces, got = [], 0
        while got < size and (piece := stream.read(min(size - got, _READ_CHUNK))):
            got += len(piece)
            if keep:
                pieces.append(piece)
        data = b"".join(pieces)
    if got != size:
        raise tarfile.ReadError(f"unexpected end of tar data ({got} of {size} bytes)")
    return data


def iter_members(stream: IO[bytes], max_bytes: int | None = None) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data)`` of every regular file of the tar read sequentially from ``stream``.

    Stops at the end-of-archive block (or a clean end of the stream between members). Directories, links
    and other member kinds are skipped. With ``max_bytes``, a larger member is read past without being
    held in memory and yielded with ``data`` ``None``.
    """
    extended = _Extended()
    for header, size, kind in _headers(stream):
        if kind in _EXTENDED:
            extended.read(_read_exact(stream, _padded(_extended_size(size)))[:size], kind)
            continue
        name, size = extended.member(header, size)
        padded = _padded(size)
        if kind not in _REGULAR or (max_bytes is not None and size > max_bytes):
            _read_exact(stream, padded, keep=False)
            if kind in _REGULAR:
                yield name, None
            continue
        data = _read_exact(stream, padded)
        yield name, data[:size] if padded != size else data


def _padded(size: int) -> int:
    return size + (-size % BLOCK)


def scan_tar(path: str) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of the regular files of a local tar, reading only the headers.

    Every member lies inside the file (a header whose data would run past its end raises
    :class:`tarfile.ReadError`), so a caller reading ``size`` bytes at ``offset`` reads the member only.
    One ``pread`` per header: a buffered file that seeks past each member refills its buffer at every header
    (30% slower on 4,000 photos).
    """
    extended = _Extended()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        offset = 0
        while True:
            header = os.pread(fd, BLOCK, offset)
            parsed = _parse(header)
            if parsed is None:
                return
            size, kind = parsed
            offset += BLOCK
            if kind in _EXTENDED:
                size = _extended_size(size)
                _check_inside(offset, size, file_size)
                extended.read(os.pread(fd, size, offset), kind)
            else:
                name, size = extended.member(header, size)
                _check_inside(offset, size, file_size)
                if kind in _REGULAR:
                    yield name, offset, size
            offset += _padded(size)
    finally:
        os.close(fd)


def _check_inside(offset: int, size: int, file_size: int) -> None:
    if offset + size > file_size:
        raise tarfile.ReadError(f"tar member at byte {offset} ends {offset + size - file_size} bytes past the end "
                                "of the archive (truncated, or a corrupt size)")


# ------------------------------------------------------------------------------------------------ writing


def _header_template() -> tuple[bytes, int]:
    header = bytearray(BLOCK)
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime 0: reproducible shards
    header[148:156] = b" " * 8  # checksum placeholder
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return bytes(header), sum(header)


_HEADER, _HEADER_SUM = _header_template()


def ustar_header(name: str, size: int) -> bytes:
    """A USTAR header; the checksum is the template's byte sum plus that of the name and size fields.

    Packed directly: tarfile's header code costs ~80 us per member.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a USTAR header")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_HEADER_SUM + sum(encoded) + sum(size_field))
    return b"".join((encoded, _HEADER[len(encoded) : 124], size_field, _HEADER[136:148], checksum, _HEADER[156:]))


class TarWriter:
    """A deterministic tar in a local file, written from members already packed (headers, data, padding).

    Adding a member is one write and one hash update. The result is a plain POSIX tar that tarfile and
    webdataset read.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = create_private(path, buffering=1 << 20)  # new file only, never through a symlink
        self._hasher = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes that are already tar members (headers, data, padding)."""
        self._file.write(data)
        self._hasher.update(data)
        self.offset += len(data)

    def close(self) -> tuple[int, str]:
        """Finish the tar (two zero blocks, padded to tar's 10 KiB record); returns its size and sha256."""
        end = 1024 + (-(self.offset + 1024) % 10240)
        self.write(b"\0" * end)
        self._file.close()
        return self.offset, self._hasher.hexdigest()
