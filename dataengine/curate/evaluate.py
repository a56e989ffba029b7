"""Near-duplicate removal judged against known duplicates (e.g. the synthetic corpus's planted ones).

A threshold is chosen on a validation collection (:func:`choose_threshold`: the best F1 of "similarity above
the threshold" against the known duplicates) and then judged on another collection (:func:`dedup_scores`), so
that the figures are not tuned on the rows they describe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DedupScores:
    """Rows dropped as near-duplicates against the rows known to be near-duplicates."""

    dropped: int
    """Rows dropped."""
    planted: int
    """Rows known to be near-duplicates."""
    true_positives: int
    """Known near-duplicates that were dropped."""

    @property
    def precision(self) -> float:
        """Share of the dropped rows that are known near-duplicates (NaN when none is dropped)."""
        return self.true_positives / self.dropped if self.dropped else float("nan")

    @property
    def recall(self) -> float:
        """Share of the known near-duplicates that were dropped (NaN when none is known)."""
        return self.true_positives / self.planted if self.planted else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return dict(asdict(self), precision=self.precision, recall=self.recall)


def dedup_scores(dropped: np.ndarray, planted: np.ndarray) -> DedupScores:
    """Precision and recall of the ``dropped`` mask against the ``planted`` mask (both ``(N,)`` bool)."""
    dropped, planted = np.asarray(dropped, dtype=bool), np.asarray(planted, dtype=bool)
    if dropped.shape != planted.shape:
        raise ValueError(f"dropped {dropped.shape} and planted {planted.shape} masks differ in shape")
    return DedupScores(dropped=int(dropped.sum()), planted=int(planted.sum()),
                       true_positives=int((dropped & planted).sum()))


def choose_threshold(similarities: np.ndarray, planted: np.ndarray) -> float:
    """The threshold whose rule ``similarity > threshold`` best finds the planted rows (highest F1).

    Args:
        similarities: ``(N,)`` each row's similarity to its most similar earlier row of its cluster (NaN: none).
        planted: ``(N,)`` bool, the rows known to be near-duplicates.

    Returns:
        A value halfway between the lowest similarity still dropped and the next lower one, so that a small
        shift of the figures does not flip the rows at the boundary.
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    planted = np.asarray(planted, dtype=bool)
    known = ~np.isnan(similarities)
    if not planted[known].any():
        raise ValueError("no planted near-duplicate has a similarity: nothing to choose a threshold from")
    order = np.argsort(-similarities[known], kind="stable")
    values, hits = similarities[known][order], planted[known][order]
    true_positives = np.cumsum(hits)
    dropped = np.arange(1, len(values) + 1)
    f1 = 2 * true_positives / (dropped + planted.sum())
    last = np.flatnonzero(np.append(values[1:] < values[:-1], True))  # cut only between distinct values
    best = int(last[np.argmax(f1[last])])
    lower = values[best + 1] if best + 1 < len(values) else values[best] - 1e-3
    return float((values[best] + lower) / 2)
