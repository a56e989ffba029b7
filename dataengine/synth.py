"""Synthetic YFCC100M-like corpus: JPEG photos plus a 25-column metadata file with planted structure.

The corpus is the embedded default for the demo and the tests. Later stages must recover what is planted:

* latent visual classes (procedural shapes and textures at random positions, scales and colours, so that colour
  alone never identifies a class) with a long-tailed (Zipf) class-size distribution;
* users with a few preferred classes, a home location and one camera each; Zipf-distributed tags correlated
  with the class, frequent noise tags and rare tags; GPS near the user's home, and landmarks photographed at
  the very same coordinates by many users; a scanner device (:data:`SCANNER_DEVICE`) for the ``drawing`` class;
  photos without tags, GPS or device; a few videos (marker 1, no image file);
* optional anomalies (exact duplicates, corrupt files, missing files) for ingest's bookkeeping.

Output of :func:`generate_corpus` (``OUT`` a local folder or an fsspec URL)::

    OUT/images/<photo_id>.jpg  one file per photo row (none for videos and "missing" rows)
    OUT/metadata.tsv           YFCC100M ``yfcc100m_dataset`` layout: 25 TAB-separated fields, no header
    OUT/classes.tsv            ``photo_id<TAB>class_name`` for every photo row (videos excluded), file order
    OUT/anomalies.tsv          ``photo_id<TAB>kind`` for every row whose expected ingest status is not ``ok``
    OUT/synth.json             resolved config and planted-structure summary; written last (= complete)

``anomalies.tsv`` kinds, each the status ingest should give the row:

* ``video``: marker 1; no image file is written.
* ``missing``: a photo row without an image file.
* ``corrupt``: an image file that does not decode: a truncated JPEG (first half of the bytes), a zero-byte file
  or an HTML error page named ``.jpg`` (``synth.json`` names which, under ``anomalies.corrupt``).
* ``duplicate``: the file has exactly the bytes of an *earlier* row in file order whose expected status is
  ``ok``: the first ``ok`` row of the same latent class (``synth.json`` maps each duplicate to that source
  under ``anomalies.duplicate``). Class sizes stay exact: a duplicate keeps its class in ``classes.tsv``.

Every row not listed is expected to ingest as ``ok``; ``synth.json`` has the counts (``expected_counts``).
The same seed and config give byte-identical files: every random draw comes from generators seeded by the
config's seed (images from a per-row generator), and nothing depends on time.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote_plus

import numpy as np
from PIL import Image, ImageDraw

from dataengine.errors import OutputExistsError
from dataengine.fs import Location

logger = logging.getLogger(__name__)

FORMAT = "dataengine.synth"
VERSION = 1
SCANNER_DEVICE = "Canon CanoScan LiDE 100"
ANOMALY_KINDS = ("video", "missing", "corrupt", "duplicate")
CORRUPT_KINDS = ("truncated", "empty", "text")

# Class order is also the size rank (the first class is the largest). "drawing" sits early so that it keeps
# enough photos in small corpora.
CLASS_NAMES = (
    "disc", "stripes", "checkerboard", "ring", "drawing", "triangle", "cross", "dots",
    "waves", "grid", "star", "crescent", "target", "frame", "zigzag", "square",
)
# Per-class tag vocabularies, most frequent first (Zipf weights by rank). Some tags have spaces or non-ASCII
# characters on purpose; a few overlap between classes ("pattern", "moon", "night"), as real tags do.
CLASS_TAGS = {
    "disc": ("circle", "disc", "round", "ball", "sun", "orb", "dot", "moon", "círculo", "full moon"),
    "stripes": ("stripes", "lines", "striped", "pattern", "horizontal", "fabric", "blinds", "rayures", "pin stripe"),
    "checkerboard": (
        "checkerboard", "checkered", "chess", "tiles", "squares", "floor", "pattern", "damier", "chess board",
    ),
    "ring": ("ring", "donut", "hoop", "loop", "wheel", "tire", "bagel", "o-ring", "life buoy"),
    "drawing": ("drawing", "sketch", "pencil", "doodle", "art", "illustration", "ink", "scan", "dessin", "line art"),
    "triangle": ("triangle", "pyramid", "warning", "delta", "geometry", "peak", "yield", "dreieck", "road sign"),
    "cross": ("cross", "plus", "intersection", "swiss", "medical", "crossing", "sign", "kreuz", "red cross"),
    "dots": ("dots", "polka", "spots", "dotted", "leds", "pattern", "bubbles", "pois", "polka dots"),
    "waves": ("waves", "wavy", "water", "ripples", "sea", "curves", "flow", "ocean", "vagues", "sound waves"),
    "grid": ("grid", "mesh", "fence", "net", "wire", "lattice", "graph paper", "grille", "chain link"),
    "star": ("star", "stars", "starfish", "christmas", "shine", "sheriff", "sparkle", "étoile", "shooting star"),
    "crescent": ("crescent", "moon", "croissant", "arc", "night", "lunar", "half moon", "mond", "new moon"),
    "target": ("target", "bullseye", "archery", "concentric", "dartboard", "aim", "cible", "bull's eye"),
    "frame": ("frame", "border", "window", "box", "outline", "picture frame", "cadre", "rahmen"),
    "zigzag": ("zigzag", "chevron", "lightning", "saw", "teeth", "herringbone", "zick zack", "zig-zag"),
    "square": ("square", "block", "cube", "tile", "diamond", "quadrat", "carré", "sticky note"),
}
NOISE_TAGS = (
    "2008", "vacation", "canon", "travel", "2009", "family", "nikon", "friends", "summer", "2007", "party",
    "me", "nature", "holiday", "iphone", "new york", "trip", "2010", "café", "東京", "rock & roll", "köln",
    "hello, world", "50% off",
)
LANDMARK_NAMES = (
    "old lighthouse", "grand fountain", "stone bridge", "clock tower", "temple gate", "harbour crane",
    "castle hill", "golden statue", "tour de l'horloge", "alte brücke",
)
CITIES = (  # (name, latitude, longitude)
    ("paris", 48.8566, 2.3522), ("new york", 40.7128, -74.006), ("london", 51.5074, -0.1278),
    ("tokyo", 35.6762, 139.6503), ("sydney", -33.8688, 151.2093), ("são paulo", -23.5505, -46.6333),
    ("berlin", 52.52, 13.405), ("san francisco", 37.7749, -122.4194), ("toronto", 43.6532, -79.3832),
    ("cape town", -33.9249, 18.4241), ("mumbai", 19.076, 72.8777), ("moscow", 55.7558, 37.6173),
    ("mexico city", 19.4326, -99.1332), ("buenos aires", -34.6037, -58.3816), ("rome", 41.9028, 12.4964),
    ("beijing", 39.9042, 116.4074), ("seoul", 37.5665, 126.978), ("cairo", 30.0444, 31.2357),
    ("reykjavík", 64.1466, -21.9426), ("nairobi", -1.2921, 36.8219),
)
CAMERAS = (  # one per user; never the scanner
    "Canon EOS 5D Mark II", "Canon EOS 400D Digital", "Canon PowerShot SD1000", "NIKON D90", "NIKON D700",
    "Apple iPhone 4", "Apple iPhone 3GS", "SONY DSC-W55", "Panasonic DMC-FZ8", "FUJIFILM FinePix S5600",
    "OLYMPUS IMAGING CORP. E-510", "EASTMAN KODAK COMPANY KODAK EASYSHARE C713 ZOOM DIGITAL CAMERA",
)
NICKNAMES = (
    "anna", "José García", "photo_guy", "Lumière", "mr. smith", "Анна", "山田太郎", "bob & alice", "kate",
    "the wanderer", "jürgen", "lens+light", "o'brien", "chloé", "señor foto", "50mm", "Zoë K.", "dave",
)
LICENSES = (
    ("Attribution License", "http://creativecommons.org/licenses/by/2.0/"),
    ("Attribution-ShareAlike License", "http://creativecommons.org/licenses/by-sa/2.0/"),
    ("Attribution-NoDerivs License", "http://creativecommons.org/licenses/by-nd/2.0/"),
    ("Attribution-NonCommercial License", "http://creativecommons.org/licenses/by-nc/2.0/"),
    ("Attribution-NonCommercial-ShareAlike License", "http://creativecommons.org/licenses/by-nc-sa/2.0/"),
    ("Attribution-NonCommercial-NoDerivs License", "http://creativecommons.org/licenses/by-nc-nd/2.0/"),
)
DESCRIPTIONS = (
    "Taken on a sunny afternoon.", "first line\nsecond line", 'see <a href="http://example.com/">my site</a>',
    "tab\tseparated words", "Día de campo, ¡qué bonito!", "100% unedited & straight out of camera",
    "夏の思い出", "a+b=c; 1/2 of it",
)
_BOGUS_YEARS = ("1900", "1904", "2032", "2037")  # reset or misconfigured camera clocks
_TAKEN_RANGE = (1072915200, 1398816000)  # 2004-01-01 .. 2014-04-30, unix seconds
_HTML_404 = b"<html><head><title>404 Not Found</title></head><body>Photo unavailable</body></html>\n"


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Parameters of the synthetic corpus. Rates become exact counts (at least 1 when the rate is > 0)."""

    num_images: int = 2000
    """Photo rows (marker 0), each with a latent class; videos come on top of these."""
    seed: int = 0
    """Seed of every random draw: the same seed and config give byte-identical files."""
    num_classes: int = 12
    """Latent visual classes, the first ``num_classes`` of :data:`CLASS_NAMES` (2 to 16)."""
    class_size_exponent: float = 1.0
    """Zipf exponent of class sizes: the k-th class (1-based) gets a share proportional to ``1 / k**exponent``."""
    num_users: int | None = None
    """Users; ``None`` resolves to ``max(8, num_images // 20)``."""
    preferred_share: float = 0.85
    """Share of a user's (non-landmark) photos drawn from the user's preferred classes."""
    min_image_size: int = 64
    """Smallest image side in pixels."""
    max_image_size: int = 128
    """Largest image side in pixels."""
    square_rate: float = 0.6
    """Share of square images; the others have a random aspect ratio within the size range."""
    jpeg_quality: int = 90
    """JPEG quality of the written photos."""
    video_rate: float = 0.01
    """Videos (marker 1, no image file) per photo row."""
    no_tags_rate: float = 0.15
    """Share of rows without user tags."""
    no_gps_rate: float = 0.3
    """Share of rows (landmark photos excepted) without geotag: longitude, latitude and accuracy empty."""
    no_device_rate: float = 0.1
    """Share of rows without capture device."""
    bogus_date_rate: float = 0.01
    """Share of rows whose date taken has a bogus year (1900, 1904, 2032, 2037)."""
    machine_tag_rate: float = 0.05
    """Share of rows with machine tags (``geo:lat=...``, ``camera:make=...``)."""
    rare_tag_rate: float = 0.05
    """Rare tags per photo row; each rare tag is used by one or two rows."""
    num_landmarks: int = 4
    """Landmarks: fixed coordinates where many users photograph the same class."""
    landmark_rate: float = 0.08
    """Share of photo rows taken at a landmark (split between landmarks, at most half of a class)."""
    anomalies: bool = True
    """Plant the duplicates, corrupt files and missing files below; ``False`` writes a clean corpus."""
    num_duplicates: int = 3
    """Rows whose file has the same bytes as an earlier ``ok`` row (when ``anomalies``)."""
    num_corrupt: int = 3
    """Rows with an undecodable file, cycling truncated JPEG, zero-byte file, text file (when ``anomalies``)."""
    num_missing: int = 2
    """Photo rows without an image file (when ``anomalies``)."""

    def __post_init__(self) -> None:
        self._check_counts()
        for name in ("preferred_share", "square_rate", "video_rate", "no_tags_rate", "no_gps_rate",
                     "no_device_rate", "bogus_date_rate", "machine_tag_rate", "rare_tag_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.landmark_rate <= 0.5:
            raise ValueError(f"landmark_rate must be within [0, 0.5], got {self.landmark_rate}")
        if not 16 <= self.min_image_size <= self.max_image_size <= 4096:
            raise ValueError(f"need 16 <= min_image_size <= max_image_size <= 4096, "
                             f"got {self.min_image_size} and {self.max_image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within [1, 100], got {self.jpeg_quality}")
        if not 0.0 < self.class_size_exponent <= 4.0:
            raise ValueError(f"class_size_exponent must be within (0, 4], got {self.class_size_exponent}")

    def _check_counts(self) -> None:
        if not 2 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be within [2, {len(CLASS_NAMES)}], got {self.num_classes}")
        if self.num_images < 2 * self.num_classes:
            raise ValueError(f"num_images must be at least 2 * num_classes = {2 * self.num_classes}, "
                             f"got {self.num_images}; raise num_images or lower num_classes")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_users is not None and self.num_users < 1:
            raise ValueError(f"num_users must be >= 1 (or None for automatic), got {self.num_users}")
        if not 0 <= self.num_landmarks <= len(LANDMARK_NAMES):
            raise ValueError(f"num_landmarks must be within [0, {len(LANDMARK_NAMES)}], got {self.num_landmarks}")
        for name in ("num_duplicates", "num_corrupt", "num_missing"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        planted = self.num_duplicates + self.num_corrupt + self.num_missing
        if self.anomalies and planted > self.num_images // 4:
            raise ValueError(f"num_duplicates + num_corrupt + num_missing = {planted} exceeds num_images // 4 = "
                             f"{self.num_images // 4}; lower them or raise num_images")

    @property
    def resolved_num_users(self) -> int:
        """The number of users, ``num_users`` or its automatic value."""
        return self.num_users if self.num_users is not None else max(8, self.num_images // 20)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The names of the latent classes, largest first."""
        return CLASS_NAMES[: self.num_classes]

    def planted_anomalies(self) -> dict[str, int]:
        """Planted anomaly counts by kind (all zero when ``anomalies`` is off)."""
        counts = {"duplicate": self.num_duplicates, "corrupt": self.num_corrupt, "missing": self.num_missing}
        return counts if self.anomalies else {kind: 0 for kind in counts}

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as a JSON-able dict."""
        return dict(dataclasses.asdict(self), num_users=self.resolved_num_users)


@dataclass(frozen=True, kw_only=True)
class SynthSummary:
    """What :func:`generate_corpus` wrote (or found already written)."""

    out: str
    """The output folder."""
    num_rows: int
    """Metadata lines (photos and videos)."""
    num_images: int
    """Photo rows."""
    num_videos: int
    """Video rows."""
    num_classes: int
    """Latent classes."""
    num_users: int
    """Users."""
    num_landmarks: int
    """Landmarks."""
    class_sizes: dict[str, int]
    """Photo rows per latent class, in class order."""
    expected_counts: dict[str, int]
    """The status counts ingest should report: ok, missing, corrupt, duplicate, video."""
    seconds: float = 0.0
    """Wall-clock time of the generation (0 when skipped)."""
    skipped: bool = False
    """True when a complete corpus with the same config was already there."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Images: each class is a family of procedural shapes or textures drawn with vectorised numpy.
# Shape functions return an alpha mask in [0, 1]; they are written as approximate signed distances in pixels
# (positive inside) passed through _fill, which antialiases the edge over about one pixel.
# ----------------------------------------------------------------------------------------------------------


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
    return np.ascontiguousarray(_render_planes(class_name, rng, height, width).transpose(1, 2, 0))


def _render_planes(class_name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """:func:`render_image`, channel-first ``(3, height, width)``."""
    g = _grid(height, width)
    if class_name == "drawing":
        return _drawing(rng, g)
    if class_name not in _SHAPES:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASS_NAMES)}")
    return _compose(rng, g, _SHAPES[class_name](rng, g))


def _image_size(rng: np.random.Generator, config: SynthConfig) -> tuple[int, int]:
    """(height, width): square with probability ``square_rate``, else each side drawn within the range."""
    low, high = config.min_image_size, config.max_image_size
    side = int(rng.integers(low, high + 1))
    if rng.random() < config.square_rate:
        return side, side
    return side, int(rng.integers(low, high + 1))


def _encode_jpeg(planes: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a channel-first uint8 image."""
    image = Image.merge("RGB", [Image.fromarray(plane, "L") for plane in planes])
    buffer = io.BytesIO()
    # Fixed encoder settings (no optimize/progressive, default 4:2:0 subsampling) keep the bytes reproducible.
    image.save(buffer, "JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# The plan: which row is what (class, user, landmark, flags, anomaly), decided before anything is written.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _User:
    nsid: str
    nickname: str
    lat: float
    lon: float
    camera: str
    preferred: tuple[int, ...]


@dataclass(frozen=True)
class _Landmark:
    name: str
    lat: float
    lon: float
    cls: int


@dataclass
class _Plan:
    """Per-row decisions, in file order."""

    photo_id: np.ndarray
    cls: np.ndarray  # latent class index, -1 for videos
    kind: np.ndarray  # expected ingest status: ok, video, missing, corrupt, duplicate
    user: np.ndarray | None = None  # index into users
    landmark: np.ndarray | None = None  # landmark index, -1 for none
    corrupt: dict[int, str] = field(default_factory=dict)  # row -> truncated / empty / text
    duplicate_of: dict[int, int] = field(default_factory=dict)  # row -> earlier ok row with the same bytes
    users: list[_User] = field(default_factory=list)
    landmarks: list[_Landmark] = field(default_factory=list)
    flags: dict[str, np.ndarray] = field(default_factory=dict)  # no_tags, no_gps, no_device, bogus_date, ...
    rare_tags: dict[int, list[str]] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.photo_id)


def _count(rate: float, n: int) -> int:
    """An exact count for a rate: 0 for rate 0, else at least 1 (so every feature is present) and at most n."""
    return 0 if rate <= 0 or n <= 0 else int(min(n, max(1, round(rate * n))))


def _choose(rng: np.random.Generator, candidates: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct rows among ``candidates`` (fewer when there are fewer candidates), sorted."""
    k = min(k, len(candidates))
    return np.sort(rng.choice(candidates, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _zipf(n: int, exponent: float = 1.0) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def _class_sizes(config: SynthConfig) -> np.ndarray:
    """Exact Zipf class sizes (largest remainder rounding), each at least 1, summing to ``num_images``."""
    spare = config.num_images - config.num_classes
    share = _zipf(config.num_classes, config.class_size_exponent) * spare
    sizes = np.floor(share).astype(np.int64)
    sizes[np.argsort(-(share - sizes), kind="stable")[: spare - sizes.sum()]] += 1
    return sizes + 1


def _photo_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique, non-contiguous positive ids in random order (Flickr-like magnitudes)."""
    ids = np.unique(rng.integers(10**8, 2 * 10**10, size=n + n // 8 + 16))
    while len(ids) < n:  # astronomically rare: redraw until enough distinct ids
        ids = np.unique(np.concatenate([ids, rng.integers(10**8, 2 * 10**10, size=n)]))
    return rng.permutation(ids)[:n].astype(np.int64)


def _layout(rng: np.random.Generator, config: SynthConfig) -> _Plan:
    """Rows in file order: photo ids, videos at random positions, shuffled latent classes."""
    num_videos = _count(config.video_rate, config.num_images)
    num_rows = config.num_images + num_videos
    is_video = np.zeros(num_rows, dtype=bool)
    is_video[_choose(rng, np.arange(1, num_rows), num_videos)] = True  # row 0 stays a photo
    cls = np.full(num_rows, -1, dtype=np.int64)
    cls[~is_video] = rng.permutation(np.repeat(np.arange(config.num_classes), _class_sizes(config)))
    kind = np.where(is_video, "video", "ok").astype(object)
    return _Plan(photo_id=_photo_ids(rng, num_rows), cls=cls, kind=kind)


def _plant_anomalies(rng: np.random.Generator, config: SynthConfig, plan: _Plan) -> None:
    """Mark missing, corrupt and duplicate rows (never the first photo row)."""
    planted = config.planted_anomalies()
    photos = np.flatnonzero(plan.kind == "ok")
    broken = rng.permutation(_choose(rng, photos[1:], planted["missing"] + planted["corrupt"]))
    plan.kind[broken[: planted["missing"]]] = "missing"
    for i, row in enumerate(np.sort(broken[planted["missing"]:])):
        plan.kind[row] = "corrupt"
        plan.corrupt[int(row)] = CORRUPT_KINDS[i % len(CORRUPT_KINDS)]
    _plant_duplicates(rng, plan, planted["duplicate"])


def _plant_duplicates(rng: np.random.Generator, plan: _Plan, count: int) -> None:
    """Duplicates copy the bytes of the first ok row of their own class, so class sizes stay exact."""
    ok = np.flatnonzero(plan.kind == "ok")
    _, first_index = np.unique(plan.cls[ok], return_index=True)
    first = ok[first_index]
    source_of_class = dict(zip(plan.cls[first].tolist(), first.tolist()))
    # Enough candidates: validation keeps anomalies <= num_images / 4 and classes <= num_images / 2.
    for row in _choose(rng, np.setdiff1d(ok, first), count):
        plan.kind[row] = "duplicate"
        plan.duplicate_of[int(row)] = source_of_class[int(plan.cls[row])]
    assert len(plan.duplicate_of) == count, "SynthConfig validation guarantees enough candidate rows"


def _nsids(rng: np.random.Generator, n: int) -> list[str]:
    numbers = rng.permutation(np.unique(rng.integers(10**7, 10**8, size=2 * n + 16)))[:n]
    suffixes = rng.choice([0, 0, 0, 2, 3, 4, 5, 6, 7, 8], size=n)  # @N00 dominates, as on Flickr
    return [f"{number}@N{suffix:02d}" for number, suffix in zip(numbers, suffixes)]


def _nickname(rng: np.random.Generator, i: int) -> str:
    base = NICKNAMES[rng.integers(len(NICKNAMES))]
    return base if rng.random() < 0.3 else f"{base}{i}"


def _make_users(rng: np.random.Generator, config: SynthConfig, class_sizes: np.ndarray) -> list[_User]:
    """Users with 1-3 preferred classes (popular classes have more fans, every class has one), a home, a camera."""
    n, k = config.resolved_num_users, config.num_classes
    popularity = class_sizes ** 0.7 / (class_sizes ** 0.7).sum()
    preferred = [list(rng.choice(k, size=min(k, int(rng.integers(1, 4))), replace=False, p=popularity))
                 for _ in range(n)]
    for c in range(k):
        if not any(c in p for p in preferred):
            preferred[int(rng.integers(n))].append(c)
    users = []
    for i, nsid in enumerate(_nsids(rng, n)):
        _, lat, lon = CITIES[rng.integers(len(CITIES))]
        home_lat, home_lon = lat + rng.normal(0, 0.05), lon + rng.normal(0, 0.05)
        camera = CAMERAS[rng.integers(len(CAMERAS))]
        users.append(_User(nsid, _nickname(rng, i), home_lat, home_lon, camera, tuple(sorted(map(int, preferred[i])))))
    return users


def _plant_landmarks(rng: np.random.Generator, config: SynthConfig, plan: _Plan) -> None:
    """Landmarks, each showing one (non-drawing) class, at fixed coordinates near a city."""
    plan.landmark = np.full(plan.num_rows, -1, dtype=np.int64)
    total = _count(config.landmark_rate, config.num_images) if config.num_landmarks else 0
    candidates = [c for c in range(config.num_classes) if CLASS_NAMES[c] != "drawing"]
    classes = candidates[: max(config.num_landmarks, len(candidates) // 2)]
    names = rng.permutation(len(LANDMARK_NAMES))[: config.num_landmarks]
    for i, name_index in enumerate(names):
        cls = int(classes[rng.integers(len(classes))])
        city = CITIES[rng.integers(len(CITIES))]
        lat = round(city[1] + rng.uniform(-0.03, 0.03), 6)
        lon = round(city[2] + rng.uniform(-0.03, 0.03), 6)
        plan.landmarks.append(_Landmark(LANDMARK_NAMES[name_index], lat, lon, cls))
        free = np.flatnonzero((plan.cls == cls) & (plan.kind == "ok") & (plan.landmark < 0))
        want = total // config.num_landmarks + (i < total % config.num_landmarks)
        plan.landmark[_choose(rng, free, min(want, len(free) // 2))] = i


def _assign_users(rng: np.random.Generator, config: SynthConfig, plan: _Plan, activity: np.ndarray) -> None:
    """Owners of rows: landmark photos by many distinct visitors, other photos mostly by their class's fans."""
    users = plan.users
    plan.user = np.full(plan.num_rows, -1, dtype=np.int64)
    for i in range(len(plan.landmarks)):
        rows = np.flatnonzero(plan.landmark == i)
        plan.user[rows] = rng.choice(len(users), size=len(rows), replace=len(rows) > len(users))
    regular = (plan.landmark < 0) & (plan.cls >= 0)
    loyal = regular & (rng.random(plan.num_rows) < config.preferred_share)
    for c in range(config.num_classes):
        fans = np.array([u for u, user in enumerate(users) if c in user.preferred])
        rows = np.flatnonzero(loyal & (plan.cls == c))
        plan.user[rows] = rng.choice(fans, size=len(rows), p=activity[fans] / activity[fans].sum())
    # The others (and videos) go to users in proportion to their loyal photos, so every user's photos stay
    # mostly from the preferred classes.
    weight = np.bincount(plan.user[plan.user >= 0], minlength=len(users)) + 1.0
    rows = np.flatnonzero(plan.user < 0)
    plan.user[rows] = rng.choice(len(users), size=len(rows), p=weight / weight.sum())


def _pick_flags(rng: np.random.Generator, config: SynthConfig, plan: _Plan) -> None:
    """Exact sets of rows without tags, GPS or device, with bogus dates or machine tags."""
    n, rows = plan.num_rows, np.arange(plan.num_rows)
    rates = {"no_tags": (config.no_tags_rate, rows), "no_device": (config.no_device_rate, rows),
             "no_gps": (config.no_gps_rate, np.flatnonzero(plan.landmark < 0)),
             "bogus_date": (config.bogus_date_rate, rows), "machine_tags": (config.machine_tag_rate, rows)}
    for name, (rate, candidates) in rates.items():
        mask = np.zeros(n, dtype=bool)
        mask[_choose(rng, candidates, _count(rate, n))] = True
        plan.flags[name] = mask


def _one(rng: np.random.Generator, items: tuple[Any, ...] | list[Any]) -> Any:
    """One item, uniformly (rng.choice would first copy the sequence into an array)."""
    return items[int(rng.integers(len(items)))]


def _rare_word(rng: np.random.Generator) -> str:
    syllables = ("ka", "zu", "mi", "ro", "te", "xo", "lun", "bri", "qua", "ñe", "vo", "sh", "ph", "ge", "ïo")
    return "".join(_one(rng, syllables) for _ in range(int(rng.integers(3, 6))))


def _plant_rare_tags(rng: np.random.Generator, config: SynthConfig, plan: _Plan) -> None:
    """Rare tags, each used by one or two tagged photo rows."""
    common = set(NOISE_TAGS).union(*CLASS_TAGS.values())
    tagged = np.flatnonzero(~plan.flags["no_tags"] & (plan.cls >= 0))
    words: set[str] = set()
    for _ in range(_count(config.rare_tag_rate, config.num_images)):
        word = _rare_word(rng)
        while word in words or word in common:
            word += _rare_word(rng)[:2]
        words.add(word)
        for row in _choose(rng, tagged, int(rng.integers(1, 3))):
            plan.rare_tags.setdefault(int(row), []).append(word)


def _build_plan(config: SynthConfig) -> _Plan:
    """Decide every row (class, owner, landmark, flags, anomaly) from the config's seed."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    plan = _layout(rng, config)
    _plant_anomalies(rng, config, plan)
    plan.users = _make_users(rng, config, _class_sizes(config).astype(np.float64))
    _plant_landmarks(rng, config, plan)
    activity = 1.0 / np.arange(1, len(plan.users) + 1) ** 0.9  # long-tailed user activity
    _assign_users(rng, config, plan, rng.permutation(activity))
    _pick_flags(rng, config, plan)
    _plant_rare_tags(rng, config, plan)
    return plan


# ----------------------------------------------------------------------------------------------------------
# Metadata lines (YFCC100M ``yfcc100m_dataset`` layout, 25 fields).
# ----------------------------------------------------------------------------------------------------------


def _encode(text: str) -> str:
    return quote_plus(text, safe="")


def _encode_list(items: list[str]) -> str:
    """Each item URL-encoded on its own (commas inside become %2C), then joined by commas."""
    return ",".join(_encode(item) for item in items)


def _zipf_sample(rng: np.random.Generator, vocabulary: tuple[str, ...], k: int) -> list[str]:
    """``k`` distinct words, Zipf-weighted by rank (Efraimidis-Spirakis keys: much faster than rng.choice)."""
    keys = rng.exponential(size=len(vocabulary)) / _zipf(len(vocabulary))
    return [vocabulary[i] for i in np.argsort(keys, kind="stable")[:k]]


def _user_tags(rng: np.random.Generator, plan: _Plan, row: int) -> list[str]:
    """Class tags (Zipf), frequent noise tags (Zipf), the landmark's name and the row's rare tags."""
    if plan.flags["no_tags"][row]:
        return []
    tags = ["video"] if plan.cls[row] < 0 else _zipf_sample(rng, CLASS_TAGS[CLASS_NAMES[plan.cls[row]]],
                                                           1 + int(rng.binomial(3, 0.5)))
    tags += _zipf_sample(rng, NOISE_TAGS, int(rng.binomial(3, 0.4)))
    if plan.landmark[row] >= 0 and rng.random() < 0.8:
        tags.append(plan.landmarks[plan.landmark[row]].name)
    tags += plan.rare_tags.get(row, [])
    return list(dict.fromkeys(tags[i] for i in rng.permutation(len(tags))))


def _geo(rng: np.random.Generator, plan: _Plan, row: int) -> tuple[str, str, str]:
    """(longitude, latitude, accuracy) strings: empty together, exact at landmarks, near home otherwise."""
    if plan.flags["no_gps"][row]:
        return "", "", ""
    if plan.landmark[row] >= 0:
        landmark = plan.landmarks[plan.landmark[row]]
        return f"{landmark.lon:.6f}", f"{landmark.lat:.6f}", "16"
    user = plan.users[plan.user[row]]
    lat = float(np.clip(user.lat + rng.normal(0, 0.01), -89.9, 89.9))
    lon = float(np.clip(user.lon + rng.normal(0, 0.01), -179.9, 179.9))
    accuracy = _one(rng, (16, 16, 16, 15, 14, 13, 12, 11, 6, 3))
    return f"{lon:.6f}", f"{lat:.6f}", str(accuracy)


def _dates(rng: np.random.Generator, plan: _Plan, row: int) -> tuple[str, str]:
    """(date taken ``YYYY-MM-DD HH:MM:SS.0``, date uploaded in unix seconds, always after the true date)."""
    taken = int(rng.integers(*_TAKEN_RANGE))
    uploaded = taken + 60 + int(rng.exponential(30 * 86400))
    text = datetime.fromtimestamp(taken, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + ".0"
    if plan.flags["bogus_date"][row]:
        text = _one(rng, _BOGUS_YEARS) + text[4:].replace("-02-29", "-02-28")
    return text, str(uploaded)


def _device(plan: _Plan, row: int) -> str:
    if plan.flags["no_device"][row]:
        return ""
    if plan.cls[row] >= 0 and CLASS_NAMES[plan.cls[row]] == "drawing":
        return SCANNER_DEVICE
    return plan.users[plan.user[row]].camera


def _machine_tags(rng: np.random.Generator, plan: _Plan, row: int, lon: str, lat: str) -> list[str]:
    if not plan.flags["machine_tags"][row]:
        return []
    if lat and rng.random() < 0.7:
        return [f"geo:lat={lat}", f"geo:lon={lon}"]
    make = plan.users[plan.user[row]].camera.split()[0].lower()
    return [f"camera:make={make}", "upload:by=flickrmobile"][: int(rng.integers(1, 3))]


def _title(rng: np.random.Generator, plan: _Plan, row: int, tags: list[str]) -> str:
    choice = rng.random()
    if choice < 0.4:
        return _one(rng, ("IMG_{:04d}", "DSC_{:04d}", "P{:07d}", "DSCN{:04d}")).format(int(rng.integers(10**4)))
    if choice < 0.7 and tags:
        return f"{tags[0]} #{int(rng.integers(1, 50))}"
    if choice < 0.85:
        return ""
    return _one(rng, ("Día de campo", "l'après-midi", "untitled (2)", "夕焼け", "me & you\tforever"))


def _description(rng: np.random.Generator) -> str:
    return "" if rng.random() < 0.6 else _one(rng, DESCRIPTIONS)


def _metadata_line(rng: np.random.Generator, plan: _Plan, row: int) -> str:
    """One 25-field metadata line (no newline)."""
    photo_id, user = int(plan.photo_id[row]), plan.users[plan.user[row]]
    taken, uploaded = _dates(rng, plan, row)
    tags = _user_tags(rng, plan, row)
    lon, lat, accuracy = _geo(rng, plan, row)
    farm, server = int(rng.integers(1, 10)), int(rng.integers(1, 10000))
    secret, original_secret, photo_hash = (rng.bytes(n).hex() for n in (5, 5, 16))
    license_name, license_url = LICENSES[rng.integers(len(LICENSES))]
    is_video = plan.cls[row] < 0
    fields = [
        str(row), str(photo_id), photo_hash, user.nsid, _encode(user.nickname), taken, uploaded,
        _encode(_device(plan, row)), _encode(_title(rng, plan, row, tags)), _encode(_description(rng)),
        _encode_list(tags), _encode_list(_machine_tags(rng, plan, row, lon, lat)), lon, lat, accuracy,
        f"http://www.flickr.com/photos/{user.nsid}/{photo_id}/",
        f"http://farm{farm}.staticflickr.com/{server}/{photo_id}_{secret}.jpg",
        _encode(license_name), license_url, str(server), str(farm), secret, original_secret,
        _one(rng, ("mp4", "mov", "avi")) if is_video else "jpg", "1" if is_video else "0",
    ]
    return "\t".join(fields)


# ----------------------------------------------------------------------------------------------------------
# Writing the corpus.
# ----------------------------------------------------------------------------------------------------------

_OUTPUTS = ("metadata.tsv", "classes.tsv", "anomalies.tsv", "synth.json")


def _image_bytes(config: SynthConfig, plan: _Plan, row: int) -> bytes:
    """The JPEG of a photo row, from a generator of its own (so a row's image does not depend on the others)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1, row]))
    height, width = _image_size(rng, config)
    return _encode_jpeg(_render_planes(CLASS_NAMES[plan.cls[row]], rng, height, width), config.jpeg_quality)


def _file_bytes(config: SynthConfig, plan: _Plan, row: int, written: dict[int, bytes]) -> bytes | None:
    """What to write for a photo row: its JPEG, a corrupted file, a duplicate's source bytes, or None."""
    kind = plan.kind[row]
    if kind == "missing":
        return None
    if kind == "duplicate":
        return written[plan.duplicate_of[row]]
    data = _image_bytes(config, plan, row)
    corrupt = plan.corrupt.get(row)
    if corrupt == "truncated":
        return data[: len(data) // 2]
    if corrupt == "empty":
        return b""
    if corrupt == "text":
        return _HTML_404
    return data


def _write_images(location: Location, config: SynthConfig, plan: _Plan,
                  progress: Callable[[int], None] | None) -> None:
    sources = set(plan.duplicate_of.values())
    written: dict[int, bytes] = {}  # only the sources of duplicates are kept
    for row in range(plan.num_rows):
        if plan.cls[row] < 0:
            continue
        data = _file_bytes(config, plan, row, written)
        if data is not None:
            location.write_bytes(f"images/{int(plan.photo_id[row])}.jpg", data)
        if row in sources:
            written[row] = data
        if progress is not None:
            progress(1)


def _tables(config: SynthConfig, plan: _Plan) -> dict[str, bytes]:
    """metadata.tsv, classes.tsv and anomalies.tsv, in file order."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2]))
    metadata = [_metadata_line(rng, plan, row) for row in range(plan.num_rows)]
    classes = [f"{plan.photo_id[r]}\t{CLASS_NAMES[plan.cls[r]]}" for r in range(plan.num_rows) if plan.cls[r] >= 0]
    anomalies = [f"{plan.photo_id[r]}\t{plan.kind[r]}" for r in range(plan.num_rows) if plan.kind[r] != "ok"]
    return {name: "".join(line + "\n" for line in lines).encode("utf-8")
            for name, lines in (("metadata.tsv", metadata), ("classes.tsv", classes), ("anomalies.tsv", anomalies))}


def _landmark_summary(plan: _Plan) -> list[dict[str, Any]]:
    summary = []
    for i, landmark in enumerate(plan.landmarks):
        rows = np.flatnonzero(plan.landmark == i)
        summary.append({"name": landmark.name, "lat": landmark.lat, "lon": landmark.lon,
                        "class": CLASS_NAMES[landmark.cls], "num_photos": len(rows),
                        "num_users": len(set(plan.user[rows].tolist()))})
    return summary


def _manifest(config: SynthConfig, plan: _Plan) -> dict[str, Any]:
    """The content of synth.json: resolved config and the planted structure."""
    ids = plan.photo_id
    counts = {kind: int((plan.kind == kind).sum()) for kind in ("ok",) + ANOMALY_KINDS}
    photos = plan.cls >= 0
    is_drawing = plan.cls == CLASS_NAMES.index("drawing")
    return {
        "format": FORMAT, "version": VERSION, "config": config.to_dict(),
        "num_rows": plan.num_rows, "num_images": int(photos.sum()), "num_videos": counts["video"],
        "class_names": list(config.class_names),
        "class_sizes": {name: int((plan.cls == c).sum()) for c, name in enumerate(config.class_names)},
        "expected_counts": counts,
        "anomalies": {"missing": [int(ids[r]) for r in np.flatnonzero(plan.kind == "missing")],
                      "corrupt": {str(ids[r]): k for r, k in plan.corrupt.items()},
                      "duplicate": {str(ids[r]): int(ids[s]) for r, s in plan.duplicate_of.items()}},
        "planted": {name: int(mask.sum()) for name, mask in plan.flags.items()}
        | {"rare_tags": len({t for tags in plan.rare_tags.values() for t in tags}),
           "scanner_photos": int((is_drawing & ~plan.flags["no_device"]).sum())},
        "landmarks": _landmark_summary(plan),
        "num_users": len(plan.users),
        "users": [{"nsid": u.nsid, "camera": u.camera, "lat": round(u.lat, 6), "lon": round(u.lon, 6),
                   "preferred": [CLASS_NAMES[c] for c in u.preferred]} for u in plan.users],
    }


def _summary(out: str, manifest: dict[str, Any], seconds: float, skipped: bool) -> SynthSummary:
    return SynthSummary(
        out=out, num_rows=manifest["num_rows"], num_images=manifest["num_images"],
        num_videos=manifest["num_videos"], num_classes=len(manifest["class_names"]),
        num_users=manifest["num_users"], num_landmarks=len(manifest["landmarks"]),
        class_sizes={name: manifest["class_sizes"][name] for name in manifest["class_names"]},  # class order
        expected_counts={kind: manifest["expected_counts"][kind] for kind in ("ok",) + ANOMALY_KINDS},
        seconds=seconds, skipped=skipped,
    )


def _clear_previous(location: Location, config: SynthConfig, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of an identical finished corpus (to skip), or None after clearing a different one."""
    if not location.exists("synth.json"):
        return None
    previous = location.read_json("synth.json")
    if previous.get("config") == config.to_dict() and previous.get("version") == VERSION:
        return previous
    if not overwrite:
        raise OutputExistsError(f"{location.url} holds a synthetic corpus made with another config; "
                                "pass overwrite=True (--overwrite) or choose another folder")
    logger.info("removing the previous synthetic corpus in %s", location.url)
    location.remove("synth.json")  # first, so an interrupted clean-up never looks complete
    if location.exists("images"):
        location.fs.rm(location.path("images"), recursive=True)
    for name in _OUTPUTS:
        location.remove(name)
    return None


def generate_corpus(out_dir: str, config: SynthConfig, progress: Callable[[int], None] | None = None, *,
                    overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> SynthSummary:
    """Write a synthetic YFCC100M-like corpus to ``out_dir`` (see the module docstring for the layout).

    Re-running with the same config on a complete corpus (``synth.json`` present) does nothing. A folder
    without ``synth.json`` (an interrupted run) is written over; image files that the new corpus does not name
    may remain there, unused by ``metadata.tsv``.

    Args:
        out_dir: output folder, a local path or an fsspec URL.
        config: what to generate.
        progress: called with the number of photo rows just processed.
        overwrite: replace a corpus made with another config instead of raising.
        storage_options: fsspec options for remote ``out_dir``.

    Returns:
        A summary of the corpus, with the ingest status counts it should produce.

    Raises:
        OutputExistsError: ``out_dir`` holds a corpus with another config and ``overwrite`` is False.
    """
    start = time.perf_counter()
    location = Location(out_dir, storage_options)
    previous = _clear_previous(location, config, overwrite)
    if previous is not None:
        logger.info("%s already holds this synthetic corpus; nothing to do", location.url)
        return _summary(out_dir, previous, 0.0, skipped=True)
    location.makedirs("images")
    plan = _build_plan(config)
    _write_images(location, config, plan, progress)
    for name, data in _tables(config, plan).items():
        location.write_bytes(name, data)
    manifest = _manifest(config, plan)
    location.write_json("synth.json", manifest)  # last: its presence means the corpus is complete
    seconds = time.perf_counter() - start
    logger.info("wrote %d rows (%d photos, %d videos) to %s in %.1f s", plan.num_rows, manifest["num_images"],
                manifest["num_videos"], location.url, seconds)
    return _summary(out_dir, manifest, seconds, skipped=False)


def read_classes(path: str) -> dict[int, str]:
    """``classes.tsv`` as ``{photo_id: class_name}`` (for tests and reports)."""
    with open(path, encoding="utf-8") as handle:
        return {int(pid): name for pid, name in (line.rstrip("\n").split("\t") for line in handle if line.strip())}


def read_anomalies(path: str) -> dict[int, str]:
    """``anomalies.tsv`` as ``{photo_id: kind}`` (kinds in :data:`ANOMALY_KINDS`)."""
    return read_classes(path)
