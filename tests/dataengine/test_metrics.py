"""Cluster metrics: NMI equal to sklearn's, chance levels, label encoders, purity, flags and size stats."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_mutual_info_score
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from dataengine import metrics
from dataengine.metrics import (
    ClusterFlagConfig,
    ClusteringEvaluator,
    Contingency,
    nmi_score,
)

TOL = 1e-9


def sk_nmi(labels, clusters, average_method="geometric"):
    """sklearn's NMI with the papers' (and dataengine's default) normalisation unless told otherwise."""
    return normalized_mutual_info_score(labels, clusters, average_method=average_method)


def sk_present(clusters, labels, average_method="geometric"):
    """sklearn's NMI on the rows where both codes are present."""
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    keep = (clusters >= 0) & (labels >= 0)
    return sk_nmi(labels[keep], clusters[keep], average_method=average_method)


def planted(rng, num_rows, num_clusters, num_labels, noise):
    """Clusters and labels agreeing through a random map except for a ``noise`` share of rows."""
    clusters = rng.integers(0, num_clusters, num_rows)
    mapping = rng.integers(0, num_labels, num_clusters)
    labels = np.where(rng.random(num_rows) < noise, rng.integers(0, num_labels, num_rows), mapping[clusters])
    return clusters, labels


# ---------------------------------------------------------------------------------------------- NMI


@pytest.mark.parametrize("seed", range(6))
def test_nmi_equals_sklearn_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    num_rows = int(rng.integers(50, 5000))
    clusters, labels = planted(rng, num_rows, int(rng.integers(2, 300)), int(rng.integers(2, 300)),
                               noise=float(rng.random()))
    assert abs(nmi_score(clusters, labels) - sk_nmi(labels, clusters)) < TOL
    assert abs(nmi_score(labels, clusters) - sk_nmi(labels, clusters)) < TOL  # symmetric


@pytest.mark.parametrize("average_method", metrics.AVERAGE_METHODS)
def test_every_average_method_equals_sklearn(average_method):
    clusters, labels = planted(np.random.default_rng(1), 3000, 40, 25, noise=0.4)
    ours = nmi_score(clusters, labels, average_method=average_method)
    assert abs(ours - sk_nmi(labels, clusters, average_method=average_method)) < TOL
    with pytest.raises(ValueError, match="average_method"):
        nmi_score(clusters, labels, average_method="harmonic")


@pytest.mark.parametrize("case", [
    "single_cluster", "single_label", "both_single", "all_unique_labels", "all_unique_both",
    "one_row", "identical", "permuted_names", "sparse_codes", "extreme_codes", "independent",
])
def test_nmi_equals_sklearn_on_adversarial_inputs(case):
    rng = np.random.default_rng(7)
    n = 500
    clusters, labels = rng.integers(0, 8, n), rng.integers(0, 5, n)
    if case == "single_cluster":
        clusters = np.zeros(n, np.int64)
    elif case == "single_label":
        labels = np.full(n, 3)
    elif case == "both_single":
        clusters, labels = np.full(n, 4), np.full(n, 9)
    elif case == "all_unique_labels":
        labels = rng.permutation(n)
    elif case == "all_unique_both":
        clusters, labels = rng.permutation(n), rng.permutation(n)
    elif case == "one_row":
        clusters, labels = clusters[:1], labels[:1]
    elif case == "identical":
        labels = clusters.copy()
    elif case == "permuted_names":
        labels = rng.permutation(8)[clusters]
    elif case == "sparse_codes":  # far beyond the dense range: the sorted marginal path
        clusters = clusters * 200_000_003 % metrics.MAX_CODE
        labels = labels * 300_000_007 % metrics.MAX_CODE
    elif case == "extreme_codes":
        clusters = np.where(clusters == 0, metrics.MAX_CODE, clusters)
        labels = np.where(labels == 0, metrics.MAX_CODE, labels)
    elif case == "independent":  # every cell of the table is the product of the marginals: MI == 0
        clusters, labels = np.repeat(np.arange(4), 6), np.tile(np.arange(3), 8)
    expected = sk_nmi(labels, clusters)
    assert abs(nmi_score(clusters, labels) - expected) < TOL
    if case in ("single_cluster", "single_label", "independent"):
        assert nmi_score(clusters, labels) == 0.0
    if case in ("both_single", "one_row", "identical", "permuted_names"):
        assert nmi_score(clusters, labels) == pytest.approx(1.0)


def test_missing_values_are_excluded_and_counted_for_coverage():
    rng = np.random.default_rng(3)
    clusters, labels = planted(rng, 4000, 30, 20, noise=0.3)
    labels[rng.random(4000) < 0.35] = -1
    clusters[rng.random(4000) < 0.05] = -1
    table = Contingency()
    table.update(clusters, labels)
    used = int(np.sum((clusters >= 0) & (labels >= 0)))
    result = table.result(chance_seed=None)
    assert abs(result.nmi - sk_present(clusters, labels)) < TOL
    assert (result.rows_used, result.rows_total) == (used, 4000)
    assert result.coverage == pytest.approx(used / 4000)
    assert math.isnan(result.chance_nmi)


def test_no_present_row_gives_nan_not_sklearns_one():
    table = Contingency()
    table.update(np.array([0, 1, -1]), np.array([-1, -1, 2]))
    assert math.isnan(table.nmi()) and math.isnan(table.chance_nmi())
    result = table.result()
    assert result.rows_used == 0 and result.coverage == 0.0
    assert result.as_dict()["nmi"] is None and result.as_dict()["rows_total"] == 3
    assert math.isnan(nmi_score(np.zeros(0, np.int64), np.zeros(0, np.int64)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 6), st.integers(-1, 4)), min_size=1, max_size=80))
