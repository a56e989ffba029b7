"""Drawing the photos: each latent class is a family of procedural shapes or textures drawn with vectorised numpy.

Shape functions return an alpha mask in [0, 1]; they are written as approximate signed distances in pixels
(positive inside) passed through ``_fill``, which antialiases the edge over about one pixel.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dataengine.synth.config import SynthConfig
from dataengine.synth.vocabulary import CLASS_NAMES


@dataclass(frozen=True)
class _Grid:
    xx: np.ndarray
    yy: np.ndarray

    @property
    def h(self) -> int:
        return self.xx.shape[0]

    @property
    def w(self) -> int:
        return self.xx.shape[1]

    @property
    def s(self) -> int:
        return min(self.h, self.w)


@functools.lru_cache(maxsize=256)
def _grid(height: int, width: int) -> _Grid:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + np.float32(0.5)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return _Grid(xx, yy)


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    # A Python float: numpy float64 scalars would promote the float32 pixel arrays to float64.
    return float(rng.uniform(low, high))


def _fill(distance: np.ndarray) -> np.ndarray:
    return np.clip(distance + np.float32(0.5), np.float32(0.0), np.float32(1.0))


def _norm(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    # sqrt of squares: np.hypot is several times slower and its overflow care is useless at pixel scale.
    return np.sqrt(dx * dx + dy * dy)


def _center(rng: np.random.Generator, g: _Grid, radius: float) -> tuple[float, float]:
    """A random centre keeping most of a shape of ``radius`` inside the image (it may be cropped a little)."""
    mx, my = min(0.7 * radius, g.w / 2), min(0.7 * radius, g.h / 2)
    return _u(rng, mx, g.w - mx), _u(rng, my, g.h - my)


def _rotated(g: _Grid, cx: float, cy: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    dx, dy = g.xx - cx, g.yy - cy
    c, s = math.cos(theta), math.sin(theta)
    return dx * c + dy * s, dy * c - dx * s


def _placed(rng: np.random.Generator, g: _Grid, low: float, high: float) -> tuple[float, np.ndarray, np.ndarray]:
    """A random size in ``[low, high] * side`` and the rotated coordinates around a random centre."""
    size = g.s * _u(rng, low, high)
    cx, cy = _center(rng, g, size)
    u, v = _rotated(g, cx, cy, _u(rng, 0, 2 * np.pi))
    return size, u, v


def _region(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    """Where a texture is shown: the whole frame, an ellipse or a rectangle of random size and position."""
    choice = rng.random()
    if choice < 0.25:
        return np.ones_like(g.xx)
    rx, ry = g.w * _u(rng, 0.3, 0.55), g.h * _u(rng, 0.3, 0.55)
    cx, cy = _u(rng, 0.6 * rx, g.w - 0.6 * rx), _u(rng, 0.6 * ry, g.h - 0.6 * ry)
    dx, dy = np.abs(g.xx - cx), np.abs(g.yy - cy)
    if choice < 0.6:
        return _fill((1.0 - _norm(dx / rx, dy / ry)) * min(rx, ry))
    return _fill(np.minimum(rx - dx, ry - dy))


def _stripes_of(phase: np.ndarray, period: float) -> np.ndarray:
    """Antialiased stripes from a phase field (sin slope turned into an approximate pixel distance)."""
    return _fill(np.sin(phase) * (period / (2 * np.pi)))


def _disc(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    alpha = np.zeros_like(g.xx)
    for _ in range(rng.integers(1, 3)):
        radius = g.s * _u(rng, 0.12, 0.3)
        cx, cy = _center(rng, g, radius)
        alpha = np.maximum(alpha, _fill(radius - _norm(g.xx - cx, g.yy - cy)))
    return alpha


def _ring(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    radius = g.s * _u(rng, 0.2, 0.38)
    thickness = radius * _u(rng, 0.2, 0.35)
    cx, cy = _center(rng, g, radius)
    return _fill(thickness / 2 - np.abs(_norm(g.xx - cx, g.yy - cy) - radius))


def _target(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    radius = g.s * _u(rng, 0.28, 0.45)
    period = radius / _u(rng, 2.5, 3.5)
    cx, cy = _center(rng, g, radius)
    d = _norm(g.xx - cx, g.yy - cy)
    return np.minimum(_fill(radius - d), _stripes_of(2 * np.pi * d / period, period))


def _crescent(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    radius = g.s * _u(rng, 0.2, 0.35)
    cx, cy = _center(rng, g, radius)
    angle, offset = _u(rng, 0, 2 * np.pi), radius * _u(rng, 0.35, 0.55)
    d1 = _norm(g.xx - cx, g.yy - cy)
    d2 = _norm(g.xx - cx - offset * math.cos(angle), g.yy - cy - offset * math.sin(angle))
    return _fill(np.minimum(radius - d1, d2 - 0.9 * radius))


def _polygon(rng: np.random.Generator, g: _Grid, sides: int, low: float, high: float) -> np.ndarray:
    """A filled regular polygon: the intersection of ``sides`` half-planes at the inradius."""
    radius = g.s * _u(rng, low, high)
    cx, cy = _center(rng, g, radius)
    theta = _u(rng, 0, 2 * np.pi)
    inradius = radius * np.cos(np.pi / sides)
    f = np.full_like(g.xx, np.inf)
    for k in range(sides):
        a = theta + 2 * np.pi * k / sides
        f = np.minimum(f, inradius - ((g.xx - cx) * math.cos(a) + (g.yy - cy) * math.sin(a)))
    return _fill(f)


def _triangle(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    return _polygon(rng, g, 3, 0.3, 0.45)


def _square(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    return _polygon(rng, g, 4, 0.22, 0.4)


def _frame(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    half, u, v = _placed(rng, g, 0.2, 0.35)
    thickness = half * _u(rng, 0.18, 0.3)
    return _fill(thickness / 2 - np.abs(np.maximum(np.abs(u), np.abs(v)) - half))


def _cross(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    arm, u, v = _placed(rng, g, 0.22, 0.38)
    half_width = arm * _u(rng, 0.12, 0.2)
    au, av = np.abs(u), np.abs(v)
    return _fill(np.maximum(np.minimum(arm - au, half_width - av), np.minimum(arm - av, half_width - au)))


def _star(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    outer, u, v = _placed(rng, g, 0.25, 0.42)
    inner = outer * _u(rng, 0.38, 0.48)
    frac = np.mod(np.arctan2(v, u) * (5 / (2 * np.pi)), 1.0)
    spikes = np.abs(2 * frac - 1)  # 1 on the five spikes, 0 between them
    return _fill(inner + (outer - inner) * spikes**2 - _norm(u, v))


def _stripes(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    # Near-horizontal stripes: orientation and frequency are what identify the class.
    period = g.s * _u(rng, 0.09, 0.14)
    _, v = _rotated(g, 0, 0, _u(rng, -0.25, 0.25))
    return _stripes_of(2 * np.pi * v / period + _u(rng, 0, 2 * np.pi), period) * _region(rng, g)


def _waves(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    # Near-vertical sinusoidal stripes.
    period, wavelength = g.s * _u(rng, 0.12, 0.18), g.s * _u(rng, 0.3, 0.5)
    x = g.xx + period * _u(rng, 0.5, 0.8) * np.sin(2 * np.pi * g.yy / wavelength + _u(rng, 0, 6.3))
    return _stripes_of(2 * np.pi * x / period + _u(rng, 0, 2 * np.pi), period) * _region(rng, g)


def _zigzag(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    period, wavelength = g.s * _u(rng, 0.14, 0.2), g.s * _u(rng, 0.18, 0.28)
    triangle_wave = np.abs(2 * np.mod(g.xx / wavelength, 1.0) - 1)
    y = g.yy + wavelength * 0.6 * triangle_wave
    return _stripes_of(2 * np.pi * y / period + _u(rng, 0, 2 * np.pi), period) * _region(rng, g)


def _checkerboard(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    cell = g.s * _u(rng, 0.1, 0.16)
    u, v = _rotated(g, _u(rng, 0, cell), _u(rng, 0, cell), _u(rng, 0, np.pi / 2))
    product = np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell)
    return _fill(product * cell / np.pi) * _region(rng, g)


def _lattice(rng: np.random.Generator, g: _Grid, low: float, high: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Offsets of each pixel from the nearest node of a slightly rotated square lattice of random period."""
    period = g.s * _u(rng, low, high)
    u, v = _rotated(g, _u(rng, 0, period), _u(rng, 0, period), _u(rng, -0.3, 0.3))
    return period, np.mod(u, period) - period / 2, np.mod(v, period) - period / 2


