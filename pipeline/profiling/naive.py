"""The naive profiling engine: a full forward pass of the model per sparsity level, and the
per-level weights both engines prune the layer to.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from pipeline.nn.device import (
    model_device,
    precision,
)
from pipeline.nn.evaluation import per_sample_distortion, predict_logits
from pipeline.profiling.suffix import consumer_batchnorm
from pipeline.pruning.batchnorm import BN_RULES, input_moments, set_running_stats
from pipeline.pruning.masking import pruned_count
from pipeline.pruning.patches import (
    Candidate,
    PatchMoments,
    candidate_params,
    layer_patch_moments,
)
from pipeline.pruning.repair import (
    augmented_weight,
    candidate_rows,
    damped_gram,
    equations_solution,
    equations_solutions,
    moment_equations,
)

log = logging.getLogger(__name__)


def grid_counts(weight: torch.Tensor, sparsities: np.ndarray, of_remaining: bool) -> list[int]:
    """Weights zeroed per level. ``of_remaining``: a level's sparsity is the fraction of the
    layer's non-zero weights pruned, on top of its zeros (an iterative round's grid)."""
    zeros = int((weight == 0).sum()) if of_remaining else 0
    return [zeros + pruned_count(weight.numel() - zeros, float(s)) for s in sparsities]


class LevelWeights:
    """The layer's parameters at each level j: its weight with the ``counts[j]`` smallest
    magnitudes zeroed (the tie-break of ``mask_pruning``) and, with ``repair`` (the layer's
    input moments and the damping), the kept weights and the bias re-solved to reproduce the
    layer's output (repair.py, layer-wise: the layer's input is the dense one). Kept once built
    while they fit in ``budget`` bytes, so that they are not rebuilt for every batch; with
    repair, ``prepare`` solves a block of levels from one factorisation per output row."""

    def __init__(
        self,
        module: nn.Module,
        counts: list[int],
        budget: int,
        repair: tuple[PatchMoments, float] | None = None,
    ) -> None:
        self.module, self.counts = module, counts
        self.weight = module.weight.detach()
        self.order = torch.argsort(self.weight.abs().flatten(), stable=True)
        self.cache: dict[int, Candidate] = {}
        self.equations = moment_equations(repair[0]) if repair is not None else None
        self.damping = repair[1] if repair is not None else 0.0
        self.anchor = augmented_weight(module) if repair is not None else None
        # one factorisation of the layer's input statistics for every level
        self.damped = (
            damped_gram(module, self.equations, self.damping) if repair is not None else None
        )
        self.keep = budget // self.bytes

    def prepare(self, levels: list[int], budget: int) -> None:
        """With repair, solve ``levels`` from one factorisation per output row where it fits
        in ``budget`` bytes (``ridge.nested_solve``: the same bits for a level whatever other
        levels come with it) and keep them beyond the cache's budget; otherwise each level is
        solved when first asked for."""
        if self.equations is None or not levels:
            return
        rank = torch.empty_like(self.order)
        rank[self.order] = torch.arange(len(self.order), device=self.order.device)
        solved = equations_solutions(
            self.module,
            self.equations,
            rank.view_as(self.weight),
            [self.counts[j] for j in levels],
            self.damped,
            self.anchor,
            budget,
        )
        for m, rows in solved.items():
            self.cache[levels[m]] = candidate_rows(self.module, rows)

    @property
    def bytes(self) -> int:
        """Bytes of one level's parameters (the weight; a repaired bias is negligible)."""
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, j: int) -> Candidate:
        if j in self.cache:
            return self.cache[j]
        keep = torch.ones(self.weight.numel(), dtype=torch.bool, device=self.weight.device)
        keep[self.order[: self.counts[j]]] = False  # mask_pruning's mask, from the one sort
        keep = keep.view_as(self.weight)
        pruned: Candidate = self.weight * keep
        if self.equations is not None:
            rows = equations_solution(
                self.module,
                self.equations,
                keep,
                self.damping,
                dense=self.anchor,
                damped=self.damped,
            )
            pruned = candidate_rows(self.module, rows)
        if len(self.cache) < self.keep:
            self.cache[j] = pruned
        return pruned


