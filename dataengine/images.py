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


class ImageFiltered(ImageRejected):
    """A decodable image that the size filters refuse (shorter side too small, aspect ratio too large)."""


RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")


@dataclass(frozen=True, kw_only=True)
class Resize:
    """How images are resized and which ones are kept (img2dataset's options of the same names)."""

    mode: str = "keep_ratio"
    """``keep_ratio``: the shorter side becomes ``image_size``; ``center_crop``: then the centre square of
    ``image_size``; ``border``: the longer side becomes ``image_size``, padded with white to a square;
    ``no``: stored at the original size."""
    only_if_bigger: bool = True
    """Resize only images larger than ``image_size`` (the shorter side for keep_ratio and center_crop, the
    longer for border); smaller ones are kept as they are, never upscaled."""
    min_image_size: int = 0
    """Images whose shorter side (before resizing) is smaller are refused (``filtered``)."""
    max_aspect_ratio: float = float("inf")
    """Images whose longer side over shorter side (before resizing) is larger are refused (``filtered``)."""

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.mode!r}")
        if self.min_image_size < 0:
            raise ValueError(f"min_image_size must be >= 0, got {self.min_image_size}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    def check(self, width: int, height: int) -> None:
        """Raise :class:`ImageFiltered` when a ``width`` x ``height`` original is refused by the filters."""
        shorter, longer = min(width, height), max(width, height)
        if shorter < self.min_image_size:
            raise ImageFiltered(f"image too small: {width}x{height}, shorter side under {self.min_image_size}")
        if longer > self.max_aspect_ratio * shorter:
            raise ImageFiltered(f"aspect ratio too large: {width}x{height}, over {self.max_aspect_ratio:g}")

    def output_size(self, width: int, height: int, image_size: int) -> tuple[int, int]:
        """The stored size of a ``width`` x ``height`` image."""
        if self.mode == "no":
            return width, height
        if self.mode == "border":
            if self.only_if_bigger and max(width, height) <= image_size:
                return width, height
            return image_size, image_size
        if self.only_if_bigger and min(width, height) <= image_size:
            return width, height
        return (image_size, image_size) if self.mode == "center_crop" else _scaled(width, height, image_size)


KEEP_RATIO = Resize()


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
    original_width: int = 0
    original_height: int = 0


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


def _open_filtered(data: bytes, max_pixels: int, resize: Resize, original: list[int]) -> Image.Image:
    """The opened image once the size filters accept it; its upright original size is put in ``original``."""
    image = _open_checked(data, max_pixels)
    width, height = image.size
    if resize.min_image_size or resize.max_aspect_ratio != float("inf"):
        resize.check(width, height)  # symmetric in width and height: EXIF orientation does not matter
    original.extend((width, height))  # as stored: _resize turns it upright (reading EXIF here may decode a PNG)
    return image


def _check_raster(image: Image.Image, image_size: int, max_pixels: int, resize: Resize = KEEP_RATIO) -> None:
    """Refuse, before decoding, a raster too large for memory or an output JPEG cannot hold."""
    width, height = image.size
    needed, budget = decoded_bytes(width, height), max_decoded_bytes(max_pixels)
    if needed > budget:
        raise ImageRejected(f"decompression bomb: {width}x{height} decodes to {needed} bytes (with a pointer per "
                            f"row), more than the {budget} allowed with max_pixels={max_pixels}")
    tile = _tiff_tile_bytes(image)
    if tile > budget:  # libtiff allocates a whole tile, whatever the image's size
        raise ImageRejected(f"decompression bomb: a TIFF tile of {tile} bytes, more than the {budget} allowed")
    out_width, out_height = resize.output_size(width, height, image_size)
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


def _decode(image: Image.Image, image_size: int, max_pixels: int, resize: Resize = KEEP_RATIO) -> Image.Image:
    # JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= the target size:
    # still a full decode of the stream (truncation is detected) at a fraction of the cost.
    if image.format == "JPEG" and resize.mode != "no":
        image.draft("RGB", (image_size, image_size))
    _check_raster(image, image_size, max_pixels, resize)
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


def _scaled(width: int, height: int, image_size: int, side: int | None = None) -> tuple[int, int]:
    """``width`` x ``height`` scaled so that ``side`` (default: the shorter one) becomes ``image_size``."""
    scale = image_size / (min(width, height) if side is None else side)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize(image: Image.Image, image_size: int, resize: Resize, original: list[int]) -> Image.Image:
    """``image`` (maybe draft-scaled) as :class:`Resize` says of its ``original`` size."""
    if (original[0] - original[1]) * (image.width - image.height) < 0:  # EXIF turned it: the upright original
        original.reverse()
    if resize.mode == "no" or resize.output_size(*original, image_size) == tuple(original):
        return image
    width, height = image.size
    if resize.mode == "border":
        size = _scaled(width, height, image_size, max(width, height))
    else:
        size = _scaled(width, height, image_size)
    if size != (width, height):
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if resize.mode == "center_crop":
        left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
        return image.crop((left, top, left + image_size, top + image_size))
    if resize.mode == "border":
        canvas = Image.new("RGB", (image_size, image_size), (255, 255, 255))
        canvas.paste(image, ((image_size - image.width) // 2, (image_size - image.height) // 2))
        return canvas
    return image


def normalize_image(data: bytes, image_size: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                    resize: Resize = KEEP_RATIO) -> NormalizedImage:
    """Decode ``data`` fully, apply EXIF orientation, convert to RGB, resize and re-encode as JPEG.

    Args:
        data: the original file bytes.
        image_size: the shorter side after resizing (with the default ``resize``); smaller images are kept
            as they are.
        quality: JPEG quality of the re-encoded image.
        max_pixels: images with more pixels, or whose decoded raster would take more bytes than
            :func:`max_decoded_bytes` allows, are rejected as decompression bombs.
        resize: the resize mode and the size filters.

    Raises:
        ImageRejected: with a human-readable reason when the bytes are not a usable image;
            :class:`ImageFiltered` when the size filters refuse it.
    """
    try:
        original: list[int] = []
        # Nested calls, so that no name here keeps a raster alive once the next step has converted it.
        image = _resize(_to_rgb(_decode(_open_filtered(data, max_pixels, resize, original), image_size, max_pixels,
                                        resize)), image_size, resize, original)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality, optimize=False)
    except (ImageRejected, MemoryError):  # memory running out within the bounds is the machine's, not the sample's
        raise
    except Exception as exc:  # anything else a decoder, EXIF parser or encoder raises on these bytes is theirs
        raise ImageRejected(f"conversion failed: {_describe(exc)}") from exc
    return NormalizedImage(out.getvalue(), image.width, image.height, *original)
