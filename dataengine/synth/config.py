"""The synthetic corpus's config (:class:`SynthConfig`) and what a run reports (:class:`SynthSummary`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dataengine.synth.vocabulary import CLASS_NAMES, LANDMARK_NAMES

FORMAT = "dataengine.synth"
VERSION = 1
ANOMALY_KINDS = ("video", "missing", "corrupt", "duplicate")
CORRUPT_KINDS = ("truncated", "empty", "text")
NEAR_DUPLICATE_KINDS = ("resized", "reencoded", "cropped")


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
    num_near_duplicates: int = 0
    """Photo rows whose image is a near-duplicate of an earlier ``ok`` row's photo of the same class: resized,
    re-encoded at another JPEG quality or cropped (:data:`NEAR_DUPLICATE_KINDS`, in equal shares). Their bytes
    differ from the source, so ingest keeps them (``ok``); ``near_duplicates.tsv`` lists them with their source.
    Independent of ``anomalies``; 0 plants none and leaves every other file as it is without them."""

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
        if not 0 <= self.num_near_duplicates <= self.num_images // 4:
            raise ValueError(f"num_near_duplicates must be within [0, num_images // 4 = {self.num_images // 4}], "
                             f"got {self.num_near_duplicates}")

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
        """The resolved config as a JSON-able dict.

        ``num_near_duplicates`` is left out when 0, so that a corpus without near-duplicates has the same
        ``synth.json`` (and is recognised as the same corpus on re-run) as before the option existed.
        """
        resolved = dict(dataclasses.asdict(self), num_users=self.resolved_num_users)
        if not self.num_near_duplicates:
            del resolved["num_near_duplicates"]
        return resolved


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
    num_near_duplicates: int = 0
    """Photo rows holding a near-duplicate of an earlier photo (listed in ``near_duplicates.tsv``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
