"""The per-sample image kernel: decode, orientation, RGB, resize, and every kind of rejection."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dataengine.images import ImageRejected, normalize_image


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