def test_nmi_property_equals_sklearn(rows):
    clusters = np.array([c for c, _ in rows])
    labels = np.array([label for _, label in rows])
    keep = (clusters >= 0) & (labels >= 0)
    ours = nmi_score(clusters, labels)
    if not keep.any():
        assert math.isnan(ours)
    else:
        assert abs(ours - sk_present(clusters, labels)) < TOL


def test_streaming_blocks_and_merge_equal_one_pass():
    rng = np.random.default_rng(5)
    clusters, labels = planted(rng, 20_000, 500, 400, noise=0.5)
    whole = Contingency()
    whole.update(clusters, labels)
    # Tiny block_rows forces many per-block tables and several merges of the sparse table.
    streamed, left, right = Contingency(block_rows=700), Contingency(block_rows=999), Contingency()
    for start in range(0, 20_000, 3_333):
        streamed.update(clusters[start:start + 3_333], labels[start:start + 3_333])
    left.update(clusters[:12_345], labels[:12_345])
    right.update(clusters[12_345:], labels[12_345:])
    left.merge(right)
    expected = sk_nmi(labels, clusters)
    for table in (whole, streamed, left):
        got_c, got_l, got_n = table.table()
        assert np.all(np.diff(got_c * (1 << 32) + got_l) > 0)  # sorted, distinct cells
        assert abs(table.nmi() - expected) < TOL
        assert table.rows_total == 20_000
    dense = contingency_matrix(clusters, labels)
    got_c, got_l, got_n = streamed.table()
    np.testing.assert_array_equal(dense[got_c, got_l], got_n)
    assert got_n.sum() == dense.sum() and got_n.size == np.count_nonzero(dense)


def test_nmi_over_many_clusters_and_labels_with_multiple_blocks():
    """The sizes where the sparse table matters (many cells), across block merges."""
    rng = np.random.default_rng(11)
    clusters, labels = planted(rng, 300_000, 20_000, 30_000, noise=0.5)
    table = Contingency(block_rows=70_000)
    table.update(clusters, labels)
    assert abs(table.nmi() - sk_nmi(labels, clusters)) < TOL


