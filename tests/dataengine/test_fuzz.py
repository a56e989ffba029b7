"""Fuzz suites (hypothesis) for ingest's hostile-input surface: the YFCC line parser, the tar readers, image
decoding, and the status every row ends with.

Properties: nothing but the documented error types escapes; everything terminates (the tests run under a
timeout); readers never reach outside the bytes they were given; every input row gets exactly one status.
Each suite runs a few thousand cases in CI (derandomized, so that CI is reproducible) and many more, with
fresh random cases each time, under ``-m slow``. Cases are built from one hypothesis-seeded ``random.Random``
each (``st.randoms``): one draw per case keeps hypothesis's own cost to ~1 ms a case, where drawing every
mutation from hypothesis cost several; a failure prints the seed that reproduces it.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import random
import struct
import tarfile
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dataengine import yfcc
from dataengine.errors import InputCorruptError
from dataengine.images import JPEG_MAX_SIDE, ImageRejected, normalize_image
from dataengine.ingest import STATUSES
from dataengine.metadata_table import rows_to_table
from dataengine.sources import Fetcher, Row, iter_rows
from dataengine.tario import iter_members, scan_tar, ustar_header


def runs(ci: int, slow: int) -> pytest.MarkDecorator:
    """Parametrize a fuzz test over a CI profile (``ci`` derandomized cases) and a slow one (``slow`` cases).

    The timeouts catch a hang (a case that never ends), with room for a busy machine.
    """
    return pytest.mark.parametrize("examples", [
        pytest.param(ci, id=f"ci-{ci}", marks=pytest.mark.timeout(600)),
        pytest.param(slow, id=f"slow-{slow}", marks=[pytest.mark.slow, pytest.mark.timeout(7200)]),
    ])


def fuzz(examples: int, check) -> None:
    """Run the hypothesis test ``check`` for ``examples`` cases (derandomized unless it is the slow profile)."""
    settings(max_examples=examples, deadline=None, database=None, derandomize=examples <= 5000,
             suppress_health_check=list(HealthCheck))(check)()


# --------------------------------------------------------------------------------------------- YFCC lines

_HOSTILE_INTS = ["+1", " 1", "1 ", "\u0663", "\uff11", "0x10", "1_0", "", "-0", "00", "007", "1e3", "nan", "-1",
                 str(2**31 - 1), str(2**31), str(2**63 - 1), str(2**63), str(2**64), "9" * 30, "-" + "9" * 19]
_HOSTILE_TEXT = ["%00", "%2F", "%2e%2e", "%ZZ", "%", "+", "..", ".", "jpg/x", "j" * 300, "d/../../outside/s.jpg",
                 "a\\b", "\u202e", "http://h/1/a%00b.jpg", "http://h/x/..", "http://h/", "?", "#", "\x00"]
_BASE = dict(line_number="7", photo_id="6985418911", photo_hash="ab" * 16, user_nsid="1@N00", user_nickname="x+y",
             date_taken="2010-05-01+10%3A00%3A00.0", date_uploaded="1273000000", device="NIKON+D90", title="t",
             description="d", user_tags="a,b+c", machine_tags="", longitude="-1.5", latitude="2.5", accuracy="16",
             page_url="http://p/1", download_url="http://h/1/6985418911_s.jpg", license_name="L", license_url="",
             server_id="1", farm_id="1", secret="s", secret_original="o", extension_original="jpg", marker="0")
_CHARS = "abc XYZ019+-%./\\:?#=&\x00\x7f\u00e9\u0663\uff11\u202e\U0001f600"


def _hostile_value(r: random.Random) -> str:
    kind = r.randrange(4)
    if kind == 0:
        return r.choice(_HOSTILE_INTS)
    if kind == 1:
        return r.choice(_HOSTILE_TEXT)
    if kind == 2:
        return str(r.randint(-(2**65), 2**65) >> r.randrange(66))
    return "".join(r.choice(_CHARS) for _ in range(r.randrange(13)))


def yfcc_line(r: random.Random) -> bytes | str:
    """A valid line of either layout with a few fields replaced by hostile values (sometimes with a field
    too many or too few), or raw bytes."""
    if r.randrange(10) == 0:
        return r.randbytes(r.randrange(600))
    names = r.choice([yfcc.FIELDS_25, yfcc.FIELDS_23])
    values = [_BASE[name] for name in names]
    for _ in range(r.randint(1, 5)):
        values[r.randrange(len(values))] = _hostile_value(r)
    extra = r.choice([0, 0, 0, 0, 0, 0, 1, -1])
    values = values + ["x"] if extra > 0 else values[:extra] if extra < 0 else values
    line = "\t".join(values)
    return line.encode("utf-8", "surrogatepass") if r.random() < 0.5 else line


@runs(ci=2000, slow=100_000)
def test_fuzz_yfcc_parser(examples):
    fetcher = Fetcher("/nonexistent-root", download=False, storage_options={})

    @given(st.randoms(use_true_random=True))
    def check(r):
        line = yfcc_line(r)
        result = yfcc.parse_line(line)
        assert isinstance(result, (yfcc.YfccRecord, yfcc.BadLine))
        if isinstance(result, yfcc.BadLine):
            assert isinstance(result.reason, str) and result.reason
            return
        fields = (line.decode("utf-8", "replace") if isinstance(line, bytes) else line).split("\t")
        names = yfcc.FIELDS_25 if len(fields) == 25 else yfcc.FIELDS_23
        assert fields[names.index("photo_id")] == str(result.photo_id)  # canonical: the key is the text
        record = result.to_dict()
        for name, (low, high) in yfcc.INT_RANGES.items():
            value = record.get(name)
            assert value is None or (type(value) is int and low <= value <= high), (name, value)
        json.dumps(record)
        rows_to_table([record])  # every value fits its metadata.parquet column
        names, _ = fetcher._candidates(record)
        for name in names:
            assert "/" not in name and "\\" not in name and "\0" not in name and name not in ("", ".", "..")
            assert len(name.encode("utf-8", "replace")) <= 255

    fuzz(examples, check)


# --------------------------------------------------------------------------------------------- tar readers


def _member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    header = bytearray(ustar_header("x", len(data)))
    header[0:100] = name[:100].ljust(100, b"\0")
    header[156:157] = kind
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + bytes(-len(data) % 512)


@functools.cache
def _tar_seeds() -> tuple[bytes, ...]:
    """Valid archives of every header form the readers handle: ustar, GNU long names, pax, links, folders."""
    seeds = [_member(b"a/1.jpg", b"x" * 700) + _member(b"a/2.json", b"{}") + bytes(1024)]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
            for name, size in (("d" * 120 + "/long.jpg", 30), ("caf\u00e9/\u6771.png", 513), ("e/empty.jpg", 0)):
                info = tarfile.TarInfo(name)
                info.size = size
                archive.addfile(info, io.BytesIO(b"y" * size))
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            archive.addfile(folder)
            link = tarfile.TarInfo("link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "e/empty.jpg"
            archive.addfile(link)
        seeds.append(buffer.getvalue())
    return tuple(seeds)


_SIZE_FIELDS = [b"-0000001000\0", b"-0000000001\0", b"\xff" * 12, b"\x80" + (2**60).to_bytes(11, "big"),
                b"77777777777\0", b"00000000x10\0", b"           \0", b"\0" * 12, b"00000001000\0"]


def tar_bytes(r: random.Random) -> bytes:
    """A valid archive, then mutated: bytes overwritten, a size field forged, a header replaced, or cut short."""
    data = bytearray(r.choice(_tar_seeds()))
    for _ in range(r.randrange(4)):
        kind = r.randrange(4)
        if len(data) < 512:
            break
        block = r.randrange(len(data) // 512) * 512
        if kind == 0:  # random bytes anywhere
            position = r.randrange(len(data))
            chunk = r.randbytes(r.randint(1, 16))
            data[position : position + len(chunk)] = chunk
        elif kind == 1:  # a forged size (or type flag), checksum recomputed so that the header is believed
            data[block + 124 : block + 136] = r.choice(_SIZE_FIELDS)
            data[block + 156 : block + 157] = r.choice([b"0", b"L", b"x", b"5", b"7", b"g", b"S"])
            if r.random() < 0.5:
                data[block + 148 : block + 156] = b" " * 8
                data[block + 148 : block + 156] = b"%06o\0 " % sum(data[block : block + 512])
        elif kind == 2:
            del data[r.randrange(len(data) + 1) :]
        else:
            data[block : block + 512] = r.randbytes(512)
    return bytes(data)


@runs(ci=1500, slow=50_000)
def test_fuzz_tar_readers(examples):
    folder = tempfile.mkdtemp(prefix="fuzz-tar-")
    path = os.path.join(folder, "t.tar")

    @given(st.randoms(use_true_random=True))
    def check(r):
        data = tar_bytes(r)
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            scanned = list(scan_tar(path))
        except tarfile.ReadError:
            scanned = None
        else:
            assert all(0 <= offset and 0 <= size and offset + size <= len(data) for _, offset, size in scanned)
        try:
            streamed = list(iter_members(io.BytesIO(data)))
        except tarfile.ReadError:
            streamed = None
        if scanned is not None and streamed is not None:  # both readers agree on what they both accept
            assert streamed == [(name, data[offset : offset + size]) for name, offset, size in scanned]
        for name in ("t.tar", "t.tar.gz")[: 1 + (r.random() < 0.3)]:  # through ingest: rows, or one named error
            if name.endswith(".gz"):
                with open(path + ".gz", "wb") as handle:
                    handle.write(gzip.compress(data, compresslevel=1))
            try:
                rows = list(iter_rows(None, os.path.join(folder, name), {}))
            except InputCorruptError:
                continue
            assert all(isinstance(row, Row) and (row.data is not None or row.offset >= 0 or row.error)
                       for row in rows)

    fuzz(examples, check)


# --------------------------------------------------------------------------------------------- images


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@functools.cache
def _image_seeds() -> tuple[bytes, ...]:
    gradient = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = gradient.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 30)))
    palette = gradient.convert("P")
    return (
        _encode(gradient, "JPEG", quality=80), _encode(gradient, "JPEG", progressive=True, exif=exif),
        _encode(gradient, "PNG"), _encode(rgba, "PNG"), _encode(gradient.convert("LA"), "PNG"),
        _encode(palette, "PNG", transparency=3), _encode(Image.new("I;16", (20, 10), 300), "PNG"),
        _encode(palette, "GIF"), _encode(gradient, "BMP"), _encode(gradient, "WEBP"),
        _encode(gradient, "TIFF"), _encode(gradient, "TIFF", compression="tiff_deflate"),
        _encode(gradient, "TIFF", tile=(16, 16)) if "tile" in Image.SAVE.get("TIFF").__code__.co_varnames else
        _encode(gradient, "TIFF", compression="tiff_lzw"),
    )


def _patch_dimensions(data: bytes, width: int, height: int) -> bytes:
    """The seed with the dimensions in its header replaced (PNG IHDR, JPEG SOF, GIF screen, BMP header)."""
    data = bytearray(data)
    if data.startswith(b"\x89PNG"):
        data[16:24] = struct.pack(">II", width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    elif data.startswith(b"\xff\xd8") and (sof := data.find(b"\xff\xc0")) > 0:
        data[sof + 5 : sof + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif data.startswith(b"GIF"):
        data[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data.startswith(b"BM"):
        data[18:26] = struct.pack("<ii", width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    return bytes(data)


def image_bytes(r: random.Random) -> bytes:
    """A valid image of one of many forms, then: random bytes, cut short, header dimensions forged, or flipped."""
    data = r.choice(_image_seeds())
    kind = r.randrange(5)
    if kind == 0:
        return r.randbytes(r.randrange(300))
    if kind == 1:
        return data[: r.randrange(len(data) + 1)]
    if kind == 2:
        def side() -> int:
            return r.choice([1, 2, 65_535, 65_536, 2**31 - 1]) if r.random() < 0.3 else r.randint(1, 70_000)
        return _patch_dimensions(data, side(), side())
    mutable = bytearray(data)
    for _ in range(r.randint(1, 8)):
        mutable[r.randrange(len(mutable))] = r.randrange(256)
    return bytes(mutable)


@runs(ci=1500, slow=40_000)
def test_fuzz_image_decoding(examples):
    @given(st.randoms(use_true_random=True))
    def check(r):
        data = image_bytes(r)
        try:
            out = normalize_image(data, image_size=32, quality=80)
        except ImageRejected as exc:
            assert str(exc)
            return
        assert 1 <= out.width <= JPEG_MAX_SIDE and 1 <= out.height <= JPEG_MAX_SIDE
        assert Image.open(io.BytesIO(out.jpeg)).size == (out.width, out.height)

    fuzz(examples, check)


# --------------------------------------------------------------------------------------------- row statuses


@functools.cache
def _hostile_root() -> str:
    """An images root holding what metadata may point at: photos, a folder, a FIFO, symlinks in and out."""
    base = tempfile.mkdtemp(prefix="fuzz-root-")
    root = os.path.join(base, "root")
    os.makedirs(os.path.join(root, "3.d"))
    os.makedirs(os.path.join(base, "outside"))
    photo = _encode(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG")
    for name in ("1.jpg", "2.png", "7.JPG"):
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(photo)
    with open(os.path.join(base, "outside", "secret.jpg"), "wb") as handle:
        handle.write(photo)
    with open(os.path.join(root, "6.jpg"), "wb"):
        pass
    os.mkfifo(os.path.join(root, "4.jpg"))
    os.symlink(os.path.join(base, "outside", "secret.jpg"), os.path.join(root, "5.jpg"))
    os.symlink("1.jpg", os.path.join(root, "8.jpeg"))
    os.symlink("9.jpg", os.path.join(root, "9.jpg"))
    return root


def metadata_rows(r: random.Random) -> list[bytes]:
    lines = []
    for _ in range(r.randint(1, 6)):
        values = dict.fromkeys(yfcc.FIELDS_25, "")
        values["photo_id"] = r.choice([str(i) for i in range(10)] + _HOSTILE_INTS)
        values["extension_original"] = r.choice(["jpg", "png", "jpeg", "d", "JPG"] + _HOSTILE_TEXT)
        values["download_url"] = r.choice(["", "http://h/1/secret.jpg", "http://h/1/1.jpg"] + _HOSTILE_TEXT)
        values["marker"] = r.choice(["0", "0", "1", "+0"])
        lines.append("\t".join(values[name] for name in yfcc.FIELDS_25).encode())
    return lines


@runs(ci=1500, slow=30_000)
def test_fuzz_every_row_gets_one_status_and_nothing_outside_the_root_is_read(examples):
    root = _hostile_root()
    fetcher = Fetcher(root, download=False, storage_options={})
    real_root = os.path.realpath(root) + os.sep

    @given(st.randoms(use_true_random=True))
    def check(r):
        lines = metadata_rows(r)
        rows = [Row(index, line=line) for index, line in enumerate(lines)]
        fetched = fetcher.fetch_block(rows)
        assert len(fetched) == len(rows)
        for item in fetched:
            assert item.status in STATUSES
            assert (item.data is not None) == (item.status == "ok"), item
            if item.status == "ok":
                assert os.path.realpath(os.path.join(root, item.metadata["source"])).startswith(real_root)

    fuzz(examples, check)
