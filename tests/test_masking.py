import pytest
import torch
from torch import nn

from pipeline.nn.layers import prunable_layers
from pipeline.pruning.masking import (
    apply_masks,
    magnitude_mask,
    magnitude_masks,
    mask_pruning,
    masks_from_zeros,
    pruned_count,
    zero_count,
)


@pytest.mark.parametrize("numel", [1, 7, 10, 101, 1000])
@pytest.mark.parametrize("sparsity", [0.0, 0.013, 0.25, 0.5, 0.77, 0.999, 1.0])
def test_mask_zeroes_exactly_the_rounded_count(numel, sparsity):
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    mask = magnitude_mask(weight, sparsity)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert int((~mask).sum()) == round(sparsity * numel + 1e-12) == pruned_count(numel, sparsity)


def test_mask_drops_smallest_magnitudes():
    weight = torch.tensor([[0.5, -3.0, 0.1], [-0.2, 2.0, -0.05]])
    mask = magnitude_mask(weight, 0.5)
    assert mask.tolist() == [[True, True, False], [False, True, False]]


def test_ties_are_broken_by_index_and_count_stays_exact():
    weight = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 2.0])
    mask = magnitude_mask(weight, 0.5)  # 3 of the five tied 1.0s go, lowest indices first
    assert mask.tolist() == [False, False, False, True, True, True]
    assert torch.equal(mask, magnitude_mask(weight.clone(), 0.5))


def test_larger_counts_drop_supersets():
    weight = torch.randn(50, generator=torch.Generator().manual_seed(0))
    masks = [mask_pruning(weight, k) for k in range(51)]
    assert all((a >= b).all() for a, b in zip(masks, masks[1:], strict=False))


def test_sparsity_zero_and_one():
    weight = torch.randn(4, 3, 3, 3)
    assert magnitude_mask(weight, 0.0).all()
    assert not magnitude_mask(weight, 1.0).any()


def test_pruned_count_rounds_half_up_and_clamps():
    assert pruned_count(10, 0.25) == 3  # 2.5 -> 3
    assert pruned_count(10, 0.24) == 2
    assert pruned_count(3, 1.0) == 3
    assert pruned_count(3, 0.0) == 0


def test_apply_masks_and_recover_them_from_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))
    names = [name for name, _ in prunable_layers(model)]
    assert names == ["0", "3"]
    masks = magnitude_masks(model, {"0": 36, "3": 9})  # kept weights
    apply_masks(model, masks)
    recovered = masks_from_zeros(model)
    assert all(torch.equal(recovered[n], masks[n]) for n in names)
    assert zero_count(model) == (36 + 3, 72 + 12)
