"""Metadata lines in the YFCC100M ``yfcc100m_dataset`` layout (25 TAB-separated fields, text URL-encoded)."""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import quote_plus

import numpy as np

from dataengine.synth.plan import Plan, pick_one, zipf_weights
from dataengine.synth.vocabulary import CLASS_NAMES, CLASS_TAGS, DESCRIPTIONS, LICENSES, NOISE_TAGS, SCANNER_DEVICE

_BOGUS_YEARS = ("1900", "1904", "2032", "2037")  # reset or misconfigured camera clocks
_TAKEN_RANGE = (1072915200, 1398816000)  # 2004-01-01 .. 2014-04-30, unix seconds


def _encode(text: str) -> str:
    return quote_plus(text, safe="")


def _encode_list(items: list[str]) -> str:
    """Each item URL-encoded on its own (commas inside become %2C), then joined by commas."""
    return ",".join(_encode(item) for item in items)


def _zipf_sample(rng: np.random.Generator, vocabulary: tuple[str, ...], k: int) -> list[str]:
    """``k`` distinct words, Zipf-weighted by rank (Efraimidis-Spirakis keys: much faster than rng.choice)."""
    keys = rng.exponential(size=len(vocabulary)) / zipf_weights(len(vocabulary))
    return [vocabulary[i] for i in np.argsort(keys, kind="stable")[:k]]


def _user_tags(rng: np.random.Generator, plan: Plan, row: int) -> list[str]:
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


def _geo(rng: np.random.Generator, plan: Plan, row: int) -> tuple[str, str, str]:
    """(longitude, latitude, accuracy) strings: empty together, exact at landmarks, near home otherwise."""
    if plan.flags["no_gps"][row]:
        return "", "", ""
    if plan.landmark[row] >= 0:
        landmark = plan.landmarks[plan.landmark[row]]
        return f"{landmark.lon:.6f}", f"{landmark.lat:.6f}", "16"
    user = plan.users[plan.user[row]]
    lat = float(np.clip(user.lat + rng.normal(0, 0.01), -89.9, 89.9))
    lon = float(np.clip(user.lon + rng.normal(0, 0.01), -179.9, 179.9))
    accuracy = pick_one(rng, (16, 16, 16, 15, 14, 13, 12, 11, 6, 3))
    return f"{lon:.6f}", f"{lat:.6f}", str(accuracy)


def _dates(rng: np.random.Generator, plan: Plan, row: int) -> tuple[str, str]:
    """(date taken ``YYYY-MM-DD HH:MM:SS.0``, date uploaded in unix seconds, always after the true date)."""
    taken = int(rng.integers(*_TAKEN_RANGE))
    uploaded = taken + 60 + int(rng.exponential(30 * 86400))
    text = datetime.fromtimestamp(taken, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + ".0"
    if plan.flags["bogus_date"][row]:
        text = pick_one(rng, _BOGUS_YEARS) + text[4:].replace("-02-29", "-02-28")
    return text, str(uploaded)


def _device(plan: Plan, row: int) -> str:
    if plan.flags["no_device"][row]:
        return ""
    if plan.cls[row] >= 0 and CLASS_NAMES[plan.cls[row]] == "drawing":
        return SCANNER_DEVICE
    return plan.users[plan.user[row]].camera


def _machine_tags(rng: np.random.Generator, plan: Plan, row: int, lon: str, lat: str) -> list[str]:
    if not plan.flags["machine_tags"][row]:
        return []
    if lat and rng.random() < 0.7:
        return [f"geo:lat={lat}", f"geo:lon={lon}"]
    make = plan.users[plan.user[row]].camera.split()[0].lower()
    return [f"camera:make={make}", "upload:by=flickrmobile"][: int(rng.integers(1, 3))]


def _title(rng: np.random.Generator, plan: Plan, row: int, tags: list[str]) -> str:
    choice = rng.random()
    if choice < 0.4:
        return pick_one(rng, ("IMG_{:04d}", "DSC_{:04d}", "P{:07d}", "DSCN{:04d}")).format(int(rng.integers(10**4)))
    if choice < 0.7 and tags:
        return f"{tags[0]} #{int(rng.integers(1, 50))}"
    if choice < 0.85:
        return ""
    return pick_one(rng, ("Día de campo", "l'après-midi", "untitled (2)", "夕焼け", "me & you\tforever"))


def _description(rng: np.random.Generator) -> str:
    return "" if rng.random() < 0.6 else pick_one(rng, DESCRIPTIONS)


def metadata_line(rng: np.random.Generator, plan: Plan, row: int) -> str:
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
        pick_one(rng, ("mp4", "mov", "avi")) if is_video else "jpg", "1" if is_video else "0",
    ]
    return "\t".join(fields)