@pytest.mark.parametrize(("clusters", "labels", "error"), [
    (np.array([0.0, 1.0]), np.array([0, 1]), TypeError),
    (np.array(["a", "b"]), np.array([0, 1]), TypeError),
    (np.zeros((2, 2), np.int64), np.zeros(4, np.int64), ValueError),
    (np.array([0, -2]), np.array([0, 1]), ValueError),
    (np.array([0, 2**31]), np.array([0, 1]), ValueError),
    (np.array([0, 1, 2]), np.array([0, 1]), ValueError),
])
def test_bad_codes_are_rejected(clusters, labels, error):
    with pytest.raises(error):
        Contingency().update(clusters, labels)


# ------------------------------------------------------------------------------------------- chance


def test_chance_table_keeps_both_marginals_and_is_seeded():
    rng = np.random.default_rng(2)
    clusters, labels = planted(rng, 5000, 50, 40, noise=0.2)
    labels[:700] = -1
    table = Contingency(block_rows=1500)
    table.update(clusters, labels)
    chance = table.permuted(seed=4)
    for axis in (0, 1):
        ours = np.bincount(table.table()[axis], weights=table.table()[2])
        shuffled = np.bincount(chance.table()[axis], weights=chance.table()[2], minlength=ours.size)
        np.testing.assert_array_equal(ours, shuffled)
    assert (chance.rows_used, chance.rows_total) == (table.rows_used, table.rows_total)
    assert table.chance_nmi(4) == pytest.approx(chance.nmi(), abs=1e-12)
    assert table.chance_nmi(4) == table.chance_nmi(4)
    assert table.chance_nmi(5) != table.chance_nmi(4)


def test_chance_is_sklearn_nmi_of_the_documented_permutation():
    """permuted(seed) pairs the cluster sequence (cell order) with labels shuffled by default_rng(seed)."""
    rng = np.random.default_rng(8)
    clusters, labels = planted(rng, 3000, 60, 35, noise=0.3)
    clusters[:1000] = 0  # one cluster larger than a block: blocks end on cluster boundaries
    table = Contingency(block_rows=400)
    table.update(clusters, labels)
    cells_c, cells_l, counts = table.table()
    expanded_c, expanded_l = np.repeat(cells_c, counts), np.repeat(cells_l, counts).astype(np.int32)
    np.random.default_rng(21).shuffle(expanded_l)
    assert abs(table.chance_nmi(21) - sk_nmi(expanded_l, expanded_c)) < TOL


def test_chance_level_matches_permuting_assignments_and_sits_below_planted_nmi():
    rng = np.random.default_rng(9)
    clusters, users = planted(rng, 20_000, 200, 2000, noise=0.5)  # nearly unique labels: inflated NMI
    table = Contingency()
    table.update(clusters, users)
    ours = [table.chance_nmi(seed) for seed in range(3)]
    direct = [sk_nmi(users, np.random.default_rng(100 + seed).permutation(clusters)) for seed in range(3)]
    # Both are draws of the same distribution, which is tight at this size.
    assert abs(np.mean(ours) - np.mean(direct)) < 0.01
    assert 0.2 < np.mean(ours) < table.nmi() - 0.1


# ----------------------------------------------------------------------------------------- encoders


def test_least_frequent_tag_rule_on_a_hand_made_example():
    tags = [
        ["cat", "london", "elephantparadelondon"],  # elephantparadelondon: 1 occurrence, rarest
        ["cat", "london"],                          # london (3) rarer than cat (4)
        ["cat", "dog"],                             # dog 2
        [],                                          # no tags -> missing
        None,                                        # null -> missing
        ["cat", "london", "dog"],                   # dog (2) < london (3)
        ["", "zebra", "aardvark"],                  # '' ignored; zebra/aardvark tie at 1 -> aardvark
    ]
    codes, vocabulary = metrics.hashtag_labels(tags)
    got = [vocabulary[code] if code >= 0 else None for code in codes]
    assert got == ["elephantparadelondon", "london", "dog", None, None, "dog", "aardvark"]
    # The vocabulary is ordered by rarity, ties lexicographically: code == rank.
    assert list(vocabulary) == ["aardvark", "elephantparadelondon", "zebra", "dog", "london", "cat"]