def set_params(module: nn.Module, candidate: Candidate) -> None:
    for name, value in candidate_params(candidate).items():
        getattr(module, name).copy_(value)


@torch.no_grad()
def profile_naive(
    layer: str,
    model: nn.Module,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    sparsities: np.ndarray,
    batch_size: int,
    memory_mb: int,
    bn_correction: str | None = None,
    of_remaining: bool = False,
    repair: float | None = None,
    precision_name: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's algorithm: one full forward pass of the calibration set per level. With
    ``bn_correction`` or ``repair``, the moments of the layer's input are measured first (one
    pass up to the layer for all levels; for layers ``PatchMoments`` does not cover, what the
    BatchNorm receives is measured by a pass up to it per level). Runs on the model's device."""
    device = model_device(model)
    inputs, reference = inputs.to(device), reference.to(device)  # once, not per level
    modules = dict(model.named_modules())
    module = modules[layer]
    saved_params = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
    original = saved_params["weight"]
    bn_name = consumer_batchnorm(model, layer) if bn_correction else None
    bn = modules[bn_name] if bn_name else None
    saved = (bn.running_mean.clone(), bn.running_var.clone()) if bn is not None else None
    # What the BN receives is the layer's output, a function of its (unchanged) input: one
    # pass over the input gives exact moments for every level (see PatchMoments), the same
    # computation as the fast engine's. Other layers: one more pass per level, up to the BN.
    patches = (
        layer_patch_moments(
            model, module, inputs, batch_size, memory_mb << 20, for_bn=repair is None
        )
        if bn is not None or repair is not None
        else None
    )
    if repair is not None and patches is None:
        # never called as a module (an attention block's out_proj): its input cannot be seen,
        # so the prune stage's walk cannot repair it either; its curve is the plain one
        log.info(
            "profile layer %s: not repaired (its input cannot be seen: the model applies it "
            "without calling it, or it is a subclass the repair does not cover)",
            layer,
        )
        repair = None
    bn_patches = patches if patches is not None and patches.channel_moments else None
    if bn is None:
        dense = None
    elif bn_patches is not None:
        (dense,) = bn_patches.stats([original])
    else:
        dense = input_moments(model, [bn], inputs, batch_size)[0]
    counts = grid_counts(original, sparsities, of_remaining)
    levels = LevelWeights(module, counts, 0, (patches, repair) if repair is not None else None)
    means, maxes = np.zeros(len(sparsities)), np.zeros(len(sparsities))
    zeros = int((original == 0).sum())
    # only zeros pruned: the network is unchanged, distortion 0; with repair, the levels are
    # solved in blocks whose parameters fit in profile.memory_mb, as the fast engine's
    todo = [j for j, k in enumerate(counts) if k > zeros]
    group = max(1, (memory_mb << 20) // levels.bytes)
    try:
        for i, j in enumerate(todo):
            if i % group == 0:
                levels.cache.clear()
                levels.prepare(todo[i : i + group], memory_mb << 20)
            candidate = levels(j)
            set_params(module, candidate)
            if bn is not None:
                # the rule reads the dense statistics; what the BN receives does not
                set_running_stats(bn, saved)
                if bn_patches is not None:
                    (pruned,) = bn_patches.stats([candidate])
                else:
                    pruned = input_moments(model, [bn], inputs, batch_size)[0]
                set_running_stats(bn, BN_RULES[bn_correction](bn, dense, pruned))
            with precision(precision_name, device):
                logits = predict_logits(model, inputs, batch_size)
            d = per_sample_distortion(logits, reference)
            means[j], maxes[j] = float(d.mean()), float(d.max())
    finally:
        set_params(module, saved_params)
        if bn is not None:
            set_running_stats(bn, saved)
    return means, maxes
