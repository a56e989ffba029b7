"""The clusterings a report reads: levels present, the level reported, the pairs compared."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dataengine.metrics import consecutive_pairs
from dataengine.store import FeatureStore

_LEVEL_ARRAY = re.compile(r"level(\d+)")


@dataclass(frozen=True)
class Series:
    """One level of one clustering, as read from the store."""

    name: str
    level: int

    @property
    def label(self) -> str:
        """``NAME/levelL``: its name in the evaluator and in the report."""
        return f"{self.name}/level{self.level}"

    @property
    def path(self) -> str:
        return f"clusterings/{self.label}"


def clustering_levels(store: FeatureStore, name: str) -> list[int]:
    """Levels present in a complete clustering of the store, ascending.

    Raises:
        KeyError: no complete clustering of that name (the message lists those present).
        ValueError: the clustering has no ``level{L}`` array of one id per row.
    """
    from dataengine.cluster import load_clustering

    load_clustering(store, name)
    group = store.group[f"clusterings/{name}"]
    levels = sorted(int(match.group(1)) for key in group.array_keys() if (match := _LEVEL_ARRAY.fullmatch(key)))
    if not levels:
        raise ValueError(f"clustering {name!r} in {store.url} has no level0, level1... arrays")
    for level in levels:
        shape = group[f"level{level}"].shape
        if shape != (store.num_rows,):
            raise ValueError(f"clusterings/{name}/level{level} has shape {shape}; expected ({store.num_rows},)")
    return levels


def _pick_level(name: str, levels: list[int], wanted: int | None) -> int:
    if wanted is None:
        return levels[-1]
    if wanted not in levels:
        raise ValueError(f"clustering {name!r} has levels {levels}; level {wanted} is not among them")
    return wanted


def _num_clusters(store: FeatureStore, series: Series) -> int | None:
    """Clusters at that level including empty ones, when the clustering records it."""
    summary = store.read_attrs(f"clusterings/{series.name}").get("summary", {})
    counts = summary.get("num_clusters") or []
    return int(counts[series.level]) if series.level < len(counts) else None


def _comparisons(sequence: list[str]) -> list[tuple[str, str]]:
    """Consecutive pairs along the sequence, then the first one against each other."""
    pairs = consecutive_pairs(sequence)
    pairs += [(sequence[0], other) for other in sequence[2:]]
    return pairs
