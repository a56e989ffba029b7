"""Image validation and normalisation: full decode, EXIF orientation, RGB, shorter side resize, JPEG.

:func:`normalize_image` is the per-sample kernel of ingest, and the benchmark's kernel-limit reference runs
the very same function, so their ratio measures the pipeline's overhead only.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

# PIL's own default; anything larger is treated as a decompression bomb and rejected.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageRejected(Exception):
    """The bytes are not a usable image (empty, truncated, not an image, unsupported, too large)."""


def _describe(exc: Exception) -> str:
    # PIL messages may embed object reprs ("<_io.BytesIO object at 0x7f...>"); drop them so that ledgers
    # are reproducible byte for byte.
    return f"{type(exc).__name__}: {re.sub(r' ?<[^<>]* at 0x[0-9a-f]+>', '', str(exc))}"


@dataclass(frozen=True)
class NormalizedImage:
    """A re-encoded JPEG and its size after resizing."""

    jpeg: bytes
    width: int
    height: int


def preload_plugins() -> None:
    """Import the common format plugins (JPEG, PNG, GIF, BMP, PPM) now, which the first decode would do.

    Called before forking decoding workers, so that they inherit the plugins instead of each importing them.
    """
    Image.preinit()


def reuse_image_buffers(max_blocks: int = 8) -> None:
    """Let Pillow keep up to ``max_blocks`` freed image buffers for reuse (Pillow keeps none by default).

    For a process decoding many images: otherwise every decoded image's buffer (>= 128 KiB) is a fresh mmap
    from glibc and is page-faulted in again, ~65 faults per 224-pixel photo and ~30% more CPU per image. (A
    process that once freed a larger block escapes this by luck: glibc then raises its mmap threshold.)
    """
    Image.core.set_blocks_max(max_blocks)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises many types for unreadable headers
        raise ImageRejected(f"not a decodable image: {_describe(exc)}") from exc
    if image.width * image.height > max_pixels:
        raise ImageRejected(f"decompression bomb: {image.width}x{image.height} exceeds {max_pixels} pixels")
    return image


def _decode(image: Image.Image, image_size: int) -> Image.Image:
    # JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= the target size:
    # still a full decode of the stream (truncation is detected) at a fraction of the cost.
    if image.format == "JPEG":
        image.draft("RGB", (image_size, image_size))
    try:
        image.load()
    except Exception as exc:  # truncated data, broken codec streams, unsupported modes
        raise ImageRejected(f"decode failed: {_describe(exc)}") from exc
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def _resize_shorter(image: Image.Image, image_size: int) -> Image.Image:
    width, height = image.size
    shorter = min(width, height)
    if shorter <= image_size:  # never upscale
        return image
    scale = image_size / shorter
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def normalize_image(data: bytes, image_size: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> NormalizedImage:
    """Decode ``data`` fully, apply EXIF orientation, convert to RGB, resize and re-encode as JPEG.

    Args:
        data: the original file bytes.
        image_size: the shorter side after resizing; smaller images are kept as they are.
        quality: JPEG quality of the re-encoded image.
        max_pixels: images with more pixels are rejected as decompression bombs.

    Raises:
        ImageRejected: with a human-readable reason when the bytes are not a usable image.
    """
    image = _decode(_open_checked(data, max_pixels), image_size)
    try:
        image = _resize_shorter(_to_rgb(image), image_size)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality, optimize=False)
    except (OSError, ValueError) as exc:
        raise ImageRejected(f"conversion failed: {_describe(exc)}") from exc
    return NormalizedImage(out.getvalue(), image.width, image.height)
