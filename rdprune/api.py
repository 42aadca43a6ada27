"""The functions ``rdprune`` exports: the pipeline's stages as calls on a model in memory."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.allocation.methods import ALLOCATORS
from pipeline.allocation.methods import allocate as _allocate
from pipeline.allocation.problem import Allocation, Problem, layer_bounds
from pipeline.config.sections import ProfileParams
from pipeline.edges.export import load_compact
from pipeline.edges.export import save_compact as _save_compact
from pipeline.nn.evaluation import predict_logits
from pipeline.nn.layers import macs_per_weight, prunable_layers, prunable_numel
from pipeline.profiling.distortion import DistortionCurves, profile_layer, sparsity_grid
from pipeline.pruning.masking import apply_masks, magnitude_masks
from pipeline.pruning.repair import OBJECTIVES, Recovery

__all__ = ["allocate", "load_compact", "profile", "prune", "save_compact"]


def profile(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    levels: int = 41,
    batch_size: int = 32,
    bn_correction: bool = True,
    reconstruct: float | None = 0.01,
    engine: str = "fast",
    memory_mb: int = 64,
    precision: str = "fp32",
) -> DistortionCurves:
    """Every prunable layer's distortion curve: the mean (and max) squared logit error over
    ``inputs`` (N, ...) when that layer alone is pruned by magnitude to each of ``levels``
    sparsities 0, 1/(levels-1), ..., 1.

    ``bn_correction``: each level sets the BatchNorm after the layer as ``prune`` will
    (relative rule); ``reconstruct``: the damping of the per-layer repair ``prune`` applies
    (None: the paper's plain curves). The model is left unchanged and runs where it is.
    """
    ProfileParams(
        levels=levels,
        batch_size=batch_size,
        engine=engine,
        memory_mb=memory_mb,
        precision=precision,
    ).validate()
    if not torch.is_tensor(inputs) or inputs.dim() < 2 or len(inputs) == 0:
        raise ValueError("profile: inputs must be a non-empty (N, ...) torch tensor")
    if not prunable_numel(model):
        raise ValueError("profile: the model has no prunable layer (Conv1d/2d/3d or Linear)")
    model.eval()
    inputs = inputs.to(next(model.parameters()).device)
    reference = predict_logits(model, inputs, batch_size)
    grid = sparsity_grid(levels)
    numel = prunable_numel(model)
    per_layer = [
        profile_layer(
            name,
            model=model,
            inputs=inputs,
            reference=reference,
            sparsities=grid,
            batch_size=batch_size,
            threads=torch.get_num_threads(),
            engine=engine,
            memory_mb=memory_mb,
            bn_correction="relative" if bn_correction else None,
            repair=reconstruct,
            precision=precision,
        )
        for name in numel
    ]
    curves = DistortionCurves.from_profiles(
        numel, grid, per_layer, macs_per_weight(model, inputs[:1])
    )
    curves.check()
    return curves


def allocate(
    curves: DistortionCurves,
    ratio: float,
    *,
    method: str = "rd",
    model: nn.Module | None = None,
    budget: str = "params",
    distortion: str = "mean",
    limits: Mapping[str, Sequence[float]] | None = None,
    exclude: Sequence[str] = (),
) -> Allocation:
    """Per-layer kept weights removing ``ratio`` of the prunable weights (``budget``
    "params") or of their multiply-accumulates ("flops"): ``method`` "rd" solves the
    multiple-choice knapsack on ``curves`` exactly; "global", "lamp", "erk", "uniform",
    "uniform_plus" are the baselines (they read ``model``'s weights). ``limits``: layer glob
    -> [min, max] sparsity; ``exclude``: globs kept dense. ``.sparsity``, ``.kept_by_layer``
    and ``.summary()`` describe the result."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ValueError(f"ratio = {ratio!r}; allowed: a number in [0, 1)")
    if method not in ALLOCATORS:
        raise ValueError(f"method = {method!r}; allowed: {', '.join(sorted(ALLOCATORS))}")
    if budget not in ("params", "flops"):
        raise ValueError(f"budget = {budget!r}; allowed: params, flops")
    lo, hi = layer_bounds(curves.layers, dict(limits or {}), list(exclude))
    weights = None
    if model is not None:
        weights = {name: m.weight.detach() for name, m in prunable_layers(model)}
    problem = Problem(
        curves=curves,
        kind=distortion,
        targets={budget: float(ratio)},
        lo=lo,
        hi=hi,
        magnitudes=[weights[n].abs().flatten().cpu().numpy() for n in curves.layers]
        if weights
        else None,
        shapes=[tuple(weights[n].shape) for n in curves.layers] if weights else None,
    )
    if method != "rd" and weights is None:
        raise ValueError(f"allocate(method={method!r}) reads the weights: pass model=")
    return _allocate(method, problem)


def prune(
    model: nn.Module,
    allocation: Allocation,
    inputs: torch.Tensor | None = None,
    *,
    reconstruct: str | None = "output",
    damping: float = 0.01,
    bn_recalibration: str | None = "relative",
    batch_size: int = 128,
) -> nn.Module:
    """Prune ``model`` in place to ``allocation`` (each layer's smallest magnitudes zeroed)
    and recover as the prune stage does, on ``inputs`` (N, ...): ``reconstruct`` "output"
    re-solves each layer's kept weights to match the dense network's layer output
    ("layerwise": the dense weights on the pruned input; None: no repair), BatchNorm
    statistics set by ``bn_recalibration`` ("relative", "absolute", None). Returns the model.
    Fine-tune it with its zeros fixed by multiplying each weight's gradient by ``w != 0``."""
    if reconstruct is not None and reconstruct not in OBJECTIVES:
        raise ValueError(f"reconstruct = {reconstruct!r}; allowed: {', '.join(OBJECTIVES)}, None")
    allocation.check_matches(prunable_numel(model), "the allocation")
    recover = Recovery(bn_recalibration, reconstruct, damping, batch_size)
    if recover.active and inputs is None:
        raise ValueError("prune: the repair and BatchNorm recalibration need inputs (N, ...)")
    dense = copy.deepcopy(model) if recover.active else None
    masks = magnitude_masks(model, allocation.kept_by_layer)
    apply_masks(model, masks)
    if recover.active:
        recover(model, dense, masks, inputs.to(next(model.parameters()).device))
    return model.eval()


def save_compact(path: str | Path, model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Write ``model``'s state_dict with each prunable weight as a packed bit mask plus its
    non-zero values (``dtype``: cast them, e.g. torch.float16); returns the file's bytes.
    ``load_compact(path)`` gives the state_dict back."""
    names = [f"{name}.weight" for name in prunable_numel(model)]
    return _save_compact(Path(path), model.state_dict(), names, dtype)