def test_hashtag_labels_on_sliced_and_chunked_arrow_lists_and_streaming():
    rows = [["b", "a"], ["a"], None, ["c", "b", "a"], [], ["c"], ["a", "c"], ["b"]]
    full = pa.array(rows, type=pa.list_(pa.string()))
    expected, vocabulary = metrics.hashtag_labels(rows)
    assert list(vocabulary) == ["b", "c", "a"]  # b: 3, c: 3 (tie -> b first), a: 4
    arrow_codes, _ = metrics.hashtag_labels(full)
    np.testing.assert_array_equal(arrow_codes, expected)
    chunked = pa.chunked_array([full.slice(0, 3), full.slice(3)])
    np.testing.assert_array_equal(metrics.hashtag_labels(chunked)[0], expected)
    # Two passes over blocks, the blocks being slices (non-zero offsets into shared values).
    blocks = [full.slice(0, 3), full.slice(3, 2), full.slice(5)]
    vocab = metrics.count_tags(blocks)
    np.testing.assert_array_equal(vocab.counts, [3, 3, 4])
    streamed = np.concatenate([metrics.least_frequent_tags(block, vocab) for block in blocks])
    np.testing.assert_array_equal(streamed, expected)
    large = full.cast(pa.large_list(pa.large_string()))
    np.testing.assert_array_equal(metrics.hashtag_labels(large)[0], expected)


def test_hashtag_labels_without_any_tag():
    codes, vocabulary = metrics.hashtag_labels([[], None, [""]])
    np.testing.assert_array_equal(codes, [-1, -1, -1])
    assert vocabulary.size == 0


def test_gps_cells_scheme():
    lat = np.array([0.5, -90.0, 90.0, 45.2, np.nan, 10.0, 91.0, -33.9])
    lon = np.array([0.5, -180.0, 180.0, -73.9, 3.0, np.nan, 0.0, 151.2])
    codes = metrics.gps_cells(lat, lon)
    assert metrics.gps_grid_shape(1.0) == (180, 360)
    assert codes[0] == 90 * 360 + 180
    assert codes[1] == 0                       # south-west corner
    assert codes[2] == 179 * 360 + 359         # the north pole and lon 180 go into the last row/column
    assert codes[3] == 135 * 360 + 106
    np.testing.assert_array_equal(codes[4:7], [-1, -1, -1])  # missing and out of range: never clamped
    lat0, lon0, lat1, lon1 = metrics.gps_cell_bounds(int(codes[7]))
    assert lat0 <= -33.9 < lat1 and lon0 <= 151.2 < lon1 and lat1 - lat0 == 1.0
    # Coarser cells that do not divide 180/360 evenly: the last row/column is narrower.
    assert metrics.gps_grid_shape(7.0) == (26, 52)
    coarse = metrics.gps_cells([89.9, -89.9], [179.9, -179.9], cell_deg=7.0)
    np.testing.assert_array_equal(coarse, [25 * 52 + 51, 0])
    arrow = metrics.gps_cells(pa.array([0.5, None]), pa.array([0.5, 1.0]))
    np.testing.assert_array_equal(arrow, [codes[0], -1])
    for bad in (0, -1.0, 200.0):
        with pytest.raises(ValueError, match="cell_deg"):
            metrics.gps_cells(lat, lon, cell_deg=bad)
    with pytest.raises(ValueError, match="differ"):
        metrics.gps_cells([1.0], [1.0, 2.0])


def test_device_labels_are_normalised():
    devices = ["Canon EOS 5D", "  canon   eos\t5D ", None, "", "   ", "CanoScan", "canoscan", "Straße"]
    codes, vocabulary = metrics.device_labels(devices)
    np.testing.assert_array_equal(codes, [0, 0, -1, -1, -1, 1, 1, 2])
    assert list(vocabulary) == ["canon eos 5d", "canoscan", "strasse"]  # casefold, not just lower


def test_categorical_codes_are_stable_across_blocks():
    codes, vocabulary = metrics.categorical_codes(np.array(["u2", None, "u1", "", "u2"], dtype=object))
    np.testing.assert_array_equal(codes, [0, -1, 1, -1, 0])
    assert list(vocabulary) == ["u2", "u1"]
    encoder = metrics.CategoricalEncoder()
    first = encoder.encode(pa.array(["a", "b", None]))
    second = encoder.encode(pa.chunked_array([["c", "a"], ["b"]]))
    np.testing.assert_array_equal(np.concatenate([first, second]), [0, 1, -1, 2, 0, 1])
    assert list(encoder.vocabulary) == ["a", "b", "c"]
    with pytest.raises(TypeError, match="string"):
        encoder.encode(pa.array([1, 2]))


