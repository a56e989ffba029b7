"""The plan: which row is what (class, user, landmark, flags, anomaly), decided before anything is written."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataengine.synth.config import CORRUPT_KINDS, NEAR_DUPLICATE_KINDS, SynthConfig
from dataengine.synth.vocabulary import (
    CAMERAS, CITIES, CLASS_NAMES, CLASS_TAGS, LANDMARK_NAMES, NICKNAMES, NOISE_TAGS,
)


@dataclass(frozen=True)
class User:
    """A photographer: Flickr-like id and nickname, home coordinates, one camera, preferred class indices."""

    nsid: str
    nickname: str
    lat: float
    lon: float
    camera: str
    preferred: tuple[int, ...]


@dataclass(frozen=True)
class Landmark:
    """A place photographed at the very same coordinates by many users, always showing class ``cls``."""

    name: str
    lat: float
    lon: float
    cls: int


@dataclass
class Plan:
    """Per-row decisions, in file order."""

    photo_id: np.ndarray
    cls: np.ndarray  # latent class index, -1 for videos
    kind: np.ndarray  # expected ingest status: ok, video, missing, corrupt, duplicate
    user: np.ndarray | None = None  # index into users
    landmark: np.ndarray | None = None  # landmark index, -1 for none
    corrupt: dict[int, str] = field(default_factory=dict)  # row -> truncated / empty / text
    duplicate_of: dict[int, int] = field(default_factory=dict)  # row -> earlier ok row with the same bytes
    near_duplicate_of: dict[int, tuple[int, str]] = field(default_factory=dict)  # row -> (earlier ok row, kind)
    users: list[User] = field(default_factory=list)
    landmarks: list[Landmark] = field(default_factory=list)
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
def zipf_weights(n: int, exponent: float = 1.0) -> np.ndarray:
    """Probabilities proportional to ``1 / rank**exponent`` for ranks 1..n."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def _class_sizes(config: SynthConfig) -> np.ndarray:
    """Exact Zipf class sizes (largest remainder rounding), each at least 1, summing to ``num_images``."""
    spare = config.num_images - config.num_classes
    share = zipf_weights(config.num_classes, config.class_size_exponent) * spare
    sizes = np.floor(share).astype(np.int64)
    sizes[np.argsort(-(share - sizes), kind="stable")[: spare - sizes.sum()]] += 1
    return sizes + 1