def _dots(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    period, du, dv = _lattice(rng, g, 0.14, 0.22)
    return _fill(period * _u(rng, 0.22, 0.32) - _norm(du, dv)) * _region(rng, g)


def _grid_lines(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    period, du, dv = _lattice(rng, g, 0.14, 0.22)
    half_width = _u(rng, 0.6, 1.1)
    distance = period / 2 - np.maximum(np.abs(du), np.abs(dv))  # to the nearest grid line
    return _fill(half_width - distance) * _region(rng, g)


_SHAPES: dict[str, Callable[[np.random.Generator, _Grid], np.ndarray]] = {
    "disc": _disc, "stripes": _stripes, "checkerboard": _checkerboard, "ring": _ring, "triangle": _triangle,
    "cross": _cross, "dots": _dots, "waves": _waves, "grid": _grid_lines, "star": _star, "crescent": _crescent,
    "target": _target, "frame": _frame, "zigzag": _zigzag, "square": _square,
}
_INKS = np.array([[25, 25, 30], [70, 70, 75], [20, 35, 120], [40, 30, 25]], dtype=np.float32)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours, uniformly random but far enough apart to see the shape."""
    for _ in range(32):
        fg, bg = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        if np.linalg.norm(fg - bg) > 120:
            return fg, bg
    return fg, 255 - fg


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed block of standard normal noise; images take random windows of it (drawing fresh normals per
    pixel costs more than everything else in an image)."""
    return np.random.default_rng(np.random.SeedSequence([20190101])).standard_normal(1 << 21, dtype=np.float32)


def _noisy(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    bank = _noise_bank()
    start = int(rng.integers(0, len(bank) - image.size))
    image += bank[start : start + image.size].reshape(image.shape) * np.float32(sigma)
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _compose(rng: np.random.Generator, g: _Grid, alpha: np.ndarray) -> np.ndarray:
    """Paint ``alpha`` in a random colour over a random background with a lighting gradient and noise.

    Images are channel-first ``(3, h, w)`` while drawn: numpy is far faster with the long axis last.
    """
    fg, bg = _colours(rng)
    gx, gy = _u(rng, -40, 40), _u(rng, -40, 40)
    light = (g.xx * (1 / g.w) - 0.5) * gx + (g.yy * (1 / g.h) - 0.5) * gy
    image = light[None] + bg[:, None, None]
    delta = fg[:, None, None] - image
    delta *= alpha[None]
    image += delta
    return _noisy(rng, image, _u(rng, 3, 12))


def _strokes(rng: np.random.Generator, g: _Grid) -> list[np.ndarray]:
    """Point lists ``(n, 2)`` (x, y) of a few smooth random-walk pen strokes."""
    strokes = []
    for _ in range(rng.integers(3, 7)):
        count = int(rng.integers(4, 10))
        heading = _u(rng, 0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.6, count))
        steps = g.s * _u(rng, 0.06, 0.16) * np.stack([np.cos(heading), np.sin(heading)], axis=1)
        start = rng.uniform([0.1 * g.w, 0.1 * g.h], [0.9 * g.w, 0.9 * g.h])
        strokes.append(np.vstack([start, start + np.cumsum(steps, axis=0)]))
    return strokes


def _stroke_alpha(rng: np.random.Generator, g: _Grid, strokes: list[np.ndarray]) -> np.ndarray:
    """Antialiased coverage of the strokes: drawn by PIL at 4x resolution, then box-filtered down."""
    scale = 4
    canvas = Image.new("L", (g.w * scale, g.h * scale), 0)
    pen = ImageDraw.Draw(canvas)
    width = int(rng.integers(4, 9))  # 1 to 2 pixels once reduced
    for points in strokes:
        pen.line([(float(x), float(y)) for x, y in points * scale], fill=255, width=width, joint="curve")
    reduced = canvas.resize((g.w, g.h), Image.Resampling.BOX)
    return np.asarray(reduced, dtype=np.float32) * np.float32(1 / 255)


def _drawing(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    """Thin dark pen or pencil strokes on near-white paper, as from a flatbed scanner."""
    paper = _u(rng, 226, 250) + np.array([3, 1, -4], dtype=np.float32) * _u(rng, 0, 1.5)
    ink = _INKS[rng.integers(len(_INKS))] + rng.normal(0, 8, 3).astype(np.float32)
    alpha = _stroke_alpha(rng, g, _strokes(rng, g)) * _u(rng, 0.75, 1.0)
    image = (ink - paper)[:, None, None] * alpha[None] + paper[:, None, None]
    return _noisy(rng, image, _u(rng, 1.5, 4))


def render_image(class_name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Draw one ``(height, width, 3)`` uint8 RGB image of the latent class ``class_name``.

    Args:
        class_name: one of :data:`CLASS_NAMES`.
        rng: the generator of every random choice (position, scale, rotation, colours, noise).
        height: image height in pixels.
        width: image width in pixels.
    """
    return np.ascontiguousarray(render_planes(class_name, rng, height, width).transpose(1, 2, 0))


def render_planes(class_name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """:func:`render_image`, channel-first ``(3, height, width)``."""
    g = _grid(height, width)
    if class_name == "drawing":
        return _drawing(rng, g)
    if class_name not in _SHAPES:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASS_NAMES)}")
    return _compose(rng, g, _SHAPES[class_name](rng, g))


def image_size(rng: np.random.Generator, config: SynthConfig) -> tuple[int, int]:
    """(height, width): square with probability ``square_rate``, else each side drawn within the range."""
    low, high = config.min_image_size, config.max_image_size
    side = int(rng.integers(low, high + 1))
    if rng.random() < config.square_rate:
        return side, side
    return side, int(rng.integers(low, high + 1))


def encode_jpeg(planes: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a channel-first uint8 image."""
    return _save_jpeg(Image.merge("RGB", [Image.fromarray(plane, "L") for plane in planes]), quality)


def near_duplicate_jpeg(source: bytes, kind: str, rng: np.random.Generator, quality: int) -> bytes:
    """A near-duplicate of the JPEG ``source``, as a re-upload would make it (decoded, changed, encoded again).

    Args:
        source: the original JPEG bytes.
        kind: ``resized`` (both sides scaled by one factor in [0.5, 0.8], bicubic), ``reencoded`` (the same
            pixels at another quality, 15 or more away from ``quality``) or ``cropped`` (a window of 70-90% of
            each side at a random offset).
        rng: the generator of the factor, quality or window.
        quality: the corpus's JPEG quality, also that of the resized and cropped copies.
    """
    with Image.open(io.BytesIO(source)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    if kind == "resized":
        scale = _u(rng, 0.5, 0.8)
        size = (max(16, round(width * scale)), max(16, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    elif kind == "reencoded":
        quality = int(rng.choice([q for q in range(30, 100, 5) if abs(q - quality) >= 15]))
    elif kind == "cropped":
        w, h = max(16, round(width * _u(rng, 0.7, 0.9))), max(16, round(height * _u(rng, 0.7, 0.9)))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        image = image.crop((left, top, left + w, top + h))
    else:
        raise ValueError(f"unknown near-duplicate kind {kind!r}; expected resized, reencoded or cropped")
    return _save_jpeg(image, quality)


def _save_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    # Fixed encoder settings (no optimize/progressive, default 4:2:0 subsampling) keep the bytes reproducible.
    image.save(buffer, "JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()