# ---------------------------------------------------------------------------- purity, flags, sizes


def test_cluster_purity_hand_made():
    clusters = np.array([0, 0, 0, 0, 1, 1, 1, 5, 5, 5])
    labels = np.array([2, 2, 1, -1, 3, 4, -1, -1, -1, -1])
    table = metrics.cluster_purity(clusters, labels)
    np.testing.assert_array_equal(table.cluster_ids, [0, 1])
    np.testing.assert_array_equal(table.labelled, [3, 2])
    np.testing.assert_array_equal(table.num_values, [2, 2])
    np.testing.assert_array_equal(table.dominant, [2, 3])  # cluster 1 ties 3/4: smallest code
    np.testing.assert_array_equal(table.dominant_count, [2, 1])
    np.testing.assert_allclose(table.purity, [2 / 3, 0.5])
    aligned = table.aligned(np.array([0, 1, 5]))
    np.testing.assert_array_equal(aligned.dominant, [2, 3, -1])
    assert math.isnan(aligned.purity[2]) and aligned.labelled[2] == 0
    for missing_one in (np.array([0, 5]), np.array([0]), np.zeros(0, np.int64)):
        with pytest.raises(ValueError, match="every cluster"):
            table.aligned(missing_one)


def make_flag_corpus():
    """Cluster 0: landmark; 1: one user; 2: scanner of many users; 3: mixed; 4: too small to flag."""
    rows = []  # (cluster, user, gps, device)
    rows += [(0, u % 12, 7, u % 5) for u in range(40)]          # 12 users, one cell, various devices
    rows += [(1, 99, 1000 + i % 3, 1) for i in range(40)]       # one user
    rows += [(2, 50 + i % 20, 200 + i % 9, 42) for i in range(40)]  # 20 users, one device
    rows += [(3, 70 + i % 10, 300 + i % 10, i % 6) for i in range(40)]
    rows += [(4, 5, 7, 42) for _ in range(5)]
    rows += [(3, -1, -1, -1) for _ in range(10)]                 # rows without metadata
    clusters, users, gps, devices = (np.array(column) for column in zip(*rows))
    return clusters, {"user": users, "gps": gps, "device": devices}