def _photo_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unique, non-contiguous positive ids in random order (Flickr-like magnitudes)."""
    ids = np.unique(rng.integers(10**8, 2 * 10**10, size=n + n // 8 + 16))
    while len(ids) < n:  # astronomically rare: redraw until enough distinct ids
        ids = np.unique(np.concatenate([ids, rng.integers(10**8, 2 * 10**10, size=n)]))
    return rng.permutation(ids)[:n].astype(np.int64)


def _layout(rng: np.random.Generator, config: SynthConfig) -> Plan:
    """Rows in file order: photo ids, videos at random positions, shuffled latent classes."""
    num_videos = _count(config.video_rate, config.num_images)
    num_rows = config.num_images + num_videos
    is_video = np.zeros(num_rows, dtype=bool)
    is_video[_choose(rng, np.arange(1, num_rows), num_videos)] = True  # row 0 stays a photo
    cls = np.full(num_rows, -1, dtype=np.int64)
    cls[~is_video] = rng.permutation(np.repeat(np.arange(config.num_classes), _class_sizes(config)))
    kind = np.where(is_video, "video", "ok").astype(object)
    return Plan(photo_id=_photo_ids(rng, num_rows), cls=cls, kind=kind)


def _plant_anomalies(rng: np.random.Generator, config: SynthConfig, plan: Plan) -> None:
    """Mark missing, corrupt and duplicate rows (never the first photo row)."""
    planted = config.planted_anomalies()
    photos = np.flatnonzero(plan.kind == "ok")
    broken = rng.permutation(_choose(rng, photos[1:], planted["missing"] + planted["corrupt"]))
    plan.kind[broken[: planted["missing"]]] = "missing"
    for i, row in enumerate(np.sort(broken[planted["missing"]:])):
        plan.kind[row] = "corrupt"
        plan.corrupt[int(row)] = CORRUPT_KINDS[i % len(CORRUPT_KINDS)]
    _plant_duplicates(rng, plan, planted["duplicate"])


def _first_ok_of_each_class(plan: Plan) -> np.ndarray:
    """The first ``ok`` row of each class present among the ``ok`` rows, in class order."""
    ok = np.flatnonzero(plan.kind == "ok")
    _, first_index = np.unique(plan.cls[ok], return_index=True)
    return ok[first_index]


def _plant_duplicates(rng: np.random.Generator, plan: Plan, count: int) -> None:
    """Duplicates copy the bytes of the first ok row of their own class, so class sizes stay exact."""
    ok, first = np.flatnonzero(plan.kind == "ok"), _first_ok_of_each_class(plan)
    source_of_class = dict(zip(plan.cls[first].tolist(), first.tolist()))
    # Enough candidates: validation keeps anomalies <= num_images / 4 and classes <= num_images / 2.
    for row in _choose(rng, np.setdiff1d(ok, first), count):
        plan.kind[row] = "duplicate"
        plan.duplicate_of[int(row)] = source_of_class[int(plan.cls[row])]
    assert len(plan.duplicate_of) == count, "SynthConfig validation guarantees enough candidate rows"


def _plant_near_duplicates(config: SynthConfig, plan: Plan) -> None:
    """Near-duplicates: ``ok`` rows whose image will be derived from an earlier ``ok`` row of the same class.

    They come from a generator of their own, after everything else, so that the rest of the plan (and so every
    other file) is the same with or without them. A source is never itself a near-duplicate.
    """
    if not config.num_near_duplicates:
        return
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 3]))
    ok, first = np.flatnonzero(plan.kind == "ok"), _first_ok_of_each_class(plan)
    rows = _choose(rng, np.setdiff1d(ok, first), config.num_near_duplicates)
    assert len(rows) == config.num_near_duplicates, "SynthConfig validation guarantees enough candidate rows"
    kinds = rng.permutation(np.resize(np.array(NEAR_DUPLICATE_KINDS), len(rows)))
    sources = np.setdiff1d(ok, rows)  # the first ok row of each class is always among them
    for row, kind in zip(rows.tolist(), kinds.tolist()):
        earlier = sources[(sources < row) & (plan.cls[sources] == plan.cls[row])]
        plan.near_duplicate_of[row] = (pick_one(rng, earlier.tolist()), kind)


def _nsids(rng: np.random.Generator, n: int) -> list[str]:
    numbers = rng.permutation(np.unique(rng.integers(10**7, 10**8, size=2 * n + 16)))[:n]
    suffixes = rng.choice([0, 0, 0, 2, 3, 4, 5, 6, 7, 8], size=n)  # @N00 dominates, as on Flickr
    return [f"{number}@N{suffix:02d}" for number, suffix in zip(numbers, suffixes)]


def _nickname(rng: np.random.Generator, i: int) -> str:
    base = NICKNAMES[rng.integers(len(NICKNAMES))]
    return base if rng.random() < 0.3 else f"{base}{i}"


def _make_users(rng: np.random.Generator, config: SynthConfig, class_sizes: np.ndarray) -> list[User]:
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
        users.append(User(nsid, _nickname(rng, i), home_lat, home_lon, camera, tuple(sorted(map(int, preferred[i])))))
    return users


def _plant_landmarks(rng: np.random.Generator, config: SynthConfig, plan: Plan) -> None:
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
        plan.landmarks.append(Landmark(LANDMARK_NAMES[name_index], lat, lon, cls))
        free = np.flatnonzero((plan.cls == cls) & (plan.kind == "ok") & (plan.landmark < 0))
        want = total // config.num_landmarks + (i < total % config.num_landmarks)
        plan.landmark[_choose(rng, free, min(want, len(free) // 2))] = i


def _assign_users(rng: np.random.Generator, config: SynthConfig, plan: Plan, activity: np.ndarray) -> None:
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


def _pick_flags(rng: np.random.Generator, config: SynthConfig, plan: Plan) -> None:
    """Exact sets of rows without tags, GPS or device, with bogus dates or machine tags."""
    n, rows = plan.num_rows, np.arange(plan.num_rows)
    rates = {"no_tags": (config.no_tags_rate, rows), "no_device": (config.no_device_rate, rows),
             "no_gps": (config.no_gps_rate, np.flatnonzero(plan.landmark < 0)),
             "bogus_date": (config.bogus_date_rate, rows), "machine_tags": (config.machine_tag_rate, rows)}
    for name, (rate, candidates) in rates.items():
        mask = np.zeros(n, dtype=bool)
        mask[_choose(rng, candidates, _count(rate, n))] = True
        plan.flags[name] = mask


def pick_one(rng: np.random.Generator, items: tuple[Any, ...] | list[Any]) -> Any:
    """One item, uniformly (rng.choice would first copy the sequence into an array)."""
    return items[int(rng.integers(len(items)))]


def _rare_word(rng: np.random.Generator) -> str:
    syllables = ("ka", "zu", "mi", "ro", "te", "xo", "lun", "bri", "qua", "ñe", "vo", "sh", "ph", "ge", "ïo")
    return "".join(pick_one(rng, syllables) for _ in range(int(rng.integers(3, 6))))


def _plant_rare_tags(rng: np.random.Generator, config: SynthConfig, plan: Plan) -> None:
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


def build_plan(config: SynthConfig) -> Plan:
    """Decide every row (class, owner, landmark, flags, anomaly, near-duplicate) from the config's seed."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    plan = _layout(rng, config)
    _plant_anomalies(rng, config, plan)
    plan.users = _make_users(rng, config, _class_sizes(config).astype(np.float64))
    _plant_landmarks(rng, config, plan)
    activity = 1.0 / np.arange(1, len(plan.users) + 1) ** 0.9  # long-tailed user activity
    _assign_users(rng, config, plan, rng.permutation(activity))
    _pick_flags(rng, config, plan)
    _plant_rare_tags(rng, config, plan)
    _plant_near_duplicates(config, plan)
    return plan
