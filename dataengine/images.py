"""Image validation and normalisation: full decode, EXIF orientation, RGB, shorter side resize, JPEG.

:func:`normalize_image` is the per-sample kernel of ingest, and the benchmark's kernel-limit reference runs
the very same function, so their ratio measures the pipeline's overhead only.

Memory is bounded before anything is decoded, from the header alone: at most ``max_pixels`` pixels; at most
:func:`max_decoded_bytes` (``4 * max_pixels + 8 * 65,500``, 358 MB by default) for one RGB copy of the
(JPEG: draft-scaled) raster as :func:`decoded_bytes` counts it, Pillow's pointer per row included, so that a
1-pixel-wide image of millions of rows is refused too; and the stored JPEG must fit JPEG's 65,500-pixel
side, which bounds the aspect ratio (about 256:1 at the default image size). Only the
decoders of the accepted formats (:data:`FORMATS`) are ever tried, never Pillow's others (EPS through
Ghostscript, PSD, FITS...). The pipeline keeps at most about three such copies alive at once (an RGBA or
LA image composited on white); see README, "Guarantees and limits", for the measured peaks.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

# PIL's own default; anything larger is treated as a decompression bomb and rejected.
DEFAULT_MAX_PIXELS = 89_478_485
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
"""The formats decoded: those of ingest's image extensions (JPEG's opener also reads multi-picture JPEGs)."""
JPEG_MAX_SIDE = 65_500
"""libjpeg's largest image side: larger output is refused before decoding rather than after."""
_ROW_POINTER_BYTES = 8


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


def decoded_bytes(width: int, height: int) -> int:
    """Bytes of one RGB copy of a ``width`` x ``height`` raster as Pillow holds it (4 per pixel, a pointer per row)."""
    return height * (4 * width + _ROW_POINTER_BYTES)


def max_decoded_bytes(max_pixels: int) -> int:
    """The decoded-raster budget: :func:`decoded_bytes` of ``max_pixels`` pixels in up to 65,500 rows."""
    return 4 * max_pixels + _ROW_POINTER_BYTES * JPEG_MAX_SIDE


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises many types for unreadable headers
        raise ImageRejected(f"not a decodable image: {_describe(exc)}") from exc
    if image.width * image.height > max_pixels:
        raise ImageRejected(f"decompression bomb: {image.width}x{image.height} exceeds {max_pixels} pixels")
    return image


def _check_raster(image: Image.Image, image_size: int, max_pixels: int) -> None:
    """Refuse, before decoding, a raster too large for memory or an output JPEG cannot hold."""
    width, height = image.size
    needed, budget = decoded_bytes(width, height), max_decoded_bytes(max_pixels)
    if needed > budget:
        raise ImageRejected(f"decompression bomb: {width}x{height} decodes to {needed} bytes (with a pointer per "
                            f"row), more than the {budget} allowed with max_pixels={max_pixels}")
    tile = _tiff_tile_bytes(image)
    if tile > budget:  # libtiff allocates a whole tile, whatever the image's size
        raise ImageRejected(f"decompression bomb: a TIFF tile of {tile} bytes, more than the {budget} allowed")
    out_width, out_height = _resized_size(width, height, image_size)
    if max(out_width, out_height) > JPEG_MAX_SIDE:
        raise ImageRejected(f"aspect ratio too extreme: {width}x{height} would be stored as {out_width}x{out_height}, "
                            f"over JPEG's {JPEG_MAX_SIDE}-pixel side")


def _tiff_tile_bytes(image: Image.Image) -> int:
    """Bytes of one decoded tile of a tiled TIFF (0 for anything else), from its tags."""
    tags = getattr(image, "tag_v2", None) if image.format == "TIFF" else None
    if not tags or not tags.get(322) or not tags.get(323):
        return 0
    bits = tags.get(258, 8)
    bits = max(bits) if isinstance(bits, tuple) else bits
    return int(tags[322]) * int(tags[323]) * int(tags.get(277, 1)) * ((int(bits) + 7) // 8)


def _decode(image: Image.Image, image_size: int, max_pixels: int) -> Image.Image:
    # JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= the target size:
    # still a full decode of the stream (truncation is detected) at a fraction of the cost.
    if image.format == "JPEG":
        image.draft("RGB", (image_size, image_size))
    _check_raster(image, image_size, max_pixels)
    try:
        image.load()
    except Exception as exc:  # truncated data, broken codec streams, unsupported modes
        raise ImageRejected(f"decode failed: {_describe(exc)}") from exc
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """The upright RGB image, transparent pixels on white. Called with the only reference to ``image``, so
    that each conversion frees its input: at most two rasters are alive at once."""
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the whole raster when upright
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA") if image.mode != "RGBA" else image
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image)  # an RGBA mask is its alpha band: no separate copy of it
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def _resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    shorter = min(width, height)
    if shorter <= image_size:  # never upscale
        return width, height
    scale = image_size / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize_shorter(image: Image.Image, image_size: int) -> Image.Image:
    size = _resized_size(*image.size, image_size)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def normalize_image(data: bytes, image_size: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> NormalizedImage:
    """Decode ``data`` fully, apply EXIF orientation, convert to RGB, resize and re-encode as JPEG.

    Args:
        data: the original file bytes.
        image_size: the shorter side after resizing; smaller images are kept as they are.
        quality: JPEG quality of the re-encoded image.
        max_pixels: images with more pixels, or whose decoded raster would take more bytes than
            :func:`max_decoded_bytes` allows, are rejected as decompression bombs.

    Raises:
        ImageRejected: with a human-readable reason when the bytes are not a usable image.
    """
    try:
        # Nested calls, so that no name here keeps a raster alive once the next step has converted it.
        image = _resize_shorter(_to_rgb(_decode(_open_checked(data, max_pixels), image_size, max_pixels)), image_size)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality, optimize=False)
    except (ImageRejected, MemoryError):  # memory running out within the bounds is the machine's, not the sample's
        raise
    except Exception as exc:  # anything else a decoder, EXIF parser or encoder raises on these bytes is theirs
        raise ImageRejected(f"conversion failed: {_describe(exc)}") from exc
    return NormalizedImage(out.getvalue(), image.width, image.height)
