"""The per-sample image kernel: decode, orientation, RGB, resize, and every kind of rejection."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from dataengine.images import (DEFAULT_MAX_PIXELS, JPEG_MAX_SIDE, ImageRejected, decoded_bytes, max_decoded_bytes,
                               normalize_image)


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, channels), dtype=np.uint8), mode)


def test_resizes_the_shorter_side_and_keeps_aspect():
    out = normalize_image(_encode(_noise(400, 300)), image_size=150, quality=90)
    assert (out.width, out.height) == (200, 150)
    assert Image.open(io.BytesIO(out.jpeg)).format == "JPEG"


def test_never_upscales():
    out = normalize_image(_encode(_noise(40, 30)), image_size=256, quality=90)
    assert (out.width, out.height) == (40, 30)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = normalize_image(_encode(_noise(80, 40), exif=exif), image_size=256, quality=90)
    assert (out.width, out.height) == (40, 80)


def test_png_with_alpha_and_grayscale_become_rgb():
    for image in (_noise(50, 50, "RGBA"), _noise(50, 50).convert("L"), _noise(50, 50).convert("P")):
        out = normalize_image(_encode(image, "PNG"), image_size=256, quality=90)
        assert Image.open(io.BytesIO(out.jpeg)).mode == "RGB"


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not a decodable image"),
    (b"GIF89a" + b"\x00" * 5, "not a decodable image"),
])
def test_rejects_non_images(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        normalize_image(data, image_size=64, quality=90)


def test_rejects_truncated_jpeg():
    data = _encode(_noise(200, 200))
    with pytest.raises(ImageRejected, match="decode failed"):
        normalize_image(data[: len(data) // 2], image_size=64, quality=90)


def test_rejects_decompression_bombs():
    data = _encode(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageRejected, match="decompression bomb"):
        normalize_image(data, image_size=64, quality=90, max_pixels=300 * 299)


def test_output_is_deterministic():
    data = _encode(_noise(300, 200))
    assert normalize_image(data, 100, 90).jpeg == normalize_image(data, 100, 90).jpeg


# ------------------------------------------------------------------------------------------ crafted headers

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, color_type: int = 0, bit_depth: int = 8, rows: int | None = None) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with ``rows`` rows of zeros (all by default): a tiny
    file for a huge raster, as zeros compress ~1000:1."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\0" * (1 + (width * channels * bit_depth + 7) // 8)
    compressor, parts, left = zlib.compressobj(9), [], height if rows is None else rows
    while left:
        count = min(left, max(1, (1 << 20) // len(row)))
        parts.append(compressor.compress(row * count))
        left -= count
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def crafted_jpeg(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is patched to claim ``width`` x ``height``."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def crafted_gif(width: int, height: int) -> bytes:
    """A GIF whose screen and only frame claim ``width`` x ``height`` (one LZW code of data)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def crafted_tiff(width: int, height: int, tile: int | None = None, compression: int = 1) -> bytes:
    """A little-endian RGB TIFF with 16 bytes of data, claiming ``width`` x ``height`` (or a huge tile)."""
    entries = {256: (4, width), 257: (4, height), 258: (3, 8), 259: (3, compression), 262: (3, 2), 277: (3, 3)}
    layout = {322: (4, tile), 323: (4, tile), 324: (4, 0), 325: (4, 16)} if tile else \
        {273: (4, 0), 278: (4, height), 279: (4, 16)}
    entries.update(layout)
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, data_offset if tag in (273, 324) else value)
        for tag, (kind, value) in sorted(entries.items())) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 16


