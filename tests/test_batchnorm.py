"""BatchNorm recalibration rules: hand-checked formulas and whole-model behaviour."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.nn.layers import prunable_numel
from pipeline.pruning.batchnorm import (
    BN_RULES,
    batchnorms,
    input_moments,
    recalibrate_bn,
    relative_stats,
)
from pipeline.pruning.masking import apply_masks, magnitude_masks
from tests.models_zoo import TinyResNet, randomized


def bn_with(mean, var, eps=1e-5):
    bn = nn.BatchNorm1d(len(mean), eps=eps).eval()
    bn.running_mean.copy_(torch.tensor(mean))
    bn.running_var.copy_(torch.tensor(var))
    return bn


def test_relative_stats_by_hand():
    # mu = 1, sigma^2 = 4; dense input N(3, 1), pruned input N(2, 0.25): r = 0.5
    bn = bn_with([1.0], [4.0], eps=0.0)
    mean, var = relative_stats(
        bn, (torch.tensor([3.0]), torch.tensor([1.0])), (torch.tensor([2.0]), torch.tensor([0.25]))
    )
    # mu' = 2 - 0.5 * (3 - 1) = 1, sigma'^2 = 0.25 * 4 = 1
    assert mean.item() == pytest.approx(1.0) and var.item() == pytest.approx(1.0)


def test_relative_stats_restore_the_dense_normalised_moments():
    gen = torch.Generator().manual_seed(0)
    bn = bn_with(
        torch.randn(5, generator=gen).tolist(), (torch.rand(5, generator=gen) + 0.5).tolist()
    )
    dense = torch.randn(4000, 5, generator=gen) * 2 + 1
    pruned = torch.randn(4000, 5, generator=gen) * 0.7 - 0.3
    moments = [(x.mean(0), x.var(0, unbiased=False)) for x in (dense, pruned)]
    before = bn(dense)
    bn.running_mean, bn.running_var = relative_stats(bn, *moments)
    after = bn(pruned)
    torch.testing.assert_close(after.mean(0), before.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after.var(0), before.var(0), atol=1e-4, rtol=1e-4)


def test_equal_moments_leave_the_statistics_unchanged():
    bn = bn_with([0.5, -1.0], [2.0, 0.1])
    m = (torch.tensor([3.0, 1.0]), torch.tensor([0.5, 0.0]))  # a dead channel too
    mean, var = relative_stats(bn, m, m)
    torch.testing.assert_close(mean, bn.running_mean)
    torch.testing.assert_close(var, bn.running_var)


def pruned_pair(seed=0):
    dense = randomized(TinyResNet(), seed=seed)
    model = copy.deepcopy(dense)
    apply_masks(
        model, magnitude_masks(model, {n: k // 3 for n, k in prunable_numel(model).items()})
    )
    return dense, model


def test_relative_recalibration_of_the_dense_model_changes_nothing():
    dense, _ = pruned_pair()
    model = copy.deepcopy(dense)
    x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 + 1
    assert recalibrate_bn(model, dense, x, batch_size=16, mode="relative") == 6
    for a, b in zip(batchnorms(model), batchnorms(dense), strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.running_var, b.running_var, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", sorted(BN_RULES))
def test_every_batchnorm_ends_up_set_from_what_the_final_model_feeds_it(mode):
    """After recalibration, each BN's statistics follow from its input moments in the final
    (recalibrated) model, whatever the batching: B sequential, early-stopped passes."""
    dense, model = pruned_pair(seed=1)
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 3 - 1
    before = input_moments(dense, batchnorms(dense), x, batch_size=40)
    recalibrate_bn(model, dense, x, batch_size=7, mode=mode)
    after = input_moments(model, batchnorms(model), x, batch_size=40)
    for bn, bn_dense, d, p in zip(batchnorms(model), batchnorms(dense), before, after, strict=True):
        want = BN_RULES[mode](bn_dense, d, p)
        torch.testing.assert_close(bn.running_mean, want[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bn.running_var, want[1], atol=1e-4, rtol=1e-4)
    assert not model.training


def test_absolute_recalibration_equals_the_data_statistics():
    dense, model = pruned_pair(seed=2)
    x = torch.randn(64, 3, 8, 8) * 3 + 1
    recalibrate_bn(model, dense, x, batch_size=64, mode="absolute")
    conv_out = model.stem(x)
    np.testing.assert_allclose(
        model.bn.running_mean, conv_out.mean((0, 2, 3)).detach(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        model.bn.running_var, conv_out.var((0, 2, 3), unbiased=False).detach(), rtol=1e-4, atol=1e-5
    )
