"""Heads and losses: Eq. 5 against a per-sample reference, the three sub-class strategies, targets helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    SUB_STRATEGIES,
    ClusterHead,
    HierarchicalHead,
    RotationHead,
    local_sub_targets,
    rotation_sub_counts,
    super_targets,
)

SUB_COUNTS = [3, 1, 7, 2, 5, 5, 4, 6]  # uneven on purpose: the padded strategies must mask correctly


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(counts: list[int], batch: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, generator=generator)
    supers = torch.randint(0, len(counts), (batch,), generator=generator)
    highs = torch.tensor(counts)[supers]
    subs = (torch.rand(batch, generator=generator) * highs).long()
    return features, supers, subs


def _reference_loss(head: HierarchicalHead, features, supers, subs) -> torch.Tensor:
    """Eq. 5 written literally: one sample at a time, the sub-class term only for the sample's super-class."""
    offsets = np.concatenate([[0], np.cumsum(head.sub_counts)])
    total = features.new_zeros(())
    for n in range(features.shape[0]):
        s = int(supers[n])
        super_logits = head.super_classifier(features[n : n + 1])
        weight = head.sub_weight[offsets[s] : offsets[s + 1]]
        bias = head.sub_bias[offsets[s] : offsets[s + 1]]
        sub_logits = F.linear(features[n : n + 1], weight, bias)
        total = total + F.cross_entropy(super_logits, supers[n : n + 1]) + F.cross_entropy(sub_logits, subs[n : n + 1])
    return total / features.shape[0]


def _gradients(head: HierarchicalHead, loss: torch.Tensor, features: torch.Tensor) -> list[torch.Tensor]:
    params = [features, head.super_classifier.weight, head.super_classifier.bias, head.sub_weight, head.sub_bias]
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("strategy", SUB_STRATEGIES)
def test_hierarchical_loss_matches_per_sample_reference(strategy):
    head = HierarchicalHead(6, SUB_COUNTS, strategy=strategy, generator=torch.Generator().manual_seed(1))
    features, supers, subs = _batch(SUB_COUNTS, 40, 6)
    features.requires_grad_(True)
    loss, stats = head(features, supers, subs)
    expected = _reference_loss(head, features, supers, subs)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["loss_super"] + stats["loss_sub"], expected.detach())
    for got, want in zip(_gradients(head, loss, features), _gradients(head, expected, features)):
        torch.testing.assert_close(got, want)


def test_strategies_agree_on_loss_stats_and_gradients():
    features, supers, subs = _batch(SUB_COUNTS, 64, 5, seed=3)
    results = []
    for strategy in SUB_STRATEGIES:
        head = HierarchicalHead(5, SUB_COUNTS, strategy=strategy, generator=torch.Generator().manual_seed(7))
        loss, stats = head(features, supers, subs)
        loss.backward()
        results.append((loss.detach(), stats, head.sub_weight.grad, head.super_classifier.weight.grad))
    for loss, stats, sub_grad, super_grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(sub_grad, results[0][2])
        torch.testing.assert_close(super_grad, results[0][3])
        assert stats.keys() == results[0][1].keys()
        for key in stats:
            torch.testing.assert_close(stats[key], results[0][1][key])


@pytest.mark.parametrize("strategy", SUB_STRATEGIES)
def test_a_sample_only_trains_its_own_super_class(strategy):
    head = HierarchicalHead(4, SUB_COUNTS, strategy=strategy, generator=torch.Generator().manual_seed(0))
    features = torch.randn(3, 4)
    supers = torch.tensor([2, 2, 5])
    loss, _ = head(features, supers, torch.tensor([6, 0, 4]))
    loss.backward()
    offsets = np.concatenate([[0], np.cumsum(SUB_COUNTS)])
    touched = head.sub_weight.grad.abs().sum(dim=1) > 0
    expected = torch.zeros_like(touched)
    for s in (2, 5):
        expected[offsets[s] : offsets[s + 1]] = True
    assert torch.equal(touched, expected)
    assert torch.all(head.sub_bias.grad[~expected] == 0)


def test_hierarchical_stats_decompose_the_super_class():
    # Features one-hot on the super-class the head should predict; V = identity makes that the argmax.
    counts = [2] * 8  # m = 2 level-1 clusters x 4 rotations
    head = HierarchicalHead(8, counts, strategy="grouped")
    with torch.no_grad():
        head.super_classifier.weight.copy_(torch.eye(8))
        head.super_classifier.bias.zero_()
        head.sub_weight.zero_()
        head.sub_weight[0::2, :] = 1.0  # every sub-classifier predicts local class 0
    targets = torch.tensor([0, 5, 6, 3])
    predicted = torch.tensor([0, 6, 2, 7])  # exact; cluster right/rotation wrong; rotation right; rotation right
    features = F.one_hot(predicted, 8).float() * 10
    _, stats = head(features, targets, torch.tensor([0, 0, 1, 1]))
    assert stats["super_acc"].item() == pytest.approx(0.25)
    assert stats["cluster_acc"].item() == pytest.approx(0.5)  # 0 // 4 == 0 // 4, 6 // 4 == 5 // 4
    assert stats["rotation_acc"].item() == pytest.approx(0.75)  # 0, 2 % 4 == 6 % 4, 7 % 4 == 3 % 4
    assert stats["sub_acc"].item() == pytest.approx(0.5)
    assert all(not value.requires_grad for value in stats.values())


