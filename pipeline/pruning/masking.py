"""Magnitude masks. A mask is a bool tensor shaped like the weight, True = keep."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from pipeline.nn.layers import prunable_layers


def pruned_count(numel: int, sparsity: float) -> int:
    """Number of weights zeroed at ``sparsity``: round(sparsity * numel), halves rounded up."""
    return min(numel, max(0, math.floor(sparsity * numel + 0.5)))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``pruned_count(numel, sparsity)`` smallest-magnitude weights."""
    return mask_pruning(weight, pruned_count(weight.numel(), sparsity))


def mask_pruning(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Mask dropping the ``k`` smallest-magnitude weights.

    Ties are broken by flat index (a stable sort), so the zero count is always exact, the same
    weight tensor always gives the same mask, and a larger k drops a superset (masks only grow).
    """
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if k:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        mask[order[:k]] = False
    return mask.view_as(weight)


def magnitude_masks(model: nn.Module, kept: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``{layer: mask keeping its kept[layer] largest-magnitude weights}``."""
    modules = dict(model.named_modules())
    return {
        name: mask_pruning(modules[name].weight, modules[name].weight.numel() - int(k))
        for name, k in kept.items()
    }


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the weights that ``masks`` (layer name -> mask) drop, in place."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        # +0.0 where dropped (a product would leave -0.0 for negative weights)
        weight.masked_fill_(~mask.to(device=weight.device, dtype=torch.bool), 0.0)


def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of a pruned model: a weight is kept when it is non-zero."""
    return {name: m.weight.detach() != 0 for name, m in prunable_layers(model)}


def zero_count(model: nn.Module) -> tuple[int, int]:
    """(zero weights, all weights) over the prunable layers."""
    zeros = total = 0
    for _, m in prunable_layers(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros, total