def test_cluster_profiles_and_flags():
    clusters, labels = make_flag_corpus()
    profiles = metrics.cluster_profiles(clusters, labels)
    np.testing.assert_array_equal(profiles.cluster_ids, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(profiles.sizes, [40, 40, 40, 50, 5])
    np.testing.assert_array_equal(profiles.landmark, [True, False, False, False, False])
    np.testing.assert_array_equal(profiles.single_user, [False, True, False, False, False])
    np.testing.assert_array_equal(profiles.device, [False, False, True, False, False])
    gps = profiles.purity["gps"]
    assert gps.dominant[0] == 7 and gps.purity[0] == 1.0
    assert profiles.purity["user"].labelled[3] == 40
    # Without GPS metadata, no cluster can be a landmark; thresholds are validated.
    no_gps = metrics.cluster_profiles(clusters, {"user": labels["user"], "device": labels["device"]})
    assert not no_gps.landmark.any() and no_gps.device[2]
    strict = metrics.cluster_profiles(clusters, labels, ClusterFlagConfig(landmark_min_users=13))
    assert not strict.landmark.any()
    with pytest.raises(ValueError, match="device_purity"):
        ClusterFlagConfig(device_purity=1.5)
    with pytest.raises(ValueError, match="min_size"):
        ClusterFlagConfig(min_size=-1)


def test_size_stats():
    equal = metrics.size_stats([5, 5, 5, 5])
    assert (equal.min, equal.median, equal.max, equal.num_empty) == (5, 5.0, 5, 0)
    assert equal.gini == pytest.approx(0.0, abs=1e-12)
    assert equal.entropy == pytest.approx(math.log(4)) and equal.normalized_entropy == pytest.approx(1.0)
    skewed = metrics.size_stats([10], num_clusters=4)  # k=4 with three empty clusters
    assert (skewed.num_clusters, skewed.num_empty, skewed.min, skewed.median) == (4, 3, 0, 0.0)
    assert skewed.gini == pytest.approx(0.75) and skewed.entropy == 0.0
    mixed = metrics.size_stats([1, 2, 3, 4])
    assert mixed.gini == pytest.approx(0.25) and mixed.median == 2.5
    with pytest.raises(ValueError, match="num_clusters"):
        metrics.size_stats([1, 2], num_clusters=1)
    with pytest.raises(ValueError):
        metrics.size_stats([])


# ------------------------------------------------------------------------------ evaluator and epochs


def test_evaluator_streams_sequences_pairs_and_sizes():
    rng = np.random.default_rng(12)
    n = 6000
    epochs = {f"epoch-{e}": planted(rng, n, 40, 40, noise=0.9 - 0.3 * e)[0] for e in range(3)}
    users = rng.integers(0, 300, n)
    tags = np.where(rng.random(n) < 0.4, -1, rng.integers(0, 80, n))
    labels = {"user": users, "hashtag": tags}
    names = list(epochs)
    evaluator = ClusteringEvaluator(names, list(labels), compare=metrics.consecutive_pairs(names),
                                    block_rows=900)
    for start in range(0, n, 1000):
        evaluator.update({k: v[start:start + 1000] for k, v in epochs.items()},
                         {k: v[start:start + 1000] for k, v in labels.items()})
    assert evaluator.rows == n
    results = evaluator.nmi(chance_seed=3)
    in_memory = metrics.nmi_sequence(epochs, labels, chance_seed=3)
    for name in names:
        for kind in labels:
            assert abs(results[name][kind].nmi - sk_present(epochs[name], labels[kind])) < TOL
            chance = results[name][kind].chance_nmi  # other blocks: other summation order
            assert chance == pytest.approx(in_memory[name][kind].chance_nmi, abs=1e-12)
        assert results[name]["hashtag"].rows_used == int(np.sum(tags >= 0))
    pairs = evaluator.pair_nmi()
    consecutive = metrics.consecutive_nmi(epochs)
    assert [(a, b) for a, b, _ in consecutive] == [("epoch-0", "epoch-1"), ("epoch-1", "epoch-2")]
    for a, b, result in consecutive:
        assert abs(result.nmi - sk_nmi(epochs[a], epochs[b])) < TOL
        assert pairs[a, b].nmi == result.nmi and result.coverage == 1.0
    ids, sizes = evaluator.sizes("epoch-2")
    np.testing.assert_array_equal(sizes, np.bincount(epochs["epoch-2"])[ids])
    stats = evaluator.size_stats("epoch-2", num_clusters=50)
    assert stats.num_empty == 50 - ids.size and stats.max == sizes.max()
    single = metrics.metadata_nmi(epochs["epoch-0"], labels, chance_seed=None)
    assert single["user"].nmi == results["epoch-0"]["user"].nmi
    assert set(single["user"].as_dict()) >= {"nmi", "chance_nmi", "coverage", "rows_used", "num_labels"}


def test_evaluator_rejects_inconsistent_blocks():
    evaluator = ClusteringEvaluator(["a"], ["user"])
    with pytest.raises(ValueError, match="expected kinds"):
        evaluator.update({"a": np.zeros(3, np.int64)}, {"gps": np.zeros(3, np.int64)})
    with pytest.raises(ValueError, match="differ in length"):
        evaluator.update({"a": np.zeros(3, np.int64)}, {"user": np.zeros(4, np.int64)})
    with pytest.raises(ValueError, match="unique"):
        ClusteringEvaluator(["a", "a"], ["user"])
    with pytest.raises(ValueError, match="compare"):
        ClusteringEvaluator(["a"], ["user"], compare=[("a", "b")])


# ---------------------------------------------------------------------------------------------- normalisation, AMI


def test_geometric_nmi_by_hand():
    """DeepCluster's NMI(A; B) = I(A; B) / sqrt(H(A) H(B)) on a 4-row table worked out by hand: A = {0, 0, 1, 1},
    B = {0, 0, 0, 1}; cells (0,0) = 2, (1,0) = 1, (1,1) = 1 of 4 rows."""
    clusters, labels = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    mutual = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) + 0.25 * math.log(2)
    h_a, h_b = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert abs(nmi_score(clusters, labels) - mutual / math.sqrt(h_a * h_b)) < 1e-12
    assert abs(nmi_score(clusters, labels) - 0.345592) < 1e-6  # 0.215762 / sqrt(0.693147 * 0.562335)
    assert abs(nmi_score(clusters, labels, average_method="arithmetic") - mutual / ((h_a + h_b) / 2)) < 1e-12
    result = Contingency()
    result.update(clusters, labels)
    both = result.result()
    assert both.average_method == "geometric" and both.nmi == both.nmi_geometric > both.nmi_arithmetic


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("average_method", ["geometric", "arithmetic"])
def test_ami_equals_sklearn(seed, average_method):
    rng = np.random.default_rng(seed)
    num_rows = int(rng.integers(20, 3000))
    clusters, labels = planted(rng, num_rows, int(rng.integers(2, 120)), int(rng.integers(2, 80)),
                               noise=float(rng.random()))
    clusters[rng.random(num_rows) < 0.1] = -1  # missing codes: scored on the rows with both
    table = Contingency()
    table.update(clusters, labels)
    keep = clusters >= 0
    expected = adjusted_mutual_info_score(labels[keep], clusters[keep], average_method=average_method)
    assert abs(table.ami(average_method) - expected) < TOL
    assert abs(table.result(average_method=average_method).ami - expected) < TOL