def test_hierarchical_head_fits_separable_data():
    torch.manual_seed(0)
    counts = rotation_sub_counts([3, 2])  # m = 2 clusters with 3 and 2 sub-clusters
    head = HierarchicalHead(16, counts, generator=torch.Generator().manual_seed(0))
    supers = torch.arange(len(counts)).repeat_interleave(12)
    subs = torch.cat([torch.arange(12) % counts[s] for s in range(len(counts))])
    codes = torch.randn(len(counts), 16) * 3
    features = codes[supers] + torch.randn(len(supers), 16) * 0.1
    features = features + torch.randn(8, 16)[subs]  # sub-class offsets shared across super-classes
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        loss, stats = head(features, supers, subs)
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    assert stats["super_acc"].item() == 1.0 and stats["sub_acc"].item() == 1.0


def test_hierarchical_rejects_bad_targets():
    head = HierarchicalHead(4, [2, 3])
    features = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="sub-target 2 >= k_s=2"):
        head(features, torch.tensor([1, 0]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="super_targets must be in"):
        head(features, torch.tensor([0, 2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="features must be"):
        head(torch.zeros(2, 5), torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(TypeError):
        head(features, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="sub_counts"):
        HierarchicalHead(4, [2, 0])
    with pytest.raises(ValueError, match="strategy"):
        HierarchicalHead(4, [2], strategy="loop")


def test_reinitialize_replaces_parameters_deterministically():
    head = HierarchicalHead(4, [2, 3], generator=torch.Generator().manual_seed(5))
    old = head.sub_weight
    head.reinitialize([4, 1, 1, 6], generator=torch.Generator().manual_seed(5))
    assert head.sub_weight is not old
    assert head.sub_weight.shape == (12, 4) and head.super_classifier.out_features == 4
    assert head.num_super == 4 and head.sub_sizes.tolist() == [4, 1, 1, 6]
    twin = HierarchicalHead(4, [4, 1, 1, 6], generator=torch.Generator().manual_seed(5))
    for mine, theirs in zip(head.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(mine, theirs)
    loss, _ = head(torch.randn(3, 4), torch.tensor([3, 0, 1]), torch.tensor([5, 3, 0]))
    assert torch.isfinite(loss)
    assert set(head.state_dict()) == {"super_classifier.weight", "super_classifier.bias", "sub_weight", "sub_bias"}


def test_rotation_and_cluster_heads():
    features = torch.randn(10, 6)
    rotations = torch.randint(0, 4, (10,))
    head = RotationHead(6, generator=torch.Generator().manual_seed(0))
    loss, stats = head(features, rotations)
    logits = head.classifier(features)
    torch.testing.assert_close(loss, F.cross_entropy(logits, rotations))
    assert stats["rotation_acc"].item() == pytest.approx((logits.argmax(1) == rotations).float().mean().item())

    clusters = ClusterHead(6, 9)
    targets = torch.randint(0, 9, (10,))
    loss, stats = clusters(features, targets)
    torch.testing.assert_close(loss, F.cross_entropy(clusters.classifier(features), targets))
    assert set(stats) == {"loss", "cluster_acc"}
    clusters.reinitialize(3)
    assert clusters.classifier.out_features == 3
    with pytest.raises(ValueError, match="targets must be in"):
        clusters(features, targets.clamp(min=3))
    with pytest.raises(ValueError, match="rotations must be in"):
        head(features, rotations + 4)


def test_local_sub_targets_contiguous_layout():
    group_offsets = np.array([0, 3, 4, 9])
    cluster_parents = np.repeat(np.arange(3), np.diff(group_offsets))
    level2 = np.array([0, 2, 3, 8, 4, 5])
    targets = local_sub_targets(level2, cluster_parents)
    assert targets.parents.tolist() == [0, 0, 1, 2, 2, 2]
    assert targets.local.tolist() == (level2 - group_offsets[targets.parents]).tolist()
    assert targets.counts.tolist() == [3, 1, 5]


def test_local_sub_targets_any_layout_matches_a_dict_reference():
    rng = np.random.default_rng(0)
    cluster_parents = rng.integers(0, 5, 40)
    cluster_parents[:5] = np.arange(5)  # every parent has a child
    level2 = rng.integers(0, 40, 300)
    targets = local_sub_targets(level2, cluster_parents, num_parents=6)
    children: dict[int, list[int]] = {}
    for cluster, parent in enumerate(cluster_parents):
        children.setdefault(int(parent), []).append(cluster)
    expected = [children[int(cluster_parents[z])].index(int(z)) for z in level2]
    assert targets.local.tolist() == expected
    assert targets.counts.tolist() == [len(children.get(p, [])) for p in range(6)]
    with pytest.raises(ValueError, match="level-2 ids"):
        local_sub_targets(np.array([40]), cluster_parents)
    with pytest.raises(ValueError, match="num_parents"):
        local_sub_targets(level2, cluster_parents, num_parents=3)


def test_super_targets_and_rotation_counts():
    parents = torch.tensor([0, 1, 2, 1])
    rotations = torch.tensor([3, 0, 2, 1])
    assert super_targets(parents, rotations).tolist() == [3, 4, 10, 5]
    assert rotation_sub_counts([2, 5]) == [2, 2, 2, 2, 5, 5, 5, 5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", SUB_STRATEGIES)
def test_hierarchical_head_on_cuda_matches_cpu(strategy):
    features, supers, subs = _batch(SUB_COUNTS, 32, 6)
    head = HierarchicalHead(6, SUB_COUNTS, strategy=strategy, generator=torch.Generator().manual_seed(2))
    expected, _ = head(features, supers, subs)
    head.cuda()
    head.reinitialize(SUB_COUNTS, generator=torch.Generator().manual_seed(2))  # stays on the device
    assert head.sub_weight.is_cuda and head.sub_offsets.is_cuda
    loss, stats = head(features.cuda(), supers.cuda(), subs.cuda())
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-4, atol=1e-5)
    assert stats["sub_acc"].is_cuda
