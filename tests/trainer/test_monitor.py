"""The re-clustering monitor: the report's streaming NMI on the leaf level, against in-memory oracles."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dataengine import metrics
from dataengine.metrics.store import StoreLabels
from trainer.monitor import clustering_nmi


@pytest.fixture()
def table():
    rng = np.random.default_rng(3)
    num_rows = 240
    users = [f"u{u}" if u < 9 else None for u in rng.integers(0, 10, num_rows)]
    tags = [[f"t{t}" for t in rng.integers(0, 12, rng.integers(0, 3))] for _ in range(num_rows)]
    lat = np.where(rng.random(num_rows) < 0.7, rng.uniform(-60, 60, num_rows), np.nan)
    return pa.table({"key": [str(i) for i in range(num_rows)], "user": users,
                     "device": [["Canon EOS", "nikon d5", None][d] for d in rng.integers(0, 3, num_rows)],
                     "tags": tags, "lat": lat, "lon": rng.uniform(-170, 170, num_rows)})


def test_nmi_equals_the_in_memory_metrics_on_the_leaf_level(tmp_path, table, metadata_store):
    rng = np.random.default_rng(4)
    users = metrics.categorical_codes(table["user"])[0]
    leaf = np.where(rng.random(table.num_rows) < 0.8, users % 5, rng.integers(0, 5, table.num_rows))
    leaf[:3] = -1  # rows without a cluster count only towards coverage
    previous = rng.integers(0, 4, table.num_rows)
    previous[5] = -1
    store = metadata_store(str(tmp_path / "now"), table, {"epoch001": [np.maximum(leaf, 0) // 3, leaf]})
    metadata_store(str(tmp_path / "before"), table, {"epoch000": [previous]})
    found = clustering_nmi(str(tmp_path / "now"), "epoch001", str(tmp_path / "before"), "epoch000", block_rows=50)
    labels = {"hashtag": metrics.hashtag_labels(table["tags"])[0], "user": users,
              "gps": metrics.gps_cells(table["lat"], table["lon"]),
              "device": metrics.device_labels(table["device"])[0]}
    expected = metrics.metadata_nmi(leaf, labels)
    # The chance level permutes the store's own codes: the in-memory evaluator on those codes is its oracle.
    store_labels = StoreLabels(store)
    store_labels.count_tags([(0, table.num_rows)])
    chance = metrics.metadata_nmi(leaf, store_labels.block(0, table.num_rows))
    assert set(found["nmi"]) == set(labels)
    for kind, result in expected.items():
        assert found["nmi"][kind]["nmi"] == pytest.approx(result.nmi, abs=1e-12)
        assert found["nmi"][kind]["chance"] == chance[kind].chance_nmi
        assert found["nmi"][kind]["coverage"] == result.coverage < 1
        assert found["nmi"][kind]["nmi"] == found["nmi"][kind]["nmi_geometric"]  # DeepCluster's normalisation
        assert found["nmi"][kind]["nmi_arithmetic"] == pytest.approx(
            metrics.nmi_score(leaf, labels[kind], average_method="arithmetic"), abs=1e-12)
        assert found["nmi"][kind]["ami"] == pytest.approx(result.ami, abs=1e-12)
        assert isinstance(found["nmi"][kind]["near_chance"], bool)
    assert found["nmi_average"] == "geometric"
    arithmetic = clustering_nmi(str(tmp_path / "now"), "epoch001", average_method="arithmetic")
    assert arithmetic["nmi"]["user"]["nmi"] == found["nmi"]["user"]["nmi_arithmetic"]
    both = (leaf >= 0) & (previous >= 0)
    assert found["nmi_previous"] == pytest.approx(metrics.nmi_score(leaf[both], previous[both]), abs=1e-12)
    assert found["num_clusters"] == int(leaf.max()) + 1


def test_undefined_figures_are_none_and_the_first_clustering_has_no_previous(tmp_path, table, metadata_store):
    nothing = np.full(table.num_rows, -1)
    metadata_store(str(tmp_path / "now"), table, {"epoch000": [np.zeros(table.num_rows, int)]})
    metadata_store(str(tmp_path / "before"), table, {"old": [nothing]})
    first = clustering_nmi(str(tmp_path / "now"), "epoch000")
    assert "nmi_previous" not in first and first["num_clusters"] == 1
    assert first["nmi"]["user"]["nmi"] == 0.0  # one cluster: sklearn's convention
    second = clustering_nmi(str(tmp_path / "now"), "epoch000", str(tmp_path / "before"), "old")
    assert second["nmi_previous"] is None  # no row is assigned in both


def test_clusterings_of_other_rows_are_refused(tmp_path, table, metadata_store):
    metadata_store(str(tmp_path / "now"), table, {"a": [np.zeros(table.num_rows, int)]})
    metadata_store(str(tmp_path / "short"), table.slice(0, 100), {"b": [np.zeros(100, int)]})
    with pytest.raises(ValueError, match="clustering 'previous' has 100 ids for 240 rows"):
        clustering_nmi(str(tmp_path / "now"), "a", str(tmp_path / "short"), "b")
    with pytest.raises(KeyError, match="no complete clustering 'nope'"):
        clustering_nmi(str(tmp_path / "now"), "nope")