def crafted_bmp(width: int, height: int) -> bytes:
    """A 24-bit BMP claiming ``width`` x ``height`` with no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


BOMBS = {  # each header claims a raster whose decoding would take GBs or tens of seconds
    "png 1 x 89.4M rows": crafted_png(1, 89_400_000),
    "png 16-bit RGBA 1 x 40M": crafted_png(1, 40_000_000, color_type=6, bit_depth=16, rows=1000),
    "png 65,535 x 65,535": crafted_png(65535, 65535, rows=10),
    "jpeg 1 x 65,535": crafted_jpeg(1, 65535),
    "jpeg 65,500 x 65,500": crafted_jpeg(65500, 65500),
    "gif 1 x 65,535": crafted_gif(1, 65535),
    "gif 65,535 x 65,535": crafted_gif(65535, 65535),
    "tiff 1 x 89M rows": crafted_tiff(1, 89_000_000),
    "tiff 16 x 16 with a 32,768-pixel tile": crafted_tiff(16, 16, tile=32768, compression=8),
    "bmp 1 x 30M rows": crafted_bmp(1, 30_000_000),
}

_PEAK_CHECK = """
import json, resource, sys
from dataengine.images import ImageRejected, normalize_image
sys.path.insert(0, sys.argv[1])
from test_images import BOMBS
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {}
for name, data in BOMBS.items():
    try:
        normalize_image(data, 256, 90)
        results[name] = "accepted"
    except ImageRejected as exc:
        results[name] = str(exc)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "results": results}))
"""


def test_crafted_headers_are_refused_before_decoding_with_bounded_memory():
    """A 174 KB PNG of 1 x 89.4M pixels took 2.65 GB and seconds per worker; every such header is refused
    from the header alone (peak RSS of a fresh interpreter that tries them all, measured, not timed)."""
    result = subprocess.run([sys.executable, "-c", _PEAK_CHECK, os.path.dirname(__file__)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    accepted = [name for name, outcome in report["results"].items() if outcome == "accepted"]
    assert not accepted, report
    assert report["peak_kib"] < 64 << 10, report  # under 64 MiB above the interpreter's own


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_every_crafted_header_is_rejected(name):
    with pytest.raises(ImageRejected, match="decompression bomb|aspect ratio|decode failed|not a decodable"):
        normalize_image(BOMBS[name], image_size=256, quality=90)


def test_decoded_bytes_count_a_pointer_per_row():
    assert decoded_bytes(1, 1000) == 1000 * (4 + 8)
    assert max_decoded_bytes(DEFAULT_MAX_PIXELS) == 4 * DEFAULT_MAX_PIXELS + 8 * JPEG_MAX_SIDE
    side = int(DEFAULT_MAX_PIXELS**0.5)  # the largest square image stays accepted
    assert decoded_bytes(side, side) <= max_decoded_bytes(DEFAULT_MAX_PIXELS)


def test_an_extreme_aspect_ratio_is_refused_before_decoding():
    data = crafted_png(3, 70_000, rows=70_000)  # small in pixels and bytes, but no JPEG can hold 70,000 rows
    with pytest.raises(ImageRejected, match="aspect ratio too extreme: 3x70000"):
        normalize_image(data, image_size=256, quality=90)
    assert normalize_image(crafted_png(3, 60_000), image_size=256, quality=90).height == 60_000


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "ICO", "PPM", "TGA", "SGI"])
def test_only_the_ingested_formats_are_decoded(fmt):
    """Pillow's other decoders (EPS runs Ghostscript) are never tried on bytes named like a photo."""
    image = Image.new("RGB", (32, 32), (1, 2, 3))
    data = _encode(image, fmt) if fmt != "EPS" else b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n"
    with pytest.raises(ImageRejected, match="not a decodable image"):
        normalize_image(data, image_size=64, quality=90)


def test_transparent_images_keep_their_bytes_with_one_conversion():
    """RGBA, LA and palette transparency composite on white exactly as before the memory changes."""
    rgba = _noise(64, 48, "RGBA")
    reference = Image.new("RGB", rgba.size, (255, 255, 255))
    reference.paste(rgba, mask=rgba.getchannel("A"))
    out = normalize_image(_encode(rgba, "PNG"), image_size=256, quality=90)
    expected = io.BytesIO()
    reference.save(expected, format="JPEG", quality=90, optimize=False)
    assert out.jpeg == expected.getvalue()