def test_ami_special_cases_follow_sklearn():
    for clusters, labels in (([0, 0, 0], [1, 1, 1]), ([0, 0, 0], [0, 1, 2]), ([0, 1, 2], [0, 1, 2])):
        table = Contingency()
        table.update(np.array(clusters), np.array(labels))
        assert table.ami() == pytest.approx(adjusted_mutual_info_score(labels, clusters, average_method="geometric"))
    empty = Contingency()
    empty.update(np.array([-1, 0]), np.array([3, -1]))
    assert math.isnan(empty.ami())


def test_an_nmi_within_noise_of_chance_is_flagged():
    rng = np.random.default_rng(3)
    independent = Contingency()
    independent.update(rng.integers(0, 30, 4000), rng.integers(0, 20, 4000))
    chance = independent.result()
    assert chance.near_chance and abs(chance.ami) < 0.01 and chance.nmi > 0.02  # NMI is biased up, AMI is not
    assert abs(chance.nmi - chance.chance_nmi) < 3 * chance.noise
    associated = Contingency()
    associated.update(*planted(rng, 4000, 30, 20, noise=0.8))
    signal = associated.result()
    assert not signal.near_chance and signal.ami > 0.02
    assert signal.as_dict()["near_chance"] is False and chance.as_dict()["near_chance"] is True


def test_chance_level_holds_a_block_of_rows_not_all_of_them():
    """3M rows, nearly every one its own (cluster, label) cell: the chance NMI holds the shuffled labels (4 bytes a
    row), the table's cells (about 20 bytes a cell) and one block's temporaries (Python-visible, tracemalloc).
    Blocks of 2^24 rows took every row of a store below 16M rows at once (52 bytes a row here; 650 MB above)."""
    import tracemalloc

    from dataengine.metrics.contingency import Contingency

    rows = 3_000_000
    rng = np.random.default_rng(0)
    table = Contingency()
    table.update(rng.integers(0, 4000, rows).astype(np.int32), rng.integers(0, 100_000, rows).astype(np.int32))
    nmi = table.nmi()
    tracemalloc.start()
    try:
        chance = table.chance_nmi(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0 < chance <= nmi + 0.01
    assert peak < 40 * rows, f"{peak / rows:.1f} bytes a row"  # 31 measured
