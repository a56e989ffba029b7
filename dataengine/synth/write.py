"""Writing the corpus: image files, the three tables and ``synth.json`` (last), with skip and overwrite rules."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dataengine.errors import OutputExistsError
from dataengine.fs import Location
from dataengine.locks import check_output_path, locked_output
from dataengine.synth.config import ANOMALY_KINDS, FORMAT, VERSION, SynthConfig, SynthSummary
from dataengine.synth.draw import encode_jpeg, image_size, near_duplicate_jpeg, render_planes
from dataengine.synth.metadata import metadata_line
from dataengine.synth.plan import Plan, build_plan
from dataengine.synth.vocabulary import CLASS_NAMES

logger = logging.getLogger(__name__)

_HTML_404 = b"<html><head><title>404 Not Found</title></head><body>Photo unavailable</body></html>\n"
_OUTPUTS = ("metadata.tsv", "classes.tsv", "anomalies.tsv", "near_duplicates.tsv", "synth.json")


def _image_bytes(config: SynthConfig, plan: Plan, row: int) -> bytes:
    """The JPEG of a photo row, from a generator of its own (so a row's image does not depend on the others)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1, row]))
    height, width = image_size(rng, config)
    return encode_jpeg(render_planes(CLASS_NAMES[plan.cls[row]], rng, height, width), config.jpeg_quality)


def _file_bytes(config: SynthConfig, plan: Plan, row: int, written: dict[int, bytes]) -> bytes | None:
    """What to write for a photo row: its JPEG, a corrupted file, a (near-)duplicate of its source, or None."""
    kind = plan.kind[row]
    if kind == "missing":
        return None
    if kind == "duplicate":
        return written[plan.duplicate_of[row]]
    if row in plan.near_duplicate_of:
        source, how = plan.near_duplicate_of[row]
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 4, row]))
        return near_duplicate_jpeg(written[source], how, rng, config.jpeg_quality)
    data = _image_bytes(config, plan, row)
    corrupt = plan.corrupt.get(row)
    if corrupt == "truncated":
        return data[: len(data) // 2]
    if corrupt == "empty":
        return b""
    if corrupt == "text":
        return _HTML_404
    return data


def _write_images(location: Location, config: SynthConfig, plan: Plan,
                  progress: Callable[[int], None] | None) -> None:
    # The bytes of (near-)duplicates' sources are kept until their last copy is written.
    uses = collections.Counter([*plan.duplicate_of.values(), *(s for s, _ in plan.near_duplicate_of.values())])
    written: dict[int, bytes] = {}
    for row in range(plan.num_rows):
        if plan.cls[row] < 0:
            continue
        data = _file_bytes(config, plan, row, written)
        if data is not None:
            location.write_bytes(f"images/{int(plan.photo_id[row])}.jpg", data)
        if row in uses:
            written[row] = data
        source = plan.near_duplicate_of[row][0] if row in plan.near_duplicate_of else plan.duplicate_of.get(row)
        if source is not None:
            uses[source] -= 1
            if not uses[source]:
                del written[source]
        if progress is not None:
            progress(1)


def _tables(config: SynthConfig, plan: Plan) -> dict[str, bytes]:
    """metadata.tsv, classes.tsv, anomalies.tsv and (with near-duplicates) near_duplicates.tsv, in file order."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2]))
    ids = plan.photo_id
    tables = {
        "metadata.tsv": [metadata_line(rng, plan, row) for row in range(plan.num_rows)],
        "classes.tsv": [f"{ids[r]}\t{CLASS_NAMES[plan.cls[r]]}" for r in range(plan.num_rows) if plan.cls[r] >= 0],
        "anomalies.tsv": [f"{ids[r]}\t{plan.kind[r]}" for r in range(plan.num_rows) if plan.kind[r] != "ok"],
    }
    if config.num_near_duplicates:
        tables["near_duplicates.tsv"] = [f"{ids[r]}\t{ids[s]}\t{how}"
                                         for r, (s, how) in sorted(plan.near_duplicate_of.items())]
    return {name: "".join(line + "\n" for line in lines).encode("utf-8") for name, lines in tables.items()}


def _landmark_summary(plan: Plan) -> list[dict[str, Any]]:
    summary = []
    for i, landmark in enumerate(plan.landmarks):
        rows = np.flatnonzero(plan.landmark == i)
        summary.append({"name": landmark.name, "lat": landmark.lat, "lon": landmark.lon,
                        "class": CLASS_NAMES[landmark.cls], "num_photos": len(rows),
                        "num_users": len(set(plan.user[rows].tolist()))})
    return summary


def _manifest(config: SynthConfig, plan: Plan) -> dict[str, Any]:
    """The content of synth.json: resolved config and the planted structure."""
    ids = plan.photo_id
    counts = {kind: int((plan.kind == kind).sum()) for kind in ("ok",) + ANOMALY_KINDS}
    photos = plan.cls >= 0
    is_drawing = plan.cls == CLASS_NAMES.index("drawing")
    manifest = {
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
    if config.num_near_duplicates:  # absent otherwise, as before near-duplicates existed
        manifest["near_duplicates"] = {str(ids[r]): {"source": int(ids[s]), "kind": how}
                                       for r, (s, how) in sorted(plan.near_duplicate_of.items())}
    return manifest


def _summary(out: str, manifest: dict[str, Any], seconds: float, skipped: bool) -> SynthSummary:
    return SynthSummary(
        out=out, num_rows=manifest["num_rows"], num_images=manifest["num_images"],
        num_videos=manifest["num_videos"], num_classes=len(manifest["class_names"]),
        num_users=manifest["num_users"], num_landmarks=len(manifest["landmarks"]),
        class_sizes={name: manifest["class_sizes"][name] for name in manifest["class_names"]},  # class order
        expected_counts={kind: manifest["expected_counts"][kind] for kind in ("ok",) + ANOMALY_KINDS},
        seconds=seconds, skipped=skipped, num_near_duplicates=len(manifest.get("near_duplicates", {})),
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
    """Write a synthetic YFCC100M-like corpus to ``out_dir`` (layout: :mod:`dataengine.synth`).

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
        OutputUnusableError: ``out_dir`` is a file, lies under a file, or is not writable.
        OutputLockedError: another run is writing ``out_dir``.
    """
    check_output_path(out_dir)
    with locked_output(out_dir, storage_options):
        return _generate(out_dir, config, progress, overwrite, storage_options)


def _generate(out_dir: str, config: SynthConfig, progress: Callable[[int], None] | None, overwrite: bool,
              storage_options: dict[str, Any] | None) -> SynthSummary:
    start = time.perf_counter()
    location = Location(out_dir, storage_options)
    previous = _clear_previous(location, config, overwrite)
    if previous is not None:
        logger.info("%s already holds this synthetic corpus; nothing to do", location.url)
        return _summary(out_dir, previous, 0.0, skipped=True)
    location.makedirs("images")
    plan = build_plan(config)
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


def read_near_duplicates(path: str) -> dict[int, tuple[int, str]]:
    """``near_duplicates.tsv`` as ``{photo_id: (source_photo_id, kind)}`` (kinds in :data:`NEAR_DUPLICATE_KINDS`)."""
    with open(path, encoding="utf-8") as handle:
        rows = (line.rstrip("\n").split("\t") for line in handle if line.strip())
        return {int(pid): (int(source), kind) for pid, source, kind in rows}
