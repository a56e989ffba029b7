"""Cluster-balanced block-shuffled streams: per-cluster frequencies, totals, determinism and exact resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from trainer.sampler import BalancedStream, ClusterBalance, StreamConfig, stream_rng, torch_generator

NUM_ROWS = 20_000
NUM_CLUSTERS = 40


def _long_tailed_labels(seed: int = 0) -> np.ndarray:
    """Zipf-like cluster sizes (largest 11004 rows, smallest 14), rows in a random order."""
    weights = 1.0 / np.arange(1, NUM_CLUSTERS + 1) ** 1.8
    sizes = np.maximum(np.round(weights / weights.sum() * NUM_ROWS).astype(int), 1)
    labels = np.repeat(np.arange(NUM_CLUSTERS), sizes)
    return np.random.default_rng(seed).permutation(labels)


def _source(rows) -> list[tuple[int, str]]:
    return [(int(row), f"sample-{row}") for row in rows]


def _run(stream: BalancedStream, rows) -> list[tuple[int, str]]:
    return list(stream(_source(rows)))


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return _long_tailed_labels()


@pytest.fixture(scope="module")
def balanced_output(labels):
    stream = BalancedStream(ClusterBalance(labels), StreamConfig(seed=11, buffer_size=512))
    return _run(stream, range(len(labels)))


def test_per_cluster_frequencies_are_uniform(labels, balanced_output):
    emitted = labels[[row for row, _ in balanced_output]]
    counts = np.bincount(emitted, minlength=NUM_CLUSTERS)
    balanced = chisquare(counts)
    unbalanced = chisquare(np.bincount(labels, minlength=NUM_CLUSTERS))
    assert balanced.pvalue > 1e-3, (balanced, counts)
    assert unbalanced.pvalue < 1e-12, unbalanced  # the raw long-tailed stream is far from uniform
    sizes = np.bincount(labels)
    assert sizes.max() / sizes.min() > 100
    # Stochastic rounding makes a cluster's count size * floor(e) + Binomial(size, frac(e)): less spread
    # than the multinomial the chi-square test assumes (so its p-value is close to 1); check that bound too.
    rates = ClusterBalance(labels).rates
    fraction = rates - np.floor(rates)
    sigma = np.sqrt(sizes * fraction * (1 - fraction))
    assert np.all(np.abs(counts - len(labels) / NUM_CLUSTERS) <= 5 * sigma + 1e-6)


def test_each_row_gets_floor_or_ceil_of_its_expected_count(labels, balanced_output):
    balance = ClusterBalance(labels)
    expected = balance.expected(np.arange(len(labels)))
    counts = np.bincount([row for row, _ in balanced_output], minlength=len(labels))
    assert np.all((counts == np.floor(expected)) | (counts == np.floor(expected) + 1))
    # Rows of the smallest cluster are each used many times, rows of the largest mostly once or never.
    assert expected.max() > 30 and expected.min() < 0.25


@pytest.mark.parametrize("target", [None, 50_000])
def test_total_count_matches_the_target(labels, target):
    balance = ClusterBalance(labels, samples_per_epoch=target)
    wanted = len(labels) if target is None else target
    expected = balance.expected(np.arange(len(labels)))
    assert expected.sum() == pytest.approx(wanted, rel=1e-9)
    per_cluster = np.bincount(labels, weights=expected)
    assert np.allclose(per_cluster, wanted / NUM_CLUSTERS)
    fraction = expected - np.floor(expected)
    sigma = np.sqrt(np.sum(fraction * (1 - fraction)))
    for epoch in range(3):
        total = balance.counts(np.arange(len(labels)), seed=0, epoch=epoch).sum()
        assert abs(total - wanted) < 5 * sigma + 1


def test_row_counts_do_not_depend_on_how_the_stream_is_split(labels, balanced_output):
    balance = ClusterBalance(labels)
    config = StreamConfig(seed=11, buffer_size=300)
    halves = np.array_split(np.arange(len(labels)), 3)
    pieces = [_run(BalancedStream(balance, config, rank=rank, worker=0), rows) for rank, rows in enumerate(halves)]
    merged = Counter(row for piece in pieces for row, _ in piece)
    assert merged == Counter(row for row, _ in balanced_output)
    # Each worker's stream is about its rows' expected share.
    for piece, rows in zip(pieces, halves):
        assert abs(len(piece) - balance.expected(rows).sum()) < 4 * np.sqrt(len(rows))


def test_stream_is_deterministic_and_seeded_by_epoch_rank_and_worker(labels):
    balance = ClusterBalance(labels)
    rows = range(3000)

    def run(**kw):
        return _run(BalancedStream(balance, StreamConfig(seed=kw.pop("seed", 1), buffer_size=256), **kw), rows)

    reference = run()
    assert reference == run()
    assert reference != run(seed=2)
    assert sorted(reference) != sorted(run(epoch=1))  # other emission counts
    for other in (run(rank=1), run(worker=1)):
        assert other != reference and sorted(other) == sorted(reference)  # same multiset, other shuffle
    # The sample objects travel with their rows.
    assert all(sample == f"sample-{row}" for row, sample in reference)


def test_blocks_are_shuffled_and_bounded(labels):
    config = StreamConfig(seed=0, buffer_size=100)
    consumed = []

    def counting_source():
        for item in _source(range(1050)):
            consumed.append(item[0])
            yield item

    stream = BalancedStream(None, config)
    output = []
    for row, _ in stream(counting_source()):
        block = len(output) // 100  # without balancing every block of 100 inputs gives 100 outputs
        assert row // 100 == block  # an item never leaves its block
        assert len(consumed) <= (block + 2) * 100  # at most the current and the next block are held
        output.append(row)
    assert sorted(output) == list(range(1050))
    assert output != list(range(1050))
    # Resuming re-reads the input blocks whose copies may fall in the next output block.
    assert stream.state_dict()["block"] == 11 and stream.input_position == (11 - 4 + 1) * 100


@pytest.mark.parametrize("spread", [1, 4])
@pytest.mark.parametrize("cut", [0, 1, 137, 700, "block_end", "last", "end"])
def test_resume_reproduces_the_uninterrupted_sequence(labels, cut, spread):
    balance = ClusterBalance(labels)
    config = StreamConfig(seed=5, buffer_size=128, copy_spread=spread)
    rows = np.random.default_rng(0).permutation(2000)  # shard order need not be row order
    full = _run(BalancedStream(balance, config, epoch=2, worker=1), rows)
    first = BalancedStream(balance, config, epoch=2, worker=1)
    iterator = first(_source(rows))
    head: list[tuple[int, str]] = []
    while cut != len(head) and head != full:
        head.append(next(iterator))
        if cut == "block_end" and first.state_dict()["block"] == 2:
            break  # just after the last item of block 1: the state already points at block 2
        if cut == "last" and len(head) == len(full) - 1:
            break
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints are JSON
    if cut == "block_end":
        assert (state["block"], state["emitted"], state["input_position"]) == (2, 0, max(0, 3 - spread) * 128)
    resumed = BalancedStream(balance, config, epoch=0, worker=1)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2 and resumed.input_position == state["input_position"]
    tail = list(resumed(_source(rows[resumed.input_position :])))
    assert head + tail == full
    assert len(tail) > 0 or cut == "end"


def test_resume_at_the_end_of_the_stream_yields_nothing(labels):
    balance = ClusterBalance(labels)
    stream = BalancedStream(balance, StreamConfig(buffer_size=64))
    _run(stream, range(640))
    resumed = BalancedStream(balance, StreamConfig(buffer_size=64))
    resumed.load_state_dict(stream.state_dict())
    assert resumed.input_position == 640
    assert _run(resumed, range(640, 640)) == []


def test_load_state_dict_refuses_another_stream(labels):
    balance = ClusterBalance(labels)
    state = BalancedStream(balance, StreamConfig(seed=1)).state_dict()
    others = [
        BalancedStream(balance, StreamConfig(seed=2)),
        BalancedStream(balance, StreamConfig(seed=1), rank=1),
        BalancedStream(balance, StreamConfig(seed=1), worker=1),
        BalancedStream(balance, StreamConfig(seed=1, buffer_size=8)),
        BalancedStream(balance, StreamConfig(seed=1, copy_spread=1)),
        BalancedStream(None, StreamConfig(seed=1)),
        BalancedStream(ClusterBalance(labels, samples_per_epoch=10), StreamConfig(seed=1)),
    ]
    for stream in others:
        with pytest.raises(ValueError, match="cannot resume"):
            stream.load_state_dict(state)
    with pytest.raises(ValueError, match="not a"):
        BalancedStream(balance, StreamConfig(seed=1)).load_state_dict({"format": "other"})


def test_unlabelled_rows_are_never_emitted_and_empty_clusters_ignored():
    labels = np.array([-1, 0, 0, 0, 5, -1, 5, 0])  # clusters 1..4 are empty
    balance = ClusterBalance(labels, samples_per_epoch=8)
    assert balance.num_nonempty == 2 and balance.num_labelled == 6
    assert balance.rates[0] == pytest.approx(8 / (2 * 4)) and balance.rates[5] == pytest.approx(2.0)
    output = _run(BalancedStream(balance, StreamConfig(buffer_size=3)), range(8))
    assert Counter(row for row, _ in output) == {4: 2, 6: 2, 1: 1, 2: 1, 3: 1, 7: 1}
    with pytest.raises(ValueError, match="rows must be in"):
        balance.expected(np.array([8]))
    with pytest.raises(ValueError, match="no labelled row"):
        ClusterBalance(np.array([-1, -1]))
    with pytest.raises(ValueError, match="integer"):
        ClusterBalance(np.zeros(3))


def test_config_and_seed_helpers():
    with pytest.raises(ValueError, match="buffer_size"):
        StreamConfig(buffer_size=0)
    with pytest.raises(ValueError, match="seed"):
        StreamConfig(seed=-1)
    assert stream_rng(1, 2, 3).integers(1 << 30) == stream_rng(1, 2, 3).integers(1 << 30)
    assert stream_rng(1, 2, 3).integers(1 << 30) != stream_rng(1, 3, 2).integers(1 << 30)
    draw = torch.rand(3, generator=torch_generator(4, 1))
    assert torch.equal(draw, torch.rand(3, generator=torch_generator(4, 1)))
    assert not torch.equal(draw, torch.rand(3, generator=torch_generator(4, 2)))


def _copy_gaps(output: list[tuple[int, str]]) -> np.ndarray:
    """Distances (in stream positions) between consecutive copies of the same row."""
    positions: dict[int, list[int]] = {}
    for position, (row, _) in enumerate(output):
        positions.setdefault(row, []).append(position)
    return np.concatenate([np.diff(p) for p in positions.values() if len(p) > 1])


def test_copies_of_small_clusters_are_spread_over_several_blocks(labels):
    """The balanced stream's repeats of one row are spread over ``copy_spread`` blocks: with the default (4),
    consecutive copies are over 4 times further apart than with all copies in the block the row was read in,
    and less than half as often within one batch of 64."""
    balance = ClusterBalance(labels)

    def output(spread: int) -> list[tuple[int, str]]:
        return _run(BalancedStream(balance, StreamConfig(seed=11, buffer_size=512, copy_spread=spread)),
                    range(len(labels)))

    bunched, spread = _copy_gaps(output(1)), _copy_gaps(output(StreamConfig().copy_spread))
    assert np.median(spread) > 4 * np.median(bunched)
    assert np.mean(spread < 64) < 0.5 * np.mean(bunched < 64)
    assert Counter(row for row, _ in output(1)) == Counter(row for row, _ in output(4))  # the same multiset
