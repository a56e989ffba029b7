"""Synthetic YFCC100M-like corpus: JPEG photos plus a 25-column metadata file with planted structure.

The corpus is the embedded default for the demo and the tests. Later stages must recover what is planted:

* latent visual classes (procedural shapes and textures at random positions, scales and colours, so that colour
  alone never identifies a class) with a long-tailed (Zipf) class-size distribution;
* users with a few preferred classes, a home location and one camera each; Zipf-distributed tags correlated
  with the class, frequent noise tags and rare tags; GPS near the user's home, and landmarks photographed at
  the very same coordinates by many users; a scanner device (:data:`SCANNER_DEVICE`) for the ``drawing`` class;
  photos without tags, GPS or device; a few videos (marker 1, no image file);
* optional anomalies (exact duplicates, corrupt files, missing files) for ingest's bookkeeping;
* optional near-duplicates (resized, re-encoded or cropped copies of earlier photos) for deduplication.

Output of :func:`generate_corpus` (``OUT`` a local folder or an fsspec URL)::

    OUT/images/<photo_id>.jpg  one file per photo row (none for videos and "missing" rows)
    OUT/metadata.tsv           YFCC100M ``yfcc100m_dataset`` layout: 25 TAB-separated fields, no header
    OUT/classes.tsv            ``photo_id<TAB>class_name`` for every photo row (videos excluded), file order
    OUT/anomalies.tsv          ``photo_id<TAB>kind`` for every row whose expected ingest status is not ``ok``
    OUT/near_duplicates.tsv    ``photo_id<TAB>source_photo_id<TAB>kind``, file order (only with near-duplicates)
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

Near-duplicates (``SynthConfig.num_near_duplicates``, off by default) are ``ok`` photo rows of their own (own
id, metadata line and file) whose image is derived from the photo of an *earlier* ``ok`` row of the same latent
class that is not itself a near-duplicate: ``resized`` (scaled by 0.5-0.8), ``reencoded`` (another JPEG
quality) or ``cropped`` (70-90% of each side). Their bytes differ from the source's, so ingest keeps them.
``synth.json`` lists them under ``near_duplicates``. They are drawn after everything else from generators of
their own: turning them on changes only their rows' image files, and adds ``near_duplicates.tsv`` and
entries in ``synth.json``.
The same seed and config give byte-identical files: every random draw comes from generators seeded by the
config's seed (images from a per-row generator), and nothing depends on time.

Modules, in the order a corpus is made: :mod:`~dataengine.synth.vocabulary` (word lists and places),
:mod:`~dataengine.synth.config` (:class:`SynthConfig`, :class:`SynthSummary`), :mod:`~dataengine.synth.plan`
(every row decided from the seed), :mod:`~dataengine.synth.draw` (the photos),
:mod:`~dataengine.synth.metadata` (the 25-field lines) and :mod:`~dataengine.synth.write` (files, skip and
overwrite rules).
"""

from __future__ import annotations

from dataengine.synth.config import (
    ANOMALY_KINDS, CORRUPT_KINDS, FORMAT, NEAR_DUPLICATE_KINDS, VERSION, SynthConfig, SynthSummary,
)
from dataengine.synth.draw import render_image
from dataengine.synth.vocabulary import (
    CAMERAS, CITIES, CLASS_NAMES, CLASS_TAGS, DESCRIPTIONS, LANDMARK_NAMES, LICENSES, NICKNAMES, NOISE_TAGS,
    SCANNER_DEVICE,
)
from dataengine.synth.write import generate_corpus, read_anomalies, read_classes, read_near_duplicates

__all__ = [
    "ANOMALY_KINDS", "CAMERAS", "CITIES", "CLASS_NAMES", "CLASS_TAGS", "CORRUPT_KINDS", "DESCRIPTIONS", "FORMAT",
    "LANDMARK_NAMES", "LICENSES", "NEAR_DUPLICATE_KINDS", "NICKNAMES", "NOISE_TAGS", "SCANNER_DEVICE", "VERSION",
    "SynthConfig", "SynthSummary", "generate_corpus", "read_anomalies", "read_classes", "read_near_duplicates",
    "render_image",
]
